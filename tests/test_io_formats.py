"""NIfTI, NRRD and MHA loading: orientations, dtypes, header variants, and clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from geometry_helpers import shared, sitk_volume

from medseg.errors import GeometryError, InputError
from medseg.io import load_case, load_image, write_label_map, write_volume

AFFINES = {
    "ras": np.diag([1.0, 1.0, 1.0, 1.0]),
    "lps": np.diag([-0.8, -0.8, 2.5, 1.0]),
    "las_oblique": np.array(
        [[-0.9, 0.1, 0.0, 5.0], [0.1, 0.95, 0.2, -3.0], [0.0, -0.3, 2.9, 7.0], [0, 0, 0, 1.0]]
    ),
    "sagittal": np.array([[0.0, 0.0, 1.5, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, -1.0, 0.0, 3.0], [0, 0, 0, 1.0]]),
}
DTYPES = [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nifti_matches_nibabel(tmp_path: Path, name: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((7, 6, 5)) * 200).astype(dtype)
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINES[name]), path)
    img = load_image(path)
    assert tuple(img.shape) == (1, 7, 6, 5)
    np.testing.assert_array_equal(img[0].numpy(), data)
    np.testing.assert_allclose(img.affine.numpy(), nib.load(path).affine, atol=1e-6)


def test_nifti_qform_only_and_sform_precedence(tmp_path: Path) -> None:
    data = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    q_only = nib.Nifti1Image(data, None)
    q_only.set_qform(AFFINES["lps"], code=1)
    q_only.set_sform(None, code=0)
    nib.save(q_only, tmp_path / "q.nii")
    np.testing.assert_allclose(load_image(tmp_path / "q.nii").affine.numpy(), AFFINES["lps"], atol=1e-5)
    both = nib.Nifti1Image(data, None)
    both.set_qform(AFFINES["lps"], code=1)
    both.set_sform(AFFINES["las_oblique"], code=2)
    nib.save(both, tmp_path / "s.nii")
    np.testing.assert_allclose(
        load_image(tmp_path / "s.nii").affine.numpy(), AFFINES["las_oblique"], atol=1e-5
    )


def test_nifti_scaling_and_big_endian(tmp_path: Path) -> None:
    data = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "plain.nii")
    raw = bytearray((tmp_path / "plain.nii").read_bytes())
    raw[112:120] = np.array([0.5, -3.0], dtype="<f4").tobytes()  # scl_slope, scl_inter
    (tmp_path / "scaled.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    proxy = nib.load(tmp_path / "scaled.nii.gz").dataobj
    assert (proxy.slope, proxy.inter) == (0.5, -3.0)
    np.testing.assert_allclose(load_image(tmp_path / "scaled.nii.gz")[0].numpy(), data * 0.5 - 3.0)
    big = nib.Nifti1Image(data, np.eye(4), header=nib.Nifti1Header(endianness=">"))
    nib.save(big, tmp_path / "big.nii")
    assert nib.load(tmp_path / "big.nii").get_data_dtype().byteorder == ">"
    np.testing.assert_array_equal(load_image(tmp_path / "big.nii")[0].numpy(), data)


def test_nifti_4d_channels_and_trailing_singletons(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((5, 4, 3, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "4d.nii.gz")
    img = load_image(tmp_path / "4d.nii.gz")
    assert tuple(img.shape) == (2, 5, 4, 3)
    np.testing.assert_array_equal(img[1].numpy(), data[..., 1])
    nib.save(nib.Nifti1Image(data[..., :1], np.eye(4)), tmp_path / "single.nii.gz")
    assert tuple(load_image(tmp_path / "single.nii.gz").shape) == (1, 5, 4, 3)


def test_nifti_header_that_lies_about_size(tmp_path: Path) -> None:
    data = np.zeros((10, 10, 10), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ok.nii")
    raw = (tmp_path / "ok.nii").read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(InputError, match=r"short\.nii\.gz.*promises"):
        load_image(tmp_path / "short.nii.gz")


def test_empty_missing_and_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="must not be empty"):
        load_image(tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="must exist"):
        load_image(tmp_path / "nope.nii.gz")
    (tmp_path / "junk.nrrd").write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=r"junk\.nrrd"):
        load_image(tmp_path / "junk.nrrd")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match=r"junk\.nii\.gz"):
        load_image(tmp_path / "junk.nii.gz")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_write_then_load_round_trip(tmp_path: Path, suffix: str) -> None:
    data = np.random.default_rng(2).random((6, 5, 4)).astype(np.float32)
    path = write_volume(data, AFFINES["las_oblique"], tmp_path / f"v{suffix}")
    img = load_image(path)
    np.testing.assert_array_equal(img[0].numpy(), data)
    np.testing.assert_allclose(img.affine.numpy(), AFFINES["las_oblique"], atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file must be renamed away"


def test_label_map_written_with_small_dtype(tmp_path: Path) -> None:
    labels = np.zeros((4, 4, 4), dtype=np.int64)
    labels[1:3, 1:3, 1:3] = 2
    write_label_map(torch.as_tensor(labels), AFFINES["lps"], tmp_path / "lab.nii.gz")
    loaded = nib.load(tmp_path / "lab.nii.gz")
    assert loaded.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), labels)


def test_written_nifti_gz_is_plain_gzip_of_the_uncompressed_file(tmp_path: Path) -> None:
    import gzip

    from medseg.io.write import write_probabilities

    labels = np.zeros((30, 20, 10), dtype=np.uint8)
    labels[5:25, 4:16, 2:8] = 3
    write_label_map(labels, AFFINES["lps"], tmp_path / "lab.nii.gz")
    write_volume(labels, AFFINES["lps"], tmp_path / "lab.nii")
    assert gzip.decompress((tmp_path / "lab.nii.gz").read_bytes()) == (tmp_path / "lab.nii").read_bytes()
    write_label_map(labels, AFFINES["lps"], tmp_path / "again.nii.gz")  # reproducible bytes
    assert (tmp_path / "again.nii.gz").read_bytes() == (tmp_path / "lab.nii.gz").read_bytes()
    probs = np.random.default_rng(0).random((3, 6, 5, 4)).astype(np.float32)
    write_probabilities(probs, AFFINES["lps"], tmp_path / "p.nii.gz")
    with gzip.open(tmp_path / "p.nii.gz") as f:  # Python's own gzip reads it to the end
        assert len(f.read()) == 352 + probs.size * 4
    np.testing.assert_allclose(
        np.moveaxis(nib.load(tmp_path / "p.nii.gz").get_fdata(), -1, 0), probs, atol=1e-3
    )


def test_nrrd_matches_simpleitk() -> None:
    path = shared("nrrd_mr", "brain1_image.nrrd")
    img = load_image(path)
    s_arr, s_aff = sitk_volume(path)
    np.testing.assert_array_equal(img[0].numpy(), s_arr)
    np.testing.assert_allclose(img.affine.numpy(), s_aff, atol=1e-6)
    label = load_image(shared("nrrd_mr", "brain1_label.nrrd"))
    assert label.shape == img.shape
    np.testing.assert_allclose(label.affine.numpy(), img.affine.numpy(), atol=1e-4)


def test_load_case_stacks_coregistered_channels(tmp_path: Path) -> None:
    a = np.ones((5, 4, 3), dtype=np.float32)
    write_volume(a, AFFINES["lps"], tmp_path / "t1.nii.gz")
    write_volume(2 * a, AFFINES["lps"], tmp_path / "t2.nrrd")
    case = load_case([tmp_path / "t1.nii.gz", tmp_path / "t2.nrrd"])
    assert tuple(case.shape) == (2, 5, 4, 3)
    np.testing.assert_array_equal(case[1].numpy(), 2 * a)
    write_volume(a, AFFINES["ras"], tmp_path / "moved.nii.gz")
    with pytest.raises(GeometryError, match="share one voxel grid"):
        load_case([tmp_path / "t1.nii.gz", tmp_path / "moved.nii.gz"])
