"""Voxel geometry, in one place: affines from DICOM headers, spacing, voxel volume, RAS and LPS.

medseg's affines map voxel indices ``(i, j, k)`` to RAS+ millimetres (NIfTI's convention); DICOM
and ITK speak LPS+, which differs by the sign of the first two axes (:data:`LPS_TO_RAS`, its own
inverse). A DICOM series' grid is ``i`` along a row (ImageOrientationPatient's first cosine),
``j`` down a column (its second cosine) and ``k`` along ``cross(row, col)``, the slice normal.

Examples:
    >>> import numpy as np
    >>> affine = dicom_affine([1, 0, 0, 0, 1, 0], (0.5, 0.8), (10.0, 20.0, 30.0), (0, 0, 2.5))
    >>> affine[:3].tolist()
    [[-0.8, 0.0, 0.0, -10.0], [0.0, -0.5, 0.0, -20.0], [0.0, 0.0, 2.5, 30.0]]
    >>> spacing_from_affine(affine), round(voxel_volume_ml(affine), 6)
    ((0.8, 0.5, 2.5), 0.001)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Turns an LPS+ affine into RAS+ (``LPS_TO_RAS @ affine``) and back (it is its own inverse)."""

ArrayLike = np.ndarray | Sequence[float] | Sequence[Sequence[float]]


def lps_to_ras(affine: ArrayLike) -> np.ndarray:
    """The RAS+ affine of an LPS+ one, or the LPS+ affine of a RAS+ one (the same flip).

    Works for ``(d+1, d+1)`` affines of 2 to 3 dimensions (a 2D image flips both its axes).

    Examples:
        >>> lps_to_ras(np.eye(4)).diagonal().tolist()
        [-1.0, -1.0, 1.0, 1.0]
    """
    a = np.asarray(affine, dtype=np.float64)
    n = a.shape[0]
    flip = np.diag([-1.0, -1.0, *([1.0] * (n - 2))])[:n, :n] if n >= 3 else np.eye(n)
    return flip @ a


def spacing_from_affine(affine: ArrayLike) -> tuple[float, ...]:
    """Voxel spacing (mm per voxel axis) of an affine: the lengths of its direction columns.

    Works for oblique and flipped affines alike (a flip does not change a spacing).

    Args:
        affine: A ``(d+1, d+1)`` homogeneous voxel-to-world matrix.

    Returns:
        The ``d`` spacings, in voxel-axis order.

    Raises:
        ValueError: If ``affine`` is not square with at least 2 rows.

    Examples:
        >>> spacing_from_affine([[0, -2.0, 0, 5], [1.5, 0, 0, 0], [0, 0, -3.0, 1], [0, 0, 0, 1]])
        (1.5, 2.0, 3.0)
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        msg = f"affine must be a square (d+1, d+1) matrix, got shape {a.shape}"
        raise ValueError(msg)
    d = a.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(a[:d, :d], axis=0))


def voxel_volume_ml(affine: ArrayLike) -> float:
    """The volume of one voxel in mL (``|det|`` of the affine's 3x3 part, over 1000 mm³).

    Examples:
        >>> round(voxel_volume_ml(np.diag([2.0, 2.0, 2.5, 1.0])), 6)
        0.01
    """
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def slice_normal(orientation: ArrayLike) -> np.ndarray:
    """The slice normal ``cross(row, col)`` of a DICOM ImageOrientationPatient (6 numbers).

    Examples:
        >>> slice_normal([1, 0, 0, 0, 1, 0]).tolist()
        [0.0, 0.0, 1.0]
    """
    iop = np.asarray(orientation, dtype=np.float64)
    return np.cross(iop[:3], iop[3:])


def order_along(positions: ArrayLike, normal: ArrayLike) -> np.ndarray:
    """The order of slice positions along the slice normal (stable: equal positions keep their order).

    Examples:
        >>> order_along([[0, 0, 5.0], [0, 0, 1.0], [0, 0, 3.0]], [0, 0, 1]).tolist()
        [1, 2, 0]
    """
    pos = np.asarray(positions, dtype=np.float64)
    return np.argsort(pos @ np.asarray(normal, dtype=np.float64), kind="stable")


def dicom_affine(
    orientation: ArrayLike,
    pixel_spacing: ArrayLike,
    origin: ArrayLike,
    slice_step: ArrayLike,
) -> np.ndarray:
    """The RAS+ affine of a DICOM series' grid.

    Args:
        orientation: ImageOrientationPatient (row cosine, then column cosine; LPS).
        pixel_spacing: PixelSpacing (between rows, then between columns; mm).
        origin: ImagePositionPatient of the first slice (LPS, mm).
        slice_step: The LPS vector from one slice's first pixel to the next one's.

    Returns:
        The 4x4 voxel-to-RAS affine (``i`` along a row, ``j`` down a column, ``k`` along the slices).
    """
    iop = np.asarray(orientation, dtype=np.float64)
    spacing = np.asarray(pixel_spacing, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * spacing[1]
    lps[:3, 1] = iop[3:] * spacing[0]
    lps[:3, 2] = np.asarray(slice_step, dtype=np.float64)
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ lps
