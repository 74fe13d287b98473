"""MONAI ``ImageReader`` implementations of medseg: DICOM series, SimpleITK formats, fast NIfTI.

MONAI ships no SimpleITK reader, and its ``PydicomReader`` orders slices by InstanceNumber and takes
the slice spacing from one coordinate; these readers plug into ``monai.transforms.LoadImage``.
Each returns arrays indexed ``(i, j, k)`` with a RAS+ affine, like MONAI's ``NibabelReader``.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data.image_reader import ImageReader, _copy_compatible_dict, _stack_images
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medseg.errors import InputError
from medseg.io.dicom_series import LPS_TO_RAS, DicomVolume, read_series

PathLike = str | Path
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".nii", ".nii.gz", ".hdr", ".img", ".vtk", ".gipl")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _name(path: PathLike) -> str:
    return str(path).lower()


def _meta(affine: np.ndarray, shape: tuple[int, ...], data_ndim: int) -> dict[str, Any]:
    spatial = np.asarray(shape[: len(affine) - 1])
    return {
        MetaKeys.AFFINE: affine.copy(),
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: spatial,
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if data_ndim == len(spatial) else -1,
    }


def _stack(arrays: list[np.ndarray], metas: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, Any]]:
    compatible: dict[str, Any] = {}
    for meta in metas:
        _copy_compatible_dict(meta, compatible)
    return _stack_images(arrays, compatible), compatible


class DicomSeriesReader(ImageReader):
    """Read a DICOM series folder with slices ordered by position (see :mod:`medseg.io.dicom_series`).

    Args:
        series_uid: Which series to read where a folder holds several.
        min_slices: Fewest slices accepted as a volume.
        allow_tilt: Accept gantry tilt, keeping a sheared affine.
    """

    def __init__(self, series_uid: str | None = None, min_slices: int = 3, allow_tilt: bool = False) -> None:
        self.series_uid = series_uid
        self.min_slices = min_slices
        self.allow_tilt = allow_tilt

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Accept folders and ``.dcm`` files."""
        return all(Path(f).is_dir() or _name(f).endswith(".dcm") for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> DicomVolume | list[DicomVolume]:
        """Read one series per folder (several folders become channels).

        Args:
            data: Series folder(s); a list of ``.dcm`` files is read as one series.
            **kwargs: Overrides of ``series_uid``, ``min_slices`` and ``allow_tilt``.

        Returns:
            One :class:`DicomVolume` per folder.
        """
        opts = {"series_uid": self.series_uid, "min_slices": self.min_slices, "allow_tilt": self.allow_tilt}
        opts.update(kwargs)
        items = ensure_tuple(data)
        if all(not Path(f).is_dir() for f in items):
            return read_series([Path(f) for f in items], **opts)
        volumes = [read_series(Path(f), **opts) for f in items]
        return volumes if len(volumes) > 1 else volumes[0]

    def get_data(self, img: DicomVolume | list[DicomVolume]) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the array(s) and MONAI meta data (several volumes are stacked as channels)."""
        arrays, metas = [], []
        for vol in ensure_tuple(img):
            meta = _meta(vol.affine, vol.array.shape, vol.array.ndim)
            meta.update({f"dicom_{k}": v for k, v in vol.meta.items() if k != "sop_instance_uids"})
            meta["dicom_sop_instance_uids"] = list(vol.meta.get("sop_instance_uids", []))
            arrays.append(vol.array)
            metas.append(meta)
        return _stack(arrays, metas)


def sitk_affine(image: Any) -> np.ndarray:
    """The RAS+ voxel-to-world affine of a SimpleITK image (which stores LPS geometry).

    Args:
        image: A ``SimpleITK.Image``.

    Returns:
        A ``(d+1, d+1)`` affine for a d-dimensional image.
    """
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(dim + 1)
    affine[:dim, :dim] = direction * spacing
    affine[:dim, dim] = image.GetOrigin()
    flip = np.diag([-1.0, -1.0, *([1.0] * (dim - 1))])[: dim + 1, : dim + 1] if dim >= 2 else np.eye(dim + 1)
    return flip @ affine


class SimpleITKReader(ImageReader):
    """Read NRRD, MHA/MHD, NIfTI and other ITK formats with SimpleITK (MONAI has no such reader).

    Vector images (several components per voxel) keep their components as channels.
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Accept the ITK file formats by suffix."""
        return all(_name(f).endswith(SITK_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """Read one image per file.

        Raises:
            InputError: If SimpleITK cannot read a file.
        """
        import SimpleITK as sitk

        images = []
        for f in ensure_tuple(data):
            try:
                images.append(sitk.ReadImage(str(f)))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                msg = f"{f}: must be a readable image file, got a SimpleITK error: {first}"
                raise InputError(msg) from exc
        return images if len(images) > 1 else images[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the array(s) indexed ``(i, j, k[, c])`` and MONAI meta data."""
        import SimpleITK as sitk

        arrays, metas = [], []
        for image in img if isinstance(img, list) else [img]:  # an Image is iterable: no ensure_tuple
            array = sitk.GetArrayFromImage(image)
            dim = image.GetDimension()
            spatial_axes = tuple(range(dim))[::-1]
            if image.GetNumberOfComponentsPerPixel() > 1:
                array = array.transpose(*spatial_axes, dim)
            else:
                array = array.transpose(*spatial_axes)
            arrays.append(array)
            metas.append(_meta(sitk_affine(image), array.shape, array.ndim))
        return _stack(arrays, metas)


def _decompress(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return zlib.decompress(raw, wbits=31)
    except zlib.error:
        # Concatenated gzip members: fall back to the stream reader.
        return gzip.decompress(raw)


class NiftiReader(ImageReader):
    """A NIfTI reader that decompresses in one call and returns a zero-copy view of the voxels.

    Geometry comes from nibabel (sform/qform rules included); scaling (``scl_slope``/``scl_inter``)
    is applied as nibabel does. Arrays are native-endian views in Fortran order (``i`` fastest).
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Accept ``.nii`` and ``.nii.gz``."""
        return all(_name(f).endswith(NIFTI_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """Read header and voxels of each file.

        Raises:
            InputError: Unreadable files, or a header that promises more voxels than the file holds.
        """
        out = []
        for f in ensure_tuple(data):
            path = Path(f)
            try:
                img = nib.load(path)
                buf = _decompress(path)
            except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError, ValueError) as exc:
                msg = f"{path}: must be a readable NIfTI file, got {type(exc).__name__}: {exc}"
                raise InputError(msg) from exc
            header = img.header
            shape = tuple(int(s) for s in header.get_data_shape())
            dtype = header.get_data_dtype()
            offset = int(img.dataobj.offset)
            count = int(np.prod(shape))
            need = offset + count * dtype.itemsize
            if len(buf) < need:
                msg = f"{path}: NIfTI header promises {shape} voxels of {dtype} ({need} bytes), file holds {len(buf)}"
                raise InputError(msg)
            arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
            if not dtype.isnative:
                arr = arr.astype(dtype.newbyteorder("="))
            slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)  # the header's are reset on load
            if slope is not None and not (slope == 1 and (inter or 0) == 0):
                arr = arr * np.float32(slope) + np.float32(inter or 0)
            out.append((arr, np.asarray(img.affine, dtype=np.float64)))
        return out if len(out) > 1 else out[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the array(s) and MONAI meta data; 4D files keep their 4th axis as channels."""
        items = img if isinstance(img, list) else [img]
        arrays, metas = [], []
        for arr, affine in items:
            while arr.ndim > 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim > 4:
                msg = f"NIfTI image must have at most 4 dimensions, got shape {arr.shape}"
                raise InputError(msg)
            spatial = arr.shape[:3] if arr.ndim == 4 else arr.shape
            meta = _meta(affine, spatial, arr.ndim if arr.ndim < 4 else 4)
            if arr.ndim == 4:
                meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1
            arrays.append(arr)
            metas.append(meta)
        return _stack(arrays, metas)
