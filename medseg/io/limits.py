"""Check an input before loading it: readable, and small enough for the memory budget by its own header.

A file can claim any size in its header (a NIfTI of 100000^3 voxels is 348 bytes), and a compressed
DICOM frame can decode to far more than its Rows x Columns. Before a scan is loaded, the size its
headers declare is computed without reading the voxels:

* NIfTI: ``dim`` x datatype size (nibabel reads only the header);
* NRRD / MetaImage: ``sizes`` / ``DimSize`` x element type size (the text header);
* DICOM: Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated / 8, summed over slices;
  JPEG 2000 frames also by their codestream's SIZ marker, which must match Rows x Columns.

The scan is refused (:class:`~medseg.errors.InputError`, naming the file and the sizes) when the
declared voxels, held as loaded plus as the float32 copy the pipeline works on, exceed the budget:
``--max-memory`` (the ``MEDSEG_MAX_MEMORY`` environment variable, e.g. ``8G``), by default half of
the machine's RAM. Files that cannot be opened for permissions are refused with that reason.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, InputError

MEMORY_ENV = "MEDSEG_MAX_MEMORY"
DEFAULT_RAM_SHARE = 0.5
FLOAT_BYTES = 4
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "int16", "int16_t", "ushort", "uint16"), 2),
    **dict.fromkeys(("unsigned short", "unsigned short int", "uint16_t", "signed short int"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32"), 4),
    **dict.fromkeys(("uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "int64", "int64_t", "ulonglong", "uint64", "uint64_t"), 8),
    **dict.fromkeys(("unsigned long long", "signed long long", "double"), 8),
}
_MET_TYPES = {"CHAR": 1, "UCHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG": 8, "ULONG": 8}
_MET_TYPES |= {"LONG_LONG": 8, "ULONG_LONG": 8, "FLOAT": 4, "DOUBLE": 8}
J2K_SYNTAXES: tuple[str, ...] = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
J2K_SYNTAXES += ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
_SOC_SIZ = b"\xff\x4f\xff\x51"


def parse_size(text: str) -> int:
    """Bytes from a size such as ``8G``, ``512M``, ``1.5T`` or ``1000000``.

    Raises:
        ConfigError: For anything else.

    Examples:
        >>> parse_size("8G"), parse_size("512m"), parse_size("1000")
        (8589934592, 536870912, 1000)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        msg = f"max memory must be a positive size such as 8G or 512M, got {text!r}"
        raise ConfigError(msg)
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def memory_budget() -> int:
    """Bytes one scan may need: ``MEDSEG_MAX_MEMORY``, else half of the machine's RAM."""
    text = os.environ.get(MEMORY_ENV)
    if text:
        return parse_size(text)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * DEFAULT_RAM_SHARE)


