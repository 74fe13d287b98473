"""The same DICOM instance in several files: count identical copies once, refuse conflicting ones.

Scan folders often hold one series more than once: exported twice, a partial re-export beside a
complete one, a stray copy of a file. Instances are identified by SOPInstanceUID. Files that share
one and hold the same pixel data are one instance (the first by path is read); files that share one
but differ in pixel data are an :class:`~medseg.errors.InputError` naming both; a damaged copy
(truncated pixel data, or unreadable) gives way to an intact one. The union of the
distinct instances is what forms the volume, so a partial copy adds nothing and never makes the
complete one fail.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom

from medseg.errors import InputError


def _pixel_digest(path: Path, header: pydicom.Dataset | None) -> str | None:
    """SHA-256 of a file's pixel data, or ``None`` for a damaged copy (unreadable or truncated)."""
    try:
        ds = header if header is not None else pydicom.dcmread(path)
        data = ds.get("PixelData")
        if data is None:
            ds = pydicom.dcmread(path)
            data = ds.get("PixelData", b"")
        data = bytes(data)
    except Exception:  # a truncated file fails while its deferred pixels are read
        return None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = rows * cols * frames * int(ds.get("SamplesPerPixel", 1) or 1)
        expected = expected * int(ds.get("BitsAllocated", 16) or 16) // 8
        if len(data) < expected:
            return None
    return hashlib.sha256(data).hexdigest()


def distinct_instances(
    files: Sequence[Path], headers: Mapping[Path, pydicom.Dataset] | None = None
) -> tuple[Path, ...]:
    """The files of a series with each instance once (the first file by path of identical copies).

    A copy whose pixel data is truncated or unreadable gives way to an intact copy of the instance.

    Args:
        files: The series' files (any order, copies included).
        headers: Already-read headers by path (pixel data may be deferred); others are read here.

    Returns:
        One file per distinct SOPInstanceUID (files without one are all kept), in path order.

    Raises:
        InputError: If two files share a SOPInstanceUID but hold different pixel data.
    """
    headers = headers or {}
    by_uid: dict[str, list[Path]] = {}
    keep: list[Path] = []
    for path in sorted(files):
        ds = headers.get(path)
        if ds is None:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except Exception:  # the reader reports an unreadable file with its own words
                keep.append(path)
                continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            keep.append(path)
            continue
        by_uid.setdefault(uid, []).append(path)
    for uid, paths in by_uid.items():
        if len(paths) == 1:
            keep.append(paths[0])
            continue
        digests = {p: _pixel_digest(p, headers.get(p)) for p in paths}
        intact = [p for p in paths if digests[p] is not None] or paths[:1]  # damaged copies give way
        first = intact[0]
        for other in intact[1:]:
            if digests[other] != digests[first]:
                msg = (
                    f"DICOM instances sharing SOPInstanceUID {uid} must hold the same pixel data, got "
                    f"different pixels in {first} and {other}"
                )
                raise InputError(msg)
        keep.append(first)
    return tuple(sorted(keep))


def folders_with_copies(files: Sequence[Path], sop_uids: Sequence[str]) -> tuple[Path, ...]:
    """The folders that hold a series' files when some instance is in more than one file, else ``()``.

    Examples:
        >>> folders_with_copies([Path("a/1"), Path("b/1"), Path("b/2")], ["x", "x", "y"])
        (PosixPath('a'), PosixPath('b'))
        >>> folders_with_copies([Path("a/1"), Path("a/2")], ["x", "y"])
        ()
    """
    named = [u for u in sop_uids if u]
    if len(set(named)) == len(named):
        return ()
    return tuple(sorted({Path(f).parent for f in files}))
