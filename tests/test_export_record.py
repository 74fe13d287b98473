"""One geometry, one case record per scan, one case.json, typed review rows (tiny hand-built cases)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from export_helpers import expected_frame, oblique_affine

from medseg.errors import GeometryError
from medseg.export import BatchCase, CaseExport, export_case, label_table, write_review
from medseg.export.dicom_grid import place_series
from medseg.export.dicom_seg import segment_frames
from medseg.geometry import LPS_TO_RAS, dicom_affine, lps_to_ras, spacing_from_affine, voxel_volume_ml
from medseg.io.dicom_series import read_series
from medseg.labelmap import dice, dice_from_counts, label_dtype, torch_label_dtype
from medseg.synth import write_dicom_series

TABLE = label_table({"organ": 1, "lesion": 2})


def _blocks(shape=(12, 10, 6)) -> np.ndarray:
    v = np.zeros(shape, np.uint8)
    v[2:9, 2:7, 1:5] = 1
    v[4:6, 4:6, 2:4] = 2
    return v


def test_dicom_affine_is_the_affine_the_series_was_written_with(tmp_path: Path) -> None:
    affine = oblique_affine(flip=False)  # right-handed: the reader keeps its slice order
    write_dicom_series(_blocks().astype(np.float32), affine, tmp_path / "s", modality="MR")
    volume = read_series(tmp_path / "s")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    first = pydicom.dcmread(volume.files[0], stop_before_pixels=True)
    last = pydicom.dcmread(volume.files[-1], stop_before_pixels=True)
    step = (np.asarray(last.ImagePositionPatient, float) - np.asarray(first.ImagePositionPatient, float)) / (
        len(volume.files) - 1
    )
    built = dicom_affine(first.ImageOrientationPatient, first.PixelSpacing, first.ImagePositionPatient, step)
    np.testing.assert_allclose(built, affine, atol=1e-4)
    assert spacing_from_affine(built) == pytest.approx((0.9, 1.1, 2.5), abs=1e-4)
    assert voxel_volume_ml(built) == pytest.approx(0.9 * 1.1 * 2.5 / 1000, rel=1e-4)
    np.testing.assert_array_equal(lps_to_ras(lps_to_ras(built)), built)
    np.testing.assert_array_equal(lps_to_ras(np.eye(4)), LPS_TO_RAS)


def test_label_dtype_and_dice_have_one_rule() -> None:
    assert [label_dtype(n) for n in (2, 256, 257, 65536, 65537)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.int32,
    ]
    assert str(torch_label_dtype(256)) == "torch.uint8"
    assert str(torch_label_dtype(257)) == "torch.int32"
    a, b = _blocks(), _blocks()
    b[2, 2, 1] = 0
    n = int((a == 1).sum())
    assert dice(a, b, 1) == pytest.approx(2 * (n - 1) / (2 * n - 1))
    assert dice(a, b, 7) == 1.0
    assert np.isnan(dice(a, b, 7, empty=float("nan")))
    assert dice_from_counts(0, 3, 0) == 0.0


def test_dicom_seg_places_the_series_on_the_loaders_grid(tmp_path: Path) -> None:
    """The SEG's frames come from the case's grid (the loader's), checked against each instance."""
    affine = oblique_affine(flip=True)
    labels = _blocks()
    write_dicom_series(labels.astype(np.float32), affine, tmp_path / "s", modality="MR")
    files = tuple(sorted((tmp_path / "s").iterdir()))
    loaded = read_series(tmp_path / "s").affine
    case = CaseExport("c", labels, loaded, TABLE, dicom_files=files, inputs=files)
    grid, frames = segment_frames(case)
    for ds, frame in zip(grid.headers, frames):
        np.testing.assert_array_equal(frame, expected_frame(ds, labels, affine))
    shifted = loaded.copy()
    shifted[:3, 3] += shifted[:3, 0] * 0.5  # half a voxel off along i
    with pytest.raises(GeometryError, match="must lie on a slice of the grid"):
        place_series(files, shifted, labels.shape)
    turned = loaded.copy()
    turned[:3, [0, 1]] = turned[:3, [1, 0]]
    with pytest.raises(GeometryError, match="orientation"):
        place_series(files, turned, labels.shape)


def test_every_export_writes_one_case_json_listing_them_all(tmp_path: Path) -> None:
    case = CaseExport("c", _blocks(), np.diag([2.0, 2.0, 2.5, 1.0]), TABLE)
    written = export_case(case, tmp_path, ["volumes", "stats", "dicom-seg", "nifti"])
    names = [p.name for p in written]
    assert names.count("case.json") == 1
    assert names[-1] == "case.json"
    facts = json.loads((tmp_path / "case.json").read_text())
    assert facts["exports"] == ["nifti", "stats", "volumes"]
    assert facts["not_applicable"] == ["dicom-seg"]
    volumes = json.loads((tmp_path / "volumes.json").read_text())
    assert volumes["1"]["voxels"] == int((case.labels == 1).sum())
    assert volumes["1"]["volume_ml"] == pytest.approx(volumes["1"]["voxels"] * 0.01)


def test_review_page_escapes_what_it_shows(tmp_path: Path) -> None:
    labels = _blocks()
    (tmp_path / "a").mkdir()
    case = CaseExport("a", labels, np.eye(4), TABLE, series_description='<script>alert("x")</script>')
    export_case(case, tmp_path / "a", ["nifti", "stats"])
    cases = [
        BatchCase("a", "ok", outputs=("a/labels.nii.gz", "a/stats.json")),
        BatchCase("b&<i>", "failed", error='bad "file" <b>'),
    ]
    written = write_review(tmp_path, cases)
    index = written[0].read_text()
    assert "<script>alert" not in index
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in index
    assert 'data-case="b&amp;&lt;i&gt;"' in index
    assert 'title="bad &#34;file&#34; &lt;b&gt;"' in index
    assert '<a href="cases/b%26%3Ci%3E.html">' in index
    page = (tmp_path / "report" / "cases" / "a.html").read_text()
    assert '<a href="../../a/stats.json">stats.json</a>' in page
    assert "<td>20 x 10 x 6</td>" not in page  # the grid is the label map's
    assert "<td>12 x 10 x 6</td>" in page


def test_export_never_imports_batch() -> None:
    """The batch uses the exports and owns its manifest; the exports never reach back."""
    root = Path(__file__).parents[1] / "medseg" / "export"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("medseg.batch") for n in names), path.name
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "manifest.json" not in node.value, path.name
