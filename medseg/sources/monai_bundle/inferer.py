"""A MONAI inferer's settings as medseg's tiling: the same windows, weights and padding.

medseg runs a bundle's network through its own engine (:func:`medseg.tiling.infer`), not through
the bundle's inferer object, and reproduces ``sliding_window_inference``: the volume is padded
where it is smaller than the window (half before, the rest after, with the inferer's
``padding_mode`` and ``cval``), the windows are planned with ``placement="monai"`` (steps of
``int(roi * (1 - overlap))``, the last window moved back to fit), blended with MONAI's importance
map, and the padding is cropped off again. Supported, or refused by name:

* ``SlidingWindowInferer`` (and ``SlidingWindowInfererAdapt``, which only moves work between
  devices): ``roi_size`` (``-1``/``0`` entries: the volume's size), ``sw_batch_size``, ``overlap``
  and ``sigma_scale`` (one value for every axis; per-axis values are refused), ``mode``
  (``constant``/``gaussian``), ``padding_mode`` (``constant``, ``reflect``, ``replicate``,
  ``circular``) and ``cval``; ``with_coord`` is refused; ``device``, ``sw_device``, ``progress``,
  ``cpu_thresh``, ``buffer_*`` and the weight-map cache change where and how fast it runs, not
  the result;
* ``SimpleInferer``: one window, the whole volume;
* any other inferer (``SliceInferer``, ``PatchInferer``, ``SaliencyInferer``, ...) is refused.

Examples:
    >>> from monai.inferers import SlidingWindowInferer
    >>> setup = window_setup(SlidingWindowInferer(roi_size=(16, 16, -1), overlap=0.5, mode="gaussian"))
    >>> setup.roi_for((40, 30, 12)), setup.padding((40, 12, 12))
    ((16, 16, 12), ((0, 0), (2, 2), (0, 0)))
    >>> setup.plan((40, 30, 12)).starts[0], setup.settings.blend
    ((0, 8, 16, 24), 'gaussian')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError
from medseg.tiling import PatchPlan, TilingSettings, plan_patches

PAD_MODES = ("constant", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class WindowSetup:
    """A bundle inferer's windows, as medseg's engine runs them.

    Attributes:
        kind: The inferer's class name.
        roi_size: Its window size (``None``: the whole volume, as ``SimpleInferer`` runs it); one
            entry for every axis, or one per axis; entries ``<= 0`` take the volume's size.
        settings: The tiling settings (overlap, blending, batch, MONAI's placement; the padding is
            done here, before the engine, so its ``pad_value`` is not used).
        pad_mode: How the volume is padded where it is smaller than a window (one of
            :data:`PAD_MODES`, as ``torch.nn.functional.pad`` does it).
        cval: The value of ``"constant"`` padding.
    """

    kind: str
    roi_size: tuple[int, ...] | None
    settings: TilingSettings
    pad_mode: str = "constant"
    cval: float = 0.0

    def roi_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The window size for a volume of this spatial shape (MONAI's ``fall_back_tuple``)."""
        dims = tuple(int(s) for s in shape)
        if self.roi_size is None:
            return dims
        roi = self.roi_size * len(dims) if len(self.roi_size) == 1 else self.roi_size
        if len(roi) != len(dims):
            n = len(dims)
            msg = f"inferer roi_size must have {n} entries for a {n}D image, got {self.roi_size}"
            raise ConfigError(msg)
        return tuple(s if r <= 0 else r for r, s in zip(roi, dims))

    def padding(self, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` padding per axis: half the shortfall before a window, the rest after."""
        roi = self.roi_for(shape)
        return tuple(((r - s) // 2, r - s - (r - s) // 2) if s < r else (0, 0) for s, r in zip(shape, roi))

    def plan(self, shape: Sequence[int]) -> PatchPlan:
        """The windows of the padded volume, as MONAI places them."""
        pads = self.padding(shape)
        padded = tuple(int(s) + b + a for s, (b, a) in zip(shape, pads))
        return plan_patches(padded, self.roi_for(shape), overlap=self.settings.overlap, placement="monai")

    def run(
        self, network: nn.Module, image: torch.Tensor, *, device: torch.device | str | None = None
    ) -> WindowRun:
        """Blended network output for a ``(C, *spatial)`` image, as ``sliding_window_inference`` gives.

        Args:
            network: The bundle's network (in eval mode).
            image: The preprocessed image.
            device: Where the network runs.

        Returns:
            The :class:`WindowRun`: ``(K, *spatial)`` blended logits on the image's grid.
        """
        from medseg.tiling import infer

        x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        x = x.float()
        pads = self.padding(x.shape[1:])
        if any(b or a for b, a in pads):
            flat = [v for b, a in reversed(pads) for v in (b, a)]
            value = self.cval if self.pad_mode == "constant" else None
            x = F.pad(x[None], flat, mode=self.pad_mode, value=value)[0]
        plan = self.plan(image.shape[1:])
        result = infer(network, x, self.settings, plan=plan, output="logits", device=device)
        assert result.probabilities is not None
        crop = tuple(slice(b, b + int(n)) for n, (b, _) in zip(image.shape[1:], pads))
        logits = result.probabilities[(slice(None), *crop)]
        return WindowRun(logits=logits, plan=plan, timings=dict(result.timings), pads=pads)

    def as_params(self) -> dict[str, str]:
        """The settings as strings (for tracking)."""
        s = self.settings
        roi = "volume" if self.roi_size is None else "x".join(map(str, self.roi_size))
        return {
            "inferer": self.kind,
            "roi_size": roi,
            "overlap": str(s.overlap),
            "blend": s.blend,
            "sigma_scale": str(s.sigma_scale),
            "sw_batch_size": str(s.batch_size),
            "padding_mode": self.pad_mode,
            "cval": str(self.cval),
        }


@dataclass(frozen=True)
class WindowRun:
    """What :meth:`WindowSetup.run` made.

    Attributes:
        logits: ``(K, *spatial)`` blended network output on the image's grid.
        plan: The windows that ran (on the padded volume).
        timings: The engine's timings (``forward``: the network alone).
        pads: The ``(before, after)`` padding per axis added before the windows.
    """

    logits: torch.Tensor
    plan: PatchPlan
    timings: dict[str, float]
    pads: tuple[tuple[int, int], ...] = ()


def _one(value: Any, name: str, kind: str) -> float:
    """One value for every axis (medseg's engine has no per-axis overlap or sigma)."""
    values = (
        [float(v) for v in value]
        if isinstance(value, Sequence) and not isinstance(value, str)
        else [float(value)]
    )
    if len(set(values)) != 1:
        msg = f"{kind} {name} must be one value for every axis to run in medseg's engine, got {list(values)}"
        raise ConfigError(msg)
    return values[0]


def window_setup(inferer: Any) -> WindowSetup:
    """The window setup of a MONAI inferer object.

    Args:
        inferer: What the bundle's ``inferer`` section built.

    Returns:
        The :class:`WindowSetup`.

    Raises:
        ConfigError: An inferer or a setting medseg's engine cannot reproduce, by name.
    """
    from monai.inferers import SimpleInferer, SlidingWindowInferer, SlidingWindowInfererAdapt

    kind = type(inferer).__name__
    if type(inferer) is SimpleInferer:
        return WindowSetup(
            kind,
            None,
            TilingSettings(
                patch_size=(1, 1, 1),
                overlap=0.0,
                blend="constant",
                batch_size=1,
                memory="full",
                placement="monai",
            ),
        )
    if type(inferer) not in (SlidingWindowInferer, SlidingWindowInfererAdapt):
        msg = f"inferer must be SlidingWindowInferer or SimpleInferer to run in medseg's engine, got {kind}"
        raise ConfigError(msg)
    if getattr(inferer, "with_coord", False):
        msg = f"{kind} with_coord must be false (the network takes windows only), got True"
        raise ConfigError(msg)
    padding = str(getattr(inferer.padding_mode, "value", inferer.padding_mode))
    if padding not in PAD_MODES:
        msg = f"{kind} padding_mode must be one of {list(PAD_MODES)}, got {padding!r}"
        raise ConfigError(msg)
    roi = inferer.roi_size
    roi_size = tuple(int(r) for r in roi) if isinstance(roi, Sequence) else (int(roi),)
    try:
        settings = TilingSettings(
            patch_size=tuple(max(r, 1) for r in (roi_size if len(roi_size) in (2, 3) else roi_size * 3)),
            overlap=_one(inferer.overlap, "overlap", kind),
            blend=str(getattr(inferer.mode, "value", inferer.mode)),  # type: ignore[arg-type]
            sigma_scale=_one(inferer.sigma_scale, "sigma_scale", kind),
            batch_size=int(inferer.sw_batch_size),
            memory="full",
            placement="monai",
        )
    except ValueError as exc:
        msg = f"{kind} settings must suit medseg's engine: {exc}"
        raise ConfigError(msg) from exc
    return WindowSetup(kind, roi_size, settings, pad_mode=padding, cval=float(inferer.cval))
