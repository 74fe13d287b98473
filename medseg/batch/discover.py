"""Find the scans in a file or folder: NIfTI/NRRD/MHA files and DICOM image series."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from medseg.io.dicom_series import scan_series

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Scan:
    """One scan to process.

    Attributes:
        case_id: Stable id (file stem, or a hash of the SeriesInstanceUID: never patient data).
        path: The file, or the folder holding the DICOM series.
        series_uid: The DICOM series to read from ``path`` (``None`` for files).
    """

    case_id: str
    path: Path
    series_uid: str | None = None

    @property
    def load_kwargs(self) -> dict[str, str]:
        """Keyword arguments for :func:`medseg.io.load_image`."""
        return {"series_uid": self.series_uid} if self.series_uid else {}


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


def discover_scans(source: str | Path) -> list[Scan]:
    """List the scans under a file or folder (recursively), sorted by case id.

    Args:
        source: A scan file, a DICOM series folder, or a folder of scans.

    Returns:
        The scans; case ids are made unique by suffixes where names repeat.
    """
    source = Path(source)
    if source.is_file() and source.name.lower().endswith(IMAGE_SUFFIXES):
        return [Scan(_stem(source), source)]
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    scans: list[Scan] = []
    others: list[Path] = []
    for f in files:
        if f.name.lower().endswith(IMAGE_SUFFIXES) and not f.name.startswith("."):
            scans.append(Scan(_stem(f), f))
        elif not f.name.lower().endswith((".raw", ".img", ".zraw", ".json", ".txt", ".csv", ".yaml")):
            others.append(f)
    for series in scan_series(others):
        folder = Path(*_common_parts([p.parent for p in series.files]))
        scans.append(Scan(dicom_case_id(series.series_uid), folder, series.series_uid))
    seen: dict[str, int] = {}
    unique = []
    for scan in sorted(scans, key=lambda s: (s.case_id, str(s.path))):
        n = seen.get(scan.case_id, 0)
        seen[scan.case_id] = n + 1
        unique.append(scan if n == 0 else Scan(f"{scan.case_id}_{n}", scan.path, scan.series_uid))
    return unique


def _common_parts(folders: list[Path]) -> tuple[str, ...]:
    parts = folders[0].parts
    for f in folders[1:]:
        other = f.parts
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return parts
