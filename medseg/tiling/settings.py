"""Tiling settings (what a pipeline config's ``inference`` section says) and planning for a network.

Examples:
    >>> import torch
    >>> net = torch.nn.Conv3d(1, 2, 1)
    >>> net.size_divisor = 16
    >>> str(plan_for(net, (40, 30, 7), TilingSettings(patch_size=(20, 20, 20))))
    'PatchPlan(40x30x7: 2 windows 2x1x1 of 32x32x32, padding ((0, 0), (1, 1), (12, 13)), overlap 0.25, even)'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

if TYPE_CHECKING:
    from medseg.config.pipeline import InferenceConfig

from medseg.errors import InputError
from medseg.tiling.plan import PatchPlan, Placement, network_divisors, plan_patches
from medseg.tiling.weights import Blend

MemoryMode = Literal["auto", "full", "bounded"]
MEMORY_MODES = ("auto", "full", "bounded")
MemoryFormat = Literal["auto", "contiguous", "channels_last"]
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
TILING_FIELDS = (
    "overlap",
    "blend",
    "sigma_scale",
    "batch_size",
    "tta_axes",
    "memory",
    "memory_limit_mb",
    "placement",
    "slice_axis",
    "context",
    "pad_value",
    "memory_format",
    "stitch_threads",
    "precision",
)
"""The settings a pipeline config's ``inference`` section holds (all but the window size)."""


@dataclass(frozen=True)
class TilingSettings:
    """How to tile, stitch and augment (what a pipeline config's ``inference`` section says).

    Attributes:
        patch_size: Requested window size (rounded up to what the network accepts).
        overlap: Overlap fraction between neighbouring windows, ``0 <= overlap < 1``.
        blend: ``"gaussian"`` or ``"constant"`` importance weighting.
        sigma_scale: Gaussian sigma as a fraction of the window size.
        batch_size: Windows per forward pass.
        tta_axes: Spatial axes to flip for test-time augmentation; every combination of them is run
            (``2 ** len(tta_axes)`` passes) and the logits are averaged. Empty: no TTA.
        memory: ``"full"``, ``"bounded"`` or ``"auto"`` (bounded above ``memory_limit_mb``).
        memory_limit_mb: Size of the full float32 accumulation buffer above which ``"auto"`` bounds.
        placement: ``"even"`` (nnU-Net's evenly spread windows) or ``"monai"`` (MONAI's grid).
        slice_axis: For a 2D network on volumes, the axis it runs along.
        context: For a 2D network on volumes, neighbouring slices per side given as channels (2.5D).
        pad_value: Value of the padding added where the volume is smaller than a window.
        memory_format: ``"contiguous"``, ``"channels_last"`` or ``"auto"`` (the network's
            ``preferred_memory_format`` attribute, else contiguous).
        precision: What the network's forward pass computes in: ``float32``, ``bfloat16``,
            ``float16`` or ``auto`` (see :mod:`medseg.tiling.precision`); window answers are cast
            to float32 before blending.
        stitch_threads: Intra-op threads for cutting windows and stitching (the network keeps
            torch's setting); ``0`` (default): one or torch's number, whichever a short probe
            finds faster, probed again every few batches. This work is bound by memory bandwidth
            and made of many small operations: on an idle machine two threads stitch faster than
            one, on a busy one one thread is faster (it never waits for a second thread the
            scheduler has put aside); ``docs/benchmarks.md`` has the ratios.

    Raises:
        ValueError: Naming the first invalid field (the rules are
            :class:`~medseg.config.pipeline.InferenceConfig`'s).
    """

    patch_size: tuple[int, ...]
    overlap: float = 0.25
    blend: Blend = "gaussian"
    sigma_scale: float = 0.125
    batch_size: int = 4
    tta_axes: tuple[int, ...] = ()
    memory: MemoryMode = "auto"
    memory_limit_mb: float = 1024.0
    placement: Placement = "even"
    slice_axis: int = 2
    context: int = 0
    pad_value: float = 0.0
    memory_format: MemoryFormat = "auto"
    stitch_threads: int = 0
    precision: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "tta_axes", tuple(int(a) for a in self.tta_axes))
        if not (len(self.patch_size) in (2, 3) and min(self.patch_size) >= 1):
            msg = f"patch_size must be 2 or 3 sizes >= 1, got {self.patch_size!r}"
            raise ValueError(msg)
        from medseg.config.pipeline import check_tiling  # the one schema of these settings

        check_tiling({name: getattr(self, name) for name in TILING_FIELDS})

    @classmethod
    def from_config(
        cls, inference: InferenceConfig, window: Sequence[int], **overrides: Any
    ) -> TilingSettings:
        """Settings from a pipeline config's ``inference`` section.

        Args:
            inference: The :class:`~medseg.config.pipeline.InferenceConfig`.
            window: The window size (``PipelineConfig.window``).
            **overrides: Fields to set explicitly.

        Returns:
            The settings.
        """
        values = {name: getattr(inference, name) for name in TILING_FIELDS}
        values.update(overrides)
        return cls(patch_size=tuple(window), **values)


def plan_for(network: nn.Module, shape: Sequence[int], settings: TilingSettings) -> PatchPlan:
    """Plan the windows of a volume for a network (its ``spatial_dims`` and size divisors).

    Args:
        network: The network; ``spatial_dims`` (default: the volume's) and ``size_divisors`` or
            ``size_divisor`` are read when present.
        shape: The volume's spatial shape.
        settings: Tiling settings.

    Returns:
        The plan: 3D windows, or for a 2D network on a volume one slice per window along
        ``settings.slice_axis``.

    Raises:
        InputError: If the network's dimensionality does not suit the volume.
        ValueError: If the patch size does not suit the volume.
    """
    n = len(shape)
    net_dims = int(getattr(network, "spatial_dims", n))
    patch = settings.patch_size
    if net_dims == n:
        if len(patch) != n:
            msg = f"patch_size must have {n} entries for a {n}D volume, got {patch}"
            raise ValueError(msg)
        return plan_patches(
            shape,
            patch,
            overlap=settings.overlap,
            divisor=network_divisors(network, n),
            placement=settings.placement,
        )
    if net_dims == 2 and n == 3:
        a = settings.slice_axis
        divs = list(network_divisors(network, 2))
        divs.insert(a, 1)
        if len(patch) == 2:
            patch = (*patch[:a], 1, *patch[a:])
        return plan_patches(
            shape,
            patch,
            overlap=settings.overlap,
            divisor=divs,
            placement=settings.placement,
            slice_axis=a,
            context=settings.context,
        )
    msg = f"network must take {n}D inputs (or 2D slices of a 3D volume), got spatial_dims={net_dims}"
    raise InputError(msg)


def choose_memory_mode(settings: TilingSettings, plan: PatchPlan, num_classes: int) -> str:
    """``"full"`` or ``"bounded"``: the setting, or for ``"auto"`` by the size of the full buffer."""
    if settings.memory != "auto":
        return settings.memory
    full_bytes = 4 * num_classes * math.prod(plan.padded_shape)
    return "bounded" if full_bytes > settings.memory_limit_mb * 2**20 else "full"
