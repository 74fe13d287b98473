"""A MONAI inferer's settings as medseg's tiling: the same windows, weights and padding.

medseg runs a bundle's network through its own engine (:func:`medseg.tiling.infer`), not through
the bundle's inferer object. The windows are planned with ``placement="monai"``, which reproduces
``sliding_window_inference``'s grid (steps of ``int(roi * (1 - overlap))``, the last window moved
back to fit, half the padding before and half after where the volume is smaller than the window),
and the importance map is MONAI's. What the engine cannot reproduce is refused by name:

* ``SlidingWindowInferer`` (and ``SlidingWindowInfererAdapt``, which only moves work between
  devices): ``roi_size`` (``-1``/``0`` entries: the volume's size), ``sw_batch_size``, ``overlap``
  and ``sigma_scale`` (one value for every axis), ``mode`` (``constant``/``gaussian``),
  ``padding_mode`` ``constant`` with ``cval``; ``with_coord`` and per-axis overlaps are refused;
  ``device``, ``sw_device``, ``progress``, ``cpu_thresh``, ``buffer_*`` and the weight-map cache
  change where and how fast it runs, not the result;
* ``SimpleInferer``: one window, the whole volume;
* any other inferer (``SliceInferer``, ``PatchInferer``, ``SaliencyInferer``, ...) is refused.

Examples:
    >>> from monai.inferers import SlidingWindowInferer
    >>> setup = window_setup(SlidingWindowInferer(roi_size=(16, 16, -1), overlap=0.5, mode="gaussian"))
    >>> plan = setup.plan((40, 30, 12))
    >>> plan.patch_size, plan.starts[0], setup.settings.blend
    ((16, 16, 12), (0, 8, 16, 24), 'gaussian')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medseg.errors import ConfigError
from medseg.tiling import PatchPlan, TilingSettings, plan_patches


@dataclass(frozen=True)
class WindowSetup:
    """A bundle inferer's windows, as medseg's engine runs them.

    Attributes:
        kind: The inferer's class name.
        roi_size: Its window size (``None``: the whole volume, as ``SimpleInferer`` runs it);
            entries ``<= 0`` take the volume's size on that axis.
        settings: The tiling settings (overlap, blending, batch, padding value; MONAI's placement).
    """

    kind: str
    roi_size: tuple[int, ...] | None
    settings: TilingSettings

    def plan(self, shape: Sequence[int]) -> PatchPlan:
        """The windows for a volume of this spatial shape, as MONAI places them."""
        dims = tuple(int(s) for s in shape)
        if self.roi_size is None:
            roi = dims
        else:
            if len(self.roi_size) == 1:  # one size for every axis
                return self._plan(dims, self.roi_size * len(dims))
            if len(self.roi_size) != len(dims):
                n = len(dims)
                msg = f"inferer roi_size must have {n} entries for a {n}D image, got {self.roi_size}"
                raise ConfigError(msg)
            roi = self.roi_size
        return self._plan(dims, roi)

    def _plan(self, dims: tuple[int, ...], roi: Sequence[int]) -> PatchPlan:
        roi = tuple(s if r <= 0 else r for r, s in zip(roi, dims))
        return plan_patches(dims, roi, overlap=self.settings.overlap, divisor=1, placement="monai")

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
            "cval": str(s.pad_value),
        }


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
    if padding != "constant":
        msg = f"{kind} padding_mode must be 'constant' (with cval) in medseg's engine, got {padding!r}"
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
            pad_value=float(inferer.cval),
        )
    except ValueError as exc:
        msg = f"{kind} settings must suit medseg's engine: {exc}"
        raise ConfigError(msg) from exc
    return WindowSetup(kind, roi_size, settings)
