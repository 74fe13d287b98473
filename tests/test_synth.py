"""Synthetic data: DICOM/NIfTI writers against reference readers, phantoms, and data sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from scipy import ndimage

from medseg.config.spec import load_spec
from medseg.synth import LABELS, dicom_reader_view, generate_dataset, make_phantom, write_dicom_series
from medseg.synth.dicom_writer import write_nifti

ReadSeries = Callable[[Path], tuple[np.ndarray, np.ndarray]]
SHAPE = (24, 20, 10)
SPACING = (0.7, 0.9, 2.5)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    a, b = (i for i in range(3) if i != axis)
    rot = np.eye(3)
    rot[a, a], rot[a, b], rot[b, a], rot[b, b] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
    return rot


def _affine(rot: np.ndarray, spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = (12.5, -31.0, 47.25)
    return aff


def _volume(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.int16)


ORIENTATIONS = {
    "identity": np.eye(3),
    "oblique_two_axes": _rotation(0, 14.0) @ _rotation(2, -9.0),
    "flipped_x": np.diag([-1.0, 1.0, 1.0]),
    "flipped_xy": np.diag([-1.0, -1.0, 1.0]),
    # sagittal stack: i along posterior, j down (inferior), slices from left to right
    "sagittal": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}


# --- DICOM writer --------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_dicom_round_trip_matches_simpleitk(
    tmp_path: Path, sitk_read_series: ReadSeries, name: str, shuffle: bool
) -> None:
    vol, aff = _volume(), _affine(ORIENTATIONS[name])
    write_dicom_series(vol, aff, tmp_path / "s", shuffle_instance_numbers=shuffle, seed=5)
    arr, got_aff = sitk_read_series(tmp_path / "s")
    exp_arr, exp_aff = dicom_reader_view(vol, aff)
    np.testing.assert_allclose(got_aff, exp_aff, atol=1e-4)
    np.testing.assert_array_equal(arr, exp_arr)
    if np.linalg.det(aff[:3, :3]) > 0:  # right-handed: read back exactly as written
        np.testing.assert_array_equal(arr, vol)
        np.testing.assert_allclose(got_aff, aff, atol=1e-4)


def test_left_handed_affine_reads_back_with_reversed_slices_at_the_same_world_positions(
    tmp_path: Path, sitk_read_series: ReadSeries
) -> None:
    vol, aff = _volume(), _affine(ORIENTATIONS["flipped_x"])
    write_dicom_series(vol, aff, tmp_path / "s")
    arr, got_aff = sitk_read_series(tmp_path / "s")
    assert not np.array_equal(arr, vol)
    nz = vol.shape[2]
    for k in (0, 3, nz - 1):
        np.testing.assert_array_equal(arr[:, :, nz - 1 - k], vol[:, :, k])
        np.testing.assert_allclose(got_aff @ [2, 5, nz - 1 - k, 1], aff @ [2, 5, k, 1], atol=1e-4)


def test_shuffled_instance_numbers_do_not_follow_position(tmp_path: Path) -> None:
    files = write_dicom_series(_volume(), _affine(np.eye(3)), tmp_path / "s", shuffle_instance_numbers=True)
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    numbers = [int(ds.InstanceNumber) for ds in dss]
    assert sorted(numbers) == list(range(1, SHAPE[2] + 1))
    assert numbers != sorted(numbers)
    assert numbers != sorted(numbers, reverse=True)
    assert [f.name for f in files] == [f"IM{n:04d}.dcm" for n in numbers]
    z = [float(ds.ImagePositionPatient[2]) for ds in dss]
    assert z == sorted(z)


def test_required_tags_and_pixel_layout(tmp_path: Path) -> None:
    vol, aff = _volume(), _affine(ORIENTATIONS["oblique_two_axes"])
    files = write_dicom_series(
        vol, aff, tmp_path / "s", patient_name="Doe^Jane", patient_id="P42", series_number=7
    )
    assert len(files) == SHAPE[2]
    dss = [pydicom.dcmread(f) for f in files]
    for k, ds in enumerate(dss):
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert str(ds.PatientName) == "Doe^Jane"
        assert (ds.PatientID, ds.Modality, ds.Manufacturer, ds.SeriesNumber) == ("P42", "CT", "medseg", 7)
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (SHAPE[1], SHAPE[0], 16, 1)
        assert ds.RescaleType == "HU"
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([SPACING[1], SPACING[0]])
        assert float(ds.SliceThickness) == pytest.approx(SPACING[2])
        assert float(ds.SpacingBetweenSlices) == pytest.approx(SPACING[2])
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff @ [0, 0, k, 1]
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], lps[:3], atol=1e-4)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, vol[:, :, k].T)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientBirthDate"):
        assert len({str(getattr(ds, key)) for ds in dss}) == 1, key
    assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
    for key in ("StudyDate", "StudyTime", "PatientSex", "KVP", "WindowCenter", "WindowWidth", "ImageType"):
        assert key in dss[0], key


def test_series_is_reproducible_given_its_uids(tmp_path: Path) -> None:
    kwargs = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "series_uid": "1.2.826.0.1.3680043.8.498.2"}
    a = write_dicom_series(_volume(), np.eye(4), tmp_path / "a", **kwargs)
    b = write_dicom_series(_volume(), np.eye(4), tmp_path / "b", **kwargs)
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]


def test_mr_with_rescale_round_trips(tmp_path: Path, sitk_read_series: ReadSeries) -> None:
    vol = np.abs(_volume()).astype(np.float64) * 0.5
    write_dicom_series(vol, _affine(np.eye(3)), tmp_path / "s", modality="MR", rescale_slope=0.5)
    ds = pydicom.dcmread(next((tmp_path / "s").iterdir()))
    assert ds.SOPClassUID == MRImageStorage
    assert ds.Modality == "MR"
    arr, _ = sitk_read_series(tmp_path / "s")
    np.testing.assert_array_equal(arr, vol)


def test_large_positive_values_use_uint16(tmp_path: Path, sitk_read_series: ReadSeries) -> None:
    vol = np.full(SHAPE, 60000, dtype=np.int32)
    vol[0, 0, 0] = 0
    files = write_dicom_series(vol, np.eye(4), tmp_path / "s", modality="MR")
    assert pydicom.dcmread(files[0]).PixelRepresentation == 0
    np.testing.assert_array_equal(sitk_read_series(tmp_path / "s")[0], vol)


def test_slice_positions_override_writes_uneven_and_missing_slices(tmp_path: Path) -> None:
    vol = _volume(shape=(8, 6, 4))
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 6.0], [0.0, 0.0, 7.5]])
    files = write_dicom_series(vol, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "s", slice_positions=pos)
    dss = [pydicom.dcmread(f) for f in files]
    np.testing.assert_allclose([[float(v) for v in ds.ImagePositionPatient] for ds in dss], pos)
    assert "SpacingBetweenSlices" not in dss[0]
    # a tilted stack: positions drift along y; the affine's third column is then not checked
    tilted = np.array([[0.0, 0.5 * k, 2.0 * k] for k in range(4)])
    skewed = np.eye(4)
    skewed[:3, 2] = [0.0, 0.5, 2.0]
    write_dicom_series(vol, skewed, tmp_path / "t", slice_positions=tilted)
    assert float(pydicom.dcmread(tmp_path / "t" / "IM0004.dcm").ImagePositionPatient[1]) == 1.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"affine": np.array([[1.0, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])}, "orthogonal"),
        ({"affine": np.eye(3)}, r"shape \(4, 4\)"),
        ({"array": np.zeros((4, 4))}, "3D"),
        ({"array": np.full((4, 4, 2), 1e6)}, "int16 or uint16"),
        ({"modality": "PT"}, "modality"),
        ({"rescale_slope": 0.0}, "rescale_slope"),
        ({"slice_positions": np.zeros((3, 3))}, "slice_positions"),
    ],
)
def test_write_dicom_series_rejects_bad_input(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"array": np.zeros((4, 4, 2)), "affine": np.eye(4), **kwargs}
    with pytest.raises(ValueError, match=match):
        write_dicom_series(args.pop("array"), args.pop("affine"), tmp_path / "s", **args)


def test_write_nifti_sets_sform_and_qform(tmp_path: Path) -> None:
    aff = _affine(ORIENTATIONS["oblique_two_axes"])
    path = write_nifti(_volume(), aff, tmp_path / "a" / "img.nii.gz", dtype=np.float32)
    img = nib.load(path)
    assert int(img.header["sform_code"]) == 1
    assert int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_sform(), aff, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), aff, atol=1e-4)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), _volume())
    assert [p.name for p in path.parent.iterdir()] == ["img.nii.gz"]  # no temporary left behind


# --- phantom -------------------------------------------------------------------------------------


def test_phantom_is_deterministic_per_seed_and_varies_between_seeds() -> None:
    a, b = make_phantom(shape=SHAPE, seed=4), make_phantom(shape=SHAPE, seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = make_phantom(shape=SHAPE, seed=5)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])
    assert not np.allclose(a[2], c[2])
    image, label, affine = a
    assert image.shape == label.shape == SHAPE
    assert (image.dtype, label.dtype, affine.shape) == (np.float32, np.uint8, (4, 4))


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("shape", [(24, 20, 10), (16, 16, 4), (64, 64, 32)])
def test_phantom_holds_every_label(shape: tuple[int, int, int], modality: str) -> None:
    for seed in range(5):
        image, label, _ = make_phantom(shape=shape, seed=seed, modality=modality)
        assert set(np.unique(label).tolist()) == set(LABELS.values())
        assert np.all(image == np.rint(image))
        if modality == "MR":
            assert image.min() >= 0
        else:
            assert -1200 < image.min() < -800  # air
            assert np.median(image[label > 0]) == pytest.approx(40, abs=60)  # soft tissue


def test_phantom_affine_is_oblique_anisotropic_and_sometimes_flipped() -> None:
    spacing = (1.5, 1.2, 3.0)
    dets = []
    for seed in range(12):
        affine = make_phantom(shape=(16, 16, 4), spacing=spacing, seed=seed)[2]
        cols = affine[:3, :3]
        np.testing.assert_allclose(np.linalg.norm(cols, axis=0), spacing)
        unit = cols / spacing
        np.testing.assert_allclose(unit.T @ unit, np.eye(3), atol=1e-12)
        assert np.abs(np.abs(unit) - np.eye(3)).max() > 1e-3  # rotated, not axis-aligned
        assert np.degrees(np.arccos(np.clip(np.abs(np.diag(unit)).min(), 0, 1))) < 22  # at most ~15 deg twice
        dets.append(np.linalg.det(unit))
    assert min(dets) < 0 < max(dets)


def _cnr_and_threshold_accuracy(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """CNR against the 2-voxel shell around ``mask``, and the best balanced accuracy of one threshold."""
    ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
    inside, around = image[mask], image[ring]
    cnr = abs(inside.mean() - around.mean()) / np.sqrt((inside.var() + around.var()) / 2)
    inside, around = np.sort(inside), np.sort(around)
    cuts = np.unique(np.concatenate([inside, around]))
    below_in = np.searchsorted(inside, cuts) / inside.size
    below_out = np.searchsorted(around, cuts) / around.size
    accuracy = np.maximum(1 - below_in + below_out, below_in + 1 - below_out) / 2
    return float(cnr), float(accuracy.max())


@pytest.mark.parametrize(("modality", "seed"), [("CT", 0), ("CT", 1), ("CT", 2), ("MR", 0), ("MR", 3)])
def test_phantom_structures_are_not_thresholdable(modality: str, seed: int) -> None:
    image, label, _ = make_phantom(seed=seed, modality=modality)
    for name in ("organ", "lesion", "vessel"):
        cnr, accuracy = _cnr_and_threshold_accuracy(image, label == LABELS[name])
        assert 1.0 <= cnr <= 2.5, (name, cnr)
        assert accuracy < 0.9, (name, accuracy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (8, 8, 8)}, "shape"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"modality": "US"}, "modality"),
    ],
)
def test_make_phantom_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_phantom(**kwargs)


# --- data set ------------------------------------------------------------------------------------


def test_generated_dataset_loads_and_matches_its_dicom(
    synthetic_dataset: Path, sitk_read_series: ReadSeries
) -> None:
    loaded = load_spec(synthetic_dataset)
    assert loaded.spec.labels == {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
    assert loaded.spec.channels[0].modality.value == "CT"
    cases = loaded.resolve_cases(require_labels=True)
    assert [c.id for c in cases] == ["case_000", "case_001"]
    root = synthetic_dataset.parent
    for index, case in enumerate(cases):
        image, label = nib.load(case.images[0]), nib.load(case.label)
        np.testing.assert_allclose(image.affine, label.affine)
        assert set(np.unique(np.asarray(label.dataobj)).tolist()) == {0, 1, 2, 3}
        series = root / "dicom" / case.id
        ds = pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True)
        assert str(ds.PatientName) == f"Phantom^Case{index:03d}"
        assert ds.PatientID == f"SYNTH{index:03d}"
        arr, aff = sitk_read_series(series)
        exp_arr, exp_aff = dicom_reader_view(np.asarray(image.dataobj), image.affine)
        np.testing.assert_array_equal(arr, exp_arr)
        np.testing.assert_allclose(aff, exp_aff, atol=1e-4)
    shuffled = [pydicom.dcmread(f, stop_before_pixels=True) for f in (root / "dicom" / "case_001").iterdir()]
    numbers = [int(ds.InstanceNumber) for ds in sorted(shuffled, key=lambda ds: float(ds.SliceLocation))]
    assert numbers != sorted(numbers)
    assert numbers != sorted(numbers, reverse=True)


def test_generate_dataset_is_deterministic_and_guards_foreign_folders(tmp_path: Path) -> None:
    first = generate_dataset(tmp_path / "ds", 3, shape=(16, 16, 4), seed=2, modality="MR")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "ds").rglob("*.dcm"))}
    again = generate_dataset(tmp_path / "ds", 2, shape=(16, 16, 4), seed=2, modality="MR")
    assert again == first
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "ds").rglob("*.dcm"))}
    assert after == {k: v for k, v in before.items() if "case_002" not in str(k)}  # stale case removed
    assert len(load_spec(again).resolve_cases(require_labels=True)) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="out_dir must be empty"):
        generate_dataset(tmp_path / "other", 1, shape=(16, 16, 4))
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="cases must be >= 1"):
        generate_dataset(tmp_path / "ds", 0)
