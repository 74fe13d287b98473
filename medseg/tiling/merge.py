"""The merger: accumulate weighted window predictions, finish parts as soon as they are final.

Windows must arrive in the plan's order (:meth:`PatchPlan.locations` with the merger's
``outer_axis``), which makes two things cheap:

* *first-touch writes*: a voxel's first window is the one with the smallest grid index on every
  axis, so each window writes (instead of adds) the box it touches first; no buffer is ever zeroed
  and a voxel is read, modified and written only for its second and later windows;
* *memory-bounded stitching* with *cells*: along each split axis the volume is cut at every window
  start and end, so every window covers whole cells and the plan says which window is each cell's
  first and last. A cell lives from its first window until the windows have moved past its last
  one, when it goes to the sinks. All lifetimes are known before the first window, so every cell
  gets its place in one arena up front (:func:`_place`): one allocation, page-faulted once, where
  fresh memory per cell would cost the kernel's page faults, about as much as the accumulation
  itself. The split axes set the memory:

  - none (``bounded=False``): one cell, the whole volume, finished at the end;
  - the outer axis (bounded, when a sink needs whole planes): about one window row;
  - the outer and the next axis (bounded, otherwise): the overlap band the previous row left plus
    about one window column of the current row. For a 512x512x300 CT with 96³ windows and 14
    classes the cells alive at once take 328 MB and their arena 418 MB, against 4.2 GB for the
    volume.

Finished cells reach the sinks as :class:`~medseg.tiling.slab.Slab` boxes in increasing order; the
labels need no division by the weight sums (it cannot change the argmax), so those are only kept
when a sink normalises.

Examples:
    >>> import torch
    >>> from medseg.tiling.plan import plan_patches
    >>> from medseg.tiling.weights import importance_map
    >>> from medseg.tiling.sinks import ProbabilitySink
    >>> plan = plan_patches((10, 9), (4, 4), overlap=0.5)
    >>> sink = ProbabilitySink(normalise="logits", shape=(10, 9))
    >>> merger = Merger(plan, importance_map(plan.patch_size, "gaussian"), [sink], bounded=True)
    >>> image = torch.arange(90.0).reshape(1, 10, 9)
    >>> for loc in plan.locations(merger.outer_axis):
    ...     merger.add([loc], 2 * image[(slice(None), *loc.slices)][None])
    >>> merger.finish()
    >>> torch.allclose(sink.result(), 2 * image)
    True
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medseg.tiling.plan import PatchLocation, PatchPlan
from medseg.tiling.slab import Sink, Slab
from medseg.tiling.weights import ImportanceMap

Cell = tuple[int, ...]


@dataclass
class _Memory:
    """A cell's buffers: ``(K, *cell)`` sums and ``(*cell)`` weight sums, views of the arena."""

    sums: torch.Tensor
    weights: torch.Tensor | None


def _place(events: Sequence[tuple[Cell, int]]) -> tuple[dict[Cell, int], int]:
    """Offsets in one arena for blocks allocated (size > 0) and freed (size 0) in a known order.

    Each block goes at the lowest offset where it overlaps no block alive at the same time, blocks
    taken largest first, or first born, or largest in size times lifetime (as TFLite's memory
    planners do); the order that needs the smallest arena wins.

    Returns:
        The offsets and the arena size.

    Examples:
        >>> _place([((0,), 4), ((1,), 2), ((0,), 0), ((2,), 3), ((3,), 2)])
        ({(0,): 0, (1,): 4, (2,): 0, (3,): 6}, 8)
    """
    born, died, sizes = {}, {}, {}
    for t, (cell, size) in enumerate(events):
        if size:
            born[cell], sizes[cell] = t, size
        else:
            died[cell] = t
    life = {c: died.get(c, len(events)) - born[c] for c in sizes}
    orders = [
        lambda c: (-sizes[c], born[c]),
        lambda c: (born[c],),
        lambda c: (-sizes[c] * life[c], born[c]),
    ]
    best: tuple[dict[Cell, int], int] = ({}, -1)
    for order in orders:
        placed: list[tuple[int, int, int, int]] = []  # (offset, end, born, died)
        offsets = {}
        for cell in sorted(sizes, key=order):
            b, d = born[cell], died.get(cell, len(events))
            offset = 0
            for o, e in sorted((o, e) for o, e, pb, pd in placed if pb < d and b < pd):
                if o - offset >= sizes[cell]:
                    break
                offset = max(offset, e)
            offsets[cell] = offset
            placed.append((offset, offset + sizes[cell], b, d))
        top = max((e for _, e, _, _ in placed), default=0)
        if best[1] < 0 or top < best[1]:
            best = (dict(sorted(offsets.items())), top)
    return best


