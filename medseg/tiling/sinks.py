"""Sinks: where the merger's finished slabs go (labels in memory, probabilities in memory or on disk).

Examples:
    >>> import torch
    >>> sink = LabelSink((2, 3))
    >>> scores = torch.tensor([[[0.0, 1, 0], [1, 0, 0]], [[1.0, 0, 0], [0, 0, 1]]])
    >>> sink.consume(Slab((slice(0, 2), slice(0, 3)), scores, lambda: 1.0))
    >>> sink.finish()
    >>> sink.result().tolist()
    [[1, 0, 0], [0, 0, 1]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medseg.labelmap import torch_label_dtype
from medseg.tiling.slab import Slab, argmax_channels


class LabelSink:
    """Collects argmax labels of the whole volume (the cheapest output: no division, no softmax).

    Args:
        shape: The volume's spatial shape.
    """

    needs_weights = False
    needs_planes = False

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self._labels: torch.Tensor | None = None

    def consume(self, slab: Slab) -> None:
        """Write the slab's labels."""
        if self._labels is None:
            self._labels = torch.empty(self.shape, dtype=torch_label_dtype(slab.num_classes))
        self._labels[slab.region] = slab.labels().cpu()

    def finish(self) -> None:
        """Nothing to flush."""

    def result(self) -> torch.Tensor:
        """The ``(*shape)`` label map.

        Raises:
            RuntimeError: If no slab arrived.
        """
        if self._labels is None:
            msg = "label sink must receive slabs before its result is read, got none"
            raise RuntimeError(msg)
        return self._labels


class ProbabilitySink:
    """Collects normalised logits or probabilities of the whole volume in memory.

    A slab that is the whole volume (full mode) is kept as it is (no copy); boxes (bounded mode) are
    copied into one tensor, which defeats the memory bound: prefer :class:`ProbabilityWriter`.

    Args:
        normalise: ``"probabilities"`` (softmax) or ``"logits"`` (blended, divided by the weights).
        shape: The volume's spatial shape (needed for boxes only).
    """

    needs_weights = True
    needs_planes = False

    def __init__(
        self,
        normalise: Literal["probabilities", "logits"] = "probabilities",
        shape: Sequence[int] | None = None,
    ) -> None:
        if normalise not in ("probabilities", "logits"):
            msg = f"normalise must be 'probabilities' or 'logits', got {normalise!r}"
            raise ValueError(msg)
        self.normalise = normalise
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self._result: torch.Tensor | None = None

    def consume(self, slab: Slab) -> None:
        """Keep the slab's values (a view of the whole volume, else a copy of the box)."""
        values = slab.probabilities() if self.normalise == "probabilities" else slab.logits()
        if slab.whole:
            self._result = values
            return
        if self._result is None:
            if self.shape is None:
                msg = "ProbabilitySink must be given the volume shape to collect boxes, got shape=None"
                raise ValueError(msg)
            self._result = torch.empty((values.shape[0], *self.shape), dtype=values.dtype)
        self._result[(slice(None), *slab.region)] = values.cpu()

    def finish(self) -> None:
        """Nothing to flush."""

    def result(self) -> torch.Tensor:
        """The ``(K, *shape)`` values.

        Raises:
            RuntimeError: If no slab arrived.
        """
        if self._result is None:
            msg = "probability sink must receive slabs before its result is read, got none"
            raise RuntimeError(msg)
        return self._result


