"""Reading the pixels of a DICOM series into one volume, fast.

Uncompressed slices are read straight from their place in each file, slab by slab in worker
threads, rescaled and laid out as ``(i, j, k)`` in the narrowest exact dtype; compressed slices go
through pydicom's decoders (pylibjpeg, gdcm).
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement

from medseg.errors import InputError

_SLAB_BYTES = 8 << 20  # slices transposed together into the (i, j, k) volume
_ROW_BLOCK = 16  # rows of a slab transposed at a time
_PARALLEL_BYTES = 16 << 20  # below this, no threads
_WORKERS = max(1, min(4, os.cpu_count() or 1))


def raw_ds(ds: pydicom.Dataset, keyword: str) -> list[float] | None:
    """The numbers of a decimal-string attribute read straight from its raw bytes, or ``None``.

    pydicom's ``DSfloat`` conversion costs tens of microseconds a value, a good part of reading a
    long series; ``None`` (element absent, converted already, or unusual) leaves it to pydicom.
    """
    try:
        elem = ds.get_item(keyword, keep_deferred=True)
    except (KeyError, ValueError):
        return None
    if not isinstance(elem, RawDataElement) or not elem.value or elem.VR not in ("DS", None):
        return None
    try:
        return [float(v) for v in elem.value.split(b"\\")]
    except ValueError:
        return None


def _scalar(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    """A single-valued decimal-string attribute; absent, empty or zero gives ``default``."""
    fast = raw_ds(ds, keyword)
    if fast is not None and len(fast) == 1:
        return float(fast[0] or default)
    return float(ds.get(keyword, default) or default)


def _slice_pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored pixel values of one single-frame slice as a (rows, cols) array."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        msg = f"{path}: DICOM image must be grey-scale (SamplesPerPixel 1), got {ds.SamplesPerPixel}"
        raise InputError(msg)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if not ds.file_meta.TransferSyntaxUID.is_compressed and int(ds.BitsAllocated) in (8, 16, 32):
        bits = int(ds.BitsAllocated)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
        if not ds.file_meta.TransferSyntaxUID.is_little_endian:
            dtype = dtype.newbyteorder(">")
        raw = ds.PixelData
        need = rows * cols * dtype.itemsize
        if len(raw) < need:
            msg = f"{path}: PixelData must hold {need} bytes for {rows}x{cols}x{bits} bits, got {len(raw)}"
            raise InputError(msg)
        arr = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
        bits_stored = int(ds.get("BitsStored", bits))
        if signed and bits_stored < bits:  # sign-extend values stored in fewer bits
            shift = bits - bits_stored
            arr = (arr.astype(dtype.newbyteorder("=")) << shift) >> shift
        return arr
    try:
        return ds.pixel_array
    except Exception as exc:
        ts = ds.file_meta.TransferSyntaxUID
        msg = f"{path}: pixel data must be decodable, got transfer syntax {ts.name} that failed: {exc}"
        raise InputError(msg) from exc


@dataclass(frozen=True)
class _RawPixels:
    """Where one slice's uncompressed pixels lie in its file."""

    dtype: np.dtype
    offset: int
    length: int
    bits_stored: int
    signed: bool


def _raw_pixels(ds: pydicom.Dataset) -> _RawPixels | None:
    """The file location of a slice's pixels when they can be read as they are, else ``None``."""
    try:
        ts = ds.file_meta.get("TransferSyntaxUID")
        if ts is None or ts.is_compressed or ts.is_deflated:
            return None
        little_endian = ts.is_little_endian
    except (AttributeError, ValueError):
        return None
    bits = ds.get("BitsAllocated")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or bits is None or int(bits) not in (8, 16, 32):
        return None
    elem = ds.get_item("PixelData", keep_deferred=True)
    if not isinstance(elem, RawDataElement) or elem.value is not None or elem.length == 0xFFFFFFFF:
        return None  # already in memory (small), or encapsulated
    bits = int(bits)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    if not little_endian:
        dtype = dtype.newbyteorder(">")
    return _RawPixels(dtype, int(elem.value_tell), int(elem.length), int(ds.get("BitsStored", bits)), signed)


