"""Batch prediction over a folder mixing good and bad scans: manifest, exit status, resume, privacy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from bundle_helpers import passthrough_bundle as _bundle
from geometry_helpers import shared
from pydicom.dataset import FileDataset, FileMetaDataset
from typer.testing import CliRunner

from medseg.batch.runner import PredictionSettings, run_prediction
from medseg.bundle import build_network, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.errors import InputError
from medseg.io import load_image
from medseg.sources.folder import discover
from medseg.synth import write_dicom_series, write_nifti

PATIENT = "Doe^Jane"
PATIENT_ID = "PID-7731-SECRET"


def _vol(seed: int, shape=(20, 18, 8)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, dtype=np.int16)
    lo = rng.integers(1, 6, size=3)
    v[lo[0] : lo[0] + 8, lo[1] : lo[1] + 7, lo[2] : lo[2] + 4] = 1 + seed % 2
    return v


def _aff(angle: float = 0.0) -> np.ndarray:
    a = np.radians(angle)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(
        [1, 1.2, 2.5]
    )
    aff[:3, 3] = [5.0, -3.0, 10.0]
    return aff


def _sr_file(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientName = PATIENT
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _mixed_folder(root: Path) -> dict[str, str]:
    """Write good and bad scans; returns {case id or file stem: expected status}."""
    expect: dict[str, str] = {}
    write_nifti(_vol(1), _aff(10), root / "good one.nii.gz")
    expect["good_one"] = "ok"
    write_nifti(_vol(2), _aff(-20), root / "ünïcode" / "scan2.nii.gz")
    expect["scan2"] = "ok"
    good_dicom = write_dicom_series(
        _vol(3),
        _aff(15),
        root / "dicom" / "a",
        modality="MR",
        patient_name=PATIENT,
        patient_id=PATIENT_ID,
        shuffle_instance_numbers=True,
    )
    expect[str(pydicom.dcmread(good_dicom[0]).SeriesInstanceUID)] = "ok"
    compressed = write_dicom_series(
        _vol(4, (64, 48, 4)),
        _aff(),
        root / "dicom" / "rle",
        modality="MR",
        patient_name=PATIENT,
        patient_id=PATIENT_ID,
    )
    for f in compressed:
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(f)
    expect[str(pydicom.dcmread(compressed[0]).SeriesInstanceUID)] = "ok"
    no_uid = write_dicom_series(
        _vol(5), _aff(), root / "dicom" / "nouid", modality="MR", patient_name=PATIENT
    )
    for f in no_uid:
        ds = pydicom.dcmread(f)
        del ds.SeriesInstanceUID
        ds.save_as(f)
    pos = np.array([[0.0, 0.0, 2.5 * k] for k in range(8)])
    missing = write_dicom_series(
        _vol(6, (20, 18, 7)),
        np.eye(4),
        root / "dicom" / "missing",
        modality="MR",
        slice_positions=np.delete(pos, 4, axis=0),
        patient_name=PATIENT,
    )
    expect[str(pydicom.dcmread(missing[0]).SeriesInstanceUID)] = "failed"
    tilted = pos.copy()
    tilted[:, 1] = np.arange(8) * 0.8
    tilt = write_dicom_series(
        _vol(7),
        np.eye(4),
        root / "dicom" / "tilt",
        modality="MR",
        slice_positions=tilted,
        patient_name=PATIENT,
    )
    expect[str(pydicom.dcmread(tilt[0]).SeriesInstanceUID)] = "failed"
    (root / "zero.nii.gz").write_bytes(b"")
    expect["zero"] = "failed"
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    expect["corrupt"] = "failed"
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 30), np.float32), np.eye(4)), root / "lies.nii")
    raw = (root / "lies.nii").read_bytes()
    (root / "lies.nii").write_bytes(raw[: len(raw) // 3])
    expect["lies"] = "failed"
    nan = _vol(8).astype(np.float32)
    nan[3, 3, 3] = np.nan
    write_nifti(nan, _aff(), root / "nan.nii.gz")
    expect["nan"] = "failed"
    write_nifti(np.zeros((10, 10, 5, 3), np.float32), _aff(), root / "four_d.nii.gz")
    expect["four_d"] = "failed"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), root / "flat2d.nii.gz")
    expect["flat2d"] = "failed"
    _sr_file(root / "dicom" / "report" / "sr.dcm")
    (root / "notes.txt").write_text("not an image")
    return expect


def test_mixed_folder_batch(tmp_path: Path) -> None:
    root = tmp_path / "in put"
    expect = _mixed_folder(root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    bundle = _bundle(tmp_path / "bundle")
    result = CliRunner().invoke(app, ["predict", str(root), str(tmp_path / "out"), "--model", str(bundle)])
    assert result.exit_code == 1, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    by_id = {e["case_id"]: e for e in manifest["scans"]}
    from medseg.sources.folder import dicom_case_id

    for key, status in expect.items():
        case_id = key if key in by_id else dicom_case_id(key)
        assert by_id[case_id]["status"] == status, (key, by_id[case_id])
        if status == "failed":
            assert by_id[case_id]["error"], key
    nouid = [e for e in by_id.values() if e["case_id"].startswith("dicom-") and "nouid" in e["inputs"][0]]
    assert nouid[0]["status"] == "ok"  # a series without SeriesInstanceUID is grouped by folder
    errors = {k: by_id[k]["error"] for k in ("zero", "lies", "nan", "four_d", "flat2d")}
    assert "must not be empty" in errors["zero"]
    assert "promises" in errors["lies"]
    assert "finite" in errors["nan"]
    assert "channel" in errors["four_d"]
    assert "3D" in errors["flat2d"]
    by_folder = {Path(e["inputs"][0]).parent.name: e for e in by_id.values()}
    assert "missing slice" in by_folder["missing"]["error"]
    assert "tilt" in by_folder["tilt"]["error"]
    reasons = " ".join(s["reason"] for s in manifest["skipped"])
    assert "SR" in reasons
    assert "notes.txt" in " ".join(s["path"] for s in manifest["skipped"])
    # good outputs overlay their inputs exactly
    for e in by_id.values():
        if e["status"] != "ok":
            continue
        out = load_image(tmp_path / "out" / e["outputs"][0])
        src_path = [Path(p) for p in e["inputs"]]
        src = load_image(src_path if len(src_path) > 1 else src_path[0])
        np.testing.assert_allclose(out.affine.numpy(), src.affine.numpy(), atol=1e-5)
        np.testing.assert_array_equal(out[0].numpy(), src[0].numpy())
    assert (tmp_path / "out" / "manifest.csv").read_text().count("\n") == len(by_id) + len(
        manifest["skipped"]
    ) + 1
    # inputs untouched
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    # a second run keeps the finished scans and retries the failed ones
    again = run_prediction(root, tmp_path / "out", models=[bundle])
    assert again.reused == sum(v == "ok" for v in expect.values()) + 1
    assert again.failed == sum(v == "failed" for v in expect.values())


def test_real_invalid_series_fail_with_their_reason(tmp_path: Path) -> None:
    root = tmp_path / "in"
    shutil.copytree(shared("dicom_bad"), root / "bad_real")  # a 2-slice series; mixed orientations
    write_nifti(_vol(1), _aff(10), root / "good.nii.gz")
    summary = run_prediction(root, tmp_path / "out", models=[_bundle(tmp_path / "b")])
    assert (summary.ok, summary.failed) == (1, 2)
    scans = json.loads((tmp_path / "out" / "manifest.json").read_text())["scans"]
    errors = {Path(e["inputs"][0]).parent.parent.name: e["error"] for e in scans if e["status"] == "failed"}
    assert set(errors) == {"slicecount", "sliceorientation"}, scans
    assert "at least 3 slices" in errors["slicecount"]
    assert "orientation" in errors["sliceorientation"]


def test_other_model_does_not_overwrite(tmp_path: Path) -> None:
    write_nifti(_vol(1), _aff(), tmp_path / "in" / "a.nii.gz")
    run_prediction(tmp_path / "in", tmp_path / "out", models=[_bundle(tmp_path / "b1")])
    spec = DatasetSpec.model_validate(
        {
            "name": "t",
            "channels": [{"name": "x", "modality": "MR"}],
            "labels": {"background": 0, "a": 1},
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate(
        {"name": "u", "model": {"name": "unet3d", "params": {"channels": [4, 8]}}}
    )
    other = save_bundle(tmp_path / "b2", cfg, spec, build_network(cfg, spec))
    with pytest.raises(InputError, match="made with model"):
        run_prediction(tmp_path / "in", tmp_path / "out", models=[other])
    assert (
        run_prediction(
            tmp_path / "in", tmp_path / "out", models=[other], settings=PredictionSettings(overwrite=True)
        ).ok
        == 1
    )
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="at least one scan"):
        run_prediction(tmp_path / "nothing", tmp_path / "o2", models=[other])


def test_changed_input_is_redone(tmp_path: Path) -> None:
    write_nifti(_vol(1), _aff(), tmp_path / "in" / "a.nii.gz")
    bundle = _bundle(tmp_path / "b")
    assert run_prediction(tmp_path / "in", tmp_path / "out", models=[bundle]).reused == 0
    assert run_prediction(tmp_path / "in", tmp_path / "out", models=[bundle]).reused == 1
    time.sleep(0.01)
    write_nifti(_vol(2), _aff(), tmp_path / "in" / "a.nii.gz")
    again = run_prediction(tmp_path / "in", tmp_path / "out", models=[bundle])
    assert again.reused == 0
    np.testing.assert_array_equal(load_image(tmp_path / "out" / "a" / "labels.nii.gz")[0].numpy(), _vol(2))


@pytest.mark.parametrize("parallel", [1, 2])
def test_overlapped_batch_matches_a_sequential_one(tmp_path: Path, parallel: int) -> None:
    # loading the next scan and writing the last one in background threads, and segmenting several
    # scans at once on shares of torch's threads, change nothing but time
    for i in range(4):
        write_nifti(_vol(i), _aff(), tmp_path / "in" / f"s{i}.nii.gz")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a scan")
    bundle = _bundle(tmp_path / "b")
    threads = torch.get_num_threads()
    runs = {
        mode: run_prediction(
            tmp_path / "in",
            tmp_path / mode,
            models=[bundle],
            settings=PredictionSettings(
                prefetch=mode == "overlap", keep_probabilities=True, parallel_scans=parallel
            ),
        )
        for mode in ("overlap", "sequential")
    }
    assert torch.get_num_threads() == threads  # restored
    assert (runs["overlap"].workers, runs["sequential"].workers) == (min(parallel, threads), 1)
    order = [e["case_id"] for e in runs["sequential"].entries]
    assert [e["case_id"] for e in runs["overlap"].entries] == order
    for a, b in zip(runs["overlap"].entries, runs["sequential"].entries):
        assert (a["status"], a["error"], a["outputs"]) == (b["status"], b["error"], b["outputs"])
        assert {"preprocess", "model", "network", "write", "total"} <= set(a["seconds"]) or a["error"]
        for rel in a["outputs"]:
            np.testing.assert_array_equal(
                nib.load(tmp_path / "overlap" / rel).get_fdata(),
                nib.load(tmp_path / "sequential" / rel).get_fdata(),
            )
    assert (runs["overlap"].ok, runs["overlap"].failed) == (4, 1)
    assert all(
        len(e["outputs"]) == 2 for e in runs["overlap"].entries if e["status"] == "ok"
    )  # + probabilities
    assert (
        0
        < runs["overlap"].model_seconds
        < sum(e["seconds"]["model"] for e in runs["overlap"].entries if e["outputs"])
    )
    assert not list((tmp_path / "overlap").glob(".tmp-*"))


def test_thread_share_gives_each_scan_in_flight_an_equal_share() -> None:
    from medseg.batch.local_engine import _ThreadShare

    threads = torch.get_num_threads()
    share = _ThreadShare(4, parallel=2)
    seen = []

    def scan(inner: bool) -> None:
        with share:
            seen.append(torch.get_num_threads())  # half, even before the second scan has started
            if inner:
                t = threading.Thread(target=scan, args=(False,))
                t.start()
                t.join()
                share.tail = True  # no scan left to start, and this one alone: every thread back
                share.apply()
                seen.append(torch.get_num_threads())

    t = threading.Thread(target=scan, args=(True,))
    t.start()
    t.join()
    assert seen == [2, 2, 4]
    assert torch.get_num_threads() == threads  # other threads' settings do not leak into this one


def test_discovery_filters(tmp_path: Path) -> None:
    write_dicom_series(_vol(1), _aff(), tmp_path / "mr", modality="MR", series_description="T1 post")
    write_dicom_series(_vol(2), _aff(), tmp_path / "ct", modality="CT", series_description="abdomen")
    from medseg.sources.folder import ScanFilter

    assert len(discover(tmp_path).scans) == 2
    only_ct = discover(tmp_path, ScanFilter(modalities=("CT",)))
    assert [s.modality for s in only_ct.scans] == ["CT"]
    assert "modality MR" in only_ct.skipped[0].reason
    assert [s.description for s in discover(tmp_path, ScanFilter(description="T1")).scans] == ["T1 post"]
    assert discover(tmp_path, ScanFilter(min_slices=9)).scans == []


def test_privacy_no_patient_data_in_manifest_log_or_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "private.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    write_dicom_series(
        _vol(1), _aff(), tmp_path / "in" / "s1", modality="MR", patient_name=PATIENT, patient_id=PATIENT_ID
    )
    pos = np.array([[0.0, 0.0, 2.5 * k] for k in range(8)])
    write_dicom_series(
        _vol(2, (20, 18, 7)),
        np.eye(4),
        tmp_path / "in" / "s2",
        modality="MR",
        patient_name=PATIENT,
        patient_id=PATIENT_ID,
        slice_positions=np.delete(pos, 3, axis=0),
    )
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(_bundle(tmp_path / "b"))]
    )
    assert result.exit_code == 1
    texts = [
        result.output,
        (tmp_path / "out" / "manifest.json").read_text(),
        (tmp_path / "out" / "manifest.csv").read_text(),
    ]
    with sqlite3.connect(db) as con:
        for table in ("params", "tags", "metrics", "runs"):
            texts.append(repr(con.execute(f"select * from {table}").fetchall()))
    for artifact in (tmp_path).rglob("mlartifacts/**/*.json"):
        texts.append(artifact.read_text())
    blob = "\n".join(texts)
    for secret in ("Doe", "Jane", PATIENT_ID):
        assert secret not in blob


@pytest.mark.slow
def test_killed_batch_resumes_with_every_output_valid(tmp_path: Path) -> None:
    for i in range(40):
        write_nifti(_vol(i, (40, 40, 24)), _aff(i), tmp_path / "in" / f"scan{i:02d}.nii.gz")
    bundle = _bundle(tmp_path / "b")
    cmd = [
        sys.executable,
        "-m",
        "medseg.cli",
        "predict",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--model",
        str(bundle),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 120
    manifest = tmp_path / "out" / "manifest.json"
    while time.time() < deadline:
        if manifest.is_file():
            try:
                if json.loads(manifest.read_text())["counts"]["ok"] >= 3:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = json.loads(manifest.read_text())["counts"]["ok"]
    assert done_before < 40, "the batch finished before it could be killed; the test needs slower scans"
    # whatever is there must be complete or absent: every case folder has its result.json
    for case in (tmp_path / "out").iterdir():
        if case.is_dir() and not case.name.startswith("."):
            assert (case / "result.json").is_file(), case
    resumed = run_prediction(tmp_path / "in", tmp_path / "out", models=[bundle])
    assert resumed.ok == 40
    assert resumed.failed == 0
    assert resumed.reused >= done_before
    assert not list((tmp_path / "out").glob(".tmp-*"))
    for i in range(40):
        out = load_image(tmp_path / "out" / f"scan{i:02d}" / "labels.nii.gz")
        np.testing.assert_array_equal(out[0].numpy(), _vol(i, (40, 40, 24)))
