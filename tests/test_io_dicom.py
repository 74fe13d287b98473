"""DICOM series loading: geometry against SimpleITK and reference conversions, and bad series."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from geometry_helpers import on_grid, shared, sitk_volume

from medseg.errors import GeometryError, InputError
from medseg.io import load_image
from medseg.io.dicom_series import read_series, scan_series
from medseg.synth.dicom_writer import dicom_reader_view, write_dicom_series


def _rotation(ax: float, ay: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rx @ ry


def _affine(rot: np.ndarray, spacing: tuple[float, float, float], origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing)
    aff[:3, 3] = origin
    return aff


def _volume(shape=(12, 10, 6), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2000, size=shape).astype(np.int16)


ORIENTATIONS = {
    "axial": np.eye(3),
    "oblique": _rotation(np.radians(20), np.radians(-12)),
    "flipped_x": np.diag([-1.0, 1.0, 1.0]),
    "flipped_z": np.diag([1.0, 1.0, -1.0]),
    # sagittal stack: rows along y (A), columns along -z (I), slices along x
    "sagittal": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_written_series_loads_with_exact_geometry(tmp_path: Path, name: str) -> None:
    vol = _volume()
    aff = _affine(ORIENTATIONS[name], (0.8, 0.9, 2.5))
    write_dicom_series(vol, aff, tmp_path / "s", shuffle_instance_numbers=True, seed=3)
    img = load_image(tmp_path / "s")
    exp_arr, exp_aff = dicom_reader_view(vol, aff)
    assert tuple(img.shape) == (1, *vol.shape)
    np.testing.assert_allclose(img.affine.numpy(), exp_aff, atol=1e-4)
    np.testing.assert_array_equal(img[0].numpy(), exp_arr)
    # and SimpleITK agrees voxel for voxel, in world coordinates
    s_arr, s_aff = sitk_volume(tmp_path / "s")
    np.testing.assert_array_equal(on_grid(img[0].numpy(), img.affine.numpy(), s_aff, s_arr.shape), s_arr)


def test_rescale_slope_intercept_applied(tmp_path: Path) -> None:
    vol = np.linspace(-50.0, 50.0, 12 * 10 * 4).reshape(12, 10, 4).astype(np.float32)
    write_dicom_series(vol, np.eye(4), tmp_path / "s", rescale_slope=0.5, rescale_intercept=-10.0)
    img = load_image(tmp_path / "s")
    assert img.dtype.is_floating_point
    np.testing.assert_allclose(img[0].numpy(), np.round((vol + 10) / 0.5) * 0.5 - 10, atol=1e-5)


def test_integer_ct_stays_int16(tmp_path: Path) -> None:
    write_dicom_series(_volume(), np.eye(4), tmp_path / "s", rescale_intercept=-1024.0)
    img = load_image(tmp_path / "s")
    assert str(img.dtype) == "torch.int16"
    np.testing.assert_array_equal(img[0].numpy(), _volume())


def test_slices_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    vol = _volume()
    files = write_dicom_series(vol, np.eye(4), tmp_path / "s", shuffle_instance_numbers=True, seed=1)
    numbers = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files]
    assert numbers != sorted(numbers)  # the test is only meaningful if the numbers are shuffled
    np.testing.assert_array_equal(load_image(tmp_path / "s")[0].numpy(), vol)


def test_folder_with_two_series_requires_a_choice(tmp_path: Path) -> None:
    a = write_dicom_series(
        _volume(seed=1), np.eye(4), tmp_path / "both", series_uid="1.2.3.1", file_names="A{:03d}.dcm"
    )
    write_dicom_series(
        _volume(seed=2), np.eye(4), tmp_path / "both", series_uid="1.2.3.2", file_names="B{:03d}.dcm"
    )
    assert len(a) == 6
    assert sorted(len(s.files) for s in scan_series(sorted((tmp_path / "both").iterdir()))) == [6, 6]
    with pytest.raises(InputError, match=r"holds 2 image series.*1\.2\.3\.1.*1\.2\.3\.2"):
        load_image(tmp_path / "both")
    first = load_image(tmp_path / "both", series_uid="1.2.3.1")
    second = load_image(tmp_path / "both", series_uid="1.2.3.2")
    np.testing.assert_array_equal(first[0].numpy(), _volume(seed=1))
    np.testing.assert_array_equal(second[0].numpy(), _volume(seed=2))


def test_series_split_over_nested_folders_and_extensionless_files(tmp_path: Path) -> None:
    files = write_dicom_series(_volume(), np.eye(4), tmp_path / "flat")
    for i, f in enumerate(files):
        dest = tmp_path / "nested" / f"part{i % 2}" / f"slice{i}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    (tmp_path / "nested" / "notes.txt").write_text("not dicom")
    np.testing.assert_array_equal(load_image(tmp_path / "nested")[0].numpy(), _volume())


def _positions(n: int, spacing: float = 2.0) -> np.ndarray:
    return np.array([[0.0, 0.0, spacing * k] for k in range(n)])


def test_missing_slice_is_reported(tmp_path: Path) -> None:
    pos = np.delete(_positions(7), 3, axis=0)
    write_dicom_series(_volume(), np.eye(4), tmp_path / "s", slice_positions=pos)
    with pytest.raises(GeometryError, match="1 missing slice"):
        load_image(tmp_path / "s")


def test_uneven_spacing_is_reported(tmp_path: Path) -> None:
    pos = _positions(6)
    pos[4:, 2] += 0.7
    write_dicom_series(_volume(), np.eye(4), tmp_path / "s", slice_positions=pos)
    with pytest.raises(GeometryError, match="slice spacing must be even"):
        load_image(tmp_path / "s")


def test_duplicate_positions_are_reported(tmp_path: Path) -> None:
    pos = _positions(6)
    pos[3] = pos[2]
    write_dicom_series(_volume(), np.eye(4), tmp_path / "s", slice_positions=pos)
    with pytest.raises(GeometryError, match="positions must be distinct"):
        load_image(tmp_path / "s")


def test_gantry_tilt_rejected_unless_allowed(tmp_path: Path) -> None:
    pos = _positions(6)
    pos[:, 1] = np.arange(6) * 0.5  # positions drift along y: a tilt of about 14 degrees
    vol = _volume()
    write_dicom_series(vol, np.eye(4), tmp_path / "s", slice_positions=pos)
    with pytest.raises(GeometryError, match=r"tilt of 14\.\d+ degrees"):
        load_image(tmp_path / "s")
    img = load_image(tmp_path / "s", allow_tilt=True)
    # the sheared affine puts every slice at its own stored position
    for k in range(6):
        world = img.affine.numpy() @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(world[:3], [-pos[k, 0], -pos[k, 1], pos[k, 2]], atol=1e-4)


def test_too_few_slices_threshold_is_configurable(tmp_path: Path) -> None:
    write_dicom_series(_volume(shape=(8, 8, 2)), np.eye(4), tmp_path / "s")
    with pytest.raises(GeometryError, match="at least 3 slices"):
        load_image(tmp_path / "s")
    assert load_image(tmp_path / "s", min_slices=2).shape[-1] == 2


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_transfer_syntaxes_decode(tmp_path: Path, syntax: str) -> None:
    vol = _volume(shape=(64, 48, 3))
    files = write_dicom_series(vol, np.eye(4), tmp_path / "s", rescale_intercept=-1024.0)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(getattr(pydicom.uid, syntax))
        ds.save_as(f)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(load_image(tmp_path / "s")[0].numpy(), vol)


def test_no_dicom_in_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(InputError, match="at least one DICOM image series"):
        load_image(tmp_path)


def test_truncated_slice_is_a_clear_error(tmp_path: Path) -> None:
    files = write_dicom_series(_volume(), np.eye(4), tmp_path / "s")
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 50])
    with pytest.raises(InputError, match=files[2].name):
        load_image(tmp_path / "s")


# --- real series from ../shared/data ---------------------------------------------------------------


@pytest.mark.parametrize(
    "parts",
    [
        ("dicom_geometry", "anatomical", "001"),
        ("dicom_geometry", "hitachi", "anatomical", "001"),
        ("dicom_geometry", "hitachi", "anatomical", "001_implicit"),
        ("mr_study", "12-T1post-05670"),
        ("mr_study", "13_HCropVolume"),
        ("ct_seg_reference", "ct-3slice"),
    ],
)
def test_real_series_match_simpleitk(parts: tuple[str, ...]) -> None:
    folder = shared(*parts)
    img = load_image(folder)
    s_arr, s_aff = sitk_volume(folder)
    ours = on_grid(img[0].numpy(), img.affine.numpy(), s_aff, s_arr.shape)
    np.testing.assert_array_equal(ours, s_arr)


@pytest.mark.parametrize(
    ("series", "reference"),
    [
        (("dicom_geometry", "anatomical", "001"), "001_ground_truth.nii.gz"),
        (("dicom_geometry", "hitachi", "anatomical", "001"), "001_ground_truth.nii.gz"),
        (("dicom_geometry", "hitachi", "anatomical", "001_implicit"), "001_implicit_ground_truth.nii.gz"),
    ],
)
def test_real_series_match_reference_nifti(series: tuple[str, ...], reference: str) -> None:
    folder = shared(*series)
    ref = nib.load(folder.parent / reference)
    img = load_image(folder)
    ref_arr = np.asarray(ref.dataobj)
    ours = on_grid(img[0].numpy(), img.affine.numpy(), ref.affine, ref_arr.shape)
    np.testing.assert_array_equal(ours, ref_arr)


def test_real_study_folder_lists_both_series() -> None:
    study = shared("mr_study")
    with pytest.raises(InputError, match="holds 2 image series") as info:
        load_image(study)
    assert "T1post" in str(info.value)
    assert "HippoCrop" in str(info.value)
    uid = next(s.series_uid for s in scan_series(sorted(study.rglob("*.dcm"))) if s.description == "T1post")
    assert load_image(study, series_uid=uid).shape[-1] == 22


def test_bad_real_series_are_rejected_with_reasons() -> None:
    with pytest.raises(GeometryError, match=r"at least 3 slices.*got 2"):
        load_image(shared("dicom_bad", "slicecount", "001"))
    with pytest.raises(GeometryError, match="share one orientation"):
        load_image(shared("dicom_bad", "sliceorientation", "001"))


def test_read_series_reports_sop_instances_in_volume_order(tmp_path: Path) -> None:
    files = write_dicom_series(_volume(), np.eye(4), tmp_path / "s", shuffle_instance_numbers=True)
    vol = read_series(tmp_path / "s")
    expected = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    assert vol.meta["sop_instance_uids"] == expected  # files were written in position order
