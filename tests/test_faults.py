"""Faults that lose data in real deployments, injected into real `medseg predict` processes.

SIGKILL at each named point of the write path, EIO from fsync, a full (tmpfs) disk, two batches into
one folder, the write -> fsync -> rename -> fsync order of every output kind, permissions.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import passthrough_bundle as _bundle

from medseg import faults
from medseg.synth import write_dicom_series, write_nifti

SHAPE = (20, 18, 8)


def _labels(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A label volume (0, 1, 2): the passthrough model segments it into itself."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, size=shape).astype(np.int16)


def _scans(folder: Path, n: int, shape: tuple[int, int, int] = SHAPE) -> dict[str, np.ndarray]:
    expected = {}
    for i in range(n):
        vol = _labels(i, shape)
        write_nifti(vol, np.diag([1.0, 1.2, 2.5, 1.0]), folder / f"scan{i:02d}.nii.gz")
        expected[f"scan{i:02d}"] = vol
    return expected


def _predict(
    src: Path, out: Path, bundle: Path, *extra: str, env: dict[str, str] | None = None, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "medseg.cli", "predict", str(src), str(out), "--model", str(bundle)]
    cmd += list(extra) or ["--export", "none"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300, check=False)


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name != ".medseg.lock"]


def _check_consistent(out: Path, expected: dict[str, np.ndarray]) -> int:
    """Every output complete and valid or absent; the manifest parseable. Returns finished cases."""
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        assert {e["case_id"] for e in manifest["scans"]} <= set(expected)
    if (out / "manifest.csv").exists():
        with (out / "manifest.csv").open() as f:
            assert {r["case_id"] for r in csv.DictReader(f)} <= set(expected)
    done = 0
    for case in out.iterdir():
        if case.name.startswith(".") or not case.is_dir():
            continue
        result = json.loads((case / "result.json").read_text())
        assert result["status"] == "ok"
        for rel in result["outputs"]:
            assert (out / rel).is_file(), rel
        labels = np.asarray(nib.load(case / "labels.nii.gz").dataobj)
        np.testing.assert_array_equal(labels, expected[case.name])
        done += 1
    return done


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="medseg-faults-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.mark.slow
def test_sigkill_at_every_write_point_leaves_outputs_complete_or_absent(tmp_path: Path, bundle: Path) -> None:
    expected = _scans(tmp_path / "in", 4)
    out = tmp_path / "out"
    for point in faults.POINTS:
        proc = _predict(tmp_path / "in", out, bundle, env={faults.KILL_ENV: f"{point}:2"})
        assert proc.returncode == -signal.SIGKILL, (point, proc.stdout, proc.stderr)
        _check_consistent(out, expected)
    trace = tmp_path / "trace.tsv"
    done = _predict(tmp_path / "in", out, bundle, env={faults.TRACE_ENV: str(trace)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert _check_consistent(out, expected) == len(expected)
    assert json.loads((out / "manifest.json").read_text())["counts"]["ok"] == len(expected)
    assert not _temporaries(out), "temporary files of killed writers must be removed by the next run"


def _trace(path: Path) -> list[tuple[str, str, Path]]:
    rows = []
    for line in path.read_text().splitlines():
        who, event, where = line.split("\t")
        rows.append((who, event, Path(where)))
    return rows


def _assert_durable_order(rows: list[tuple[str, str, Path]]) -> set[str]:
    """Each file: write, fsync(its temporary), rename onto it, fsync(its folder); each case folder:
    fsync(its temporary folder), rename, fsync(the output folder). Returns the names checked."""
    by_thread: dict[str, list[tuple[str, Path]]] = {}
    for who, event, where in rows:
        by_thread.setdefault(who, []).append((event, where))
    checked = set()
    for events in by_thread.values():
        for i, (event, where) in enumerate(events):
            if event == "write":
                (e1, tmp), (e2, renamed), (e3, folder) = events[i + 1 : i + 4]
                assert (e1, e2, e3) == ("fsync-file", "rename", "fsync-dir"), events[i : i + 4]
                assert tmp.parent == where.parent
                assert tmp.name.startswith(".")
                assert renamed == where
                assert folder == where.parent
                checked.add(where.name)
            elif event == "rename" and (i == 0 or events[i - 1][0] != "fsync-file"):  # a case folder
                assert events[i - 1][0] == "fsync-dir"
                assert events[i - 1][1].name.startswith(".tmp-")
                assert events[i + 1] == ("fsync-dir", where.parent)
                checked.add("<case folder>")
    return checked


@pytest.mark.slow
def test_every_output_kind_is_written_fsynced_renamed_and_its_folder_fsynced(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = tmp_path / "trace.tsv"
    _scans(tmp_path / "in", 1)
    write_dicom_series(_labels(1), np.diag([1.0, 1.2, 2.5, 1.0]), tmp_path / "in" / "series")
    proc = _predict(
        tmp_path / "in", tmp_path / "out", bundle, "--export", "default", env={faults.TRACE_ENV: str(trace)}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # bundles and training checkpoints are written by this process
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    _bundle(tmp_path / "bundle2")
    from medseg.training.loop import _save_checkpoint

    _save_checkpoint(tmp_path / "ckpt" / "last.pt", {"epoch": 1})
    checked = _assert_durable_order(_trace(trace))
    kinds = {
        "labels.nii.gz",
        "result.json",
        "manifest.json",
        "manifest.csv",
        "case.json",
        "stats.json",
        "stats.csv",
        "montage.png",
        "index.html",
        "labels.ctbl",
        "weights.pt",
        "bundle.json",
        "last.pt",
        "segmentation.dcm",
        "<case folder>",
    }
    assert kinds - checked == set(), sorted(checked)


def test_outputs_get_the_umask_permissions_and_other_users_can_read_them(shared_dir: Path) -> None:
    from medseg.io.atomic import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(shared_dir / "a" / "group.txt", "x")
    finally:
        os.umask(old)
    assert (shared_dir / "a" / "group.txt").stat().st_mode & 0o777 == 0o640
    atomic_write_text(shared_dir / "a" / "all.txt", "shared")
    assert (shared_dir / "a" / "all.txt").stat().st_mode & 0o777 == 0o666 & ~old
    if os.geteuid() != 0:
        pytest.skip("reading as another user needs root (runuser)")
    (shared_dir / "a").chmod(0o755)
    read = subprocess.run(
        ["runuser", "-u", "nobody", "--", "cat", str(shared_dir / "a" / "all.txt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert read.returncode == 0, read.stderr
    assert read.stdout == "shared"


@pytest.mark.slow
def test_eio_at_fsync_fails_that_scan_only_and_a_rerun_completes(tmp_path: Path, bundle: Path) -> None:
    expected = _scans(tmp_path / "in", 3)
    out = tmp_path / "out"
    proc = _predict(tmp_path / "in", out, bundle, env={faults.ERRNO_ENV: "EIO:2@labels"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [e for e in manifest["scans"] if e["status"] == "failed"]
    assert len(failed) == 1
    assert "Input/output error" in failed[0]["error"]
    assert manifest["counts"]["ok"] == 2
    assert not (out / failed[0]["case_id"]).exists(), "a scan that failed must leave no output folder"
    assert not _temporaries(out)
    assert _check_consistent(out, expected) == 2
    again = _predict(tmp_path / "in", out, bundle)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _check_consistent(out, expected) == 3


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one was denied: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_full_disk_fails_scans_keeps_earlier_outputs_stops_early_and_a_rerun_completes(
    tmp_path: Path, bundle: Path
) -> None:
    shape = (64, 64, 32)  # about 40 KB per compressed label map: a 256 KB disk holds a few
    expected = _scans(tmp_path / "in", 12, shape)
    with _tmpfs(tmp_path / "disk", "256k") as disk:
        out = disk / "out"
        proc = _predict(tmp_path / "in", out, bundle, "--export", "none", "--parallel-scans", "1")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "ENOSPC" in proc.stderr
        assert "free space and run the same command again" in proc.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        counts = manifest["counts"]
        assert counts["ok"] >= 1
        assert counts["pending"] >= 1, "the batch must stop early, not fail every remaining scan"
        assert counts["failed"] <= 2  # 0 when the manifest itself no longer fit (the earlier one is kept)
        failed = [e["error"] for e in manifest["scans"] if e["status"] == "failed"]
        assert all("No space left on device" in error for error in failed)
        assert not _temporaries(out), "no partial file may be left"
        assert _check_consistent(out, expected) >= counts["ok"]  # a case may finish after the last manifest
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        again = _predict(tmp_path / "in", out, bundle)
        assert again.returncode == 0, again.stdout + again.stderr
        assert _check_consistent(out, expected) == len(expected)


@pytest.mark.slow
def test_a_second_batch_into_a_folder_being_written_is_refused_naming_the_first(
    tmp_path: Path, bundle: Path
) -> None:
    expected = _scans(tmp_path / "in", 3)
    out = tmp_path / "out"
    release = tmp_path / "release"
    env = {faults.STALL_ENV: "case-complete:1", faults.RELEASE_ENV: str(release)}
    first = _predict(tmp_path / "in", out, bundle, env=env, wait=False)
    try:
        deadline = time.time() + 240
        while not Path(f"{release}.waiting").exists():
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert time.time() < deadline, "the first batch never reached its first case"
            time.sleep(0.1)
        second = _predict(tmp_path / "in", out, bundle)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"pid {first.pid} on host" in second.stderr
        assert "one writer at a time" in second.stderr
        export = subprocess.run(
            [sys.executable, "-m", "medseg.cli", "export", str(out), "--export", "stats"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert export.returncode == 2, export.stdout + export.stderr
        assert f"pid {first.pid}" in export.stderr
    finally:
        release.touch()
        first.wait(timeout=240)
    assert first.returncode == 0
    assert _check_consistent(out, expected) == len(expected)


def test_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    from medseg.batch.lock import OutputLockedError, output_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from medseg.batch.lock import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)",
            str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid} on host"):
            output_lock(tmp_path / "out").__enter__()
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path / "out"):  # the kernel released the dead holder's lock
        assert f"pid={os.getpid()}" in (tmp_path / "out" / ".medseg.lock").read_text()
