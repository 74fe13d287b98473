"""Overlay montages (orientation, colours, windows, pages) and their DICOM Secondary Capture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from export_helpers import dciodvfy_errors, oblique_affine

from medseg.export import CaseExport, export_case, label_table
from medseg.export.overlays import OverlaySettings, display_window, montage_pages, tile_origin
from medseg.synth import LABELS, make_phantom, write_dicom_series

PIL = pytest.importorskip("PIL", reason="overlays need Pillow (medseg[plots])")

TABLE = label_table({"background": 0, "front right top": 1, "back left bottom": 2})


def _where(page: np.ndarray, row: int, view: int, color: tuple[int, int, int], settings: OverlaySettings):
    """Centre of the pixels of exactly ``color`` in one view tile, as fractions of the tile (x, y)."""
    x0, y0 = tile_origin(row, view, settings)
    tile = page[y0 : y0 + settings.tile, x0 : x0 + settings.tile]
    ys, xs = np.nonzero(np.all(tile == color, axis=-1))
    assert xs.size, f"colour {color} absent from row {row} view {view}"
    return xs.mean() / settings.tile, ys.mean() / settings.tile


def test_views_follow_the_radiological_convention_whatever_the_grid() -> None:
    # i runs to posterior, j to the patient's left, k to superior: nothing like RAS order
    affine = np.array(
        [[0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    labels = np.zeros((20, 16, 8), np.uint8)
    labels[1:5, 1:5, 5:8] = 1  # anterior (small i), right (small j), superior (large k)
    labels[14:19, 11:15, 0:3] = 2  # posterior, left, inferior
    image = np.full(labels.shape, 40.0, np.float32)
    settings = OverlaySettings(tile=96)
    pages = montage_pages(CaseExport("c", labels, affine, TABLE, image=image, modality="CT"), settings)
    assert len(pages) == 1
    for view in range(3):  # axial, coronal, sagittal: right/anterior on the left, anterior/superior up
        x, y = _where(pages[0], 0, view, TABLE[0].color, settings)
        assert (x < 0.5, y < 0.5) == (True, True), (view, x, y)
        x, y = _where(pages[0], 1, view, TABLE[1].color, settings)
        assert (x > 0.5, y > 0.5) == (True, True), (view, x, y)


def test_windows_pages_and_empty_predictions(tmp_path: Path) -> None:
    settings = OverlaySettings()
    assert display_window(np.zeros(10), "CT", settings) == (-160.0, 240.0)
    mr = np.concatenate([np.zeros(1000), np.linspace(100, 200, 1000)])
    lo, hi = display_window(mr, "MR", settings)
    assert 100 < lo < 103
    assert 197 < hi < 200
    labels = np.zeros((16, 16, 6), np.uint8)
    many = label_table({f"l{v}": v for v in range(1, 9)})
    for v in range(1, 9):
        labels[v, 2:6, 1:4] = v
    case = CaseExport("many", labels, np.eye(4), many)
    assert len(montage_pages(case, OverlaySettings(tile=64, rows_per_page=6))) == 2
    (tmp_path / "c").mkdir()
    written = export_case(case, tmp_path / "c", ["overlays"])
    names = sorted(str(p.relative_to(tmp_path / "c")) for p in written)
    assert names == ["case.json", "overlays/montage-2.png", "overlays/montage.png"]
    with PIL.Image.open(tmp_path / "c" / "overlays" / "montage.png") as im:
        assert im.mode == "RGB"
        assert im.size[0] == 3 * 220 + 4 * 8
    empty = CaseExport("empty", np.zeros((16, 16, 6), np.uint8), np.eye(4), many)
    (page,) = montage_pages(empty, OverlaySettings(tile=64))
    assert page.shape[0] > 64


def test_secondary_capture_of_the_montage(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    image, labels, _ = make_phantom(shape=(24, 20, 10), seed=5)
    affine = oblique_affine(flip=False)
    files = write_dicom_series(
        image, affine, tmp_path / "s", patient_id="SC-PATIENT", patient_name="Doe^John"
    )
    from medseg.export.labels import label_table as make_table

    case = CaseExport(
        "dicom-x", labels, affine, make_table(LABELS), image=image, modality="CT", dicom_files=tuple(files)
    )
    (tmp_path / "out").mkdir()
    written = export_case(case, tmp_path / "out", ["overlays", "secondary-capture"])
    sc_files = [p for p in written if p.suffix == ".dcm"]
    assert len(sc_files) == 1
    ds = pydicom.dcmread(sc_files[0])
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.PatientID == "SC-PATIENT"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    with PIL.Image.open(tmp_path / "out" / "overlays" / "montage.png") as im:
        np.testing.assert_array_equal(ds.pixel_array, np.asarray(im))
    assert dciodvfy_errors(sc_files[0]) == []
