"""Bounded-memory planning for the dense CRF: the box around the foreground, slabs with halos, threads.

A full scan is never refined in one piece unless it is small: :func:`foreground_box` finds the box
around the predicted foreground (plus a margin), and :func:`plan_blocks` cuts a box larger than
``max_block_voxels`` into slabs along one axis, each refined with a halo of at least three kernel
widths of which only the core is kept.

Examples:
    >>> cfg = DenseCRFConfig(max_block_voxels=1000, bilateral_sigma_mm=1.0, spatial_sigma_mm=1.0)
    >>> [b.core[2] for b in plan_blocks([(0, 10), (0, 10), (0, 20)], (1.0, 1.0, 1.0), cfg)]
    [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from medseg.config.refine import DenseCRFConfig


@dataclass(frozen=True)
class Block:
    """One piece of the refined region: refined with its halo, only its core is kept.

    Attributes:
        core: Per axis ``(start, stop)`` of the voxels this block writes.
        padded: Per axis ``(start, stop)`` of the voxels it reads (core plus halo, clipped).
    """

    core: tuple[tuple[int, int], ...]
    padded: tuple[tuple[int, int], ...]

    @property
    def voxels(self) -> int:
        """Voxels refined (with the halo)."""
        return math.prod(b - a for a, b in self.padded)


@dataclass(frozen=True)
class CRFInfo:
    """What :func:`dense_crf` did.

    Attributes:
        roi: Per axis ``(start, stop)`` of the refined box, or ``None`` if nothing was refined.
        blocks: The blocks refined.
    """

    roi: tuple[tuple[int, int], ...] | None
    blocks: tuple[Block, ...]

    @property
    def refined_voxels(self) -> int:
        """Voxels refined, halos counted."""
        return sum(b.voxels for b in self.blocks)


def plan_blocks(
    roi: Sequence[tuple[int, int]], spacing: Sequence[float], cfg: DenseCRFConfig
) -> tuple[Block, ...]:
    """Cut a box into slabs of at most about ``cfg.max_block_voxels`` voxels (halo included).

    The slabs run along the axis that needs the fewest voxels refined in all (a thin axis with a coarse
    spacing has the cheapest halo); the halo is ``cfg.halo_widths`` widths of the widest kernel.

    Args:
        roi: Per axis ``(start, stop)`` of the box.
        spacing: Voxel spacing in mm.
        cfg: The CRF settings.

    Returns:
        The blocks; a single block when the box fits.

    """
    roi = tuple((int(a), int(b)) for a, b in roi)
    sizes = [b - a for a, b in roi]
    total = math.prod(sizes)
    if total <= cfg.max_block_voxels:
        return (Block(roi, roi),)
    best: tuple[int, int, int] | None = None  # (voxels refined, axis, core thickness)
    for axis, size in enumerate(sizes):
        halo = math.ceil(cfg.halo_widths * cfg.widest_kernel_mm / spacing[axis])
        cross = total // size
        core = min(size, cfg.max_block_voxels // cross - 2 * halo)
        if core < 1:
            continue
        n_blocks = math.ceil(size / core)
        cost = cross * (size + n_blocks * 2 * halo)
        if best is None or cost < best[0]:
            best = (cost, axis, core)
    if best is None:  # the halo alone exceeds the budget: one voxel thick cores along the coarsest axis
        axis = max(range(len(sizes)), key=lambda a: spacing[a])
        best = (0, axis, 1)
    _, axis, core = best
    halo = math.ceil(cfg.halo_widths * cfg.widest_kernel_mm / spacing[axis])
    lo, hi = roi[axis]
    blocks = []
    for start in range(lo, hi, core):
        stop = min(hi, start + core)
        c = list(roi)
        p = list(roi)
        c[axis] = (start, stop)
        p[axis] = (max(lo, start - halo), min(hi, stop + halo))
        blocks.append(Block(tuple(c), tuple(p)))
    return tuple(blocks)


def foreground_box(
    probs: torch.Tensor, spacing: Sequence[float], margin_mm: float, chunk_voxels: int = 1 << 22
) -> tuple[tuple[int, int], ...] | None:
    """The box around the voxels whose argmax is not label 0, grown by ``margin_mm`` and clipped.

    Computed slab by slab (no full-size label map).

    Args:
        probs: ``(K, *spatial)`` probabilities.
        spacing: Voxel spacing in mm.
        margin_mm: Margin added on every side.
        chunk_voxels: Voxels examined at a time.

    Returns:
        Per axis ``(start, stop)``, or ``None`` when no voxel is foreground.
    """
    shape = tuple(probs.shape[1:])
    hits = [torch.zeros(n, dtype=torch.bool, device=probs.device) for n in shape]
    step = max(1, chunk_voxels // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        part = probs[:, start : start + step]
        fg = part[1:].amax(0) > part[0]  # argmax != 0 (ties go to label 0, as argmax does)
        for axis in range(len(shape)):
            others = tuple(a for a in range(len(shape)) if a != axis)
            hit = fg.any(dim=others)
            if axis == 0:
                hits[0][start : start + step].logical_or_(hit)
            else:
                hits[axis].logical_or_(hit)
    box = []
    for axis, hit in enumerate(hits):
        idx = hit.nonzero()
        if idx.numel() == 0:
            return None
        grow = math.ceil(margin_mm / spacing[axis])
        box.append((max(0, int(idx[0]) - grow), min(shape[axis], int(idx[-1]) + 1 + grow)))
    return tuple(box)


_SMALL_BLOCK = 1 << 20
"""Blocks with fewer voxels than this are refined on one CPU thread when ``threads`` is 0 (auto)."""


def threads_for(voxels: int, threads: int, device: torch.device) -> int | None:
    """CPU threads for a block: ``None`` keeps torch's setting (CUDA, or big blocks on an idle machine)."""
    if device.type != "cpu":
        return None
    if threads:
        return threads
    if voxels < _SMALL_BLOCK:
        return 1
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5  # the cores are (nearly) all taken
    except OSError:  # pragma: no cover - no load average on this platform
        busy = False
    return 1 if busy else None


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (``None``: unchanged), restoring the setting afterwards.

    The setting is process-wide: do not refine concurrently with other torch CPU work that relies on it.
    """
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
