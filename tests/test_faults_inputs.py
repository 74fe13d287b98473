"""Hostile and oversized inputs: each refused before loading with its own reason, the batch goes on."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from test_faults import _bundle, _labels

from medseg.batch.job import ScanJob, run_job
from medseg.errors import ConfigError, InputError
from medseg.io.limits import check_inputs, j2k_frame_sizes, parse_size
from medseg.sources.folder import Scan, discover
from medseg.synth import write_dicom_series, write_nifti

HUGE = 100000


def _huge_nifti(path: Path) -> Path:
    header = nib.Nifti2Header()
    header.set_data_shape((HUGE, HUGE, HUGE))
    header.set_data_dtype(np.int16)
    path.write_bytes(header.binaryblock + bytes(64))
    return path


def _huge_nrrd(path: Path) -> Path:
    text = f"NRRD0004\ntype: short\ndimension: 3\nsizes: {HUGE} {HUGE} {HUGE}\nencoding: raw\n\n"
    path.write_bytes(text.encode() + bytes(64))
    return path


def _j2k_series(folder: Path, *, claim: int | None) -> list[Path]:
    """A 4-slice JPEG 2000 DICOM series; with ``claim``, the first frame's SIZ says claim x claim."""
    files = write_dicom_series(_labels(3, (32, 32, 4)), np.eye(4), folder)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelRepresentation = 0
        ds.compress(JPEG2000Lossless, ds.pixel_array.astype(np.uint16))
        ds.save_as(f)
    if claim is not None:
        data = bytearray(files[0].read_bytes())
        start = data.find(b"\xff\x4f\xff\x51")
        data[start + 8 : start + 16] = struct.pack(">II", claim, claim)
        files[0].write_bytes(bytes(data))
    return files


def test_headers_claiming_huge_volumes_are_refused_before_loading(tmp_path: Path) -> None:
    for path in (_huge_nifti(tmp_path / "a.nii"), _huge_nrrd(tmp_path / "b.nrrd")):
        with pytest.raises(InputError, match=rf"{path.name}: declared image size must fit the memory budget"):
            check_inputs([path], budget=8 << 30)
    frames = pydicom.dcmread(_j2k_series(tmp_path / "s", claim=None)[0])
    frames.NumberOfFrames = HUGE
    frames.save_as(tmp_path / "frames.dcm")
    with pytest.raises(InputError, match="32 x 32 x 100000 x 1 voxels"):
        check_inputs([tmp_path / "frames.dcm"], budget=64 << 20)
    small = tmp_path / "small.nii.gz"
    write_nifti(_labels(0), np.eye(4), small)
    check_inputs([small], budget=1 << 20)
    with pytest.raises(InputError, match=r"memory budget of 1\.0 KiB"):
        check_inputs([small], budget=1024)


def test_a_jpeg2000_frame_larger_than_its_header_is_refused(tmp_path: Path) -> None:
    honest = _j2k_series(tmp_path / "honest", claim=None)
    assert j2k_frame_sizes(honest[0]) == [(32, 32, 1, 2)]
    check_inputs(honest, budget=1 << 20)
    lying = _j2k_series(tmp_path / "lying", claim=60000)
    with pytest.raises(InputError, match=r"IM\d+\.dcm: JPEG 2000 frame must decode to the declared 32 x 32"):
        check_inputs(lying, budget=1 << 40)


def test_max_memory_sizes() -> None:
    assert parse_size("2G") == 2 << 30
    assert parse_size("1.5M") == 3 << 19
    with pytest.raises(ConfigError, match="max memory must be a positive size"):
        parse_size("lots")


def test_a_case_id_escaping_the_output_folder_fails_that_scan(tmp_path: Path) -> None:
    from medseg.pipeline import Predictor

    write_nifti(_labels(0), np.eye(4), tmp_path / "in.nii.gz")
    predictor = Predictor.from_path(_bundle(tmp_path / "b"))
    out = tmp_path / "out"
    out.mkdir()
    for case_id in ("../escaped", "..", "/abs"):
        job = ScanJob(Scan(case_id, tmp_path / "in.nii.gz"), "fp", "sha")
        result = run_job(job, predictor, out_root=out)
        assert result.status == "failed"
        assert "case id must be one folder name inside the output folder" in (result.error or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "in.nii.gz", "out"]
    assert list(out.iterdir()) == []


def test_symlink_loops_and_broken_links_are_skipped_with_their_reason(tmp_path: Path) -> None:
    write_nifti(_labels(0), np.eye(4), tmp_path / "good.nii.gz")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    (tmp_path / "gone").symlink_to("nowhere")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to("..")  # a folder link back up: never walked
    found = discover(tmp_path)
    assert [s.case_id for s in found.scans] == ["good"]
    reasons = {p.name: r for p, r in ((s.path, s.reason) for s in found.skipped)}
    assert reasons["loop1"] == reasons["loop2"] == "not an image file: a symlink loop"
    assert reasons["gone"].startswith("not an image file: a broken symlink")


@pytest.mark.slow
def test_hostile_folder_each_refused_with_its_reason_and_the_batch_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_nifti(_labels(0), np.eye(4), src / "good.nii.gz")
    _huge_nifti(src / "huge.nii")
    _huge_nrrd(src / "huge_nrrd.nrrd")
    _j2k_series(src / "j2k", claim=60000)
    (src / "loop1").symlink_to("loop2")
    (src / "loop2").symlink_to("loop1")
    cmd = [sys.executable, "-m", "medseg.cli", "predict", str(src), str(tmp_path / "out")]
    cmd += ["--model", str(_bundle(tmp_path / "b")), "--export", "none", "--max-memory", "4G"]
    reader = []
    if os.geteuid() == 0 and shutil.which("setpriv"):
        write_nifti(_labels(1), np.eye(4), src / "secret.nii.gz")
        os.chown(src / "secret.nii.gz", 65534, 65534)  # another user's file (nobody), mode 0600
        (src / "secret.nii.gz").chmod(0o600)
        # the batch runs without root's right to read others' files, as an ordinary user would
        reader = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    proc = subprocess.run(reader + cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    status = {e["case_id"]: (e["status"], e["error"] or "") for e in manifest["scans"]}
    assert status["good"] == ("ok", "")
    for case in ("huge", "huge_nrrd"):
        assert status[case][0] == "failed"
        assert "declared image size must fit the memory budget of 4.0 GiB" in status[case][1]
        assert "100000 x 100000 x 100000" in status[case][1]
    (dicom,) = [c for c in status if c.startswith("dicom-")]
    assert "JPEG 2000 frame must decode to the declared 32 x 32" in status[dicom][1]
    if reader:
        assert status["secret"][0] == "failed"
        assert "input must be readable by this user" in status["secret"][1]
        assert "owner uid 65534, mode 0600" in status["secret"][1]
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert skipped["loop1"] == "not an image file: a symlink loop"
    labels = np.asarray(nib.load(tmp_path / "out" / "good" / "labels.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, _labels(0))
