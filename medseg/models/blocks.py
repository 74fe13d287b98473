"""Convolution blocks shared by the networks, on MONAI's ``Convolution``.

MONAI has the convolution + norm + dropout + activation unit and the residual unit; what it lacks for
DeepLabV3+ is written here: a depthwise-separable convolution and a residual block whose convolutions
may be dilated and separable.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act
from torch import nn

NormName = Literal["instance", "batch"]
ActName = Literal["prelu", "relu", "leakyrelu"]


def norm_layer(norm: NormName | None) -> tuple[str, dict[str, Any]] | None:
    """MONAI norm spec: instance norm with a learned affine (as nnU-Net), or batch norm."""
    if norm is None:
        return None
    return ("instance", {"affine": True}) if norm == "instance" else ("batch", {})


def act_layer(act: ActName | None) -> tuple[str, dict[str, Any]] | None:
    """MONAI activation spec (leaky ReLU with nnU-Net's slope 0.01)."""
    if act is None:
        return None
    if act == "leakyrelu":
        return ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    return ("relu", {"inplace": True}) if act == "relu" else ("prelu", {})


def conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    norm: NormName | None = "instance",
    act: ActName | None = "prelu",
    dropout: float = 0.0,
) -> Convolution:
    """Convolution → norm → dropout → activation (MONAI's ``Convolution``), "same" padding.

    Without a norm the convolution has a bias; with one it does not (the norm's shift replaces it).
    """
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=stride,
        kernel_size=kernel_size,
        dilation=dilation,
        groups=groups,
        norm=norm_layer(norm),
        act=act_layer(act),
        dropout=dropout or None,
        bias=norm is None,
    )


class SeparableConv(nn.Sequential):
    """Depthwise-separable convolution: a per-channel (optionally dilated) k×k convolution, then a
    1×1 convolution mixing channels, each followed by norm and activation (as in DeepLabV3+'s
    Xception ASPP and decoder).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the depthwise convolution.
        dilation: Dilation (atrous rate) of the depthwise convolution.
        norm: Norm after each convolution.
        act: Activation after the depthwise one, and after the pointwise one unless ``last_act`` is
            ``False``.
        dropout: Dropout after the pointwise convolution.
        last_act: Whether the pointwise convolution ends with the activation.

    Examples:
        >>> block = SeparableConv(2, 8, 16, dilation=2)
        >>> block(torch.zeros(1, 8, 10, 12)).shape
        torch.Size([1, 16, 10, 12])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        norm: NormName | None = "instance",
        act: ActName = "prelu",
        dropout: float = 0.0,
        last_act: bool = True,
    ) -> None:
        super().__init__(
            conv(
                spatial_dims,
                in_channels,
                in_channels,
                stride=stride,
                dilation=dilation,
                groups=in_channels,
                norm=norm,
                act=act,
            ),
            conv(
                spatial_dims,
                in_channels,
                out_channels,
                kernel_size=1,
                norm=norm,
                act=act if last_act else None,
                dropout=dropout,
            ),
        )


class ResBlock(nn.Module):
    """A residual block of two 3×3 convolutions, optionally strided, dilated and separable.

    ``act(conv_b(conv_a(x)) + skip(x))``, where ``skip`` is the identity or a strided 1×1 projection.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (and of the projection).
        dilation: Dilation of both convolutions.
        separable: Depthwise-separable convolutions instead of full ones.
        norm: Norm layer.
        act: Activation.

    Examples:
        >>> block = ResBlock(3, 4, 8, stride=2)
        >>> block(torch.zeros(1, 4, 8, 8, 6)).shape
        torch.Size([1, 8, 4, 4, 3])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        separable: bool = False,
        norm: NormName = "instance",
        act: ActName = "prelu",
    ) -> None:
        super().__init__()
        if separable:
            self.conv_a: nn.Module = SeparableConv(
                spatial_dims, in_channels, out_channels, stride=stride, dilation=dilation, norm=norm, act=act
            )
            self.conv_b: nn.Module = SeparableConv(
                spatial_dims,
                out_channels,
                out_channels,
                dilation=dilation,
                norm=norm,
                act=act,
                last_act=False,
            )
        else:
            self.conv_a = conv(
                spatial_dims, in_channels, out_channels, stride=stride, dilation=dilation, norm=norm, act=act
            )
            self.conv_b = conv(
                spatial_dims, out_channels, out_channels, dilation=dilation, norm=norm, act=None
            )
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = conv(
                spatial_dims, in_channels, out_channels, kernel_size=1, stride=stride, norm=norm, act=None
            )
        name, args = act_layer(act)  # type: ignore[misc]
        self.act = Act[name](**args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.act(self.conv_b(self.conv_a(x)) + self.skip(x))
