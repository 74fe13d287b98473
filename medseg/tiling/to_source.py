"""Back to the source grid with probabilities, slab by slab: resample, then take the labels.

Preprocessing only reorients (flips and axis permutations) and resamples to a spacing while keeping
the direction cosines, so every source voxel index maps to the preprocessed grid axis by axis:
``c = scale * j + offset`` on one grid axis per source axis. :class:`SourceMapping` holds that map
(read off the two affines) and, per axis, linear or nearest sampling with the border clamped, which
is what :func:`medseg.preprocess.invert_to_source` does with MONAI's resamplers (linear in-plane,
nearest along the slice axis of anisotropic data, as nnU-Net does).

Because the map is separable, a slab of the preprocessed grid along one axis gives a slab of source
planes: :class:`SourceGridLabels` is a merger sink that resamples each finished slab's probabilities
to the source planes it completes and writes their argmax, keeping only the one or two grid planes
the next source plane still needs. When the map only selects voxels (no resampling: spacing kept),
it takes the labels directly, without softmax.

Examples:
    >>> import numpy as np, torch
    >>> m = SourceMapping.from_affines(np.diag([2.0, 1, 1, 1]), (3, 2, 2), np.eye(4), (5, 2, 2))
    >>> m.grid_axes, m.scale, m.exact
    ((0, 1, 2), (2.0, 1.0, 1.0), True)
    >>> resample_to_source(torch.arange(20.0).reshape(1, 5, 2, 2), m)[0, :, 0, 0].tolist()
    [0.0, 8.0, 16.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medseg.errors import GeometryError
from medseg.geometry import spacing_from_affine
from medseg.labelmap import torch_label_dtype
from medseg.preprocess.geometry import plan_resampling, separate_slice_axis
from medseg.preprocess.spacing import ResampleToSpacingd
from medseg.tiling.slab import Slab, argmax_channels

_SNAP = 1e-6  # grid coordinates this close to an integer are taken as that integer


@dataclass(frozen=True)
class SourceMapping:
    """Where each source voxel samples the preprocessed grid, axis by axis.

    Attributes:
        source_shape: The source image's spatial shape.
        grid_shape: The preprocessed grid's spatial shape.
        grid_axes: For each source axis, the grid axis it maps to.
        scale: Grid voxels per source voxel, per source axis (negative where flipped).
        offset: Grid coordinate of source index 0, per source axis.
        nearest: Per source axis, whether it is sampled by nearest neighbour (else linearly).
    """

    source_shape: tuple[int, ...]
    grid_shape: tuple[int, ...]
    grid_axes: tuple[int, ...]
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    nearest: tuple[bool, ...]

    @classmethod
    def from_affines(
        cls,
        source_affine: np.ndarray,
        source_shape: Sequence[int],
        grid_affine: np.ndarray,
        grid_shape: Sequence[int],
        nearest_grid_axes: Sequence[int] = (),
        atol: float = 1e-4,
    ) -> SourceMapping:
        """Read the mapping off the two voxel-to-world affines.

        Args:
            source_affine: The source image's ``(4, 4)`` affine.
            source_shape: The source image's spatial shape.
            grid_affine: The preprocessed grid's affine.
            grid_shape: The preprocessed grid's spatial shape.
            nearest_grid_axes: Grid axes resampled by nearest neighbour.
            atol: Tolerance (grid voxels per source voxel) for off-axis terms.

        Returns:
            The mapping.

        Raises:
            GeometryError: If the grids are not related by flips, axis permutations, scaling and shifts.
        """
        m = np.linalg.inv(np.asarray(grid_affine, np.float64)) @ np.asarray(source_affine, np.float64)
        n = len(source_shape)
        axes = tuple(int(np.argmax(np.abs(m[:n, b]))) for b in range(n))
        off_axis = max(abs(m[a, b]) for b in range(n) for a in range(n) if a != axes[b])
        if sorted(axes) != list(range(n)) or off_axis > atol:
            msg = "source and preprocessed grids must differ by flips, permutations and scaling only"
            msg += f", got the grid-to-grid matrix {m.round(4).tolist()}"
            raise GeometryError(msg)
        return cls(
            tuple(int(s) for s in source_shape),
            tuple(int(s) for s in grid_shape),
            axes,
            tuple(float(m[axes[b], b]) for b in range(n)),
            tuple(float(m[axes[b], n]) for b in range(n)),
            tuple(axes[b] in set(nearest_grid_axes) for b in range(n)),
        )

    def sampling(self, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Grid indices ``i0, i1`` and weights ``w`` (value ``(1 - w) v[i0] + w v[i1]``) of a source axis."""
        size = self.grid_shape[self.grid_axes[axis]]
        c = self.scale[axis] * np.arange(self.source_shape[axis]) + self.offset[axis]
        near = np.abs(c - np.rint(c)) < _SNAP
        c = np.clip(np.where(near, np.rint(c), c), 0, size - 1)
        if self.nearest[axis]:
            i0 = np.rint(c).astype(np.int64)
            return i0, i0, np.zeros(len(c))
        i0 = np.floor(c).astype(np.int64)
        return i0, np.minimum(i0 + 1, size - 1), c - i0

    @property
    def exact(self) -> bool:
        """Whether every source voxel is a grid voxel (labels can be taken without resampling)."""
        return all(not self.sampling(b)[2].any() for b in range(len(self.source_shape)))


