"""The Ray batch engine: the local runner's manifest and outputs, failures isolated, dead workers replaced.

Ray runs as one local instance for the whole module (2 CPUs, a 100 MB object store, no dashboard),
shut down at the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.batch.ray_engine import WORKER_PREFIX, RaySettings
from medseg.batch.runner import Engine, PredictionSettings, run_prediction
from medseg.bundle import build_network, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.errors import ConfigError, MedsegError
from medseg.synth import write_dicom_series, write_nifti

SHAPE = (24, 20, 12)


def _affine(angle: float) -> np.ndarray:
    a = np.radians(angle)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(
        [1.0, 1.2, 2.5]
    )
    aff[:3, 3] = [4.0, -2.0, 7.0]
    return aff


def _scan(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(100, 30, size=shape)
    lo = rng.integers(2, 6, size=3)
    v[lo[0] : lo[0] + 10, lo[1] : lo[1] + 8, lo[2] : lo[2] + 5] += 400
    return v.astype(np.int16)


def _unet_bundle(path: Path) -> Path:
    """A tiny untrained 3D U-Net: cheap, yet its label maps depend on every voxel."""
    spec = DatasetSpec.model_validate(
        {
            "name": "tiny",
            "channels": [{"name": "mr", "modality": "MR"}],
            "labels": {"background": 0, "a": 1, "b": 2},
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate(
        {
            "name": "tiny",
            "model": {"name": "unet3d", "params": {"channels": [4, 8], "num_res_units": 0}},
            "train": {"patch_size": [16, 16, 16]},
            "inference": {"batch_size": 2},
        }
    )
    torch.manual_seed(0)
    return save_bundle(path, cfg, spec, build_network(cfg, spec))


def _folder(root: Path, n_good: int, shape: tuple[int, int, int] = SHAPE) -> dict[str, str]:
    """Good NIfTI scans, one DICOM series and three broken files; returns {case id: expected status}."""
    expect = {}
    for i in range(n_good):
        write_nifti(_scan(i, shape), _affine(7 * i), root / f"scan{i:02d}.nii.gz")
        expect[f"scan{i:02d}"] = "ok"
    write_dicom_series(_scan(99, shape), _affine(20), root / "dicom" / "s1", modality="MR")
    (root / "zero.nii.gz").write_bytes(b"")
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    nan = _scan(5, shape).astype(np.float32)
    nan[1, 2, 3] = np.nan
    write_nifti(nan, _affine(0), root / "nan.nii.gz")
    expect.update({"zero": "failed", "corrupt": "failed", "nan": "failed"})
    return expect


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """One small local Ray instance for the module; no Ray process outlives it."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs ray (medseg[distributed])")
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024**2,
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The local runner with one torch thread, as each Ray worker has: the same arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _comparable(manifest: dict) -> dict:
    """A manifest without what differs between runs: times, and where the outputs live."""
    scans = [{k: v for k, v in e.items() if k != "seconds"} for e in manifest["scans"]]
    return {"model_sha256": manifest["model_sha256"], "scans": scans, "skipped": manifest["skipped"]}


def test_settings_and_engine_names_are_checked() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        RaySettings(workers=0)
    with pytest.raises(ValueError, match="max_attempts"):
        RaySettings(max_attempts=0)
    with pytest.raises(ConfigError, match="did you mean 'ray'"):
        Engine.parse("rya")
    done = CliRunner().invoke(app, ["predict", ".", "out", "--model", "m", "--workers", "2"])
    assert done.exit_code == 2
    assert "need --engine ray" in done.output


def test_without_ray_the_ray_engine_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if medseg[distributed] were not installed
    write_nifti(_scan(0), _affine(0), tmp_path / "in" / "a.nii.gz")
    with pytest.raises(MedsegError, match=r"the Ray batch engine needs ray; install medseg\[distributed\]"):
        run_prediction(
            tmp_path / "in",
            tmp_path / "out",
            models=[_unet_bundle(tmp_path / "m")],
            settings=PredictionSettings(engine="ray"),
        )
    assert not (tmp_path / "out").exists()  # nothing started: no output folder, no MLflow run


