"""Build the network a configuration's ``architecture`` entry describes, from allow-listed classes.

``plans.json`` names classes as dotted import paths. They are looked up in fixed tables (the U-Nets
of ``dynamic-network-architectures``, which nnU-Net itself uses, and ``torch.nn``'s convolutions,
norms, dropouts and non-linearities), never imported by name from the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medseg.errors import ConfigError, choice_error, optional_import
from medseg.sources.nnunet.plans import Configuration

NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")
_NETWORK_MODULE = "dynamic_network_architectures.architectures.unet"
_TORCH_OPS = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "LeakyReLU",
    "ReLU",
    "PReLU",
    "ELU",
    "GELU",
    "SiLU",
    "Tanh",
    "Sigmoid",
)


def _network_class(name: str, source: str) -> Any:
    module = optional_import(_NETWORK_MODULE, "Running nnU-Net models", "nnunet")
    short = name.rsplit(".", 1)[-1]
    if not name.startswith("dynamic_network_architectures.") or short not in NETWORKS:
        raise ConfigError(f"{source}: " + choice_error("network_class_name", name, NETWORKS))
    return getattr(module, short)


def _torch_op(key: str, name: str, source: str) -> Any:
    import torch

    short = name.rsplit(".", 1)[-1]
    if not name.startswith("torch.nn.") or short not in _TORCH_OPS:
        msg = f"{source}: arch_kwargs.{key} must be a torch.nn layer of {list(_TORCH_OPS)}, got '{name}'"
        raise ConfigError(msg)
    return getattr(torch.nn, short)


def build_network(config: Configuration, *, input_channels: int, num_classes: int, source: str) -> Any:
    """The configuration's network, weights uninitialised, without deep supervision.

    Args:
        config: The configuration (its ``architecture`` entry).
        input_channels: Channels of the model's input.
        num_classes: Output channels (classes, or regions).
        source: Names the plans file in errors.

    Returns:
        The ``torch.nn.Module``.

    Raises:
        ConfigError: A class outside the allow-lists, or arguments it does not take.
        MedsegError: dynamic-network-architectures is not installed.
    """
    arch = config.architecture
    cls = _network_class(arch.class_name, source)
    kwargs: dict[str, Any] = dict(arch.kwargs)
    for key in arch.requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _torch_op(key, str(kwargs[key]), source)
    kwargs["deep_supervision"] = False
    try:
        return cls(input_channels=input_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        msg = f"{source}: configuration '{config.name}' must describe a buildable {cls.__name__}, got {exc}"
        raise ConfigError(msg) from exc


def load_weights(network: Any, weights: Mapping[str, Any], *, checkpoint: str) -> None:
    """Load a state dict strictly (every key, every shape).

    Raises:
        ConfigError: The checkpoint was trained for another architecture.
    """
    try:
        network.load_state_dict(dict(weights), strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        msg = f"{checkpoint} must hold weights for the plans' {type(network).__name__}, got: {detail}"
        raise ConfigError(msg) from exc