class _AxisCells:
    """The cells along one axis: edges, the cells each window covers, each cell's last window."""

    def __init__(self, starts: Sequence[int], patch: int, size: int, split: bool) -> None:
        if split:
            self.edges = sorted({0, size, *starts, *(s + patch for s in starts)})
        else:
            self.edges = [0, size]
        spans = list(itertools.pairwise(self.edges))
        inside = [[c for c, (lo, hi) in enumerate(spans) if s <= lo and hi <= s + patch] for s in starts]
        self.cells_of = [tuple(cells) if split else (0,) for cells in inside]
        self.last = [max(j for j, cells in enumerate(self.cells_of) if c in cells) for c in range(len(spans))]


class Merger:
    """Accumulates window predictions with importance weights and hands finished boxes to sinks.

    Args:
        plan: The patch plan the windows come from.
        weights: The importance map (window-sized).
        sinks: Receivers of the finished boxes (see :mod:`medseg.tiling.sinks`).
        bounded: Keep only the cells still being written (see the module docstring); else keep the
            whole volume and finish it at the end.
        outer_axis: The axis whose rows of windows come one after another (default: the plan's
            :meth:`~PatchPlan.stream_axis`).
        device: Where the accumulation lives.

    Raises:
        ValueError: If ``outer_axis`` is not an axis of the plan or the weights are not window-sized.
    """

    def __init__(
        self,
        plan: PatchPlan,
        weights: ImportanceMap,
        sinks: Sequence[Sink],
        *,
        bounded: bool = False,
        outer_axis: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        axis = plan.stream_axis() if outer_axis is None else int(outer_axis)
        if not 0 <= axis < plan.ndim:
            msg = f"outer_axis must be an axis of the {plan.ndim}D plan, got {outer_axis}"
            raise ValueError(msg)
        if tuple(weights.tensor.shape) != plan.patch_size:
            msg = f"weights must have the patch size {plan.patch_size}, got {tuple(weights.tensor.shape)}"
            raise ValueError(msg)
        self.plan = plan
        self.outer_axis = axis
        self.bounded = bounded
        self.device = torch.device(device)
        self.weights = weights.to(self.device)
        self.sinks = list(sinks)
        self.needs_weights = any(s.needs_weights for s in self.sinks)
        order = plan.axis_order(axis)
        planes = any(getattr(s, "needs_planes", False) for s in self.sinks)
        self.split = () if not bounded else order[:1] if planes else order[:2]
        p, padded = plan.patch_size, plan.padded_shape
        self._axes = [_AxisCells(plan.starts[a], p[a], padded[a], a in self.split) for a in range(plan.ndim)]
        self._fresh = [
            tuple(s if j == 0 else max(s, st[j - 1] + p[a]) for j, s in enumerate(st))
            for a, st in enumerate(plan.starts)
        ]
        self._order = order
        self._expected = plan.locations(axis)
        self._added = 0
        self._cells: dict[Cell, _Memory] = {}
        self._key: tuple[int, ...] | None = None
        self._classes = 0
        self._channels_last = False
        self._arena = torch.empty(0)
        self._warena: torch.Tensor | None = None
        self._offsets: dict[Cell, int] = {}
        self.peak_buffer_bytes = 0

    def add(self, locations: Sequence[PatchLocation], pred: torch.Tensor) -> None:
        """Accumulate a batch of window predictions.

        Args:
            locations: The batch's windows, continuing the plan's order.
            pred: ``(B, K, *patch)`` predictions (logits), one per location.

        Raises:
            ValueError: If the shapes disagree with the plan or the windows come out of order.
        """
        if pred.ndim != self.plan.ndim + 2 or pred.shape[0] != len(locations):
            msg = f"pred must be (B={len(locations)}, K, *{self.plan.patch_size}), got {tuple(pred.shape)}"
            raise ValueError(msg)
        if tuple(pred.shape[2:]) != self.plan.patch_size:
            msg = f"pred must keep the window size {self.plan.patch_size}, got {tuple(pred.shape[2:])}"
            raise ValueError(msg)
        if self._classes == 0:
            self._classes = pred.shape[1]
            self._channels_last = pred.shape[1] > 1 and pred.stride(1) == 1
            self._plan_memory()
        elif pred.shape[1] != self._classes:
            msg = f"pred must keep {self._classes} channels, got {pred.shape[1]}"
            raise ValueError(msg)
        pred = pred.to(device=self.device, dtype=torch.float32)
        for loc, window in zip(locations, pred):
            expected = next(self._expected, None)
            if expected is None or expected.index != loc.index:
                want = "no more windows" if expected is None else f"window {expected.index}"
                msg = f"windows must arrive in plan order (outer axis {self.outer_axis}): {want}"
                msg += f", got {loc.index}"
                raise ValueError(msg)
            key = tuple(loc.index[a] for a in self.split)
            if key != self._key:
                self._flush(key)
                self._key = key
            self._add_window(loc, window)
            self._added += 1

    def _plan_memory(self) -> None:
        """Give every cell its place in one arena, from the lifetimes the plan fixes (see the module)."""
        events: list[tuple[Cell, int]] = []
        alive: set[Cell] = set()
        key = None
        for loc in self.plan.locations(self.outer_axis):
            new_key = tuple(loc.index[a] for a in self.split)
            if new_key != key:
                done = [c for c in alive if tuple(self._axes[a].last[c[a]] for a in self.split) < new_key]
                events += [(c, 0) for c in done]
                alive.difference_update(done)
                key = new_key
            for cell in itertools.product(*(ax.cells_of[i] for ax, i in zip(self._axes, loc.index))):
                if cell not in alive:
                    alive.add(cell)
                    events.append(
                        (cell, math.prod(ax.edges[c + 1] - ax.edges[c] for ax, c in zip(self._axes, cell)))
                    )
        self._offsets, voxels = _place(events)
        self._arena = torch.empty(voxels * self._classes, device=self.device)
        if self.needs_weights and not self.weights.separable:
            self._warena = torch.empty(voxels, device=self.device)
        self.peak_buffer_bytes = 4 * (
            self._arena.numel() + (0 if self._warena is None else self._warena.numel())
        )

    def _cell(self, cell: Cell) -> _Memory:
        if cell not in self._cells:
            extent = [ax.edges[c + 1] - ax.edges[c] for ax, c in zip(self._axes, cell)]
            numel, offset, k = math.prod(extent), self._offsets[cell], self._classes
            sums = self._arena[k * offset : k * (offset + numel)]
            # keep the network's layout (a channels-last argmax is a contiguous reduction)
            sums = sums.view(*extent, k).movedim(-1, 0) if self._channels_last else sums.view(k, *extent)
            weights = None
            if self._warena is not None:
                weights = self._warena[offset : offset + numel].view(extent)
            self._cells[cell] = _Memory(sums, weights)
        return self._cells[cell]

    def _add_window(self, loc: PatchLocation, window: torch.Tensor) -> None:
        n, w = self.plan.ndim, self.weights
        for cell in itertools.product(*(ax.cells_of[i] for ax, i in zip(self._axes, loc.index))):
            mem = self._cell(cell)
            buf, wbuf = mem.sums, mem.weights
            origin = [ax.edges[c] for ax, c in zip(self._axes, cell)]
            lo = [max(o, s) for o, s in zip(origin, loc.start)]
            hi = [min(ax.edges[c + 1], s + p) for ax, c, s, p in zip(self._axes, cell, loc.start, loc.size)]
            f = [min(max(self._fresh[a][i], lo[a]), hi[a]) for a, i in enumerate(loc.index)]
            # the part touched first by this window (a suffix on every axis) + up to n boxes touched before
            boxes = [(True, tuple(zip(f, hi)))]
            boxes += [
                (
                    False,
                    tuple(
                        (f[b], hi[b]) if b < a else (lo[b], f[b]) if b == a else (lo[b], hi[b])
                        for b in range(n)
                    ),
                )
                for a in range(n)
                if f[a] > lo[a]
            ]
            for first, box in boxes:
                if any(x0 >= x1 for x0, x1 in box):
                    continue
                into = tuple(slice(x0 - o, x1 - o) for (x0, x1), o in zip(box, origin))
                local = tuple(slice(x0 - s, x1 - s) for (x0, x1), s in zip(box, loc.start))
                target, src = buf[(slice(None), *into)], window[(slice(None), *local)]
                if w.constant:
                    target.copy_(src) if first else target.add_(src)
                elif first:
                    torch.mul(src, w.tensor[local], out=target)
                else:
                    target.addcmul_(src, w.tensor[local])
                if wbuf is not None:
                    wt = wbuf[into]
                    wt.copy_(w.tensor[local]) if first else wt.add_(w.tensor[local])

    def _flush(self, key: tuple[int, ...] | None) -> None:
        """Finish every cell whose last window comes before ``key`` (all cells for ``None``)."""
        done = [
            c for c in self._cells if key is None or tuple(self._axes[a].last[c[a]] for a in self.split) < key
        ]
        for cell in sorted(done, key=lambda c: tuple(c[a] for a in self._order)):
            self._emit(cell)

    def _line_sums(self, axis: int) -> torch.Tensor:
        assert self.weights.factors is not None
        factor = self.weights.factors[axis]
        line = torch.zeros(self.plan.padded_shape[axis], device=self.device)
        for s in self.plan.starts[axis]:
            line[s : s + factor.numel()] += factor
        return line

    def _weight_sums(
        self, box: tuple[slice, ...], wbuf: torch.Tensor | None, local: tuple[slice, ...]
    ) -> torch.Tensor:
        return self._weight_sums_at(box, wbuf, local, (slice(None),) * len(box))

    def _weight_sums_at(
        self,
        box: tuple[slice, ...],
        wbuf: torch.Tensor | None,
        local: tuple[slice, ...],
        index: tuple[slice, ...],
    ) -> torch.Tensor:
        """The weight sums at a strided sub-grid (``index``, relative to ``box``) of a finished box.

        Read from the weight buffer where there is one, else built for the sub-grid alone: from the
        per-axis line sums of a separable map, or by adding every window's weights at the sub-grid
        voxels it covers (a few thousand small adds, where the whole box would take millions).
        """
        if wbuf is not None:
            return wbuf[local][index]
        if self.weights.separable:
            total: torch.Tensor | None = None
            for a, (rng, sub) in enumerate(zip(box, index)):
                line = self._line_sums(a)[rng][sub]
                line = line.reshape([-1 if b == a else 1 for b in range(self.plan.ndim)])
                total = line if total is None else total * line
            assert total is not None
            return total
        coords = [range(b.start, b.stop)[i] for b, i in zip(box, index)]
        covered: list[list[tuple[slice, slice]]] = []  # per axis: (sub-grid part, window part) per window
        for a, c in enumerate(coords):
            parts = []
            for s in self.plan.starts[a]:
                first = max(0, -((c.start - s) // c.step))  # the first sub-grid voxel at or after s
                last = min(len(c) - 1, (s + self.plan.patch_size[a] - 1 - c.start) // c.step)
                if first <= last:
                    parts.append((slice(first, last + 1), slice(c[first] - s, c[last] - s + 1, c.step)))
            covered.append(parts)
        total = torch.zeros([len(c) for c in coords], device=self.device)
        for combo in itertools.product(*covered):
            total[tuple(sub for sub, _ in combo)] += self.weights.tensor[tuple(win for _, win in combo)]
        return total

    def _emit(self, cell: Cell) -> None:
        mem = self._cells.pop(cell)  # its arena space is reused once the sinks are done with it
        buf, wbuf = mem.sums, mem.weights
        box, local, region = [], [], []
        for ax, c, n, (pad, _) in zip(self._axes, cell, self.plan.shape, self.plan.padding):
            lo, hi = max(ax.edges[c], pad), min(ax.edges[c + 1], pad + n)
            if lo >= hi:
                return
            box.append(slice(lo, hi))
            local.append(slice(lo - ax.edges[c], hi - ax.edges[c]))
            region.append(slice(lo - pad, hi - pad))
        whole = all(r.start == 0 and r.stop == n for r, n in zip(region, self.plan.shape))
        weight_sums = functools.partial(self._weight_sums, tuple(box), wbuf, tuple(local))
        sampled = functools.partial(self._weight_sums_at, tuple(box), wbuf, tuple(local))
        slab = Slab(tuple(region), buf[(slice(None), *local)], weight_sums, whole, self.outer_axis, sampled)
        for sink in self.sinks:
            sink.consume(slab)

    def finish(self) -> None:
        """Finish the rest of the volume and tell the sinks.

        Raises:
            ValueError: If windows of the plan are missing.
        """
        if self._added != self.plan.num_windows:
            msg = f"merger must receive all {self.plan.num_windows} windows of the plan, got {self._added}"
            raise ValueError(msg)
        self._flush(None)
        for sink in self.sinks:
            sink.finish()
