"""A registry of segmentation models: each registers a name, a hyper-parameter schema and a builder.

Every model declares the input sizes it accepts, so the tiling planner can ask the model instead of
guessing:

* ``divisor(params)`` gives the factor every spatial size must be divisible by: an ``int`` (the same
  on every axis, from the poolings, strides and output stride) or a per-axis tuple (a 2D model applied
  slice by slice to volumes accepts any size along its slice axis, e.g. ``(16, 16, 1)``);
* ``patch_check(params, patch_size)`` (optional) refuses patch sizes the model could run on but would
  waste, e.g. atrous rates that reach past the feature map of that patch.

:func:`check_patch` runs both; :func:`create_model` sets ``size_divisor`` (an ``int``: the least
common multiple over the axes, safe for code that wants one number), ``size_divisors`` (per axis),
``spatial_dims`` and ``preferred_memory_format`` on the network it builds.

Examples:
    >>> import medseg.models as m
    >>> m.size_divisor("unet3d", channels=[8, 16, 32])
    4
    >>> m.size_divisors("unet2d_slices", channels=[8, 16, 32], axis=0)
    (1, 4, 4)
    >>> m.check_patch("unet3d", (48, 48, 30), channels=[8, 16, 32])
    Traceback (most recent call last):
    ...
    medseg.errors.ConfigError: input spatial size must be divisible by 4 at every axis, got (48, 48, 30)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from medseg.config.base import FrozenModel, format_validation_error
from medseg.errors import ConfigError, choice_error

Divisor = int | tuple[int, ...]
MemoryFormat = Literal["contiguous", "channels_last"]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: Registry name, e.g. ``"unet3d"``.
        spatial_dims: 2 or 3: the dimensionality of the inputs the network takes.
        params_type: The frozen schema of its hyper-parameters.
        builder: ``builder(params, in_channels, out_channels) -> nn.Module``.
        divisor: ``divisor(params)``: the factor every spatial input size must be divisible by, an
            ``int`` for all axes or a tuple with one entry per spatial axis.
        patch_check: ``patch_check(params, patch_size)``, raising :class:`ConfigError` for a patch
            size the model should not be used with beyond divisibility; ``None``: no further check.
        memory_format: Memory format the network runs fastest in for inference on CPU (measured by
            ``benchmarks/bench_models.py``); see :func:`prepare_for_inference`.
    """

    name: str
    spatial_dims: int
    params_type: type[FrozenModel]
    builder: Callable[[Any, int, int], nn.Module]
    divisor: Callable[[Any], Divisor]
    patch_check: Callable[[Any, tuple[int, ...]], None] | None = None
    memory_format: MemoryFormat = "contiguous"

    def parse(self, params: dict[str, Any] | FrozenModel | None) -> FrozenModel:
        """Validate hyper-parameters into the model's schema.

        Raises:
            ConfigError: On an unknown or invalid hyper-parameter, naming the valid ones.
        """
        if isinstance(params, self.params_type):
            return params
        try:
            return self.params_type.model_validate(params or {})
        except ValidationError as exc:
            valid = ", ".join(self.params_type.model_fields)
            msg = format_validation_error(exc, f"model '{self.name}'") + f" (valid hyper-parameters: {valid})"
            raise ConfigError(msg) from exc

    def divisors(self, params: FrozenModel) -> tuple[int, ...]:
        """The per-axis size divisors for validated params (``spatial_dims`` entries)."""
        return per_axis(self.divisor(params), self.spatial_dims)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    params_type: type[FrozenModel],
    spatial_dims: int,
    divisor: Callable[[Any], Divisor],
    *,
    patch_check: Callable[[Any, tuple[int, ...]], None] | None = None,
    memory_format: MemoryFormat = "contiguous",
) -> Callable[[Callable[[Any, int, int], nn.Module]], Callable[[Any, int, int], nn.Module]]:
    """Register a model builder under ``name`` (a decorator).

    Args:
        name: Registry name.
        params_type: Frozen pydantic schema of its hyper-parameters.
        spatial_dims: 2 or 3.
        divisor: Maps validated params to the factor input sizes must be divisible by (an ``int``, or
            one per axis).
        patch_check: Optional further check of a patch size for validated params.
        memory_format: The faster memory format for inference (see ``benchmarks/bench_models.py``).

    Returns:
        The decorator, which returns the builder unchanged.
    """

    def decorate(builder: Callable[[Any, int, int], nn.Module]) -> Callable[[Any, int, int], nn.Module]:
        if name in _REGISTRY:
            msg = f"model name must be unique, got '{name}' registered twice"
            raise ValueError(msg)
        _REGISTRY[name] = ModelEntry(
            name, spatial_dims, params_type, builder, divisor, patch_check, memory_format
        )
        return builder

    return decorate


def available_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """Look a model up by name.

    Raises:
        ConfigError: For an unknown name, suggesting the nearest and listing the choices.
    """
    if name not in _REGISTRY:
        raise ConfigError(choice_error("model", name, available_models()))
    return _REGISTRY[name]


