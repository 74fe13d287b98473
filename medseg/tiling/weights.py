"""Importance weights of a window: constant, or a Gaussian that trusts a window's centre more.

The Gaussian is MONAI's (``monai.data.utils.compute_importance_map``): per axis
``exp(-x**2 / (2 * sigma**2))`` with ``sigma = sigma_scale * patch`` and ``x`` measured from the
window's centre, multiplied over the axes, then raised to at least ``1e-3`` so that no voxel gets a
vanishing weight. Where that floor does not bite the map is separable (a product of 1D factors); then
the sum of the weights of all windows is an outer product of 1D sums and needs no buffer at all.

Examples:
    >>> w = importance_map((8, 8), "gaussian", sigma_scale=0.5)
    >>> w.separable, tuple(w.tensor.shape)
    (True, (8, 8))
    >>> importance_map((96, 96, 96), "gaussian").separable  # the floor bites in the corners
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Blend = Literal["gaussian", "constant"]
BLENDS = ("gaussian", "constant")
#: MONAI's floor on importance weights.
MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class ImportanceMap:
    """The weight of every voxel of a window.

    Attributes:
        tensor: ``(*patch)`` float32 weights.
        factors: Per-axis 1D factors whose outer product is ``tensor``, or ``None`` if not separable.
        constant: Whether every weight is 1.
    """

    tensor: torch.Tensor
    factors: tuple[torch.Tensor, ...] | None
    constant: bool

    @property
    def separable(self) -> bool:
        """Whether the map is an outer product of 1D factors."""
        return self.factors is not None

    def to(self, device: torch.device | str) -> ImportanceMap:
        """The same map on another device."""
        factors = None if self.factors is None else tuple(f.to(device) for f in self.factors)
        return ImportanceMap(self.tensor.to(device), factors, self.constant)


def importance_map(
    patch_size: Sequence[int], blend: Blend = "gaussian", sigma_scale: float | Sequence[float] = 0.125
) -> ImportanceMap:
    """Build the importance map of a window (bit-identical to MONAI's).

    Args:
        patch_size: Window size per axis.
        blend: ``"gaussian"`` or ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the window size (one, or one per axis).

    Returns:
        The :class:`ImportanceMap` (on the CPU).

    Raises:
        ValueError: For an unknown blend or a ``sigma_scale`` that is not > 0.
    """
    size = tuple(int(p) for p in patch_size)
    if blend not in BLENDS:
        msg = f"blend must be one of {BLENDS}, got {blend!r}"
        raise ValueError(msg)
    if blend == "constant":
        return ImportanceMap(torch.ones(size), tuple(torch.ones(p) for p in size), True)
    scales = (float(sigma_scale),) * len(size) if isinstance(sigma_scale, int | float) else tuple(sigma_scale)
    if len(scales) != len(size) or not all(s > 0 for s in scales):
        msg = f"sigma_scale must be > 0 (one, or one per axis), got {sigma_scale}"
        raise ValueError(msg)
    factors = []
    for p, s in zip(size, scales):
        x = torch.arange(start=-(p - 1) / 2.0, end=(p - 1) / 2.0 + 1, dtype=torch.float)
        factors.append(torch.exp(x**2 / (-2 * (p * s) ** 2)))
    tensor = factors[0]
    for i, f in enumerate(factors[1:], start=1):
        tensor = tensor.unsqueeze(-1) * f[(None,) * i]
    floor = max(float(tensor.min()), MIN_WEIGHT)
    separable = float(tensor.min()) >= MIN_WEIGHT
    tensor = torch.clamp_(tensor, min=floor)
    return ImportanceMap(tensor.contiguous(), tuple(factors) if separable else None, False)