def _parallel(fn: Callable[[int], Any], n: int, nbytes: int) -> list[Any]:
    """``[fn(i) for i in range(n)]``, on a few threads when the work is large.

    File reads and numpy copies release the GIL, so the threads run side by side.
    """
    if nbytes < _PARALLEL_BYTES or _WORKERS == 1 or n < 2:
        return [fn(i) for i in range(n)]
    with ThreadPoolExecutor(min(_WORKERS, n)) as pool:
        return list(pool.map(fn, range(n)))


def _narrowest(ranges: Sequence[tuple[int, int]], inters: np.ndarray, all_uint8: bool) -> np.dtype:
    """The narrowest integer type holding every ``stored + intercept`` (float64 if none does)."""
    lo = min(r[0] + int(c) for r, c in zip(ranges, inters))
    hi = max(r[1] + int(c) for r, c in zip(ranges, inters))
    for candidate in (np.uint8, np.int16, np.int32) if all_uint8 else (np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= lo and hi <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float64)


class _VolumeWriter:
    """Write slices, rescaled, into a C-contiguous ``(i, j, k)`` volume a slab of slices at a time.

    Each slab is rescaled slice by slice into a small buffer, then transposed into the volume while
    it is in cache: far faster than writing (or letting MONAI copy) one strided slice at a time.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        n: int,
        dtype: np.dtype,
        integral: bool,
        slopes: np.ndarray,
        inters: np.ndarray,
    ) -> None:
        self.rows, self.cols = shape
        self.dtype, self.integral, self.slopes, self.inters = dtype, integral, slopes, inters
        self.out = np.empty((self.cols, self.rows, n), dtype=dtype)
        self.per_slab = max(1, _SLAB_BYTES // max(1, self.rows * self.cols * dtype.itemsize))
        self.starts = range(0, n, self.per_slab)
        self.n = n
        self.buffers: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()

    def slab(self, index: int) -> tuple[int, int]:
        """The slices ``k0:k1`` of slab ``index``."""
        k0 = self.starts[index]
        return k0, min(k0 + self.per_slab, self.n)

    def write(self, k0: int, pixels: np.ndarray | Sequence[np.ndarray]) -> None:
        """Rescale ``pixels`` (slices ``k0, k0 + 1, ...``) and put them in the volume."""
        try:
            buf = self.buffers.get_nowait()
        except queue.Empty:
            buf = np.empty((self.per_slab, self.rows, self.cols), dtype=self.dtype)
        for n, src in enumerate(pixels):
            k, dst = k0 + n, buf[n]
            if self.integral:
                if self.inters[k] == 0:
                    dst[...] = src
                else:
                    np.add(src, int(self.inters[k]), out=dst, dtype=self.dtype, casting="unsafe")
            else:
                np.multiply(src, np.float32(self.slopes[k]), out=dst, casting="unsafe")
                dst += np.float32(self.inters[k])
        # (k, rows=j, cols=i) -> (i, j, k), a block of rows at a time to stay in cache
        k1 = k0 + len(pixels)
        for j0 in range(0, self.rows, _ROW_BLOCK):
            j1 = j0 + _ROW_BLOCK
            self.out[:, j0:j1, k0:k1] = buf[: len(pixels), j0:j1, :].transpose(2, 1, 0)
        self.buffers.put(buf)


def _read_raw_volume(
    raws: list[_RawPixels],
    files: tuple[Path, ...],
    shape: tuple[int, int],
    slopes: np.ndarray,
    inters: np.ndarray,
) -> np.ndarray:
    """Read uncompressed slices straight from their files into the ``(i, j, k)`` volume.

    Each slab of slices is read, range-checked, rescaled and transposed by one thread. Integer
    volumes are written in the narrowest type there is (``uint8`` for 8-bit data, else ``int16``),
    which nearly every scan fits; if some slab does not, a second pass writes the type that fits all.
    """
    dtype = raws[0].dtype
    rows, cols = shape
    need = rows * cols * dtype.itemsize
    bits = dtype.itemsize * 8
    integral = bool(np.all(slopes == 1) and np.all(inters == np.round(inters)))
    all_uint8 = dtype == np.uint8
    spare: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()  # reused read buffers

    def read(k0: int, k1: int, buf: np.ndarray) -> np.ndarray:
        buf_bytes = buf.reshape(len(buf), -1).view(np.uint8)
        for k in range(k0, k1):
            raw, path = raws[k], files[k]
            got = 0
            if raw.length >= need:
                with path.open("rb") as f:
                    f.seek(raw.offset)
                    got = f.readinto(memoryview(buf_bytes[k - k0])) or 0
            if got < need:
                held = min(raw.length, got)
                msg = f"{path}: PixelData must hold {need} bytes for {rows}x{cols}x{bits} bits, got {held}"
                raise InputError(msg)
        pixels = buf[: k1 - k0] if dtype.isnative else buf[: k1 - k0].astype(dtype.newbyteorder("="))
        for k in range(k0, k1):
            if raws[k].signed and raws[k].bits_stored < bits:  # sign-extend values stored in fewer bits
                shift = bits - raws[k].bits_stored
                np.left_shift(pixels[k - k0], shift, out=pixels[k - k0])
                np.right_shift(pixels[k - k0], shift, out=pixels[k - k0])
        return pixels

    def fill(writer: _VolumeWriter, index: int, check: bool) -> tuple[list[tuple[int, int]], bool]:
        k0, k1 = writer.slab(index)
        try:
            buf = spare.get_nowait()
        except queue.Empty:
            buf = np.empty((writer.per_slab, rows, cols), dtype=dtype)
        try:
            pixels = read(k0, k1, buf)
            ranges = [(int(p.min()), int(p.max())) for p in pixels] if check else []
            fits = not check or _narrowest(ranges, inters[k0:k1], all_uint8) == writer.dtype
            if fits:
                writer.write(k0, pixels)
        finally:
            spare.put(buf)
        return ranges, fits

    guess = np.dtype(np.uint8 if all_uint8 else np.int16) if integral else np.dtype(np.float32)
    writer = _VolumeWriter(shape, len(files), guess, integral, slopes, inters)
    results = _parallel(lambda i: fill(writer, i, integral), len(writer.starts), len(files) * need)
    if all(fits for _, fits in results):
        return writer.out
    ranges = [r for part, _ in results for r in part]
    writer = _VolumeWriter(shape, len(files), _narrowest(ranges, inters, all_uint8), integral, slopes, inters)
    _parallel(lambda i: fill(writer, i, False), len(writer.starts), len(files) * need)
    return writer.out


def stack_pixels(
    datasets: list[pydicom.Dataset], files: tuple[Path, ...], shape: tuple[int, int]
) -> np.ndarray:
    """Stack slices into an (i, j, k) array with rescale applied, in the narrowest exact dtype.

    The result is C-contiguous, the layout MONAI's ``LoadImage`` keeps without a copy.
    """
    slopes = np.array([_scalar(ds, "RescaleSlope", 1.0) for ds in datasets])
    inters = np.array([_scalar(ds, "RescaleIntercept", 0.0) for ds in datasets])
    raws = [_raw_pixels(ds) for ds in datasets]
    if all(r is not None for r in raws) and len({r.dtype for r in raws if r is not None}) == 1:
        return _read_raw_volume([r for r in raws if r is not None], files, shape, slopes, inters)

    slices = [_slice_pixels(ds, path) for ds, path in zip(datasets, files)]
    for pixels, path in zip(slices, files):
        if pixels.shape != shape:
            msg = f"{path}: pixel data must be {shape}, got {pixels.shape}"
            raise InputError(msg)
    integral = all(p.dtype.kind in "iu" for p in slices) and bool(
        np.all(slopes == 1) and np.all(inters == np.round(inters))
    )
    out_dtype = np.dtype(np.float32)
    if integral:
        ranges = [(int(p.min()), int(p.max())) for p in slices]
        out_dtype = _narrowest(ranges, inters, all(p.dtype == np.uint8 for p in slices))
    writer = _VolumeWriter(shape, len(slices), out_dtype, integral, slopes, inters)

    def fill(index: int) -> None:
        k0, k1 = writer.slab(index)
        writer.write(k0, slices[k0:k1])

    _parallel(fill, len(writer.starts), sum(p.nbytes for p in slices))
    return writer.out
