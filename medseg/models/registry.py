"""A registry of segmentation models: each registers a name, a hyper-parameter schema and a builder.

Every model declares the factor each spatial input size must be divisible by (from its poolings and
strides), so the tiling planner can ask the model instead of guessing.

Examples:
    >>> import medseg.models as m
    >>> m.size_divisor("unet3d", channels=[8, 16, 32])
    4
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from torch import nn

from medseg.config.base import FrozenModel, format_validation_error
from medseg.errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: Registry name, e.g. ``"unet3d"``.
        spatial_dims: 2 or 3.
        params_type: The frozen schema of its hyper-parameters.
        builder: ``builder(params, in_channels, out_channels) -> nn.Module``.
        divisor: ``divisor(params) -> int``, the factor every spatial input size must be divisible by.
    """

    name: str
    spatial_dims: int
    params_type: type[FrozenModel]
    builder: Callable[[Any, int, int], nn.Module]
    divisor: Callable[[Any], int]

    def parse(self, params: dict[str, Any] | None) -> FrozenModel:
        """Validate hyper-parameters into the model's schema.

        Raises:
            ConfigError: On an unknown or invalid hyper-parameter, naming the valid ones.
        """
        try:
            return self.params_type.model_validate(params or {})
        except ValidationError as exc:
            valid = ", ".join(self.params_type.model_fields)
            msg = format_validation_error(exc, f"model '{self.name}'") + f" (valid hyper-parameters: {valid})"
            raise ConfigError(msg) from exc


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, params_type: type[FrozenModel], spatial_dims: int, divisor: Callable[[Any], int]
) -> Callable[[Callable[[Any, int, int], nn.Module]], Callable[[Any, int, int], nn.Module]]:
    """Register a model builder under ``name`` (a decorator).

    Args:
        name: Registry name.
        params_type: Frozen pydantic schema of its hyper-parameters.
        spatial_dims: 2 or 3.
        divisor: Maps validated params to the factor input sizes must be divisible by.

    Returns:
        The decorator, which returns the builder unchanged.
    """

    def decorate(builder: Callable[[Any, int, int], nn.Module]) -> Callable[[Any, int, int], nn.Module]:
        if name in _REGISTRY:
            msg = f"model name must be unique, got '{name}' registered twice"
            raise ValueError(msg)
        _REGISTRY[name] = ModelEntry(name, spatial_dims, params_type, builder, divisor)
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
        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        msg = f"unknown model '{name}'{hint} choices: {', '.join(available_models())}"
        raise ConfigError(msg)
    return _REGISTRY[name]


def create_model(name: str, in_channels: int, out_channels: int, **params: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: Registry name.
        in_channels: Input channels (image channels, or slices for 2.5D).
        out_channels: Output classes.
        **params: Hyper-parameters of that model.

    Returns:
        The network; it carries ``size_divisor`` and ``spatial_dims`` attributes.
    """
    entry = model_entry(name)
    parsed = entry.parse(params)
    net = entry.builder(parsed, in_channels, out_channels)
    net.size_divisor = entry.divisor(parsed)  # type: ignore[assignment]
    net.spatial_dims = entry.spatial_dims  # type: ignore[assignment]
    return net


def size_divisor(name: str, **params: Any) -> int:
    """The factor every spatial input size of this model (with these params) must be divisible by."""
    entry = model_entry(name)
    return entry.divisor(entry.parse(params))


def check_input_size(shape: Sequence[int], divisor: int) -> None:
    """Refuse spatial sizes the network cannot halve at every level.

    Args:
        shape: Spatial size of an input.
        divisor: The model's size divisor.

    Raises:
        ConfigError: Naming the size and the divisor.
    """
    bad = [s for s in shape if s % divisor]
    if bad:
        msg = f"input spatial size must be divisible by {divisor} at every axis, got {tuple(shape)}"
        raise ConfigError(msg)
