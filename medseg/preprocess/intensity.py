"""Intensity normalisation, one setting per channel, recorded so that it can be undone.

Schemes (see :class:`~medseg.config.spec.IntensitySpec`):

* ``ct``: clip to ``clip``, then ``(x - mean) / std``. Without ``mean``/``std`` in the spec, the
  clip window is mapped onto ``[-1, 1]`` (mean = window centre, std = half its width).
* ``zscore``: ``(x - mean) / std`` with this image's own mean and (population) standard deviation,
  per channel; with ``nonzero``, the statistics come from the non-zero voxels only and only those
  are normalised (zeros stay zero, as MONAI's ``NormalizeIntensity(nonzero=True)`` does).
* ``none``: values are left as they are.

The inverse undoes the affine part, ``x * std + mean``, only: values that were clipped stay at
the clip bounds, and in ``nonzero`` mode voxels that are exactly zero are taken to be outside the
mask (a voxel whose value equalled the mean becomes 0 and is not restored).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import TraceKeys
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

from medseg.config.spec import IntensitySpec
from medseg.errors import InputError

#: Smallest standard deviation divided by (nnU-Net's guard against constant images).
MIN_STD = 1e-8


@dataclass(frozen=True)
class ChannelNorm:
    """What was applied to one channel: ``y = (clip(x) - mean) / std``.

    Attributes:
        scheme: The spec's scheme.
        mean: Value subtracted.
        std: Value divided by (``> 0``).
        clip: Clip window applied first, or ``None``.
        nonzero: Whether only non-zero voxels were changed.
    """

    scheme: Literal["ct", "zscore", "none"]
    mean: float = 0.0
    std: float = 1.0
    clip: tuple[float, float] | None = None
    nonzero: bool = False


def normalize_channel(
    x: torch.Tensor, spec: IntensitySpec, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, ChannelNorm]:
    """Normalise one channel as ``spec`` says.

    Args:
        x: The channel's voxels (any shape; spatial only, no channel axis).
        spec: The channel's intensity settings.
        out: Optional ``float32`` tensor of ``x``'s shape to write the result into (in place, no
            temporaries of the volume's size for the CT and plain z-score schemes).

    Returns:
        The normalised values (``float32``; ``out`` if given, else a new tensor) and what was applied.

    Examples:
        >>> y, norm = normalize_channel(torch.tensor([-2000.0, 0.0, 500.0]),
        ...                             IntensitySpec(scheme="ct", clip=(-1000, 1000), mean=0, std=1000))
        >>> y.tolist(), norm.clip
        ([-1.0, 0.0, 0.5], (-1000.0, 1000.0))
        >>> zscore = IntensitySpec(scheme="zscore", nonzero=True)
        >>> y, norm = normalize_channel(torch.tensor([0.0, 2.0, 4.0]), zscore)
        >>> y.tolist(), norm.mean, norm.std
        ([0.0, -1.0, 1.0], 3.0, 1.0)
    """
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if spec.scheme == "none":
        return out.copy_(x), ChannelNorm(scheme="none")
    if spec.scheme == "ct":
        assert spec.clip is not None  # the spec validates this
        low, high = float(spec.clip[0]), float(spec.clip[1])
        mean = spec.mean if spec.mean is not None else (low + high) / 2.0
        std = spec.std if spec.std is not None else (high - low) / 2.0
        norm = ChannelNorm(scheme="ct", mean=float(mean), std=max(float(std), MIN_STD), clip=(low, high))
        torch.clamp(x.to(torch.float32), low, high, out=out)
        return out.sub_(norm.mean).div_(norm.std), norm
    x = x.to(torch.float32)
    mask = x != 0 if spec.nonzero else None
    values = x[mask] if mask is not None else x.reshape(-1)
    if values.numel() == 0:
        return out.copy_(x), ChannelNorm(scheme="zscore", nonzero=spec.nonzero)
    values64 = values.to(torch.float64)
    mean = float(values64.mean())
    std = max(float(values64.std(correction=0)), MIN_STD)
    norm = ChannelNorm(scheme="zscore", mean=mean, std=std, nonzero=spec.nonzero)
    if mask is None:
        return torch.sub(x, mean, out=out).div_(std), norm
    out.copy_(x)
    out[mask] = (values - mean) / std
    return out, norm


def denormalize_channel(y: torch.Tensor, norm: ChannelNorm) -> torch.Tensor:
    """Undo :func:`normalize_channel`'s affine part: ``y * std + mean``.

    Clipping is not undone; in ``nonzero`` mode, voxels equal to 0 are left at 0.

    Args:
        y: Normalised values of one channel.
        norm: What was applied.

    Returns:
        The values on the original intensity scale (``float32``, a new tensor).

    Examples:
        >>> norm = ChannelNorm(scheme="zscore", mean=3.0, std=2.0, nonzero=True)
        >>> denormalize_channel(torch.tensor([0.0, -1.0, 1.0]), norm).tolist()
        [0.0, 1.0, 5.0]
    """
    y = y.to(torch.float32)
    if norm.scheme == "none":
        return y.clone()
    out = y * norm.std + norm.mean
    if norm.nonzero:
        out = torch.where(y != 0, out, y)
    return out


class NormalizeChannelsd(MapTransform, InvertibleTransform):
    """Normalise each channel (dim 0) of images with its own intensity settings; invertible.

    Args:
        keys: Keys of ``(C, X, Y, Z)`` images.
        channels: One :class:`~medseg.config.spec.IntensitySpec` per channel.
        allow_missing_keys: Skip keys missing from the data instead of failing.

    Raises:
        ValueError: If ``channels`` is empty.

    Examples:
        >>> from monai.data import MetaTensor
        >>> t = NormalizeChannelsd("image", [IntensitySpec(scheme="ct", clip=(-100, 100), mean=0, std=100)])
        >>> out = t({"image": MetaTensor(torch.full((1, 2, 2, 2), 50.0))})["image"]
        >>> float(out.max()), out.applied_operations[-1]["extra_info"]["channels"][0]["std"]
        (0.5, 100.0)
        >>> float(t.inverse({"image": out})["image"].max())
        50.0
    """

    def __init__(
        self, keys: KeysCollection, channels: Sequence[IntensitySpec], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(channels) == 0:
            msg = "channels must hold one intensity setting per channel, got none"
            raise ValueError(msg)
        self.channels = tuple(channels)

    def normalize(self, img: torch.Tensor, key: Hashable = "image") -> torch.Tensor:
        """Normalise one image (the array-level step behind ``__call__``).

        Args:
            img: A ``(C, ...)`` tensor (a MetaTensor keeps its metadata).
            key: The image's key, for error messages.

        Returns:
            The normalised image (``float32``), with an entry on ``applied_operations`` holding
            each channel's :class:`ChannelNorm` when it is a MetaTensor.

        Raises:
            InputError: If the image does not have one channel per intensity setting.
        """
        if img.ndim < 2 or img.shape[0] != len(self.channels):
            msg = (
                f"'{key}' must have {len(self.channels)} channel(s) in dim 0, one per spec channel, "
                f"got shape {tuple(img.shape)}"
            )
            raise InputError(msg)
        img = convert_to_tensor(img, track_meta=get_track_meta())
        data = img.as_tensor() if isinstance(img, MetaTensor) else img
        out_t = torch.empty(data.shape, dtype=torch.float32, device=data.device)
        results = [normalize_channel(data[c], spec, out=out_t[c]) for c, spec in enumerate(self.channels)]
        out, *_ = convert_to_dst_type(out_t, dst=img, dtype=torch.float32)
        if isinstance(out, MetaTensor) and get_track_meta():
            self.push_transform(out, extra_info={"channels": [asdict(n) for _, n in results]})
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise every key.

        Args:
            data: Mapping holding ``(C, X, Y, Z)`` images at ``keys``.

        Returns:
            A new dict with the keys normalised.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key], key)
        return d

    def invert(self, img: MetaTensor) -> MetaTensor:
        """Undo :meth:`normalize` on one image, using the entry it recorded.

        Args:
            img: The normalised MetaTensor.

        Returns:
            The image with ``x * std + mean`` applied per channel (clipping is not undone).
        """
        transform = self.pop_transform(img)
        norms = [ChannelNorm(**n) for n in transform[TraceKeys.EXTRA_INFO]["channels"]]
        data = img.as_tensor()
        out_t = torch.stack([denormalize_channel(data[c], n) for c, n in enumerate(norms)])
        out, *_ = convert_to_dst_type(out_t, dst=img, dtype=torch.float32)
        return out

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the normalisation on every key present.

        Args:
            data: Mapping holding the normalised MetaTensors.

        Returns:
            A new dict with the keys on their original intensity scale (up to clipping).
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.invert(d[key])
        return d
