"""U-Net, 2D and 3D, on MONAI's residual U-Net blocks."""

from __future__ import annotations

from typing import Annotated, Literal

from monai.networks.nets import UNet
from pydantic import Field
from torch import nn

from medseg.config.base import FrozenModel
from medseg.models.registry import register_model


class UNetParams(FrozenModel):
    """Hyper-parameters of the U-Net.

    Attributes:
        channels: Feature channels per level; each level after the first halves the size.
        num_res_units: Residual units per block (0: plain convolutions).
        norm: Normalisation layer.
        dropout: Dropout probability.
    """

    channels: Annotated[tuple[int, ...], Field(min_length=2)] = (16, 32, 64, 128)
    num_res_units: Annotated[int, Field(ge=0)] = 1
    norm: Literal["instance", "batch"] = "instance"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


def _divisor(p: UNetParams) -> int:
    return 2 ** (len(p.channels) - 1)


def _build(spatial_dims: int, p: UNetParams, in_channels: int, out_channels: int) -> nn.Module:
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=p.channels,
        strides=(2,) * (len(p.channels) - 1),
        num_res_units=p.num_res_units,
        norm=p.norm,
        dropout=p.dropout,
    )


@register_model("unet3d", UNetParams, spatial_dims=3, divisor=_divisor)
def unet3d(p: UNetParams, in_channels: int, out_channels: int) -> nn.Module:
    """A 3D U-Net."""
    return _build(3, p, in_channels, out_channels)


@register_model("unet2d", UNetParams, spatial_dims=2, divisor=_divisor)
def unet2d(p: UNetParams, in_channels: int, out_channels: int) -> nn.Module:
    """A 2D U-Net."""
    return _build(2, p, in_channels, out_channels)


class PassthroughParams(FrozenModel):
    """The passthrough model has no hyper-parameters."""


class Passthrough(nn.Module):
    """Returns one-hot scores of the rounded first input channel: a label map passes through unchanged.

    Not a learning model: it checks the pipeline's geometry end to end (whatever goes in must come
    out on exactly the same voxels).
    """

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x):
        import torch

        labels = x[:, :1].round().clamp(0, self.out_channels - 1).long()
        onehot = torch.zeros((x.shape[0], self.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return onehot.scatter_(1, labels, 1.0)


@register_model("passthrough", PassthroughParams, spatial_dims=3, divisor=lambda p: 1)
def passthrough(p: PassthroughParams, in_channels: int, out_channels: int) -> nn.Module:
    """A model that returns its input labels (for geometry checks)."""
    return Passthrough(out_channels)
