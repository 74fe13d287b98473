"""DICOM series: find the series in a folder, check they form a volume, read them with exact geometry.

Rules (each broken rule is a :class:`~medseg.errors.GeometryError` that says which and why):

* Files are grouped by SeriesInstanceUID; a folder with several image series needs ``series_uid``.
  Non-image objects (SEG, SR, RT, presentation states) are ignored.
* Slices are ordered by their position along the slice normal (``cross(row, col)`` of
  ImageOrientationPatient), never by InstanceNumber.
* Every slice must share one orientation (within ``1e-4``), one size and one pixel spacing.
* A series needs at least ``min_slices`` slices (default 3).
* Two slices at the same position are an error (several acquisitions mixed in one series).
* Slice spacing must be even: each gap within 1 % (or 0.01 mm) of the median gap. Gaps that are
  whole multiples of the median are reported as missing slices.
* Positions that drift sideways from the normal (gantry/detector tilt) are an error unless
  ``allow_tilt=True``, which keeps the exact, sheared affine (slice step = mean position step).
* RescaleSlope/RescaleIntercept are applied per slice; the result is ``int16``/``int32`` when
  every slope is 1 and every intercept an integer, else ``float32``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.errors import GeometryError, InputError
from medseg.geometry import dicom_affine, order_along, slice_normal
from medseg.io.dicom_duplicates import distinct_instances
from medseg.io.dicom_pixels import raw_ds, stack_pixels

ORIENTATION_TOL = 1e-4
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL = 0.01
TILT_TOL_MM = 0.01
_DEFER_BYTES = 16384  # values larger than this (the pixels) stay on disk while headers are parsed
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # segmentation, raw data, spatial registration
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports
    "1.2.840.10008.5.1.4.1.1.481",  # RT objects
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF/CDA
)
_HEADER_TAGS = [
    "SOPClassUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "Modality",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "InstanceNumber",
    "NumberOfFrames",
]


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One image series found on disk (headers only)."""

    series_uid: str
    files: tuple[Path, ...]
    modality: str = ""
    description: str = ""

    def describe(self) -> str:
        """One line for messages: UID, description and slice count."""
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.series_uid}{desc} ({self.modality or '?'}, {len(self.files)} files)"


