"""``medseg review collect``: corrected NIfTI, cropped Slicer .seg.nrrd and DICOM SEG back onto their
cases' grids as a data set with a spec; wrong grids, other series and unknown labels refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from export_helpers import expected_frame, oblique_affine
from typer.testing import CliRunner

from medseg.bundle import build_network, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.synth import write_dicom_series, write_nifti

LABELS = {"background": 0, "organ": 1, "lesion": 2}
SHAPE = (20, 18, 8)
NIFTI_AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _predicted() -> np.ndarray:
    v = np.zeros(SHAPE, np.int16)
    v[2:10, 2:12, 1:6] = 1
    v[4:6, 4:6, 2:4] = 2
    return v


def _corrected() -> np.ndarray:
    v = _predicted()
    v[10:13, 2:12, 1:6] = 1  # the organ was too small
    v[4:6, 4:6, 2:4] = 1  # no lesion there
    v[7:9, 8:10, 3:5] = 2  # the lesion is here
    return v


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collect")
    for name in ("a", "b", "c"):
        write_nifti(_predicted(), NIFTI_AFFINE, root / "in" / f"{name}.nii.gz")
    write_dicom_series(
        _predicted().astype(np.float32), oblique_affine(flip=True), root / "in" / "dicom", modality="MR"
    )
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "MR", "intensity": {"scheme": "none"}}],
            "labels": LABELS,
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    bundle = save_bundle(root / "bundle", cfg, spec, build_network(cfg, spec))
    result = CliRunner().invoke(
        app,
        ["predict", str(root / "in"), str(root / "out"), "--model", str(bundle), "--export", "nifti,stats"],
    )
    assert result.exit_code == 0, result.output
    return root / "out"


def _seg_nrrd(path: Path, labels: np.ndarray, grid_affine: np.ndarray, lo: tuple[int, int, int]) -> None:
    """A Slicer-style .seg.nrrd: the labels' bounding box, segments numbered in another order by name."""
    hi = np.argwhere(labels).max(axis=0) + 1
    box = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    file_values = np.select([box == 2, box == 1], [1, 2], 0).astype(np.uint8)  # lesion 1, organ 2
    image = sitk.GetImageFromArray(file_values.transpose(2, 1, 0))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin((lps @ np.array([*lo, 1.0]))[:3].tolist())
    for i, (name, value) in enumerate((("lesion", 1), ("Organ", 2))):
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(value))
        image.SetMetaData(f"Segment{i}_Layer", "0")
    sitk.WriteImage(image, str(path), useCompression=True)


def _dicom_seg(path: Path, series: list[Path], labels: np.ndarray, affine: np.ndarray) -> None:
    """A DICOM SEG written by highdicom over the source instances (segment 1 lesion, 2 organ)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in series]
    frames = np.stack([expected_frame(ds, labels, affine) for ds in sources])
    frames = np.select([frames == 2, frames == 1], [1, 2], 0).astype(np.uint8)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=name,
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.cid7166.ConnectiveTissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n, name in ((1, "lesion"), (2, "organ"))
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(path)


def _dicom_case(batch: Path) -> str:
    return next(p.name for p in batch.iterdir() if p.name.startswith("dicom"))


@pytest.mark.slow
def test_collect_three_formats_into_a_data_set(batch: Path, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    corrected = _corrected()
    write_nifti(corrected, NIFTI_AFFINE, fixed / "a.nii.gz")
    _seg_nrrd(fixed / "b.seg.nrrd", corrected, NIFTI_AFFINE, lo=(2, 2, 1))
    dicom_id = _dicom_case(batch)
    series = sorted((batch.parent / "in" / "dicom").iterdir())
    _dicom_seg(fixed / f"{dicom_id}.dcm", series, corrected, oblique_affine(flip=True))

    before = {p: p.read_bytes() for p in batch.rglob("*") if p.is_file()}
    result = CliRunner().invoke(
        app, ["review", "collect", str(batch), "--corrected", str(fixed), "--out", str(tmp_path / "data")]
    )
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in batch.rglob("*") if p.is_file()} == before

    from medseg.config.spec import load_spec

    loaded = load_spec(tmp_path / "data" / "dataset.yaml")
    cases = loaded.resolve_cases(require_labels=True)
    assert sorted(c.id for c in cases) == sorted(["a", "b", dicom_id])
    assert loaded.spec.labels == LABELS
    for case in cases:
        img = nib.load(case.label)
        grid = nib.load(batch / case.id / "labels.nii.gz")
        np.testing.assert_allclose(img.affine, grid.affine, atol=1e-5)
        want = corrected if case.id != dicom_id else _on_series_grid(batch, case.id)
        np.testing.assert_array_equal(np.asarray(img.dataobj), want, err_msg=case.id)
        scan = nib.load(case.images[0])
        assert scan.shape == grid.shape
    measures = {m["case_id"]: m for m in json.loads((tmp_path / "data" / "corrections.json").read_text())}
    pred, corr = _predicted() > 0, corrected > 0
    expected_dice = 2 * (pred & corr).sum() / (pred.sum() + corr.sum())
    assert measures["a"]["dice"] == pytest.approx(expected_dice)
    assert measures["b"]["dice_per_label"]["lesion"] == 0.0
    assert measures["a"]["volume_change_ml"] == pytest.approx((corr.sum() - pred.sum()) * 2 / 1000)

    from medseg.tracking.store import client

    manifest = json.loads((batch / "manifest.json").read_text())
    run = client(manifest["tracking_uri"]).get_run(manifest["run_id"])
    assert run.data.metrics["correction/a/dice"] == pytest.approx(expected_dice)
    assert run.data.metrics["correction/cases"] == 3


def _on_series_grid(batch: Path, case_id: str) -> np.ndarray:
    """The corrected labels as they lie on the DICOM case's grid (through nibabel, not medseg)."""
    from export_helpers import onto_grid

    grid = nib.load(batch / case_id / "labels.nii.gz")
    return onto_grid(_corrected(), oblique_affine(flip=True), grid.affine, grid.shape)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        (
            "a.nii.gz",
            lambda p, b: write_nifti(_corrected()[:, :, :7], NIFTI_AFFINE, p),
            "must be on the scan's grid",
        ),
        (
            "a.nii.gz",
            lambda p, b: write_nifti(_corrected() * 3, NIFTI_AFFINE, p),
            r"label values must be in .* got \[3, 6\]",
        ),
        ("zz.nii.gz", lambda p, b: write_nifti(_corrected(), NIFTI_AFFINE, p), "must be named for a case"),
        (
            "DICOM",
            lambda p, b: _dicom_seg(
                p, sorted((b.parent / "other").iterdir()), _corrected(), np.diag([1.0, 1.0, 2.0, 1.0])
            ),
            "must reference the case's series",
        ),
    ],
)
def test_collect_refuses_bad_corrections(batch: Path, tmp_path: Path, name: str, make, message: str) -> None:
    import re

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    if name == "DICOM":
        name = f"{_dicom_case(batch)}.dcm"
        other = batch.parent / "other"
        if not other.exists():
            write_dicom_series(
                _predicted().astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), other, modality="MR"
            )
    make(fixed / name, batch)
    result = CliRunner().invoke(
        app, ["review", "collect", str(batch), "--corrected", str(fixed), "--out", str(tmp_path / "data")]
    )
    assert result.exit_code == 2, result.output
    assert str(fixed / name) in result.output.replace("\n", "")
    assert re.search(message, result.output.replace("\n", "")), result.output
    assert not (tmp_path / "data").exists()
    shutil.rmtree(fixed)