class ProbabilityWriter:
    """Writes probabilities slab by slab to a ``.npy`` file (channel first), memory-mapped.

    Args:
        path: The ``.npy`` file to write.
        shape: The volume's spatial shape.
        dtype: ``"float16"`` (half the disk) or ``"float32"``.

    Examples:
        >>> import tempfile, torch
        >>> path = Path(tempfile.mkdtemp()) / "p.npy"
        >>> w = ProbabilityWriter(path, (1, 2))
        >>> w.consume(Slab((slice(0, 1), slice(0, 2)), torch.zeros(2, 1, 2), lambda: 1.0))
        >>> w.finish()
        >>> np.load(path).tolist()
        [[[0.5, 0.5]], [[0.5, 0.5]]]
    """

    needs_weights = True
    needs_planes = False

    def __init__(
        self, path: str | Path, shape: Sequence[int], dtype: Literal["float16", "float32"] = "float16"
    ) -> None:
        if dtype not in ("float16", "float32"):
            msg = f"dtype must be 'float16' or 'float32', got {dtype!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._array: np.memmap | None = None

    def consume(self, slab: Slab) -> None:
        """Write the slab's probabilities."""
        if self._array is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._array = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=self.dtype, shape=(slab.num_classes, *self.shape)
            )
        values = slab.probabilities().cpu().numpy()
        self._array[(slice(None), *slab.region)] = values

    def finish(self) -> None:
        """Flush the file."""
        if self._array is not None:
            self._array.flush()
            self._array = None


ENTROPY_SAMPLES = 1 << 18  # voxels a mean entropy looks at, at most (about): plenty for a mean


def entropy_sum(probs: torch.Tensor, mask: torch.Tensor, chunk: int = 1 << 20) -> float:
    """Sum of the softmax entropies (nats) of the voxels where ``mask`` is set.

    Args:
        probs: ``(K, *spatial)`` probabilities.
        mask: ``(*spatial)`` boolean mask.
        chunk: Voxels per step (bounds the temporary memory).
    """
    flat = probs.reshape(probs.shape[0], -1)
    keep = mask.reshape(-1)
    total = 0.0
    for start in range(0, flat.shape[1], chunk):
        m = keep[start : start + chunk]
        if not bool(m.any()):
            continue
        p = flat[:, start : start + chunk][:, m].float().clamp_min(1e-12)
        total += float(-(p * p.log()).sum())
    return total


def sampling_step(shape: Sequence[int], max_voxels: int) -> int:
    """The step of a regular sub-grid of ``shape`` with at most about ``max_voxels`` voxels."""
    return max(1, math.ceil((math.prod(shape) / max_voxels) ** (1 / len(shape))))


class ForegroundEntropy:
    """Mean softmax entropy over the voxels labelled foreground, on a regular sub-grid, slab by slab.

    A review signal (uncertain segmentations have high entropy) that needs no probability volume:
    only every ``step``-th voxel along each axis of the volume is looked at (at most about
    ``max_voxels``), and only there are the blended logits normalised and turned into probabilities.

    Args:
        shape: The volume's spatial shape.
        max_voxels: Voxels to look at, at most (about).

    Examples:
        >>> sink = ForegroundEntropy((1, 2))
        >>> sink.consume(Slab((slice(0, 1), slice(0, 2)), torch.zeros(2, 1, 2), lambda: 1.0))
        >>> sink.result() is None  # ties go to the background: no foreground voxel
        True
    """

    needs_weights = False  # the weight sums at the sub-grid come from the slab without a buffer
    needs_planes = False

    def __init__(self, shape: Sequence[int], max_voxels: int = ENTROPY_SAMPLES) -> None:
        self.step = sampling_step(shape, max_voxels)
        self._total = 0.0
        self._count = 0

    def consume(self, slab: Slab) -> None:
        """Add the entropies of the slab's sub-grid voxels labelled foreground."""
        index = tuple(slice((-r.start) % self.step, r.stop - r.start, self.step) for r in slab.region)
        if any(i.start >= i.stop for i in index):
            return
        probs = slab.probabilities_at(index)
        mask = argmax_channels(probs, torch.int64) != 0
        n = int(mask.sum())
        if n:
            self._total += entropy_sum(probs, mask)
            self._count += n

    def finish(self) -> None:
        """Nothing to flush."""

    def result(self) -> float | None:
        """The mean entropy in nats, or ``None`` when no sampled voxel is foreground."""
        return self._total / self._count if self._count else None
