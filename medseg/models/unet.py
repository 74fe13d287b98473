"""U-Net, 2D and 3D, on MONAI's blocks, with a choice of decoder upsampling and deep supervision.

The encoder halves the size at every level after the first (strided convolutions); the decoder
upsamples, concatenates the encoder's features of the same level (the skip connection) and convolves.
Upsampling is either a transposed convolution (``upsample: transpose``) or an interpolation followed
by a convolution (``upsample: resize``, nearest or linear; the usual cure for checkerboard artifacts).

Registered as ``unet2d`` and ``unet3d`` (size divisor ``2 ** (len(channels) - 1)``), plus
``passthrough``, a model without weights for geometry checks.

Examples:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("unet3d", 1, 3, channels=[4, 8, 16], upsample="resize").eval()
    >>> net(torch.zeros(1, 1, 16, 8, 12)).shape
    torch.Size([1, 3, 16, 8, 12])
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from pydantic import Field
from torch import nn

from medseg.config.base import FrozenModel
from medseg.models.blocks import ActName, NormName, act_layer, conv, norm_layer
from medseg.models.registry import check_input_size, register_model


class UNetParams(FrozenModel):
    """Hyper-parameters of the U-Net.

    Attributes:
        channels: Feature channels per level; each level after the first halves the size, so the
            size divisor is ``2 ** (len(channels) - 1)``.
        num_res_units: Residual units (two convolutions each) per block; 0: two plain convolutions.
        norm: Normalisation layer (instance norm has a learned affine).
        act: Activation.
        dropout: Dropout probability after every convolution.
        upsample: ``transpose``: transposed convolution; ``resize``: interpolation, then convolution.
        interp: Interpolation of ``upsample: resize``: ``nearest`` or ``linear`` (bi/trilinear).
        deep_supervision: Add 1×1 heads on the decoder's lower levels; in ``train()`` mode the model
            then returns a tuple (see :class:`UNet`).
    """

    channels: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=2)] = (16, 32, 64, 128)
    num_res_units: Annotated[int, Field(ge=0, le=8)] = 1
    norm: NormName = "instance"
    act: ActName = "prelu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    upsample: Literal["transpose", "resize"] = "transpose"
    interp: Literal["nearest", "linear"] = "linear"
    deep_supervision: bool = False


class UNet(nn.Module):
    """U-Net with explicit skip concatenation, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output classes.
        p: Hyper-parameters.

    Shapes:
        In: ``(B, in_channels, *S)`` with every size in ``S`` divisible by ``2 ** (len(channels) - 1)``.
        Out: ``(B, out_channels, *S)`` logits. With ``deep_supervision`` and in ``train()`` mode: a
        tuple ``(full, half, quarter, ...)`` of logits at strides 1, 2, 4, ...,
        ``2 ** (len(channels) - 2)`` (train them with
        :func:`medseg.models.supervision.deep_supervision_loss`); in ``eval()`` mode always the plain
        full-resolution tensor.

    Raises:
        ConfigError: From ``forward``, for a spatial size not divisible by the size divisor.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, p: UNetParams) -> None:
        super().__init__()
        ch = p.channels
        self.size_divisors = (2 ** (len(ch) - 1),) * spatial_dims
        self.deep_supervision = p.deep_supervision

        def block(cin: int, cout: int, stride: int) -> nn.Module:
            if p.num_res_units == 0:
                return nn.Sequential(
                    conv(spatial_dims, cin, cout, stride=stride, norm=p.norm, act=p.act, dropout=p.dropout),
                    conv(spatial_dims, cout, cout, norm=p.norm, act=p.act, dropout=p.dropout),
                )
            return nn.Sequential(
                *(
                    ResidualUnit(
                        spatial_dims,
                        cin if i == 0 else cout,
                        cout,
                        strides=stride if i == 0 else 1,
                        subunits=2,
                        norm=norm_layer(p.norm),
                        act=act_layer(p.act),
                        dropout=p.dropout or None,
                        bias=False,
                    )
                    for i in range(p.num_res_units)
                )
            )

        def up(cin: int, cout: int) -> nn.Module:
            if p.upsample == "transpose":
                return UpSample(spatial_dims, cin, cout, scale_factor=2, mode="deconv", bias=True)
            return UpSample(
                spatial_dims,
                cin,
                cout,
                scale_factor=2,
                mode="nontrainable",
                pre_conv="default",  # a 1×1 convolution to ``cout`` channels first: interpolating fewer
                interp_mode=p.interp,
                align_corners=False if p.interp == "linear" else None,
                post_conv=Convolution(spatial_dims, cout, cout, kernel_size=3, conv_only=True),
            )

        self.encoder = nn.ModuleList(
            block(in_channels if i == 0 else ch[i - 1], ch[i], 1 if i == 0 else 2) for i in range(len(ch))
        )
        # decoder stage j upsamples level len(ch) - 1 - j to level len(ch) - 2 - j
        levels = list(range(len(ch) - 2, -1, -1))
        self.ups = nn.ModuleList(up(ch[lv + 1], ch[lv]) for lv in levels)
        self.decoder = nn.ModuleList(block(2 * ch[lv], ch[lv], 1) for lv in levels)
        self.head = Convolution(spatial_dims, ch[0], out_channels, kernel_size=1, conv_only=True)
        # deep supervision heads on decoder levels 1 .. len(ch) - 2 (lowest resolution first)
        self.ds_heads = nn.ModuleList(
            Convolution(spatial_dims, ch[lv], out_channels, kernel_size=1, conv_only=True)
            for lv in (levels[:-1] if p.deep_supervision else [])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits at the input's size (see the class docstring for deep supervision)."""
        check_input_size(x.shape[2:], self.size_divisors)
        skips = []
        for enc in self.encoder:
            x = enc(x)
            skips.append(x)
        skips.pop()
        supervise = self.training and self.deep_supervision
        lower = []
        for j, (up, dec) in enumerate(zip(self.ups, self.decoder)):
            x = dec(torch.cat([up(x), skips[-1 - j]], dim=1))
            if supervise and j < len(self.ds_heads):
                lower.append(self.ds_heads[j](x))
        out = self.head(x)
        if supervise:
            return (out, *reversed(lower))
        return out


def _divisor(p: UNetParams) -> int:
    return 2 ** (len(p.channels) - 1)


@register_model("unet3d", UNetParams, spatial_dims=3, divisor=_divisor)
def unet3d(p: UNetParams, in_channels: int, out_channels: int) -> nn.Module:
    """A 3D U-Net."""
    return UNet(3, in_channels, out_channels, p)


@register_model("unet2d", UNetParams, spatial_dims=2, divisor=_divisor)
def unet2d(p: UNetParams, in_channels: int, out_channels: int) -> nn.Module:
    """A 2D U-Net (for 2D images; ``unet2d_slices`` runs it over volumes)."""
    return UNet(2, in_channels, out_channels, p)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot scores ``(B, out_channels, *S)`` of ``round(x[:, 0])``."""
        labels = x[:, :1].round().clamp(0, self.out_channels - 1).long()
        onehot = torch.zeros((x.shape[0], self.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return onehot.scatter_(1, labels, 1.0)


@register_model("passthrough", PassthroughParams, spatial_dims=3, divisor=lambda p: 1)
def passthrough(p: PassthroughParams, in_channels: int, out_channels: int) -> nn.Module:
    """A model that returns its input labels (for geometry checks)."""
    return Passthrough(out_channels)
