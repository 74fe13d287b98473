"""The patch plan: where the windows go, computed before anything runs.

:func:`plan_patches` turns a volume's spatial shape, the network's size divisors, the requested
patch size and overlap into a :class:`PatchPlan`, a small frozen value that can be printed, logged
(:meth:`PatchPlan.as_dict`) and tested alone. Its :class:`PatchLocation` values are what the
splitter cuts and the merger accumulates.

Rules, per axis:

* the patch is the requested size rounded up to a multiple of the network's divisor, so the
  network can halve it at every level;
* an axis shorter than the patch is padded (half before, half after, as MONAI does) to the patch;
* windows are placed evenly (nnU-Net's rule): ``ceil((n - p) / (p * (1 - overlap))) + 1`` windows,
  the first at 0, the last at ``n - p``, the others evenly between, so the volume is covered exactly,
  with at least the requested overlap, and nothing is cropped or shifted. ``placement="monai"``
  reproduces MONAI's ``sliding_window_inference`` grid instead (for comparisons);
* for a 2D network on a volume (``slice_axis`` set) the window is one slice thick along that axis,
  one window per slice; ``context`` neighbouring slices on each side go in as extra channels (2.5D).

Examples:
    >>> plan = plan_patches((33, 47, 29), (16, 16, 16), overlap=0.25, divisor=8)
    >>> plan.grid, plan.num_windows, plan.padding
    ((3, 4, 3), 36, ((0, 0), (0, 0), (0, 0)))
    >>> plan.starts[0]
    (0, 8, 17)
    >>> plan_patches((7, 7), (16, 16), divisor=8).padding
    ((4, 5), (4, 5))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Placement = Literal["even", "monai"]
PLACEMENTS = ("even", "monai")


def _ints(values: Sequence[int] | int, n: int, name: str) -> tuple[int, ...]:
    out = (int(values),) * n if isinstance(values, int) else tuple(int(v) for v in values)
    if len(out) != n:
        msg = f"{name} must have {n} entries (one per spatial axis), got {tuple(values)}"  # type: ignore[arg-type]
        raise ValueError(msg)
    return out


@dataclass(frozen=True)
class PatchLocation:
    """One window of a plan.

    Attributes:
        index: The window's position in the plan's grid, per axis.
        start: First voxel per axis, in the padded volume's coordinates.
        size: Window size per axis.
    """

    index: tuple[int, ...]
    start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        """The window's spatial slices into the padded volume."""
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))


