"""nnU-Net's sliding-window inference, reproduced: window positions, Gaussian weights, mirroring.

- The image is padded (zeros, centred, the odd voxel after) to at least the patch size.
- Along each axis, ``ceil((size - patch) / (patch * step)) + 1`` windows, spread evenly from 0 to
  ``size - patch`` and rounded (``step`` 0.5).
- Each window's logits are weighted by a Gaussian (sigma ``patch / 8``, peak 10, stored in
  float16 as nnU-Net stores it, zeros replaced by the smallest weight) and summed; the sum is
  divided by the summed weights. Accumulation here is float32 (nnU-Net's is float16).
- With mirroring, a window's logits are the mean over the network applied to every combination
  of flips along the allowed axes (flipped back), the unflipped one included.
- 2D configurations run slice by slice along the first (transposed) axis.
- Several networks (folds) are run one after the other and their logits averaged.

Examples:
    >>> window_starts((110,), (64,), 0.5)
    [[0, 23, 46]]
    >>> window_starts((40, 56), (40, 56), 0.5)
    [[0], [0]]
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


def window_starts(size: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    """The start of every window along each axis (nnU-Net's ``compute_steps_for_sliding_window``)."""
    starts = []
    for n, p in zip(size, patch):
        count = math.ceil((n - p) / (p * step)) + 1
        stride = (n - p) / (count - 1) if count > 1 else 0.0
        starts.append([int(np.round(stride * i)) for i in range(count)])
    return starts


def gaussian_weights(patch: Sequence[int]) -> torch.Tensor:
    """nnU-Net's window weights (float16 values, returned as float32)."""
    tmp = np.zeros(tuple(patch))
    tmp[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(tmp, [p / 8 for p in patch], 0, mode="constant", cval=0)
    weights /= np.max(weights) / 10
    half = torch.from_numpy(weights).to(torch.float16)
    zero = half == 0
    half[zero] = torch.min(half[~zero])
    return half.float()


def pad_to_patch(data: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the last ``len(patch)`` axes to at least ``patch``; return the slices that undo it."""
    lead = data.ndim - len(patch)
    pads: list[tuple[int, int]] = [(0, 0)] * lead
    for n, p in zip(data.shape[lead:], patch):
        diff = max(p - n, 0)
        pads.append((diff // 2, diff // 2 + diff % 2))
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        data = torch.nn.functional.pad(data, flat, "constant", 0.0)
    undo = tuple(slice(a, n - b) for (a, b), n in zip(pads, data.shape))
    return data, undo


@dataclass
class SlidingTimings:
    """Seconds spent in the network's forward passes, and windows run."""

    forward: float = 0.0
    windows: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def network_batch_size(patch: Sequence[int]) -> int:
    """How many inputs (windows, and their mirrored copies) go through the network at once.

    Batching gives the same logits (every layer treats batch members alone) in fewer, larger calls;
    the batch is capped at about 2**19 input voxels, and 64 inputs, to bound the activations.

    Examples:
        >>> network_batch_size((40, 56, 40))
        5
        >>> network_batch_size((128, 128, 128))
        1
    """
    return max(1, min(64, (1 << 19) // math.prod(patch)))


def _mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The unflipped input, then every combination of flips, in nnU-Net's order (tensor dims)."""
    axes = [a + 2 for a in mirror_axes]
    return [(), *[c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]]


def _predict_windows(
    network: torch.nn.Module,
    windows: Sequence[torch.Tensor],
    mirror_axes: Sequence[int],
    batch: int,
    timings: SlidingTimings,
) -> list[torch.Tensor]:
    """Each window's logits, averaged over its mirrored copies as nnU-Net averages them."""
    t0 = time.perf_counter()
    combos = _mirror_combinations(mirror_axes)
    jobs = [(i, dims) for i in range(len(windows)) for dims in combos]
    outs: list[torch.Tensor | None] = [None] * len(windows)
    for first in range(0, len(jobs), batch):
        group = jobs[first : first + batch]
        inputs = torch.cat([torch.flip(windows[i], dims) if dims else windows[i] for i, dims in group])
        preds = network(inputs)
        for k, (i, dims) in enumerate(group):
            pred = preds[k : k + 1]
            pred = torch.flip(pred, dims) if dims else pred
            current = outs[i]
            outs[i] = pred.clone() if current is None else current.add_(pred)
    result = []
    for out in outs:
        assert out is not None
        if len(combos) > 1:
            out /= len(combos)
        result.append(out[0])
    timings.forward += time.perf_counter() - t0
    timings.windows += len(windows)
    return result


@torch.inference_mode()
def sliding_window_logits(
    networks: Sequence[torch.nn.Module],
    data: np.ndarray,
    *,
    patch_size: Sequence[int],
    num_heads: int,
    mirror_axes: Sequence[int] = (),
    step: float = 0.5,
    device: torch.device | str = "cpu",
    timings: SlidingTimings | None = None,
) -> torch.Tensor:
    """Logits of every network over ``data`` (averaged), on ``data``'s grid.

    Args:
        networks: One network per fold (already on ``device``, in eval mode).
        data: ``(C, *spatial)`` float32 preprocessed case (3 spatial axes).
        patch_size: The window (2 entries: 2D slices along axis 0).
        num_heads: Output channels.
        mirror_axes: Network axes to mirror along (empty: no mirroring).
        step: Window step as a fraction of the patch.
        device: Where the network runs.
        timings: Filled with the forward passes' time.

    Returns:
        ``(num_heads, *spatial)`` float32 logits on the CPU.
    """
    timings = timings if timings is not None else SlidingTimings()
    image, undo = pad_to_patch(torch.from_numpy(data), patch_size)
    spatial = tuple(image.shape[1:])
    two_d = len(patch_size) == 2
    starts = window_starts(spatial[1:] if two_d else spatial, patch_size, step)
    weights = gaussian_weights(patch_size)
    slicers: list[tuple[slice | int, ...]] = []
    for corner in itertools.product(*starts):
        window = tuple(slice(s, s + p) for s, p in zip(corner, patch_size))
        if two_d:
            slicers.extend((d, *window) for d in range(spatial[0]))
        else:
            slicers.append(window)
    batch = network_batch_size(patch_size)
    per_call = max(1, batch // len(_mirror_combinations(mirror_axes)))
    total: torch.Tensor | None = None
    for network in networks:
        logits = torch.zeros((num_heads, *spatial), dtype=torch.float32)
        counts = torch.zeros(spatial, dtype=torch.float32)
        for first in range(0, len(slicers), per_call):
            chunk = slicers[first : first + per_call]
            windows = [image[(slice(None), *sl)][None].to(device) for sl in chunk]
            preds = _predict_windows(network, windows, mirror_axes, batch, timings)
            for sl, pred in zip(chunk, preds):
                pred = pred.to("cpu", torch.float32)
                pred *= weights
                logits[(slice(None), *sl)] += pred
                counts[sl] += weights
        logits /= counts
        total = logits if total is None else total.add_(logits)
    assert total is not None
    if len(networks) > 1:
        total /= len(networks)
    return total[(slice(None), *undo[1:])]
