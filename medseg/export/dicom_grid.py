"""Where each source DICOM instance sits on a case's grid, from its own position and orientation.

DICOM exports (SEG, RTSTRUCT) need, for every source SOP instance, the slice of the label map it
shows. The grid is the one the loader built when it read the series (the case's affine and shape,
carried in the :class:`~medseg.export.case.CaseExport`), never derived again here: each instance
is placed on it from its ImagePositionPatient and checked against its ImageOrientationPatient,
never by InstanceNumber or file order, so flipped, reversed, oblique and shuffled series come out
aligned. A label map made elsewhere (any axis order or flips, as long as its voxels are the
series' voxels) is re-indexed onto the series' own grid first (:func:`to_grid`).

Grid of a series (see :mod:`medseg.geometry`): ``i`` along a row (first cosine), ``j`` down a
column (second cosine), ``k`` along ``cross(row, col)``; slice ``k`` of a label map is the frame
``labels[:, :, k].T`` (rows x columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from medseg.errors import GeometryError, InputError
from medseg.geometry import LPS_TO_RAS

GRID_TOL = 0.05
"""Largest offset accepted between a voxel and a lattice point, in voxels."""


@dataclass(frozen=True, eq=False)
class SeriesGrid:
    """The headers of a single-frame DICOM series with the voxel grid they span.

    Attributes:
        headers: The instances' headers (no pixel data), in slice order (``k``).
        affine: 4x4 RAS+ affine of the grid.
        shape: ``(columns, rows, slices)``, i.e. ``(X, Y, Z)``.
        slices: The slice ``k`` each header shows.
    """

    headers: tuple[pydicom.Dataset, ...]
    affine: np.ndarray
    shape: tuple[int, int, int]
    slices: tuple[int, ...]

    def frame(self, labels: np.ndarray, k: int) -> np.ndarray:
        """Slice ``k`` of a label map on this grid as a DICOM frame (rows x columns)."""
        return np.ascontiguousarray(labels[:, :, k].T)


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        msg = f"DICOM instance {ds.get('SOPInstanceUID', '?')}: {keyword} must hold {n} numbers, got {value}"
        raise GeometryError(msg)
    return np.asarray([float(v) for v in value], dtype=np.float64)


def read_headers(files: Sequence[Path]) -> list[pydicom.Dataset]:
    """Read the headers (without pixel data) of DICOM files.

    An empty SpecificCharacterSet (seen in real scanners' files) is dropped: it means the default
    repertoire, and writers that copy it would refuse the empty value.

    Raises:
        InputError: If a file is not readable DICOM.
    """
    out: list[pydicom.Dataset] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
            msg = f"{f}: must be a readable DICOM file, got {type(exc).__name__}: {exc}"
            raise InputError(msg) from exc
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
        out.append(ds)
    return out


def place_series(
    files: Sequence[Path] | Sequence[pydicom.Dataset],
    affine: np.ndarray,
    shape: Sequence[int],
    *,
    tol: float = GRID_TOL,
) -> SeriesGrid:
    """Place the instances of a single-frame DICOM series on the grid the loader read it into.

    Each instance's first pixel (its ImagePositionPatient) must be a lattice point ``(0, 0, k)``
    of the grid, its row and column steps (ImageOrientationPatient times PixelSpacing) the grid's
    ``i`` and ``j`` steps, its size the grid's, and no two instances may show one slice.

    Args:
        files: The series' files (or their headers), in any order.
        affine: The grid's 4x4 RAS+ affine (the loaded image's).
        shape: The grid's ``(X, Y, Z)`` shape.
        tol: Largest offset from a lattice point, in voxels.

    Returns:
        The :class:`SeriesGrid`, headers in slice order.

    Raises:
        InputError: An empty series or an unreadable file.
        GeometryError: An instance that does not lie on a slice of the grid.
    """
    headers = [f for f in files if isinstance(f, pydicom.Dataset)]
    if len(headers) < len(files):
        from medseg.io.dicom_duplicates import distinct_instances  # copies of one instance count once

        headers = read_headers(distinct_instances([Path(f) for f in files]))
    if not headers:
        msg = "DICOM series must hold at least one instance, got none"
        raise InputError(msg)
    grid_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    inv = np.linalg.inv(lps)
    slices = [_slice_of(ds, lps, inv, grid_shape, tol) for ds in headers]
    order = np.argsort(slices, kind="stable")
    ks = [slices[i] for i in order]
    if len(set(ks)) != len(ks):
        msg = "DICOM series slice positions must be distinct, got two instances at one position"
        raise GeometryError(msg)
    return SeriesGrid(
        tuple(headers[i] for i in order), np.asarray(affine, dtype=np.float64), grid_shape, tuple(ks)
    )


def _slice_of(
    ds: pydicom.Dataset, lps: np.ndarray, inv: np.ndarray, shape: tuple[int, int, int], tol: float
) -> int:
    uid = ds.get("SOPInstanceUID", "?")
    if (int(ds.Columns), int(ds.Rows)) != shape[:2]:
        msg = f"DICOM instance {uid} must have the grid's image size {shape[:2]}, got {(ds.Columns, ds.Rows)}"
        raise GeometryError(msg)
    iop = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    steps = np.stack([iop[:3] * spacing[1], iop[3:] * spacing[0]], axis=1)
    if not np.allclose(steps, lps[:3, :2], atol=tol * float(spacing.min())):
        msg = (
            f"DICOM instance {uid} must share the grid's orientation and pixel spacing, got "
            f"ImageOrientationPatient {iop.tolist()} and PixelSpacing {spacing.tolist()}"
        )
        raise GeometryError(msg)
    ijk = inv @ np.append(_floats(ds, "ImagePositionPatient", 3), 1.0)
    k = round(float(ijk[2]))
    if np.max(np.abs(ijk[:3] - [0, 0, k])) > tol or not 0 <= k < shape[2]:
        msg = (
            f"DICOM instance {uid} must lie on a slice of the grid, "
            f"got voxel position {np.round(ijk[:3], 3).tolist()}"
        )
        raise GeometryError(msg)
    return k


def instance_slices(grid: SeriesGrid) -> list[int]:
    """The slice ``k`` of the grid that each header (in ``grid.headers`` order) shows."""
    return list(grid.slices)


def to_grid(
    labels: np.ndarray,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    what: str = "label map",
    tol: float = GRID_TOL,
) -> np.ndarray:
    """Re-index a volume onto a grid that holds the same voxels (axes permuted or flipped).

    No interpolation: every voxel of ``labels`` must sit on a voxel of the target grid and the two
    grids must cover the same voxels.

    Args:
        labels: The volume ``(X, Y, Z)``.
        affine: Its RAS+ affine.
        target_affine: The target grid's RAS+ affine.
        target_shape: The target grid's shape.
        what: What the volume is, for messages.
        tol: Largest offset from a lattice point, in voxels.

    Returns:
        The volume indexed on the target grid.

    Raises:
        GeometryError: If the grids do not share their voxels.
    """
    index_map = np.linalg.inv(target_affine) @ np.asarray(affine, dtype=np.float64)
    rot = index_map[:3, :3]
    perm = np.round(rot)
    is_perm = (
        np.allclose(rot, perm, atol=tol)
        and np.allclose(np.abs(perm).sum(0), 1)
        and np.allclose(np.abs(perm).sum(1), 1)
    )
    shift = index_map[:3, 3]
    if not is_perm or not np.allclose(shift, np.round(shift), atol=tol):
        msg = (
            f"{what} must lie on the voxel grid of the DICOM series (same voxels, any axis order), "
            f"got a grid that maps to series voxels by {np.round(index_map[:3], 3).tolist()}"
        )
        raise GeometryError(msg)
    src_shape = np.asarray(labels.shape)
    mapped = np.abs(perm) @ src_shape
    if not np.array_equal(mapped.astype(int), np.asarray(target_shape)):
        msg = f"{what} must cover the series' {tuple(target_shape)} voxels, got shape {tuple(labels.shape)}"
        raise GeometryError(msg)
    out = labels
    axes = [int(np.flatnonzero(perm[t])[0]) for t in range(3)]  # target axis t comes from source axis
    out = np.transpose(out, axes)
    for t in range(3):
        if perm[t, axes[t]] < 0:
            out = out[(slice(None),) * t + (slice(None, None, -1),)]
    corner = perm @ np.zeros(3) + np.round(shift)
    low = np.minimum(corner, corner + perm @ (src_shape - 1))
    if np.any(np.abs(low) > 0.5):
        msg = f"{what} must start at the series' first voxel, got an offset of {low.tolist()} voxels"
        raise GeometryError(msg)
    return np.ascontiguousarray(out)