def create_model(name: str, in_channels: int, out_channels: int, **params: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: Registry name.
        in_channels: Input channels (image channels; a 2.5D model adds its neighbouring slices itself).
        out_channels: Output classes.
        **params: Hyper-parameters of that model.

    Returns:
        The network, returning ``(B, out_channels, *spatial)`` logits in ``eval()`` mode. It carries
        ``size_divisor`` (int), ``size_divisors`` (per axis), ``spatial_dims`` and
        ``preferred_memory_format`` attributes.

    Raises:
        ConfigError: For an unknown name or an invalid hyper-parameter.
    """
    entry = model_entry(name)
    parsed = entry.parse(params)
    net = entry.builder(parsed, in_channels, out_channels)
    divisors = entry.divisors(parsed)
    net.size_divisor = math.lcm(*divisors)  # type: ignore[assignment]
    net.size_divisors = divisors  # type: ignore[assignment]
    net.spatial_dims = entry.spatial_dims  # type: ignore[assignment]
    net.preferred_memory_format = entry.memory_format  # type: ignore[assignment]
    return net


def size_divisor(name: str, **params: Any) -> int:
    """The factor every spatial input size of this model (with these params) must be divisible by.

    For a model with per-axis divisors this is their least common multiple (safe, perhaps stricter than
    needed); :func:`size_divisors` gives each axis its own.
    """
    return math.lcm(*size_divisors(name, **params))


def size_divisors(name: str, **params: Any) -> tuple[int, ...]:
    """The factor each spatial input size must be divisible by, one per spatial axis."""
    entry = model_entry(name)
    return entry.divisors(entry.parse(params))


def check_patch(name: str, patch_size: Sequence[int], **params: Any) -> None:
    """Refuse a patch (or inference window) size this model cannot or should not run on.

    Checks divisibility on every axis, then the model's own patch check (e.g. DeepLabV3+'s atrous
    rates against the feature map of that patch). Training and tiling call this once per size.

    Args:
        name: Registry name.
        patch_size: Spatial size of the patch, one entry per spatial axis of the model's input.
        **params: Hyper-parameters of that model.

    Raises:
        ConfigError: Naming the size and what it must be.
    """
    entry = model_entry(name)
    parsed = entry.parse(params)
    patch = tuple(int(s) for s in patch_size)
    check_input_size(patch, entry.divisors(parsed))
    if entry.patch_check is not None:
        entry.patch_check(parsed, patch)


def per_axis(divisor: Divisor | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Spread a divisor over ``ndim`` axes (an ``int`` repeats; a tuple must have ``ndim`` entries).

    Examples:
        >>> per_axis(8, 3)
        (8, 8, 8)
    """
    if isinstance(divisor, int):
        return (divisor,) * ndim
    divisors = tuple(int(d) for d in divisor)
    if len(divisors) != ndim:
        msg = f"divisor must have one entry per spatial axis ({ndim}), got {divisors}"
        raise ConfigError(msg)
    return divisors


def check_input_size(shape: Sequence[int], divisor: Divisor | Sequence[int]) -> None:
    """Refuse spatial sizes the network cannot halve at every level.

    Cheap enough for every ``forward`` (and traced by ``torch.compile`` without a graph break).

    Args:
        shape: Spatial size of an input.
        divisor: The model's size divisor: an ``int`` for every axis, or one per axis.

    Raises:
        ConfigError: Naming the size and the divisor; also when a per-axis divisor and the size
            disagree on the number of axes.
    """
    if isinstance(divisor, int):
        if any(s % divisor for s in shape):
            msg = f"input spatial size must be divisible by {divisor} at every axis, got {tuple(shape)}"
            raise ConfigError(msg)
        return
    divisors = tuple(divisor)
    if len(divisors) != len(shape):
        msg = f"input must have {len(divisors)} spatial axes, got size {tuple(shape)}"
        raise ConfigError(msg)
    if any(s % d for s, d in zip(shape, divisors)):
        if len(set(divisors)) == 1:
            msg = f"input spatial size must be divisible by {divisors[0]} at every axis, got {tuple(shape)}"
        else:
            msg = f"input spatial size must be divisible by {divisors} (per axis), got {tuple(shape)}"
        raise ConfigError(msg)


def prepare_for_inference(net: nn.Module) -> nn.Module:
    """Put a network in ``eval()`` mode and its weights in its preferred memory format.

    With ``preferred_memory_format == "channels_last"`` the convolution weights go channels-last
    (``channels_last`` for 2D kernels, ``channels_last_3d`` for 3D ones); PyTorch then runs the
    convolutions channels-last whatever the input's layout.

    Args:
        net: A network from :func:`create_model`.

    Returns:
        The same network (modified in place).
    """
    net.eval()
    if getattr(net, "preferred_memory_format", "contiguous") == "channels_last":
        formats = {4: torch.channels_last, 5: torch.channels_last_3d}
        for p in net.parameters():
            if p.dim() in formats:
                p.data = p.data.contiguous(memory_format=formats[p.dim()])
    return net