def human(n: float) -> str:
    """A byte count for messages.

    Examples:
        >>> human(3 * 2**30), human(1.8e15)
        ('3.0 GiB', '1.6 PiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_readable(path: Path) -> None:
    """Open ``path`` for reading, or say why this user cannot.

    Raises:
        InputError: If the file is unreadable for its permissions or is a symlink loop.
    """
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        try:
            st = path.stat()
            who = f"owner uid {st.st_uid}, mode {st.st_mode & 0o777:04o}"
        except OSError:
            who = "its folder is not searchable"
        msg = (
            f"{path}: input must be readable by this user (uid {os.geteuid()}), got permission denied ({who})"
        )
        raise InputError(msg) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            msg = f"{path}: input must be a file, got a symlink loop"
            raise InputError(msg) from None
        if exc.errno == errno.EISDIR:
            return
        raise


def _nifti(path: Path) -> tuple[tuple[int, ...], int]:
    import nibabel as nib

    header: Any = nib.load(path).header  # the voxels are not read
    return tuple(int(d) for d in header.get_data_shape()), int(header.get_data_dtype().itemsize)


def _text_header(path: Path, limit: int = 65536) -> list[str]:
    with open(path, "rb") as f:
        head = f.read(limit)
    text = head.split(b"\n\n", 1)[0].decode("latin-1")
    return text.splitlines()


def _nrrd(path: Path) -> tuple[tuple[int, ...], int]:
    fields = {}
    for line in _text_header(path):
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip().lstrip("=").strip()
    sizes = tuple(int(s) for s in fields.get("sizes", "").split())
    return sizes, _NRRD_TYPES.get(fields.get("type", "").lower(), 8)


def _metaimage(path: Path) -> tuple[tuple[int, ...], int]:
    fields = {}
    for line in _text_header(path):
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    sizes = tuple(int(s) for s in fields.get("dimsize", "").split())
    channels = int(fields.get("elementnumberofchannels", "1") or 1)
    item = _MET_TYPES.get(fields.get("elementtype", "").upper().removeprefix("MET_"), 8)
    return (*sizes, channels), item


def j2k_frame_sizes(path: Path) -> list[tuple[int, int, int, int]]:
    """``(columns, rows, components, bytes per sample)`` of every JPEG 2000 codestream in a file.

    Found by their SOC + SIZ markers (which cannot occur inside the entropy-coded data).
    """
    sizes = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(_SOC_SIZ)
        while start >= 0 and start + 42 <= len(data):
            _rsiz, xsiz, ysiz, xo, yo = struct.unpack(">HIIII", data[start + 6 : start + 24])
            csiz = struct.unpack(">H", data[start + 40 : start + 42])[0]
            bits = (data[start + 42] & 0x7F) + 1 if start + 43 <= len(data) else 16
            sizes.append((max(0, xsiz - xo), max(0, ysiz - yo), csiz, math.ceil(bits / 8)))
            start = data.find(_SOC_SIZ, start + 4)
    return sizes


def _dicom(path: Path) -> tuple[tuple[int, ...], int]:
    import pydicom

    ds = pydicom.dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"],
    )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    item = max(1, int(ds.get("BitsAllocated", 16) or 16) // 8)
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
    if syntax in J2K_SYNTAXES:
        for c, r, comps, nbytes in j2k_frame_sizes(path):
            if (c, r) != (cols, rows) or comps > max(samples, 1) or nbytes > item:
                msg = (
                    f"{path}: JPEG 2000 frame must decode to the declared {rows} x {cols} x {samples} "
                    f"({human(rows * cols * samples * item)}), got a codestream claiming {r} x {c} x "
                    f"{comps} ({human(r * c * comps * nbytes)})"
                )
                raise InputError(msg)
    return (cols, rows, frames, samples), item


def declared_size(path: Path) -> tuple[tuple[int, ...], int] | None:
    """The shape and bytes per voxel a file's header declares, or ``None`` for formats not checked.

    Raises:
        InputError: For a compressed frame whose codestream disagrees with its DICOM header.
    """
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr", ".img")):
        return _nifti(path)
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd(path)
    if name.endswith((".mha", ".mhd")):
        return _metaimage(path)
    if not name.endswith(tuple(s for s in (".gz", ".png", ".jpg", ".txt", ".json"))):
        return _dicom(path)
    return None


def child_folder(root: Path, name: str) -> Path:
    """``root / name``, where ``name`` must be one plain folder name (a case id from any scan source).

    Raises:
        InputError: If ``name`` is empty, ``.``/``..``, absolute, holds a separator or a NUL, so that
            the folder would lie outside ``root`` (or be ``root`` itself).

    Examples:
        >>> child_folder(Path("/out"), "case-1")
        PosixPath('/out/case-1')
        >>> child_folder(Path("/out"), "../etc")
        Traceback (most recent call last):
        ...
        medseg.errors.InputError: case id must be one folder name inside the output folder, got '../etc'
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        msg = f"case id must be one folder name inside the output folder, got {name!r}"
        raise InputError(msg)
    return root / name


def check_inputs(paths: Sequence[Path], *, budget: int | None = None) -> None:
    """Refuse unreadable inputs and inputs whose headers declare more than the memory budget.

    Args:
        paths: One image file, or the files of one DICOM series (folders are passed over).
        budget: Bytes allowed (default :func:`memory_budget`).

    Raises:
        InputError: Naming the file: unreadable, a symlink loop, a lying compressed frame, or
            declared voxels beyond the budget.

    Examples:
        >>> import tempfile, pathlib, numpy as np, nibabel as nib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "big.nii"
        >>> header = nib.Nifti2Header()
        >>> header.set_data_shape((100000, 100000, 100000))
        >>> _ = path.write_bytes(header.binaryblock + bytes(4))  # 544 bytes claiming 10^15 voxels
        >>> check_inputs([path], budget=2**30)
        Traceback (most recent call last):
        ...
        medseg.errors.InputError: ...big.nii: declared image size must fit the memory budget ...
    """
    budget = memory_budget() if budget is None else budget
    total = 0
    shape: tuple[int, ...] = ()
    item = 0
    for path in paths:
        path = Path(path)
        check_readable(path)
        if path.is_dir():
            continue
        try:
            declared = declared_size(path)
        except InputError:
            raise
        except Exception:  # the reader reports an unparsable file with its own words
            continue
        if declared is None:
            continue
        shape, item = declared
        total += math.prod(shape) * (item + FLOAT_BYTES)
        if total > budget:
            dims = " x ".join(str(d) for d in shape)
            many = f" (with {len(paths)} files)" if len(paths) > 1 else ""
            msg = (
                f"{path}: declared image size must fit the memory budget of {human(budget)}, got "
                f"{dims} voxels of {item} byte(s){many}, {human(total)} loaded with its float32 copy; "
                f"raise --max-memory if this is a real scan"
            )
            raise InputError(msg)
