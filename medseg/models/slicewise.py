"""2D models on 3D volumes: slice by slice along an axis, optionally with neighbouring slices (2.5D).

:class:`SliceWise` folds the slices of a ``(B, C, X, Y, Z)`` volume into the batch, runs a 2D network
on them and reassembles ``(B, K, X, Y, Z)``. With ``context = c`` each slice sees its ``c``
neighbours on each side as extra input channels (``C * (2c + 1)`` channels for the 2D network); slices
at the ends of the volume (or of a patch) repeat the edge slice.

Every registered 2D model ``NAME`` gets a volume model ``NAME_slices`` with the same hyper-parameters
plus ``axis`` (0, 1 or 2: the spatial axis to slice along; 2 is Z) and ``context``. Its size divisor is
per axis: the 2D model's divisor in-plane and 1 along the slice axis, e.g. ``(16, 16, 1)``.

Examples:
    >>> import torch
    >>> from medseg.models import create_model, size_divisors
    >>> net = create_model("unet2d_slices", 1, 3, channels=[4, 8], axis=2, context=1).eval()
    >>> net(torch.zeros(2, 1, 8, 6, 5)).shape
    torch.Size([2, 3, 8, 6, 5])
    >>> size_divisors("unet2d_slices", channels=[4, 8, 16], axis=1)
    (4, 1, 4)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medseg.config.base import FrozenModel
from medseg.models.registry import ModelEntry, check_input_size, model_entry, register_model

MAX_CONTEXT = 8


class SliceWise(nn.Module):
    """Run a 2D network over the slices of volumes along one axis.

    Args:
        net: A 2D network taking ``in_channels * (2 * context + 1)`` channels.
        axis: Spatial axis to slice along (0, 1 or 2).
        context: Neighbouring slices on each side given as extra channels.
        divisor: The 2D network's in-plane size divisor.

    Shapes:
        In: ``(B, C, X, Y, Z)``; the in-plane sizes divisible by ``divisor``, any size along ``axis``.
        Out: ``(B, K, X, Y, Z)``. If the 2D network returns a tuple of deep-supervision outputs (in
        ``train()`` mode), a tuple of volumes, each at its head's in-plane size and the full size along
        ``axis``.

    Raises:
        ConfigError: From ``forward``, naming the size and the per-axis divisors.

    Its 2D network, ``net``, takes the context slices as channels in the order tiling that runs a 2D
    network slice by slice uses (``(C, 2 * context + 1)`` flattened, channel-major), so ``net`` with
    ``axis`` and ``context`` can go there directly (then the context comes from the whole volume
    rather than repeating a window's edge slices).
    """

    def __init__(self, net: nn.Module, axis: int, context: int, divisor: int) -> None:
        super().__init__()
        if axis not in (0, 1, 2):
            msg = f"axis must be 0, 1 or 2, got {axis}"
            raise ValueError(msg)
        self.net = net
        self.axis = axis
        self.context = context
        self.size_divisors = tuple(1 if a == axis else divisor for a in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Segment every slice; see the class docstring for shapes."""
        check_input_size(x.shape[2:], self.size_divisors)
        b, s = x.shape[0], x.shape[2 + self.axis]
        x = x.movedim(2 + self.axis, 2)  # (B, C, S, P, Q)
        if self.context > 0:
            k = self.context
            x = F.pad(x, (0, 0, 0, 0, k, k), mode="replicate").unfold(2, 2 * k + 1, 1)  # (B, C, S, P, Q, W)
            x = x.permute(0, 2, 1, 5, 3, 4)  # (B, S, C, W, P, Q)
        else:
            x = x.transpose(1, 2)  # (B, S, C, P, Q)
        y = self.net(x.reshape(b * s, -1, x.shape[-2], x.shape[-1]))
        if isinstance(y, (tuple, list)):
            return tuple(self._volume(t, b, s) for t in y)
        return self._volume(y, b, s)

    def _volume(self, y: torch.Tensor, b: int, s: int) -> torch.Tensor:
        """``(B * S, K, P, Q)`` → ``(B, K, X, Y, Z)``."""
        y = y.reshape(b, s, y.shape[1], y.shape[2], y.shape[3]).transpose(1, 2)  # (B, K, S, P, Q)
        return y.movedim(2, 2 + self.axis)


class SliceParams(FrozenModel):
    """The slice-wise hyper-parameters added to a 2D model's own.

    Attributes:
        axis: Spatial axis to slice along: 0 (X), 1 (Y) or 2 (Z, axial for RAS-oriented volumes).
        context: Neighbouring slices on each side as extra input channels (0: plain 2D; 1: 2.5D with
            3 slices).
    """

    axis: Literal[0, 1, 2] = 2
    context: Annotated[int, Field(ge=0, le=MAX_CONTEXT)] = 0


def register_slicewise(name_2d: str, name: str | None = None) -> str:
    """Register ``NAME_slices``: the registered 2D model ``name_2d`` applied slice by slice to volumes.

    Args:
        name_2d: A registered 2D model.
        name: Registry name of the volume model (default: ``f"{name_2d}_slices"``).

    Returns:
        The registered name.

    Raises:
        ValueError: If ``name_2d`` is not a 2D model.
    """
    inner: ModelEntry = model_entry(name_2d)
    if inner.spatial_dims != 2:
        msg = (
            f"slice-wise models must wrap a 2D model, got '{name_2d}' with spatial_dims {inner.spatial_dims}"
        )
        raise ValueError(msg)
    name = name or f"{name_2d}_slices"
    fields: dict[str, Any] = {f: (info.annotation, info) for f, info in SliceParams.model_fields.items()}
    params_type = pydantic.create_model(  # the 2D model's fields plus axis and context
        f"{inner.params_type.__name__}Slices",
        __base__=inner.params_type,
        __doc__=f"Hyper-parameters of '{name}': those of '{name_2d}' plus ``axis`` and ``context``.",
        **fields,
    )

    def inner_params(p: Any) -> FrozenModel:
        return inner.params_type.model_validate(p.model_dump(exclude={"axis", "context"}))

    def divisor(p: Any) -> tuple[int, ...]:
        d = inner.divisors(inner_params(p))[0]
        return tuple(1 if a == p.axis else d for a in range(3))

    def patch_check(p: Any, patch_size: tuple[int, ...]) -> None:
        if inner.patch_check is not None:
            inner.patch_check(inner_params(p), tuple(s for a, s in enumerate(patch_size) if a != p.axis))

    @register_model(
        name,
        params_type,
        spatial_dims=3,
        divisor=divisor,
        patch_check=patch_check,
        memory_format=inner.memory_format,
    )
    def build(p: Any, in_channels: int, out_channels: int) -> nn.Module:
        params_2d = inner_params(p)
        net = inner.builder(params_2d, in_channels * (2 * p.context + 1), out_channels)
        # the 2D network carries its own facts too, for tiling that runs it slice by slice itself
        divisors = inner.divisors(params_2d)
        net.size_divisors = divisors  # type: ignore[assignment]
        net.size_divisor = divisors[0]  # type: ignore[assignment]
        net.spatial_dims = 2  # type: ignore[assignment]
        net.preferred_memory_format = inner.memory_format  # type: ignore[assignment]
        return SliceWise(net, p.axis, p.context, divisors[0])

    build.__doc__ = f"'{name_2d}' applied slice by slice to volumes."
    return name