def _resample_block(
    values: torch.Tensor,
    mapping: SourceMapping,
    grid_start: Sequence[int],
    rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> torch.Tensor:
    """Resample a block of the grid (``(K, *block)``, starting at ``grid_start``) to source rows.

    ``rows`` gives, per source axis, the ``(i0, i1, w)`` sampling of the source indices wanted.
    Returns ``(K, *source block)`` in source axis order.
    """
    out = values
    for b, (i0, i1, w) in rows.items():
        a = mapping.grid_axes[b]
        if not w.any() and np.array_equal(i0 - grid_start[a], np.arange(out.shape[1 + a])):
            continue  # every plane, in order: nothing to select
        lo = torch.as_tensor(i0 - grid_start[a], device=values.device)
        first = out.index_select(1 + a, lo)
        if w.any():
            hi = torch.as_tensor(i1 - grid_start[a], device=values.device)
            shape = [1] * out.ndim
            shape[1 + a] = -1
            weight = torch.as_tensor(w, dtype=out.dtype, device=values.device).reshape(shape)
            first = torch.lerp(first, out.index_select(1 + a, hi), weight)
        out = first
    return out.permute(0, *(1 + a for a in mapping.grid_axes))


def resample_to_source(values: torch.Tensor, mapping: SourceMapping) -> torch.Tensor:
    """Resample ``(K, *grid)`` values (probabilities) to the source grid in one go.

    Args:
        values: Values on the preprocessed grid.
        mapping: The grid-to-source mapping.

    Returns:
        ``(K, *source_shape)`` values.
    """
    rows = {b: mapping.sampling(b) for b in range(len(mapping.source_shape))}
    return _resample_block(values, mapping, (0,) * values.ndim, rows)


class SourceGridLabels:
    """A merger sink that turns finished grid slabs into labels on the source grid, plane by plane.

    Args:
        mapping: The grid-to-source mapping.
    """

    needs_planes = True

    def __init__(self, mapping: SourceMapping) -> None:
        self.mapping = mapping
        self.exact = mapping.exact
        self.needs_weights = not self.exact
        n = len(mapping.source_shape)
        self._rows = {b: mapping.sampling(b) for b in range(n)}
        self._labels: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None  # grid planes still needed, along the slab axis
        self._kept_start = 0
        self._pending: np.ndarray | None = None  # source planes not written yet (along the slab axis)

    def consume(self, slab: Slab) -> None:
        """Resample the source planes this slab completes and write their labels."""
        mapping, a = self.mapping, slab.axis
        b = mapping.grid_axes.index(a)
        if self._labels is None:
            self._labels = torch.empty(mapping.source_shape, dtype=torch_label_dtype(slab.num_classes))
            self._pending = np.ones(mapping.source_shape[b], dtype=bool)
        assert self._pending is not None
        values = slab.labels()[None] if self.exact else slab.probabilities()
        i0, i1, w = self._rows[b]
        needed = np.maximum(i0, i1)
        ready = np.flatnonzero(self._pending & (needed < slab.stop))
        start = slab.start if self._kept is None else self._kept_start
        if ready.size:
            planes = np.unique(np.concatenate([i0[ready], i1[ready]]))
            block = self._planes(values, slab, planes)
            rank = {int(p): r for r, p in enumerate(planes)}
            # the slab axis first (it shrinks the block most), then the others
            lo = np.array([rank[int(i)] for i in i0[ready]])
            hi = np.array([rank[int(i)] for i in i1[ready]])
            rows = {b: (lo, hi, w[ready])}
            rows.update({c: r for c, r in self._rows.items() if c != b})
            part = _resample_block(block, mapping, [0] * len(mapping.grid_shape), rows)
            labels = part[0] if self.exact else argmax_channels(part, self._labels.dtype)
            index = torch.as_tensor(ready)
            self._labels.index_copy_(b, index, labels.to(self._labels.dtype).cpu())
            self._pending[ready] = False
        # keep the grid planes a later source plane still needs
        rest = np.flatnonzero(self._pending)
        if rest.size:
            keep_from = int(min(i0[rest].min(), i1[rest].min()))
            keep = np.arange(max(keep_from, start), slab.stop)
            self._kept = self._planes(values, slab, keep).clone() if keep.size else None
            self._kept_start = int(keep[0]) if keep.size else slab.stop
        else:
            self._kept = None

    def _planes(self, values: torch.Tensor, slab: Slab, planes: np.ndarray) -> torch.Tensor:
        """Grid planes (along the slab axis) from the kept planes and this slab, in order."""
        dim = 1 + slab.axis
        parts = []
        old = planes[planes < slab.start]
        if old.size:
            assert self._kept is not None
            parts.append(self._kept.index_select(dim, torch.as_tensor(old - self._kept_start)))
        new = planes[planes >= slab.start]
        if not old.size and np.array_equal(new, np.arange(slab.start, slab.stop)):
            return values  # the whole slab, in order
        if new.size:
            parts.append(values.index_select(dim, torch.as_tensor(new - slab.start, device=values.device)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def finish(self) -> None:
        """Check every source plane was written.

        Raises:
            RuntimeError: If some were not.
        """
        if self._pending is None or self._pending.any():
            msg = "source grid labels must cover every source plane, got planes left unwritten"
            raise RuntimeError(msg)

    def result(self) -> torch.Tensor:
        """The ``(*source_shape)`` label map."""
        if self._labels is None:
            msg = "source grid labels must receive slabs before the result is read, got none"
            raise RuntimeError(msg)
        return self._labels


def source_mapping(preprocessed: MetaTensor, source: MetaTensor, transform: Compose) -> SourceMapping:
    """The mapping from a preprocessed image's grid back to its source image's grid.

    The nearest-neighbour axis is the one :class:`~medseg.preprocess.spacing.ResampleToSpacingd`
    resampled separately (nnU-Net's slice axis of anisotropic data), if it did.

    Args:
        preprocessed: The preprocessed ``(C, *spatial)`` image.
        source: The image before preprocessing.
        transform: The preprocessing ``Compose`` that produced ``preprocessed``.

    Returns:
        The :class:`SourceMapping`.

    Raises:
        GeometryError: If the grids are not related axis by axis.
    """
    src_affine = np.asarray(source.affine, dtype=np.float64)
    grid_affine = np.asarray(preprocessed.affine, dtype=np.float64)
    src_shape, grid_shape = tuple(source.shape[1:]), tuple(preprocessed.shape[1:])
    mapping = SourceMapping.from_affines(src_affine, src_shape, grid_affine, grid_shape)
    stages = [t for t in transform.flatten().transforms if isinstance(t, ResampleToSpacingd)]
    if not stages:
        return mapping
    stage = stages[0]
    spacing = spacing_from_affine(src_affine)
    oriented = [0.0] * len(spacing)
    for b, a in enumerate(mapping.grid_axes):
        oriented[a] = spacing[b]
    steps = plan_resampling(oriented, stage.pixdim, stage.anisotropy_threshold)
    if all(s.smooth for s in steps):
        return mapping
    axis = separate_slice_axis(oriented, stage.pixdim, stage.anisotropy_threshold)
    nearest = () if axis is None else (axis,)
    return SourceMapping.from_affines(src_affine, src_shape, grid_affine, grid_shape, nearest)
