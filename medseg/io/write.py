"""Write volumes and label maps on a given voxel grid, atomically."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import InputError
from medseg.geometry import LPS_TO_RAS
from medseg.io.atomic import atomic_path
from medseg.labelmap import label_dtype

_gzip_cls: type[gzip.GzipFile]
try:  # ISA-L deflates faster than zlib at the same (fastest) level; optional
    from isal.igzip import IGzipFile

    _gzip_cls = IGzipFile
except ImportError:  # pragma: no cover - depends on the environment
    _gzip_cls = gzip.GzipFile

GZIP_LEVEL = 1
"""Deflate level of written ``.nii.gz`` files (nibabel's default, the fastest)."""


def save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    """Save a NIfTI image to ``path``; a ``.gz`` name is deflated as it is written (ISA-L if present).

    The header and the voxels stream into the gzip file, so no compressed or uncompressed copy of the
    whole volume is held in memory. The result is an ordinary single-member gzip file, the same bytes
    for the same image (no file name or time in its header).

    Args:
        img: The image.
        path: Destination (not made atomic here: pass a temporary path).
    """
    if path.name.lower().endswith(".gz"):
        # no name and no time in the gzip header: the same image gives the same bytes (as nibabel)
        with (
            open(path, "wb") as raw,
            _gzip_cls(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) as f,
        ):
            holder = nib.FileHolder(filename=str(path), fileobj=f)
            img.to_file_map({"image": holder, "header": holder})
    else:
        nib.save(img, path)


def _as_numpy(array: object) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def write_volume(array: object, affine: object, path: str | Path, dtype: np.dtype | None = None) -> Path:
    """Write a 3D volume indexed ``(i, j, k)`` with a RAS+ affine; the suffix picks the format.

    ``.nii``/``.nii.gz`` go through nibabel (sform and qform both set); other suffixes
    (``.nrrd``, ``.mha``, ...) through SimpleITK (which stores LPS).

    Args:
        array: The volume (numpy array or tensor), 3D.
        affine: 4x4 voxel-to-world matrix, RAS+.
        path: Destination file.
        dtype: Storage dtype (defaults to the array's).

    Returns:
        The written path.

    Raises:
        InputError: If the array is not 3D or the affine not 4x4.
    """
    data = _as_numpy(array)
    aff = _as_numpy(affine).astype(np.float64)
    if data.ndim != 3:
        msg = f"volume to write must be 3D (X, Y, Z), got shape {data.shape}"
        raise InputError(msg)
    if aff.shape != (4, 4):
        msg = f"affine must be 4x4, got shape {aff.shape}"
        raise InputError(msg)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    path = Path(path)
    name = path.name.lower()
    with atomic_path(path) as tmp:
        if name.endswith((".nii", ".nii.gz")):
            img = nib.Nifti1Image(data, aff)
            img.set_sform(aff, code=1)
            img.set_qform(aff, code=1)
            save_nifti(img, tmp)
        else:
            import SimpleITK as sitk

            image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
            lps = LPS_TO_RAS @ aff
            spacing = np.linalg.norm(lps[:3, :3], axis=0)
            image.SetSpacing(spacing.tolist())
            image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
            image.SetOrigin(lps[:3, 3].tolist())
            sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def write_label_map(labels: object, affine: object, path: str | Path) -> Path:
    """Write an integer label map in the narrowest unsigned dtype that holds its labels.

    Args:
        labels: 3D integer label map indexed ``(i, j, k)``.
        affine: 4x4 RAS+ affine of the grid (the source image's, for outputs).
        path: Destination file (``.nii.gz`` recommended).

    Returns:
        The written path.
    """
    data = _as_numpy(labels)
    top = int(data.max()) if data.size else 0
    return write_volume(data, affine, path, dtype=label_dtype(top + 1))


def write_probabilities(probabilities: object, affine: object, path: str | Path) -> Path:
    """Write ``(K, X, Y, Z)`` class probabilities as a 4D float32 NIfTI ``(X, Y, Z, K)``, atomically.

    NIfTI-1 has no 16-bit float type (nibabel refuses one), so the values are stored as float32.

    Args:
        probabilities: Class probabilities, channel first.
        affine: 4x4 RAS+ affine of the grid.
        path: Destination ``.nii.gz``.

    Returns:
        The written path.
    """
    data = _as_numpy(probabilities)
    if data.ndim != 4:
        msg = f"probabilities must be 4D (K, X, Y, Z), got shape {data.shape}"
        raise InputError(msg)
    aff = _as_numpy(affine).astype(np.float64)
    img = nib.Nifti1Image(np.moveaxis(data, 0, -1).astype(np.float32, copy=False), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    with atomic_path(path) as tmp:
        save_nifti(img, tmp)
    return Path(path)
