"""The same DICOM series in several folders: segmented once, from its distinct instances."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from geometry_helpers import SHARED_DATA
from test_faults import _assert_durable_order, _bundle, _trace

from medseg import faults
from medseg.batch.runner import PredictionSettings, run_prediction
from medseg.errors import InputError
from medseg.io import load_image
from medseg.io.dicom_series import read_series
from medseg.sources.folder import discover

SERIES = SHARED_DATA / "mr_study" / "13_HCropVolume"
needs_series = pytest.mark.skipif(not SERIES.is_dir(), reason=f"real DICOM series {SERIES} is absent")


def _three_copies(root: Path) -> tuple[Path, list[Path]]:
    """The series whole, missing a slice, and whole with one file duplicated under another name."""
    files = sorted(p for p in SERIES.iterdir() if p.is_file())
    for name in ("whole", "partial", "doubled"):
        (root / name).mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copy(f, root / "whole" / f.name)
        shutil.copy(f, root / "doubled" / f.name)
        if i != len(files) // 2:
            shutil.copy(f, root / "partial" / f.name)
    shutil.copy(files[3], root / "doubled" / f"copy of {files[3].name}")
    return root, files


@needs_series
def test_copies_of_one_series_are_one_scan_read_from_distinct_instances(tmp_path: Path) -> None:
    root, files = _three_copies(tmp_path / "in")
    found = discover(root)
    assert len(found.scans) == 1
    (scan,) = found.scans
    assert len(scan.files) == 3 * len(files)  # every copy is an input (fingerprinted) ...
    assert scan.copies == tuple(root / n for n in ("doubled", "partial", "whole"))
    volume = read_series(list(scan.files))  # ... and each instance is read once
    reference = read_series(SERIES)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)
    assert len(volume.files) == len(files)


@needs_series
def test_one_instance_uid_with_different_pixels_names_both_files(tmp_path: Path) -> None:
    root, files = _three_copies(tmp_path / "in")
    changed = root / "partial" / files[0].name
    ds = pydicom.dcmread(changed)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(changed)
    with pytest.raises(InputError, match="must hold the same pixel data") as info:
        read_series(list(discover(root).scans[0].files))
    assert str(changed) in str(info.value)
    assert str(root / "doubled" / files[0].name) in str(info.value)


@needs_series
def test_a_truncated_copy_gives_way_to_the_intact_one(tmp_path: Path) -> None:
    root, files = _three_copies(tmp_path / "in")
    damaged = root / "partial" / files[0].name
    damaged.write_bytes(damaged.read_bytes()[:-500])  # an export cut short
    volume = read_series(list(discover(root).scans[0].files))
    np.testing.assert_array_equal(volume.array, read_series(SERIES).array)
    assert damaged not in volume.files


@needs_series
@pytest.mark.slow
def test_a_series_in_three_folders_is_segmented_once_and_correctly(tmp_path: Path) -> None:
    root, _ = _three_copies(tmp_path / "in")
    bundle = _bundle(tmp_path / "b")
    reference = run_prediction(
        SERIES, tmp_path / "ref", models=[bundle], settings=PredictionSettings(exports=())
    )
    trace = tmp_path / "trace.tsv"
    cmd = [sys.executable, "-m", "medseg.cli", "predict", str(root), str(tmp_path / "out")]
    cmd += ["--model", str(bundle), "--export", "dicom-seg,nifti"]
    env = {**__import__("os").environ, faults.TRACE_ENV: str(trace)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (entry,) = manifest["scans"]
    assert entry["status"] == "ok"
    assert entry["case_id"] == reference.entries[0]["case_id"]
    assert entry["copies"] == [str(root / n) for n in ("doubled", "partial", "whole")]
    case = tmp_path / "out" / entry["case_id"]
    ref = tmp_path / "ref" / entry["case_id"]
    np.testing.assert_array_equal(
        np.asarray(nib.load(case / "labels.nii.gz").dataobj),
        np.asarray(nib.load(ref / "labels.nii.gz").dataobj),
    )
    # the SEG's grid is read from the distinct instances too (this real series lacks PatientBirthDate,
    # which the SEG writer needs: an error of its own, the same for a single copy)
    errors = json.loads((case / "case.json").read_text())["errors"]
    assert "distinct" not in errors.get("dicom-seg", "")
    assert _assert_durable_order(_trace(trace)) >= {"labels.nii.gz", "case.json", "result.json"}
    assert load_image(SERIES).shape == load_image(list(discover(root).scans[0].files)).shape