@dataclass
class DicomVolume:
    """A DICOM series read into a volume.

    Attributes:
        array: Voxels indexed ``(i, j, k)``: along a row, down a column, along the slice normal.
        affine: 4x4 voxel-to-world matrix in RAS+ millimetres.
        meta: Selected header fields of the first slice (modality, UIDs, description, ...).
        files: The slice files in volume order (``k``).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)
    files: tuple[Path, ...] = ()


def _is_image(ds: pydicom.Dataset) -> bool:
    sop = str(ds.get("SOPClassUID", ""))
    if any(sop.startswith(p) for p in NON_IMAGE_SOP_PREFIXES):
        return False
    return "Rows" in ds and "Columns" in ds


def list_dicom_files(folder: Path, recursive: bool = True) -> list[Path]:
    """List the files of a folder that may be DICOM (any extension; DICOMDIR excluded).

    Args:
        folder: Where to look.
        recursive: Descend into sub-folders.

    Returns:
        Sorted file paths.
    """
    it: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in it if p.is_file() and p.name.upper() != "DICOMDIR" and not p.name.startswith(".")
    )


def _scan(
    paths: Sequence[Path], keep_headers: bool
) -> tuple[list[DicomSeriesInfo], dict[Path, pydicom.Dataset]]:
    """Group image files by series; with ``keep_headers``, also return each file's whole header.

    Whole headers are read with the pixel data left on disk (``defer_size``), so that reading a
    series parses each file once. A file whose whole header fails to parse but whose few grouping
    tags do is still grouped, without a header: reading it later reports the error.
    """
    groups: dict[str, list[Path]] = {}
    first: dict[str, pydicom.Dataset] = {}
    headers: dict[Path, pydicom.Dataset] = {}
    for path in paths:
        ds = None
        if keep_headers:
            with contextlib.suppress(InvalidDicomError, OSError, ValueError, EOFError):
                ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        if ds is None:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
        elif keep_headers:
            headers[path] = ds
        if not _is_image(ds):
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or "<missing SeriesInstanceUID>"
        groups.setdefault(uid, []).append(path)
        first.setdefault(uid, ds)
    infos = [
        DicomSeriesInfo(
            series_uid=uid,
            files=tuple(files),
            modality=str(first[uid].get("Modality", "")),
            description=str(first[uid].get("SeriesDescription", "")),
        )
        for uid, files in groups.items()
    ]
    return sorted(infos, key=lambda s: (-len(s.files), s.series_uid)), headers


def scan_series(paths: Sequence[Path]) -> list[DicomSeriesInfo]:
    """Group DICOM files into image series by SeriesInstanceUID, reading headers only.

    Args:
        paths: Candidate files; files that are not DICOM, or not images, are passed over.

    Returns:
        The image series, largest first.
    """
    return _scan(paths, keep_headers=False)[0]


def find_series(source: Path | Sequence[Path], series_uid: str | None = None) -> DicomSeriesInfo:
    """Pick one image series from a folder or a list of files.

    Args:
        source: A folder (searched recursively) or explicit files.
        series_uid: Which series to take when there are several.

    Returns:
        The chosen series.

    Raises:
        InputError: If no image series is found, the UID is absent, or several series are present
            and none was chosen.
    """
    return _find_series(source, series_uid, keep_headers=False)[0]


def _find_series(
    source: Path | Sequence[Path], series_uid: str | None, keep_headers: bool
) -> tuple[DicomSeriesInfo, dict[Path, pydicom.Dataset]]:
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            msg = f"DICOM series path must be an existing folder, got {folder}"
            raise InputError(msg)
        paths = list_dicom_files(folder)
        where = str(folder)
    else:
        paths = [Path(p) for p in source]
        where = f"{len(paths)} files starting {paths[0]}" if paths else "an empty file list"
    series, headers = _scan(paths, keep_headers)
    if not series:
        msg = f"{where}: must contain at least one DICOM image series, got none"
        raise InputError(msg)
    if series_uid is not None:
        for s in series:
            if s.series_uid == series_uid:
                return s, headers
        msg = f"{where}: series_uid must be one of {[s.series_uid for s in series]}, got {series_uid}"
        raise InputError(msg)
    if len(series) > 1:
        listing = "; ".join(s.describe() for s in series)
        msg = f"{where}: holds {len(series)} image series, choose one by SeriesInstanceUID: {listing}"
        raise InputError(msg)
    return series[0], headers


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    fast = raw_ds(ds, keyword)
    if fast is not None and len(fast) == n and all(math.isfinite(v) for v in fast):
        return np.asarray(fast, dtype=np.float64)
    value = ds.get(keyword)
    if value is None:
        msg = f"{path}: DICOM attribute {keyword} must be present for a volume, got none"
        raise GeometryError(msg)
    arr = np.asarray([float(v) for v in value], dtype=np.float64)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        msg = f"{path}: DICOM attribute {keyword} must hold {n} finite numbers, got {list(value)}"
        raise GeometryError(msg)
    return arr


def _check_spacing(gaps: np.ndarray, where: str) -> float:
    median = float(np.median(gaps))
    tol = max(SPACING_ABS_TOL, SPACING_REL_TOL * median)
    bad = np.abs(gaps - median) > tol
    if np.any(bad):
        ratios = gaps / median
        if np.allclose(ratios, np.round(ratios), atol=0.02) and np.all(np.round(ratios) >= 1):
            missing = int(np.sum(np.round(ratios) - 1))
            where_idx = [int(i) for i in np.flatnonzero(np.round(ratios) > 1)][:5]
            msg = (
                f"{where}: slice spacing must be even, got {missing} missing slice(s) "
                f"(gap of {gaps.max():.3g} mm after slice index {where_idx}, usual gap {median:.3g} mm)"
            )
        else:
            msg = (
                f"{where}: slice spacing must be even within {tol:.3g} mm, got gaps from "
                f"{gaps.min():.4g} to {gaps.max():.4g} mm"
            )
        raise GeometryError(msg)
    return float(np.mean(gaps))


def read_series(
    source: Path | Sequence[Path],
    *,
    series_uid: str | None = None,
    min_slices: int = 3,
    allow_tilt: bool = False,
) -> DicomVolume:
    """Read one DICOM image series into a volume with its RAS affine.

    Args:
        source: A folder (searched recursively) or the series' files.
        series_uid: Which series to read when the source holds several.
        min_slices: Fewest slices accepted as a volume.
        allow_tilt: Accept gantry/detector tilt, keeping a sheared affine.

    Returns:
        The volume (see :class:`DicomVolume`).

    Raises:
        InputError: Unreadable or non-image input, several series without a choice.
        GeometryError: The slices do not form a valid volume (see the module's rules).
    """
    info, headers = _find_series(source, series_uid, keep_headers=True)
    info = dataclasses.replace(info, files=distinct_instances(info.files, headers))  # copies count once
    where = f"DICOM series {info.series_uid} in {info.files[0].parent}"
    if len(info.files) < min_slices:
        msg = f"{where}: must have at least {min_slices} slices to form a volume, got {len(info.files)}"
        raise GeometryError(msg)

    datasets: list[pydicom.Dataset] = []
    for path in info.files:
        ds = headers.get(path)  # pixel data still on disk
        if ds is None:
            try:
                ds = pydicom.dcmread(path)
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                msg = f"{path}: must be a readable DICOM file, got {type(exc).__name__}: {exc}"
                raise InputError(msg) from exc
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            msg = f"{path}: DICOM slices must be single-frame, got {ds.NumberOfFrames} frames (multi-frame)"
            raise InputError(msg)
        if "PixelData" not in ds:
            msg = f"{path}: DICOM image must have PixelData, got none"
            raise InputError(msg)
        datasets.append(ds)

    first = datasets[0]
    iop = _floats(first, "ImageOrientationPatient", 6, info.files[0])
    spacing = _floats(first, "PixelSpacing", 2, info.files[0])
    shape = (int(first.Rows), int(first.Columns))
    for ds, path in zip(datasets[1:], info.files[1:]):
        other = _floats(ds, "ImageOrientationPatient", 6, path)
        if np.max(np.abs(other - iop)) > ORIENTATION_TOL:
            msg = (
                f"{where}: all slices must share one orientation, got {np.round(iop, 4).tolist()} "
                f"and {np.round(other, 4).tolist()} ({path.name})"
            )
            raise GeometryError(msg)
        if (int(ds.Rows), int(ds.Columns)) != shape:
            msg = (
                f"{where}: all slices must share one size {shape}, got {(ds.Rows, ds.Columns)} ({path.name})"
            )
            raise GeometryError(msg)
        if np.max(np.abs(_floats(ds, "PixelSpacing", 2, path) - spacing)) > 1e-4:
            msg = f"{where}: all slices must share one PixelSpacing {spacing.tolist()}, got {ds.PixelSpacing}"
            raise GeometryError(msg)
    normal = slice_normal(iop)
    if not math.isclose(float(np.linalg.norm(normal)), 1.0, abs_tol=1e-3):
        msg = f"{where}: ImageOrientationPatient must hold two orthonormal cosines, got {iop.tolist()}"
        raise GeometryError(msg)

    positions = np.stack([_floats(ds, "ImagePositionPatient", 3, p) for ds, p in zip(datasets, info.files)])
    order = order_along(positions, normal)
    positions = positions[order]
    datasets = [datasets[i] for i in order]
    files = tuple(info.files[i] for i in order)
    steps = np.diff(positions, axis=0)
    gaps = steps @ normal
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        msg = (
            f"{where}: slice positions must be distinct, got {files[i].name} and {files[i + 1].name} "
            f"at the same position {positions[i].round(3).tolist()} "
            "(duplicated slices or several acquisitions)"
        )
        raise GeometryError(msg)
    slice_spacing = _check_spacing(gaps, where)
    sideways = steps - np.outer(gaps, normal)
    drift = float(np.max(np.linalg.norm(sideways, axis=1)))
    if drift > TILT_TOL_MM:
        mean_step = (positions[-1] - positions[0]) / (len(positions) - 1)
        angle = math.degrees(
            math.acos(min(1.0, float(mean_step @ normal) / float(np.linalg.norm(mean_step))))
        )
        if not allow_tilt:
            msg = (
                f"{where}: slice positions must lie along the slice normal, got a gantry/detector tilt of "
                f"{angle:.2f} degrees (pass allow_tilt=True to keep a sheared affine)"
            )
            raise GeometryError(msg)
        slice_vec = mean_step
    else:
        slice_vec = normal * slice_spacing

    array = stack_pixels(datasets, files, shape)
    meta = {
        "modality": str(first.get("Modality", "")),
        "series_uid": info.series_uid,
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "series_description": str(first.get("SeriesDescription", "")),
        "sop_instance_uids": [str(ds.get("SOPInstanceUID", "")) for ds in datasets],
        "slice_spacing": slice_spacing,
        "pixel_spacing": spacing.tolist(),
    }
    affine = dicom_affine(iop, spacing, positions[0], slice_vec)
    return DicomVolume(array=array, affine=affine, meta=meta, files=files)
