"""A finished part of the stitched volume (:class:`Slab`), the sinks that take it, and its reductions.

Examples:
    >>> import torch
    >>> slab = Slab((slice(0, 1), slice(0, 3)), torch.tensor([[[0.0, 2, 0]], [[1.0, 0, 0]]]), lambda: 2.0)
    >>> slab.labels().tolist(), slab.logits().tolist()
    ([[1, 0, 0]], [[[0.0, 1.0, 0.0]], [[0.5, 0.0, 0.0]]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from medseg.errors import InputError
from medseg.labelmap import torch_label_dtype


def argmax_channels(x: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Argmax over the first (channel) axis, fast in both memory layouts; ties go to the first class.

    Every label it returns is a channel index ``0 .. K - 1``: scores that are not finite (NaN or
    infinite, e.g. from a diverged network) are refused rather than turned into a label.

    Args:
        x: ``(K, *spatial)`` scores; channel-first or channels-last in memory.
        dtype: Integer dtype of the result.

    Returns:
        ``(*spatial)`` labels.

    Raises:
        InputError: If a voxel's largest score is NaN or infinite.

    Examples:
        >>> argmax_channels(torch.tensor([[0.0, 2.0], [1.0, 2.0]])).tolist()
        [1, 0]
        >>> argmax_channels(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
        Traceback (most recent call last):
        ...
        medseg.errors.InputError: network output must be finite, got NaN or inf at 1 voxel(s)
    """
    if x.shape[0] == 1:
        _check_finite(x[0])
        return torch.zeros(x.shape[1:], dtype=dtype, device=x.device)
    if x.stride(0) == 1:  # channels-last: a contiguous reduction
        best, labels = x.movedim(0, -1).max(-1)
        _check_finite(best)
        return labels.to(dtype)
    labels = torch.empty(x.shape[1:], dtype=dtype, device=x.device)
    step = max(1, _CHUNK // max(1, math.prod(x.shape[2:])))
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    for i in range(0, x.shape[1], step):  # chunks bound the (K, chunk) temporaries
        labels[i : i + step], ok = _first_argmax(x[:, i : i + step])
        finite &= ok
    if not bool(finite):  # one check (one device sync) for all chunks
        _check_finite(x.amax(0))
    return labels


_CHUNK = 1 << 20  # voxels per chunk of the channel-first argmax (its passes stay in cache)


def _check_finite(best: torch.Tensor) -> None:
    """Refuse maxima that are NaN (a NaN score anywhere in the voxel) or infinite."""
    if not bool(torch.isfinite(best).all()):
        bad = int((~torch.isfinite(best)).sum())
        msg = f"network output must be finite, got NaN or inf at {bad} voxel(s)"
        raise InputError(msg)


def _first_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-first argmax in five vectorised passes (torch's argmax over a strided axis is slow).

    Returns the labels and whether every voxel's maximum is finite (a 0-d bool tensor, left on the
    device): where a score is NaN no class equals the maximum and the labels there are meaningless.
    """
    k = x.shape[0]
    best = x.amax(0)  # NaN wherever a score is NaN
    finite = torch.isfinite(best).all()
    if k > 255:
        return x.argmax(0), finite
    rank = torch.arange(k, 0, -1, dtype=torch.uint8, device=x.device).view(-1, *[1] * (x.ndim - 1))
    score = torch.eq(x, best).view(torch.uint8).mul_(rank)  # k - class where the class reaches the max
    return score.amax(0).neg_().add_(k), finite


def softmax_channels_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the first axis, in place (one temporary plane-sized tensor at a time)."""
    x.sub_(x.amax(0)).exp_()
    return x.div_(x.sum(0))


class Slab:
    """A finished box of the stitched volume (padding already cropped).

    Args:
        region: The box, one slice per spatial axis, in volume coordinates.
        sums: ``(K, *box)`` weighted sums of the window predictions (a view of the merger's buffer,
            valid only while a sink consumes it unless ``whole``).
        weight_sums: Returns the ``(*box)`` sums of the weights (only called when normalising).
        whole: Whether the box is the whole volume.
        axis: The merger's outer axis (slabs come in increasing order along it).
        weight_sums_at: Returns the weight sums at a strided sub-grid of the box (one slice per
            axis), without building them for the whole box; default: ``weight_sums()`` indexed.
    """

    def __init__(
        self,
        region: tuple[slice, ...],
        sums: torch.Tensor,
        weight_sums: Callable[[], torch.Tensor | float],
        whole: bool = False,
        axis: int = 0,
        weight_sums_at: Callable[[tuple[slice, ...]], torch.Tensor | float] | None = None,
    ) -> None:
        self.region, self.whole, self.axis = region, whole, axis
        self._data = sums
        self._weight_sums = weight_sums
        self._weight_sums_at = weight_sums_at
        self._state = "sums"
        self._labels: torch.Tensor | None = None

    @property
    def start(self) -> int:
        """First index along ``axis``."""
        return int(self.region[self.axis].start)

    @property
    def stop(self) -> int:
        """One past the last index along ``axis``."""
        return int(self.region[self.axis].stop)

    @property
    def num_classes(self) -> int:
        """Number of channels."""
        return self._data.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the box."""
        return tuple(self._data.shape[1:])

    def labels(self) -> torch.Tensor:
        """``(*box)`` argmax labels (the smallest integer dtype that holds them)."""
        if self._labels is None:
            self._labels = argmax_channels(self._data, torch_label_dtype(self.num_classes))
        return self._labels

    def logits(self) -> torch.Tensor:
        """``(K, *box)`` blended logits: the sums divided by the weight sums (in place, once)."""
        if self._state == "probabilities":
            msg = "logits must be read before probabilities, got a slab already turned into probabilities"
            raise RuntimeError(msg)
        if self._state == "sums":
            self._data.div_(self._weight_sums())
            self._state = "logits"
        return self._data

    def probabilities(self) -> torch.Tensor:
        """``(K, *box)`` softmax of the blended logits (in place, once)."""
        if self._state != "probabilities":
            softmax_channels_(self.logits())
            self._state = "probabilities"
        return self._data

    def probabilities_at(self, index: tuple[slice, ...]) -> torch.Tensor:
        """``(K, *sub-grid)`` probabilities at a (strided) sub-grid of the box; the slab is unchanged.

        Args:
            index: One slice per spatial axis, relative to the box.

        Returns:
            A new tensor: the softmax of the blended logits at those voxels.
        """
        values = self._data[(slice(None), *index)].to(torch.float32, copy=True)
        if self._state == "sums":
            if self._weight_sums_at is not None:
                weights = self._weight_sums_at(index)
            else:
                weights = self._weight_sums()
                weights = weights[index] if isinstance(weights, torch.Tensor) else weights
            values.div_(weights)
        return values if self._state == "probabilities" else softmax_channels_(values)


class Sink(Protocol):
    """Receives finished slabs from a :class:`~medseg.tiling.merge.Merger`.

    Attributes:
        needs_weights: Whether it reads normalised logits or probabilities (the merger then keeps the
            weight sums).
        needs_planes: Whether every slab must span the whole volume on all axes but the outer one
            (the merger then bounds memory by whole slabs only).
    """

    needs_weights: bool
    needs_planes: bool

    def consume(self, slab: Slab) -> None:
        """Take one finished slab (its tensors are only valid during the call)."""

    def finish(self) -> None:
        """Called once after the last slab."""
