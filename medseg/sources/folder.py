"""Find the scans in a file or folder: NIfTI/NRRD/MHA files and DICOM image series.

DICOM files are grouped by SeriesInstanceUID wherever they sit (one folder with many series, one
series split over folders, files without extension, DICOMDIR present or not). Non-image DICOM
objects (SR, RT, SEG, presentation states) and unrelated files are listed as skipped with a reason.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medseg.io.dicom_duplicates import folders_with_copies
from medseg.io.dicom_series import NON_IMAGE_SOP_PREFIXES

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SIDECAR_SUFFIXES = (".raw", ".zraw", ".img")  # data files of .mhd/.nhdr/.hdr headers
_HEADER_TAGS = [
    "SOPClassUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SOPInstanceUID",
]


@dataclass(frozen=True)
class Scan:
    """One scan to process.

    Attributes:
        case_id: Stable id (file stem, or a hash of the SeriesInstanceUID: never patient data).
        path: The file, or the folder holding the DICOM series.
        series_uid: The DICOM series to read from ``path`` (``None`` for files).
        files: The DICOM files of the series (empty for files).
        modality: DICOM Modality, when known.
        description: DICOM SeriesDescription, when known.
        copies: The folders that hold copies of this series' instances (the same SOPInstanceUID in
            several files), empty when every instance is in one file.
    """

    case_id: str
    path: Path
    series_uid: str | None = None
    files: tuple[Path, ...] = ()
    modality: str = ""
    description: str = ""
    copies: tuple[Path, ...] = ()

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Every file this scan reads."""
        return self.files or (self.path,)

    @property
    def load_kwargs(self) -> dict[str, str]:
        """Keyword arguments for :func:`medseg.io.load_image`."""
        return {"series_uid": self.series_uid} if self.series_uid else {}


@dataclass(frozen=True)
class Skipped:
    """A file (or series) that is not a scan to process, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ScanFilter:
    """Which DICOM series to keep.

    Attributes:
        modalities: Keep only these Modality values (empty: all).
        description: Keep series whose SeriesDescription matches this regular expression.
        min_slices: Keep series with at least this many files.
    """

    modalities: tuple[str, ...] = ()
    description: str | None = None
    min_slices: int = 1

    def reason_to_skip(self, scan: Scan) -> str | None:
        """Why a series is filtered out, or ``None`` to keep it."""
        if self.modalities and scan.modality.upper() not in {m.upper() for m in self.modalities}:
            return f"modality {scan.modality or '?'} is not one of {list(self.modalities)}"
        if self.description and not re.search(self.description, scan.description):
            return f"series description does not match {self.description!r}"
        if scan.files and len(scan.files) < self.min_slices:
            return f"{len(scan.files)} slice(s), fewer than the minimum {self.min_slices}"
        return None


@dataclass
class Discovery:
    """What discovery found: scans to process and what was skipped."""

    scans: list[Scan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "scan"


def dicom_case_id(series_uid: str) -> str:
    """A case id for a DICOM series: a hash of its SeriesInstanceUID (no patient data)."""
    return "dicom-" + hashlib.sha256(series_uid.encode()).hexdigest()[:12]


def _common_folder(paths: list[Path]) -> Path:
    parts = paths[0].parent.parts
    for p in paths[1:]:
        other = p.parent.parts
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return Path(*parts)


def _scan_dicom(files: list[Path], found: Discovery) -> None:
    groups: dict[str, list[Path]] = {}
    sops: dict[str, list[str]] = {}
    first: dict[str, pydicom.Dataset] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, EOFError, ValueError, TypeError):
            found.skipped.append(
                Skipped(path, "not an image file medseg reads (neither DICOM nor a known suffix)")
            )
            continue
        except OSError as exc:
            found.skipped.append(Skipped(path, f"unreadable: {exc.strerror or exc}"))
            continue
        sop = str(ds.get("SOPClassUID", ""))
        if any(sop.startswith(p) for p in NON_IMAGE_SOP_PREFIXES) or "Rows" not in ds:
            kind = str(ds.get("Modality", "")) or "non-image"
            found.skipped.append(Skipped(path, f"DICOM {kind} object without image pixels (SOP class {sop})"))
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            uid = "missing-uid:" + hashlib.sha256(str(path.parent).encode()).hexdigest()[:12]
        groups.setdefault(uid, []).append(path)
        sops.setdefault(uid, []).append(str(ds.get("SOPInstanceUID", "")))
        first.setdefault(uid, ds)
    for uid, paths in groups.items():
        header = first[uid]
        found.scans.append(
            Scan(
                case_id=dicom_case_id(uid),
                path=_common_folder(paths),
                series_uid=None if uid.startswith("missing-uid:") else uid,
                files=tuple(sorted(paths)),
                modality=str(header.get("Modality", "")),
                description=str(header.get("SeriesDescription", "")),
                copies=folders_with_copies(paths, sops[uid]),
            )
        )


def _files(folder: Path, found: Discovery) -> list[Path]:
    """The files under ``folder``; symlinks that loop or lead nowhere are listed as skipped.

    Symlinked folders are not descended into (a link back up the tree cannot loop the walk).
    """
    files = []
    for p in folder.rglob("*"):
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and not p.exists():
            try:
                os.stat(p)
                reason = "a symlink that cannot be followed"
            except OSError as exc:
                loop = exc.errno == errno.ELOOP
                reason = "a symlink loop" if loop else f"a broken symlink ({exc.strerror})"
            found.skipped.append(Skipped(p, f"not an image file: {reason}"))
    return sorted(files)


def discover(source: str | Path, scan_filter: ScanFilter | None = None) -> Discovery:
    """List the scans under a file or folder (recursively), sorted by case id.

    Args:
        source: A scan file, a DICOM series folder, or a folder of scans.
        scan_filter: Which DICOM series to keep (others are listed as skipped).

    Returns:
        The scans (case ids made unique by suffixes where names repeat) and the skipped files.
    """
    source = Path(source)
    found = Discovery()
    if source.is_file() and source.name.lower().endswith(IMAGE_SUFFIXES):
        found.scans.append(Scan(_stem(source), source))
        return found
    files = [source] if source.is_file() else _files(source, found)
    maybe_dicom: list[Path] = []
    for f in files:
        name = f.name.lower()
        if f.name.startswith("."):
            continue
        if name.endswith(IMAGE_SUFFIXES):
            found.scans.append(Scan(_stem(f), f))
        elif name == "dicomdir":
            found.skipped.append(Skipped(f, "DICOMDIR index (series are found from the files themselves)"))
        elif name.endswith(SIDECAR_SUFFIXES):
            continue
        else:
            maybe_dicom.append(f)
    _scan_dicom(maybe_dicom, found)
    keep = scan_filter or ScanFilter()
    scans = []
    for scan in found.scans:
        reason = keep.reason_to_skip(scan)
        if reason is None:
            scans.append(scan)
        else:
            found.skipped.append(Skipped(scan.path, f"series {scan.case_id} filtered out: {reason}"))
    seen: dict[str, int] = {}
    unique = []
    for scan in sorted(scans, key=lambda s: (s.case_id, str(s.path))):
        n = seen.get(scan.case_id, 0)
        seen[scan.case_id] = n + 1
        if n:
            scan = dataclasses.replace(scan, case_id=f"{scan.case_id}_{n}")
        unique.append(scan)
    found.scans = unique
    return found


def discover_scans(source: str | Path) -> list[Scan]:
    """The scans under ``source`` (see :func:`discover`), without the skipped list."""
    return discover(source).scans