@pytest.mark.slow  # starts Ray workers (about 20 s on 2 cores)
def test_ray_matches_the_local_runner_byte_for_byte(
    ray_local: Any, one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them: workers must still find them
    expect = _folder(Path("in"), 4)
    bundle = _unet_bundle(Path("model"))
    local = run_prediction(
        "in", "out_local", models=[bundle], settings=PredictionSettings(exports=["volumes"])
    )
    done = CliRunner().invoke(
        app,
        ["predict", "in", "out_ray", "--model", str(bundle), "--export", "volumes", "--engine", "ray"],
    )
    assert done.exit_code == 1, done.output  # some scans failed, as with the local runner
    first = json.loads(Path("out_local/manifest.json").read_text())
    second = json.loads(Path("out_ray/manifest.json").read_text())
    assert _comparable(first) == _comparable(second)
    by_id = {e["case_id"]: e for e in second["scans"]}
    dicom = [c for c in by_id if c.startswith("dicom-")]
    assert len(dicom) == 1
    expect[dicom[0]] = "ok"
    assert {c: e["status"] for c, e in by_id.items()} == expect
    assert "must not be empty" in by_id["zero"]["error"]
    assert "finite" in by_id["nan"]["error"]
    assert local.ok == 5
    for case, status in expect.items():
        if status != "ok":
            assert not Path("out_ray", case).exists()
            continue
        for name in ("labels.nii.gz", "volumes.json"):
            a = Path("out_local", case, name).read_bytes()
            assert a == Path("out_ray", case, name).read_bytes(), (case, name)
        labels = np.asarray(nib.load(f"out_ray/{case}/labels.nii.gz").dataobj)
        assert len(np.unique(labels)) > 1  # a real network's output, not a constant
        result = json.loads(Path("out_ray", case, "result.json").read_text())
        assert result["status"] == "ok"
    # re-running resumes on Ray as locally: the finished scans are kept, the failed ones retried
    again = run_prediction(
        "in", "out_ray", models=[bundle], settings=PredictionSettings(exports=["volumes"], engine="ray")
    )
    assert (again.reused, again.ok, again.failed, again.workers) == (5, 5, 3, 2)
    assert 0 < again.start_seconds < again.seconds
    assert not list(Path("out_ray").glob(".tmp-*"))


@pytest.mark.slow  # starts Ray workers, kills one, starts its replacement (about 30 s on 2 cores)
def test_a_killed_worker_loses_and_duplicates_no_scan(ray_local: Any, tmp_path: Path) -> None:
    n = 12
    for i in range(n):
        write_nifti(_scan(i, (48, 40, 24)), _affine(i), tmp_path / "in" / f"scan{i:02d}.nii.gz")
    bundle = _unet_bundle(tmp_path / "model")
    said: list[str] = []
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["summary"] = run_prediction(
                tmp_path / "in",
                tmp_path / "out",
                models=[bundle],
                settings=PredictionSettings(engine="ray", ray=RaySettings(workers=2)),
                echo=said.append,
            )
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    manifest = tmp_path / "out" / "manifest.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and thread.is_alive():  # until the pool has finished a scan
        if manifest.is_file():
            try:
                if json.loads(manifest.read_text())["counts"]["ok"] >= 1:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.02)
    from ray.util import list_named_actors

    victims = sorted(name for name in list_named_actors() if name.startswith(WORKER_PREFIX))
    assert victims, "no Ray worker to kill"
    # ready() waits behind the job the worker is running; the driver has sent it the next one by
    # then (or will, to a dead worker): SIGKILL, as the kernel's OOM killer would, loses that job
    pid = ray_local.get(ray_local.get_actor(victims[0]).ready.remote(), timeout=120)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the batch did not finish after a worker was killed"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary.ok == n
    assert summary.failed == 0
    assert summary.retried >= 1  # the dead worker's jobs went to its replacement
    cases = [f"scan{i:02d}" for i in range(n)]
    # every scan reported once, one output folder each, nothing half-written left behind
    assert sorted(line.split("] ")[1].split(":")[0] for line in said) == cases
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == cases
    assert not list((tmp_path / "out").glob(".tmp-*"))
    entries = json.loads(manifest.read_text())["scans"]
    assert [e["case_id"] for e in entries] == cases
    assert all(e["status"] == "ok" for e in entries)
    for case in cases:
        assert json.loads((tmp_path / "out" / case / "result.json").read_text())["status"] == "ok"
    from medseg.tracking.store import client

    history = client().get_metric_history(summary.run_id, "scans_done")
    assert sorted(m.step for m in history) == list(range(1, n + 1))
    deadline = time.monotonic() + 30  # the pool's actors are killed as the run ends
    while [name for name in list_named_actors() if name.startswith(WORKER_PREFIX)]:
        assert time.monotonic() < deadline, list_named_actors()
        time.sleep(0.2)


@pytest.mark.slow  # starts (and loses) two Ray workers (about 10 s)
def test_workers_that_cannot_start_end_the_run_with_the_reason(ray_local: Any, tmp_path: Path) -> None:
    from medseg.batch.job import ScanJob
    from medseg.batch.ray_engine import RayEngine
    from medseg.sources.folder import Scan

    settings = RaySettings(workers=1, max_attempts=2)
    engine = RayEngine(None, settings=settings)  # no predictor: every worker dies starting
    job = ScanJob(Scan("a", tmp_path / "a.nii.gz"), "fingerprint", "sha")
    reason = "Ray workers must start and load the model, got: .*predictor must be a segmentation model"
    with pytest.raises(ConfigError, match=reason):
        list(engine.results([job], tmp_path))
    assert not (tmp_path / "a").exists()
