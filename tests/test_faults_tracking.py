"""A tracking server that is away: at start (exit 2, or journalled with --tracking-optional), and
stopped and restarted in the middle of a batch (journalled, replayed, the run ends complete)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import _wait_healthy, free_port
from test_faults import _bundle, _check_consistent, _scans

from medseg import faults
from medseg.tracking.journal import JOURNAL_FILE


@contextlib.contextmanager
def _server(db: Path, artifacts: Path, port: int, log: Path) -> Iterator[str]:
    """A SQLite-backed ``mlflow server`` on 127.0.0.1:port (the same port on every start)."""
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{db}"]
    cmd += ["--artifacts-destination", artifacts.as_uri()]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(url, proc, log, 120)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the server goes away as in a crash
        proc.wait(timeout=30)


def _run(db: Path) -> dict:
    """The one predict run in the server's database, with its metrics' last values and steps."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "scans_done")]
    return {
        "status": run.info.status,
        "metrics": run.data.metrics,
        "steps": sorted(steps),
        "id": run.info.run_id,
    }


def _predict(src: Path, out: Path, bundle: Path, url: str, *extra: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "medseg.cli", "predict", str(src), str(out), "--model", str(bundle)]
    cmd += ["--export", "none", "--parallel-scans", "1", *extra]
    full = {**os.environ, "MLFLOW_TRACKING_URI": url, "NO_PROXY": "127.0.0.1,localhost", **(env or {})}
    return cmd, full


@pytest.mark.slow
def test_unreachable_at_start_exits_2_or_journals_with_tracking_optional_then_syncs(tmp_path: Path) -> None:
    expected = _scans(tmp_path / "in", 2)
    bundle = _bundle(tmp_path / "b")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = _predict(tmp_path / "in", tmp_path / "out", bundle, url)
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "tracking store must be reachable when a batch starts" in refused.stderr
    assert "--tracking-optional" in refused.stderr
    done = subprocess.run(
        [*cmd, "--tracking-optional"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _check_consistent(tmp_path / "out", expected) == 2
    journal = tmp_path / "out" / JOURNAL_FILE
    ops = [json.loads(line)["op"] for line in journal.read_text().splitlines()]
    assert ops[0] == "create"
    assert ops[-1] == "end"
    assert f"medseg track sync {tmp_path / 'out'}" in done.stderr
    sync = [sys.executable, "-m", "medseg.cli", "track", "sync", str(tmp_path / "out")]
    still_away = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert still_away.returncode == 2, still_away.stdout + still_away.stderr
    db = tmp_path / "mlflow.db"
    with _server(db, tmp_path / "artifacts", port, tmp_path / "server.log"):
        synced = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert synced.returncode == 0, synced.stdout + synced.stderr
    assert not journal.exists()
    run = _run(db)
    assert run["status"] == "FINISHED"
    assert run["metrics"]["scans_ok"] == 2
    assert run["steps"] == [1, 2]


@pytest.mark.slow
def test_server_stopped_and_restarted_mid_batch_the_run_ends_complete(tmp_path: Path) -> None:
    n = 5
    expected = _scans(tmp_path / "in", n)
    bundle = _bundle(tmp_path / "b")
    port, db, log = free_port(), tmp_path / "mlflow.db", tmp_path / "server.log"
    release = tmp_path / "release"
    waiting = Path(f"{release}.waiting")
    stalls = {faults.STALL_ENV: "case-complete:2,case-complete:4", faults.RELEASE_ENV: str(release)}
    cmd, env = _predict(tmp_path / "in", tmp_path / "out", bundle, f"http://127.0.0.1:{port}", env=stalls)

    def wait_for_stall(proc: subprocess.Popen) -> None:
        deadline = time.time() + 240
        while not waiting.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.time() < deadline, "the batch never reached its stall point"
            time.sleep(0.1)

    with _server(db, tmp_path / "artifacts", port, log):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_stall(proc)  # one scan logged; the server now goes away
    try:
        release.touch()
        wait_for_stall(proc)  # scans 2 and 3 written while the server was away
        journal, deadline = tmp_path / "out" / JOURNAL_FILE, time.time() + 120
        while not journal.is_file() and time.time() < deadline:  # their records follow the writes
            time.sleep(0.1)
        assert journal.is_file(), "records the server could not take must be kept"
        with _server(db, tmp_path / "artifacts", port, log):
            release.touch()
            output, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, output
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
    assert _check_consistent(tmp_path / "out", expected) == n
    assert not (tmp_path / "out" / JOURNAL_FILE).exists(), (
        "the journal must be replayed once the server is back"
    )
    run = _run(db)
    assert run["status"] == "FINISHED"
    assert run["metrics"]["scans_ok"] == n
    assert run["steps"] == list(range(1, n + 1)), "every scan's record must reach the run, in order"
