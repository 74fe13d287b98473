"""nnU-Net's default resampling (``resample_data_or_seg_to_shape``), reproduced.

Rules, as nnU-Net applies them:

- A grid is anisotropic when its largest spacing exceeds ``3 x`` its smallest. If the current
  spacing is anisotropic (else, the target spacing), and exactly one axis has the largest spacing,
  that axis is resampled separately: each slice in-plane with spline ``order``, then along the
  out-of-plane axis with ``order_z`` (nearest by default), as ``map_coordinates`` with half-voxel
  centres. ``force_separate_z`` set to true or false overrides the test.
- Otherwise every axis with spline ``order`` at once. Both are what ``skimage.transform.resize``
  does with ``mode="edge"`` and no anti-aliasing: ``scipy.ndimage.zoom`` on float64 with grid-mode
  (half-voxel) coordinates, clipped to the input's range.

Examples:
    >>> separate_axis((0.7, 0.7, 5.0), (0.7, 0.7, 5.0))
    2
    >>> separate_axis((1.0, 1.0, 1.0), (1.2, 1.0, 1.0)) is None
    True
    >>> new_shape((10, 20, 30), (1.0, 1.0, 1.0), (2.0, 2.0, 0.5))
    (5, 10, 60)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

ANISO_THRESHOLD = 3.0


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The shape after resampling ``shape`` from ``spacing`` to ``target`` (rounded)."""
    return tuple(round(s / t * n) for s, t, n in zip(spacing, target, shape))


def _lowres_axes(spacing: Sequence[float]) -> list[int]:
    values = np.asarray(spacing, dtype=np.float64)
    return [int(i) for i in np.where(max(spacing) / values == 1)[0]]


def separate_axis(
    spacing: Sequence[float], target: Sequence[float], *, force: bool | None = None
) -> int | None:
    """The axis resampled on its own (nnU-Net's ``separate z``), or ``None``."""
    if force is not None:
        axes = _lowres_axes(spacing) if force else None
    elif max(spacing) / min(spacing) > ANISO_THRESHOLD:
        axes = _lowres_axes(spacing)
    elif max(target) / min(target) > ANISO_THRESHOLD:
        axes = _lowres_axes(target)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return axes[0]


def resize(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(array, shape, order, mode="edge", anti_aliasing=False)`` (float64)."""
    data = np.asarray(array, dtype=np.float64)
    factors = np.divide(data.shape, shape)
    out = ndimage.zoom(data, [1 / f for f in factors], order=order, mode="nearest", grid_mode=True)
    if order > 0:  # skimage clips interpolated values to the input's range
        np.clip(out, data.min(), data.max(), out=out)
    return np.asarray(out)


def _along_axis(volume: np.ndarray, shape: Sequence[int], order_z: int) -> np.ndarray:
    """Resample a volume to ``shape`` by ``map_coordinates`` (only one axis actually changes)."""
    grids = np.mgrid[tuple(slice(0, n) for n in shape)].astype(np.float64)
    coords = [(float(old) / new) * (grid + 0.5) - 0.5 for grid, old, new in zip(grids, volume.shape, shape)]
    return np.asarray(ndimage.map_coordinates(volume, np.array(coords), order=order_z, mode="nearest"))


def resample_to_shape(
    data: np.ndarray,
    shape: Sequence[int],
    spacing: Sequence[float],
    target: Sequence[float],
    *,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
    dtype: np.dtype | None = None,
) -> np.ndarray:
    """Resample ``(C, X, Y, Z)`` data to ``shape`` as nnU-Net's default resampling does.

    Args:
        data: Channel-first 3D data (images, or logits).
        shape: The spatial output shape.
        spacing: The data's spacing.
        target: The output's spacing (decides the separate axis only).
        order: Spline order in-plane (or everywhere).
        order_z: Spline order along the separate axis.
        force_separate_z: ``None`` decides by anisotropy; true or false forces it.
        dtype: Output dtype (default: the input's).

    Returns:
        The resampled data; ``data`` itself when the shape does not change.
    """
    if tuple(data.shape[1:]) == tuple(int(s) for s in shape):
        return data
    shape = tuple(int(s) for s in shape)
    out = np.zeros((data.shape[0], *shape), dtype=dtype or data.dtype)
    axis = separate_axis(spacing, target, force=force_separate_z)
    for c in range(data.shape[0]):
        channel = np.asarray(data[c], dtype=np.float64)
        if axis is None:
            out[c] = resize(channel, shape, order)
            continue
        in_plane = [n for i, n in enumerate(shape) if i != axis]
        stacked_shape = list(shape)
        stacked_shape[axis] = channel.shape[axis]
        stacked = np.zeros(stacked_shape, dtype=np.float64)
        for k in range(channel.shape[axis]):
            index = tuple(k if i == axis else slice(None) for i in range(3))
            stacked[index] = resize(channel[index], in_plane, order)
        out[c] = stacked if stacked.shape[axis] == shape[axis] else _along_axis(stacked, shape, order_z)
    return out