@dataclass(frozen=True)
class PatchPlan:
    """Where the windows of one volume go.

    Attributes:
        shape: The volume's spatial shape.
        patch_size: Window size per axis (1 on the slice axis of a 2D network).
        padding: ``(before, after)`` padding per axis; windows live in the padded volume.
        starts: Window starts per axis (padded coordinates); the windows are their product.
        overlap: The requested overlap fraction.
        divisors: The network's size divisor per axis.
        placement: ``"even"`` or ``"monai"``.
        slice_axis: For a 2D network on a volume, the axis it is run along; else ``None``.
        context: Neighbouring slices on each side given to a 2D network as channels (2.5D).

    Raises:
        ValueError: If the fields are inconsistent (windows that leave the padded volume or miss
            part of it, or sizes not divisible by the divisors).
    """

    shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    starts: tuple[tuple[int, ...], ...]
    overlap: float
    divisors: tuple[int, ...]
    placement: Placement = "even"
    slice_axis: int | None = None
    context: int = 0

    def __post_init__(self) -> None:
        n = len(self.shape)
        if not all(len(f) == n for f in (self.patch_size, self.padding, self.starts, self.divisors)):
            msg = f"plan fields must have one entry per spatial axis ({n}), got {self!r}"
            raise ValueError(msg)
        for a, (size, p, st) in enumerate(zip(self.padded_shape, self.patch_size, self.starts)):
            if self.slice_axis != a and p % self.divisors[a]:
                msg = f"patch_size must be divisible by {self.divisors}, got {self.patch_size}"
                raise ValueError(msg)
            covered = st and st[0] == 0 and st[-1] + p == size
            gaps = any(b > a_ + p for a_, b in itertools.pairwise(st)) or list(st) != sorted(set(st))
            if not covered or gaps:
                msg = f"windows must cover axis {a} (size {size}, patch {p}) exactly, got starts {st}"
                raise ValueError(msg)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.shape)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """The spatial shape after padding."""
        return tuple(n + b + a for n, (b, a) in zip(self.shape, self.padding))

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of windows per axis."""
        return tuple(len(s) for s in self.starts)

    @property
    def num_windows(self) -> int:
        """Total number of windows."""
        return math.prod(self.grid)

    def axis_order(self, outer_axis: int = 0) -> tuple[int, ...]:
        """Axes from outermost to innermost when windows are visited with ``outer_axis`` outermost."""
        return (outer_axis, *(a for a in range(self.ndim) if a != outer_axis))

    def locations(self, outer_axis: int = 0) -> Iterator[PatchLocation]:
        """The windows, in lexicographic grid order with ``outer_axis`` varying slowest.

        Args:
            outer_axis: The axis whose window rows come one after another (the streaming axis).

        Yields:
            Every :class:`PatchLocation` once.
        """
        order = self.axis_order(outer_axis)
        for idx in itertools.product(*(range(len(self.starts[a])) for a in order)):
            index = [0] * self.ndim
            for a, i in zip(order, idx):
                index[a] = i
            start = tuple(self.starts[a][i] for a, i in enumerate(index))
            yield PatchLocation(tuple(index), start, self.patch_size)

    def stream_axis(self) -> int:
        """The axis along which a slab of one window row is smallest (for memory-bounded stitching)."""
        sizes = self.padded_shape
        return min(range(self.ndim), key=lambda a: (self.patch_size[a] / sizes[a], a))

    def crop(self) -> tuple[slice, ...]:
        """Slices that take the padded volume back to the volume."""
        return tuple(slice(b, b + n) for n, (b, _) in zip(self.shape, self.padding))

    def as_dict(self) -> dict[str, Any]:
        """The plan as plain values (for logs and MLflow params)."""
        return {
            "shape": list(self.shape),
            "patch_size": list(self.patch_size),
            "padding": [list(p) for p in self.padding],
            "grid": list(self.grid),
            "num_windows": self.num_windows,
            "overlap": self.overlap,
            "divisors": list(self.divisors),
            "placement": self.placement,
            "slice_axis": self.slice_axis,
            "context": self.context,
            "starts": [list(s) for s in self.starts],
        }

    def __str__(self) -> str:
        slices = ""
        if self.slice_axis is not None:
            slices = f", 2D along axis {self.slice_axis} (context {self.context})"
        return (
            f"PatchPlan({'x'.join(map(str, self.shape))}: {self.num_windows} windows "
            f"{'x'.join(map(str, self.grid))} of {'x'.join(map(str, self.patch_size))}, "
            f"padding {self.padding}, overlap {self.overlap}, {self.placement}{slices})"
        )


def axis_starts(size: int, patch: int, overlap: float, placement: Placement = "even") -> tuple[int, ...]:
    """Window starts along one axis of length ``size >= patch``.

    Args:
        size: Axis length (already padded to at least ``patch``).
        patch: Window length.
        overlap: Requested overlap fraction in ``[0, 1)``.
        placement: ``"even"`` (nnU-Net: evenly spread, first at 0, last at ``size - patch``) or
            ``"monai"`` (MONAI: steps of ``int(patch * (1 - overlap))``, the last moved back to fit).

    Returns:
        The sorted, distinct starts.

    Examples:
        >>> axis_starts(512, 96, 0.25)
        (0, 69, 139, 208, 277, 347, 416)
        >>> axis_starts(512, 96, 0.25, "monai")
        (0, 72, 144, 216, 288, 360, 416)
    """
    if size < patch:
        msg = f"size must be >= patch ({patch}), got {size}"
        raise ValueError(msg)
    if size == patch:
        return (0,)
    if placement == "monai":
        step = max(int(patch * (1 - overlap)), 1)
        count = next(d for d in range(size) if d * step + patch >= size) + 1
        return tuple(d * step - max(d * step + patch - size, 0) for d in range(count))
    target = max(patch * (1 - overlap), 1.0)
    count = min(math.ceil((size - patch) / target) + 1, size - patch + 1)
    spread = (size - patch) / (count - 1)
    return tuple(sorted({round(spread * i) for i in range(count)}))


def plan_patches(
    shape: Sequence[int],
    patch_size: Sequence[int] | int,
    *,
    overlap: float = 0.25,
    divisor: Sequence[int] | int = 1,
    placement: Placement = "even",
    slice_axis: int | None = None,
    context: int = 0,
) -> PatchPlan:
    """Plan the windows of one volume.

    Args:
        shape: The volume's spatial shape (2 or 3 axes).
        patch_size: Requested window size, one per axis or one for all. With ``slice_axis`` the entry
            on that axis is ignored (windows are one slice thick).
        overlap: Overlap fraction between neighbouring windows, ``0 <= overlap < 1``.
        divisor: The network's size divisor, one per axis or one for all (1 on a slice axis).
        placement: ``"even"`` or ``"monai"`` (see :func:`axis_starts`).
        slice_axis: Run a 2D network slice by slice along this axis.
        context: With ``slice_axis``: neighbouring slices on each side given as channels.

    Returns:
        The :class:`PatchPlan`.

    Raises:
        ValueError: For empty axes, sizes or divisors below 1, an overlap outside ``[0, 1)``, an
            unknown placement, or a bad ``slice_axis``/``context``.

    Examples:
        >>> str(plan_patches((7, 7, 7), 16, divisor=16))
        'PatchPlan(7x7x7: 1 windows 1x1x1 of 16x16x16, padding ((4, 5), (4, 5), (4, 5)), overlap 0.25, even)'
    """
    n = len(shape)
    dims = tuple(int(s) for s in shape)
    if n not in (2, 3) or min(dims) < 1:
        msg = f"shape must be 2 or 3 spatial sizes >= 1, got {tuple(shape)}"
        raise ValueError(msg)
    if not 0.0 <= overlap < 1.0:
        msg = f"overlap must be >= 0 and < 1, got {overlap}"
        raise ValueError(msg)
    if placement not in PLACEMENTS:
        msg = f"placement must be one of {PLACEMENTS}, got {placement!r}"
        raise ValueError(msg)
    if slice_axis is not None and not 0 <= slice_axis < n:
        msg = f"slice_axis must be an axis of the {n}D volume, got {slice_axis}"
        raise ValueError(msg)
    if context < 0 or (context and slice_axis is None):
        msg = f"context must be >= 0 and needs a slice_axis, got context={context}, slice_axis={slice_axis}"
        raise ValueError(msg)
    req = _ints(patch_size, n, "patch_size")
    divs = list(_ints(divisor, n, "divisor"))
    if min(divs) < 1:
        msg = f"divisor must be >= 1 on every axis, got {tuple(divs)}"
        raise ValueError(msg)
    if slice_axis is not None:
        divs[slice_axis] = 1
        req = tuple(1 if a == slice_axis else p for a, p in enumerate(req))
    if min(req) < 1:
        msg = f"patch_size must be >= 1 on every axis, got {req}"
        raise ValueError(msg)
    patch = tuple(math.ceil(p / d) * d for p, d in zip(req, divs))
    padding = tuple(((p - s) // 2, p - s - (p - s) // 2) if s < p else (0, 0) for s, p in zip(dims, patch))
    starts = tuple(
        axis_starts(s + b + a, p, overlap, placement) for s, p, (b, a) in zip(dims, patch, padding)
    )
    return PatchPlan(
        dims, patch, padding, starts, float(overlap), tuple(divs), placement, slice_axis, context
    )


def network_divisors(network: torch.nn.Module, ndim: int) -> tuple[int, ...]:
    """The network's size divisor per axis (``size_divisors`` if it has them, else ``size_divisor``).

    Args:
        network: A network built by :func:`medseg.models.create_model` (or any module; default 1).
        ndim: Number of spatial axes the network takes.

    Returns:
        One divisor per axis.
    """
    per_axis = getattr(network, "size_divisors", None)
    if per_axis is not None and len(per_axis) == ndim:
        return tuple(int(d) for d in per_axis)
    return (int(getattr(network, "size_divisor", 1)),) * ndim
