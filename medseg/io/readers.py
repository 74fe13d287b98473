"""MONAI ``ImageReader`` implementations of medseg: DICOM series, SimpleITK formats, fast NIfTI.

MONAI ships no SimpleITK reader, and its ``PydicomReader`` orders slices by InstanceNumber and takes
the slice spacing from one coordinate; these readers plug into ``monai.transforms.LoadImage``.
Each returns arrays indexed ``(i, j, k)`` with a RAS+ affine, like MONAI's ``NibabelReader``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
from monai.data.image_reader import ImageReader, _copy_compatible_dict, _stack_images
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medseg.errors import InputError
from medseg.geometry import lps_to_ras
from medseg.io.dicom_series import DicomVolume, read_series

PathLike = str | os.PathLike[Any]
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
        opts: dict[str, Any] = {
            "series_uid": self.series_uid,
            "min_slices": self.min_slices,
            "allow_tilt": self.allow_tilt,
        }
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
    return lps_to_ras(affine)


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


_inflate_lib: ModuleType
_INFLATE_ERRORS: tuple[type[Exception], ...]
try:  # ISA-L inflates gzip faster than zlib; optional
    from isal import isal_zlib

    _inflate_lib = isal_zlib
    _INFLATE_ERRORS = (zlib.error, isal_zlib.error)  # type: ignore[assignment]  # isal's stub: a class
except ImportError:  # pragma: no cover - depends on the environment
    _inflate_lib = zlib
    _INFLATE_ERRORS = (zlib.error,)
_READ_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, *_INFLATE_ERRORS)

_READ_CHUNK = 1 << 20  # compressed bytes fed to the inflater at a time
_SLAB_BYTES = 8 << 20  # planes reordered together: large enough to amortise, small enough for the cache
_ROW_BLOCK = 16  # rows of a slab transposed at a time
_PARALLEL_BYTES = 16 << 20  # below this, reorder in the calling thread
_WORKERS = max(1, min(4, os.cpu_count() or 1))


class _PlaneReorderer:
    """Turn a stream of NIfTI voxel bytes (``i`` fastest) into a C-ordered ``(i, j, k, ...)`` array.

    NIfTI stores voxels in Fortran order; MONAI's ``LoadImage`` wants C order and would otherwise make
    a strided copy of the whole volume, the slowest step of loading. Here the stream is cut into slabs
    of planes (a few MB, reused buffers) that worker threads transpose into the output while the
    next slab is inflated.

    Args:
        offset: Bytes before the voxels (header and extensions), skipped.
        shape: The image shape from the header.
        dtype: The on-disk voxel type (any byte order).
    """

    def __init__(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.skip, self.dtype, self.shape = offset, dtype, shape
        dims = (*shape, 1, 1)[: max(3, len(shape))]  # 1D and 2D images as one-plane volumes
        self.nx, self.ny, self.nz = dims[:3]
        self.extra = dims[3:]
        n_extra = int(np.prod(self.extra, dtype=np.int64))
        self.out = np.empty(dims, dtype=dtype.newbyteorder("="))
        self.out4 = self.out.reshape(self.nx, self.ny, self.nz, n_extra)
        self.plane_bytes = self.nx * self.ny * dtype.itemsize
        self.n_planes = self.nz * n_extra
        self.per_slab = max(1, _SLAB_BYTES // max(1, self.plane_bytes))
        self.received = 0  # voxel bytes so far
        self.done = 0  # planes handed to a slab so far
        parallel = self.n_planes * self.plane_bytes >= _PARALLEL_BYTES and _WORKERS > 1
        self.pool = ThreadPoolExecutor(_WORKERS) if parallel else None
        n_buffers = _WORKERS + 2 if parallel else 1
        size = min(self.per_slab, self.n_planes) * self.plane_bytes
        self.buffers = [np.empty(size, dtype=np.uint8) for _ in range(n_buffers)]
        self.jobs: list[Future[None] | None] = [None] * n_buffers
        self.turn = 0
        self.slab: tuple[int, int, int] | None = None  # (buffer, first plane, stop plane)
        self.fill = 0  # bytes in the current slab

    @property
    def complete(self) -> bool:
        """Whether every voxel has arrived."""
        return self.done >= self.n_planes and self.slab is None

    def _reorder(self, buffer: int, first: int, stop: int) -> None:
        """Copy planes ``first:stop`` (never across a 4th-axis index) into the output."""
        t, z0 = divmod(first, self.nz)
        # the extra axes are stored Fortran-ordered (first extra axis fastest); the output is C-ordered
        e = (
            int(np.ravel_multi_index(np.unravel_index(t, self.extra[::-1])[::-1], self.extra))
            if self.extra
            else 0
        )
        n = stop - first
        planes = self.buffers[buffer][: n * self.plane_bytes].view(self.dtype).reshape(n, self.ny, self.nx)
        for j0 in range(0, self.ny, _ROW_BLOCK):  # a block of rows at a time, to stay in cache
            j1 = j0 + _ROW_BLOCK
            self.out4[:, j0:j1, z0 : z0 + n, e] = planes[:, j0:j1, :].transpose(2, 1, 0)

    def _open_slab(self) -> None:
        buffer = self.turn
        self.turn = (self.turn + 1) % len(self.buffers)
        job = self.jobs[buffer]
        if job is not None:  # wait until the buffer's last slab is written out
            job.result()
        first = self.done
        stop = min(first + self.per_slab, (first // self.nz + 1) * self.nz, self.n_planes)
        self.slab, self.fill, self.done = (buffer, first, stop), 0, stop

    def _close_slab(self) -> None:
        assert self.slab is not None
        if self.pool is None:
            self._reorder(*self.slab)
        else:
            self.jobs[self.slab[0]] = self.pool.submit(self._reorder, *self.slab)
        self.slab = None

    def write(self, data: bytes) -> None:
        """Take the next bytes of the (decompressed) file; bytes past the voxels are ignored."""
        view = memoryview(data)
        if self.skip:
            drop = min(self.skip, len(view))
            view, self.skip = view[drop:], self.skip - drop
        while len(view) and not self.complete:
            if self.slab is None:
                self._open_slab()
            assert self.slab is not None
            buffer, first, stop = self.slab
            n = min(len(view), (stop - first) * self.plane_bytes - self.fill)
            self.buffers[buffer][self.fill : self.fill + n] = view[:n]
            self.fill += n
            self.received += n
            view = view[n:]
            if self.fill == (stop - first) * self.plane_bytes:
                self._close_slab()

    def result(self) -> np.ndarray:
        """Wait for the last slabs and return the array, shaped like the header says."""
        for job in self.jobs:
            if job is not None:
                job.result()
        return self.out.reshape(self.shape)

    def close(self) -> None:
        """Stop the worker threads (after the result, or after an error)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _stream(path: Path, sink: _PlaneReorderer) -> None:
    """Feed the bytes of ``path`` (inflated, for gzip) to ``sink`` until it has every voxel.

    Concatenated gzip members are read one after the other; the member holding the last voxels
    is read to its end, so that its checksum is verified.

    Raises:
        EOFError: If a gzip stream that holds every voxel ends before its end-of-stream marker.
    """
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        inflater = _inflate_lib.decompressobj(wbits=31) if gzipped else None
        while not (sink.complete and (inflater is None or inflater.eof)):
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                break
            if inflater is None:
                sink.write(chunk)
                continue
            while chunk:
                data = inflater.decompress(chunk)
                chunk = b""
                if inflater.eof and inflater.unused_data and not sink.complete:  # another member follows
                    chunk = inflater.unused_data
                    inflater = _inflate_lib.decompressobj(wbits=31)
                sink.write(data)
        if sink.complete and inflater is not None and not inflater.eof:
            msg = "Compressed file ended before the end-of-stream marker was reached"
            raise EOFError(msg)


