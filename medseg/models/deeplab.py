"""DeepLabV3+, 2D and 3D: an atrous residual encoder, ASPP with image pooling, and a decoder that fuses
low-level (stride 4) features before upsampling to full resolution.

Chen et al., *Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation*
(ECCV 2018), adapted to medical patches: the encoder stops downsampling at ``output_stride`` (8 or
16) and dilates its later stages instead; the ASPP rates must fit the feature map of the patch (at
output stride 8 a 96³ patch gives a 12³ map, so rates like 1, 2, 4, 6, not the 6, 12, 18 of 512-pixel
photographs). A rate at or beyond the map size only sees padding, so :func:`check_deeplab_patch`
refuses it.

Registered as ``deeplabv3plus2d`` and ``deeplabv3plus3d`` (size divisor: ``output_stride``).

Examples:
    >>> import torch
    >>> from medseg.models import check_patch, create_model
    >>> params = {"channels": [4, 8, 16, 16], "aspp_rates": [1, 2], "aspp_channels": 8}
    >>> net = create_model("deeplabv3plus3d", 1, 2, **params).eval()
    >>> net(torch.zeros(1, 1, 32, 32, 16)).shape
    torch.Size([1, 2, 32, 32, 16])
    >>> check_patch("deeplabv3plus3d", (32, 32, 16), **params)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medseg.errors.ConfigError: aspp_rates must be < 2 (larger rates only see padding) for the feature map ...
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from pydantic import Field, field_validator, model_validator
from torch import nn

from medseg.config.base import FrozenModel
from medseg.errors import ConfigError
from medseg.models.blocks import ActName, NormName, ResBlock, SeparableConv, conv
from medseg.models.registry import check_input_size, register_model

PosInt = Annotated[int, Field(ge=1)]


class DeepLabParams(FrozenModel):
    """Hyper-parameters of DeepLabV3+.

    Attributes:
        channels: Channels of the encoder stages; stage ``i`` has nominal stride ``2 ** (i + 1)``.
            Stages up to ``output_stride`` downsample, later ones dilate (2, 4, ...) instead. Stage 1
            (stride 4) feeds the decoder's low-level features.
        blocks_per_stage: Residual blocks per encoder stage.
        output_stride: Stride of the encoder's output (8 or 16); also the size divisor.
        aspp_rates: Atrous rates of the ASPP branches (rate 1: a 1×1 convolution; others: 3×3
            depthwise-separable convolutions with that dilation), besides image-level pooling. Each
            must be smaller than the feature map (``patch // output_stride``), see
            :func:`check_deeplab_patch`.
        aspp_channels: Channels of each ASPP branch and of its output.
        low_level_channels: Channels the stride-4 features are projected to in the decoder.
        decoder_channels: Channels of the decoder's separable convolutions.
        separable_encoder: Depthwise-separable convolutions in the encoder too.
        norm: Normalisation layer.
        act: Activation.
        dropout: Dropout after the ASPP projection and the decoder.
    """

    channels: Annotated[tuple[PosInt, ...], Field(min_length=3, max_length=6)] = (16, 32, 64, 128, 128)
    blocks_per_stage: Annotated[int, Field(ge=1, le=8)] = 2
    output_stride: Literal[8, 16] = 8
    aspp_rates: Annotated[tuple[PosInt, ...], Field(min_length=1)] = (1, 2, 4, 6)
    aspp_channels: PosInt = 64
    low_level_channels: PosInt = 24
    decoder_channels: PosInt = 64
    separable_encoder: bool = False
    norm: NormName = "instance"
    act: ActName = "prelu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1

    @field_validator("aspp_rates")
    @classmethod
    def _distinct(cls, rates: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(rates)) != len(rates):
            msg = f"aspp_rates must be distinct, got {rates}"
            raise ValueError(msg)
        return rates

    @model_validator(mode="after")
    def _enough_stages(self) -> DeepLabParams:
        need = self.output_stride.bit_length() - 1  # stages needed to reach the output stride
        if len(self.channels) < need:
            msg = (
                f"channels must have at least {need} stages for output_stride {self.output_stride},"
                f" got {len(self.channels)}"
            )
            raise ValueError(msg)
        return self


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with image-level pooling and separable atrous branches.

    MONAI's ``SimpleASPP`` has neither the image pooling branch nor separable convolutions.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Channels of each branch and of the output.
        rates: Atrous rates (1: a 1×1 convolution).
        norm: Norm layer.
        act: Activation.
        dropout: Dropout after the projection.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        rates: tuple[int, ...],
        norm: NormName,
        act: ActName,
        dropout: float,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            conv(spatial_dims, in_channels, out_channels, kernel_size=1, norm=norm, act=act)
            if r == 1
            else SeparableConv(spatial_dims, in_channels, out_channels, dilation=r, norm=norm, act=act)
            for r in rates
        )
        # no norm on the pooled branch: it has one value per channel
        self.pool = nn.Sequential(
            Pool[Pool.ADAPTIVEAVG, spatial_dims](1),
            conv(spatial_dims, in_channels, out_channels, kernel_size=1, norm=None, act=act),
        )
        self.project = conv(
            spatial_dims,
            out_channels * (len(rates) + 1),
            out_channels,
            kernel_size=1,
            norm=norm,
            act=act,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the branches, broadcast the pooled one, concatenate and project."""
        feats = [branch(x) for branch in self.branches]
        feats.append(self.pool(x).expand_as(feats[0]))
        return self.project(torch.cat(feats, dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ for 2D or 3D inputs.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output classes.
        p: Hyper-parameters.

    Shapes:
        In: ``(B, in_channels, *S)``, every size divisible by ``output_stride``.
        Out: ``(B, out_channels, *S)`` logits.

    Raises:
        ConfigError: From ``forward``, for a spatial size not divisible by ``output_stride``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, p: DeepLabParams) -> None:
        super().__init__()
        self.size_divisors = (p.output_stride,) * spatial_dims
        self.interp = "bilinear" if spatial_dims == 2 else "trilinear"
        stages = []
        cin, stride, dilation = in_channels, 1, 1
        for cout in p.channels:
            if stride < p.output_stride:
                stride, step, rate = stride * 2, 2, dilation
            else:
                dilation, step = dilation * 2, 1
                rate = dilation
            stages.append(
                nn.Sequential(
                    *(
                        ResBlock(
                            spatial_dims,
                            cin if b == 0 else cout,
                            cout,
                            stride=step if b == 0 else 1,
                            dilation=rate,
                            separable=p.separable_encoder,
                            norm=p.norm,
                            act=p.act,
                        )
                        for b in range(p.blocks_per_stage)
                    )
                )
            )
            cin = cout
        self.stem = stages[0]
        self.low = stages[1]  # stride 4: the decoder's low-level features
        self.deep = nn.Sequential(*stages[2:])
        self.aspp = ASPP(spatial_dims, cin, p.aspp_channels, p.aspp_rates, p.norm, p.act, p.dropout)
        self.low_proj = conv(
            spatial_dims, p.channels[1], p.low_level_channels, kernel_size=1, norm=p.norm, act=p.act
        )
        self.decoder = nn.Sequential(
            SeparableConv(
                spatial_dims,
                p.aspp_channels + p.low_level_channels,
                p.decoder_channels,
                norm=p.norm,
                act=p.act,
            ),
            SeparableConv(
                spatial_dims,
                p.decoder_channels,
                p.decoder_channels,
                norm=p.norm,
                act=p.act,
                dropout=p.dropout,
            ),
        )
        self.head = Convolution(spatial_dims, p.decoder_channels, out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size."""
        check_input_size(x.shape[2:], self.size_divisors)
        low = self.low(self.stem(x))
        deep = self.aspp(self.deep(low))
        deep = F.interpolate(deep, size=low.shape[2:], mode=self.interp, align_corners=False)
        y = self.head(self.decoder(torch.cat([deep, self.low_proj(low)], dim=1)))
        return F.interpolate(y, size=x.shape[2:], mode=self.interp, align_corners=False)


def check_deeplab_patch(p: DeepLabParams, patch_size: tuple[int, ...]) -> None:
    """Refuse ASPP rates that reach past the feature map of a patch (they would only see padding).

    Args:
        p: Validated hyper-parameters.
        patch_size: Spatial size of the patch (or inference window).

    Raises:
        ConfigError: If the feature map (``patch // output_stride``) has a side below 2, or a rate is at
            or beyond its smallest side; the message names the map, the patch and the rates refused.

    Examples:
        >>> check_deeplab_patch(DeepLabParams(aspp_rates=(1, 2, 4, 6)), (96, 96, 96))
        >>> check_deeplab_patch(DeepLabParams(aspp_rates=(1, 6, 12)), (96, 96, 96))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        medseg.errors.ConfigError: aspp_rates must be < 12 (larger rates only see padding) ... refuse [12]
    """
    fmap = tuple(s // p.output_stride for s in patch_size)
    side = min(fmap)
    where = f"feature map {fmap} of patch {tuple(patch_size)} at output_stride {p.output_stride}"
    if side < 2:
        msg = f"patch size must give a feature map of at least 2 per side, got the {where}"
        raise ConfigError(msg)
    too_big = [r for r in p.aspp_rates if r > 1 and r >= side]
    if too_big:
        msg = (
            f"aspp_rates must be < {side} (larger rates only see padding) for the {where},"
            f" got {list(p.aspp_rates)}: refuse {too_big}"
        )
        raise ConfigError(msg)


def _divisor(p: DeepLabParams) -> int:
    return p.output_stride


@register_model(
    "deeplabv3plus3d", DeepLabParams, spatial_dims=3, divisor=_divisor, patch_check=check_deeplab_patch
)
def deeplabv3plus3d(p: DeepLabParams, in_channels: int, out_channels: int) -> nn.Module:
    """A 3D DeepLabV3+."""
    return DeepLabV3Plus(3, in_channels, out_channels, p)


@register_model(
    "deeplabv3plus2d", DeepLabParams, spatial_dims=2, divisor=_divisor, patch_check=check_deeplab_patch
)
def deeplabv3plus2d(p: DeepLabParams, in_channels: int, out_channels: int) -> nn.Module:
    """A 2D DeepLabV3+ (for 2D images; ``deeplabv3plus2d_slices`` runs it over volumes)."""
    return DeepLabV3Plus(2, in_channels, out_channels, p)
