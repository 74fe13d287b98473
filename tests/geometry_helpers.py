"""Compare volumes by world position: two grids that share voxels up to axis order and flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path under ``../shared/data``, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data ({path} is absent outside this workplace)")
    return path


def on_grid(
    array: np.ndarray,
    affine: np.ndarray,
    ref_affine: np.ndarray,
    ref_shape: tuple[int, ...],
    atol: float = 1e-3,
) -> np.ndarray:
    """Re-index ``array`` onto a reference grid that holds the same voxels (axes permuted/flipped).

    Fails the test if the two grids do not share every voxel position.
    """
    index_map = np.linalg.inv(ref_affine) @ affine  # our index -> reference index
    rot = index_map[:3, :3]
    perm = np.round(rot)
    assert np.allclose(rot, perm, atol=atol), f"grids are not the same lattice:\n{index_map}"
    assert np.allclose(np.abs(perm).sum(0), 1), index_map
    assert np.allclose(np.abs(perm).sum(1), 1), index_map
    shift = index_map[:3, 3]
    assert np.allclose(shift, np.round(shift), atol=atol), f"grids are offset by {shift}"
    out = np.empty(ref_shape, dtype=array.dtype)
    idx = np.indices(array.shape).reshape(3, -1)
    ref_idx = (perm @ idx + np.round(shift)[:, None]).astype(int)
    assert all((ref_idx[d] >= 0).all() and (ref_idx[d] < ref_shape[d]).all() for d in range(3))
    out[tuple(ref_idx)] = array.reshape(-1) if array.flags.c_contiguous else array.ravel()
    return out


def sitk_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a file, or a DICOM series folder, with SimpleITK: (array indexed i,j,k; RAS affine)."""
    import SimpleITK as sitk

    from medseg.io.readers import sitk_affine

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), sitk_affine(image)