class NiftiReader(ImageReader):
    """A fast NIfTI reader: streamed decompression, voxels reordered to C order on the way.

    Geometry comes from nibabel (sform/qform rules included); scaling (``scl_slope``/``scl_inter``)
    is applied as nibabel does. Arrays are native-endian and C-contiguous ``(i, j, k[, c])``, the
    layout ``LoadImage`` asks for, so it makes no copy. Gzip is inflated with ISA-L where the
    ``isal`` package is installed (about twice as fast as zlib), with zlib otherwise.
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
            except (OSError, EOFError, nib.filebasedimages.ImageFileError, ValueError) as exc:
                msg = f"{path}: must be a readable NIfTI file, got {type(exc).__name__}: {exc}"
                raise InputError(msg) from exc
            if not isinstance(img, nib.Nifti1Image):  # NIfTI-2 images are NIfTI-1 images too
                msg = f"{path}: must be a NIfTI file, got a {type(img).__name__}"
                raise InputError(msg)
            header, proxy = img.header, img.dataobj
            if not isinstance(proxy, nib.arrayproxy.ArrayProxy):  # as nib.load makes it
                msg = f"{path}: must be a NIfTI file on disk, got its data as a {type(proxy).__name__}"
                raise InputError(msg)
            shape = tuple(int(s) for s in header.get_data_shape())
            dtype = header.get_data_dtype()
            offset = int(proxy.offset)
            need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            sink = _PlaneReorderer(offset, shape, dtype)
            try:
                _stream(path, sink)
                if not sink.complete:
                    held = offset - sink.skip + sink.received
                    msg = (
                        f"{path}: NIfTI header promises {shape} voxels of {dtype} ({need} bytes), "
                        f"file holds {held}"
                    )
                    raise InputError(msg)
                arr = sink.result()
            except _READ_ERRORS as exc:
                msg = f"{path}: must be a readable NIfTI file, got {type(exc).__name__}: {exc}"
                raise InputError(msg) from exc
            finally:
                sink.close()
            # the header's scl_slope/scl_inter are reset on load; the data object keeps them
            slope, inter = float(proxy.slope), float(proxy.inter)
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
