"""A model's inference settings made concrete for one device: precision resolved, windows laid out.

A pipeline config's ``inference`` section may say ``precision: auto`` and ``tuning: measure``;
before a network runs, :func:`resolve_inference` turns them into what runs here (the precision
for this device and CPU, unless the bundle's precision check failed) and :func:`tune_inference`
measures the batch size and memory layout (or keeps the pinned ones). Options given when loading a
model (``--precision``, ``--batch-size``, ``--memory-format``; the model source's ``precision``,
``batch_size``, ``memory_format`` and ``tuning`` options, see :class:`InferenceOptions`) override
the config's values. Foreign model sources receive the same options and may honour them.

Examples:
    >>> from medseg.config.pipeline import InferenceConfig
    >>> from medseg.hardware import CpuCapabilities
    >>> opts = InferenceOptions.from_mapping({"precision": "float32", "crf": True})
    >>> opts.precision, opts.pins_layout
    ('float32', False)
    >>> caps = CpuCapabilities(model="test", flags=frozenset({"amx_bf16"}))
    >>> inference, choice = resolve_inference(InferenceConfig(), InferenceOptions(), device="cpu", cpu=caps)
    >>> inference.precision, choice.reason
    ('bfloat16', 'the CPU computes bfloat16 natively (amx_bf16)')
    >>> InferenceOptions(batch_size=2).pins_layout
    True
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.hardware import CpuCapabilities
from medseg.tiling.precision import PrecisionChoice, check_precision, resolve_precision
from medseg.tiling.tuning import TUNINGS, LayoutCache, WindowLayout, choose_layout, tuning_key

if TYPE_CHECKING:
    from medseg.bundle import Bundle
    from medseg.config.pipeline import InferenceConfig

log = logging.getLogger(__name__)
OPTION_NAMES = ("precision", "batch_size", "memory_format", "tuning")
"""The model-source options read here."""
_FALLBACKS_SAID: set[str] = set()


@dataclass(frozen=True)
class InferenceOptions:
    """Inference settings given when loading a model, overriding its pipeline config's.

    Attributes:
        precision: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (``None``: the config's).
        batch_size: Windows per forward pass, pinned (``None``: the config's or measured).
        memory_format: ``contiguous`` or ``channels_last``, pinned (``None``: as above).
        tuning: ``measure`` or ``pinned`` (``None``: the config's; a pinned batch size or memory
            format pins both).

    Raises:
        ConfigError: For an invalid value.
    """

    precision: str | None = None
    batch_size: int | None = None
    memory_format: str | None = None
    tuning: str | None = None

    def __post_init__(self) -> None:
        if self.precision is not None:
            check_precision(self.precision)
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or int(self.batch_size) < 1):
            msg = f"batch_size must be an integer >= 1, got {self.batch_size!r}"
            raise ConfigError(msg)
        if self.memory_format not in (None, "contiguous", "channels_last"):
            msg = f"memory_format must be 'contiguous' or 'channels_last', got {self.memory_format!r}"
            raise ConfigError(msg)
        if self.tuning not in (None, *TUNINGS):
            msg = f"tuning must be one of {TUNINGS}, got {self.tuning!r}"
            raise ConfigError(msg)

    @property
    def pins_layout(self) -> bool:
        """Whether the batch size and memory format are pinned by these options."""
        return self.tuning == "pinned" or self.batch_size is not None or self.memory_format is not None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> InferenceOptions:
        """The inference options among a model source's options (others are ignored)."""
        values = {k: v for k, v in (options or {}).items() if k in OPTION_NAMES and v is not None}
        if "batch_size" in values:
            values["batch_size"] = int(values["batch_size"])
        return cls(**values)

    def as_mapping(self) -> dict[str, Any]:
        """The options that are set (to pass on to a model source)."""
        return {k: getattr(self, k) for k in OPTION_NAMES if getattr(self, k) is not None}


def guard_result(info: Mapping[str, Any], dtype: str) -> bool | None:
    """Whether a bundle passed its precision check in ``dtype`` (``None``: never checked).

    ``info`` is the bundle's ``info`` (``bundle.json``), whose ``precision_check`` maps a
    precision to its check (see :mod:`medseg.training.precision_guard`).
    """
    checks = info.get("precision_check")
    if not isinstance(checks, Mapping):
        return None
    entry = checks.get(dtype)
    if not isinstance(entry, Mapping) or "passed" not in entry:
        return None
    return bool(entry["passed"])


def resolve_inference(
    inference: InferenceConfig,
    options: InferenceOptions,
    *,
    device: torch.device | str,
    info: Mapping[str, Any] | None = None,
    cpu: CpuCapabilities | None = None,
    name: str = "model",
) -> tuple[InferenceConfig, PrecisionChoice]:
    """The inference settings with the options applied and the precision resolved for ``device``.

    A bundle that failed its precision check falls back to float32 under ``auto``, and says so
    once per bundle and process (a warning naming ``name``).

    Args:
        inference: The pipeline config's ``inference`` section.
        options: Overrides.
        device: Where the network runs.
        info: The bundle's recorded facts (its ``precision_check``).
        cpu: The processor's capabilities (default: this machine's).
        name: The model, for the fallback's message.

    Returns:
        The settings (``precision`` concrete; ``batch_size``/``memory_format``/``tuning`` from the
        options where set) and the precision choice.
    """
    requested = options.precision or inference.precision
    choice = resolve_precision(requested, device=device, cpu=cpu)
    if requested == "auto" and choice.reduced:
        passed = guard_result(info or {}, choice.dtype)
        if passed is False:
            choice = resolve_precision(requested, device=device, cpu=cpu, guard_passed=False)
            if name not in _FALLBACKS_SAID:
                _FALLBACKS_SAID.add(name)
                log.warning("precision auto: %s runs in float32, %s", name, choice.reason)
    update: dict[str, Any] = {"precision": choice.dtype}
    if options.batch_size is not None:
        update["batch_size"] = options.batch_size
    if options.memory_format is not None:
        update["memory_format"] = options.memory_format
    if options.pins_layout:
        update["tuning"] = "pinned"
    elif options.tuning is not None:
        update["tuning"] = options.tuning
    return inference.model_copy(update=update), choice


def tune_inference(
    inference: InferenceConfig,
    *,
    network: nn.Module,
    window: Sequence[int],
    in_channels: int,
    model: str,
    device: torch.device | str,
    cache: LayoutCache | None = None,
) -> tuple[InferenceConfig, WindowLayout]:
    """The settings with the batch size and memory format measured (or cached), unless pinned.

    Args:
        inference: Resolved settings (see :func:`resolve_inference`).
        network: The network, on ``device``, in eval mode.
        window: The window's spatial size as the tiling runs it.
        in_channels: The network's input channels.
        model: The model's identity (weights' SHA-256) for the cache key.
        device: Where it runs.
        cache: Where measurements are kept (default: the process's, backed by a file).

    Returns:
        The settings and the layout that runs (``source``: measured, cached or pinned).
    """
    fmt = inference.memory_format
    if fmt == "auto":
        fmt = getattr(network, "preferred_memory_format", "contiguous")
    configured = WindowLayout(inference.batch_size, fmt, "pinned")
    if inference.tuning == "pinned" or len(window) != int(getattr(network, "spatial_dims", len(window))):
        return inference.model_copy(update={"memory_format": fmt}), configured
    key = tuning_key(
        model=model,
        device=str(torch.device(device)),
        threads=torch.get_num_threads(),
        precision=inference.precision,
    )
    layout = choose_layout(
        network,
        key=key,
        in_channels=in_channels,
        window=window,
        precision=inference.precision,
        device=device,
        start=configured,
        cache=cache,
    )
    update = {"batch_size": layout.batch_size, "memory_format": layout.memory_format}
    return inference.model_copy(update=update), layout


def _with_inference(bundle: Bundle, inference: InferenceConfig) -> Bundle:
    """The bundle (same network) with another ``inference`` section."""
    return dataclasses.replace(bundle, pipeline=bundle.pipeline.model_copy(update={"inference": inference}))


class BundleRuntime:
    """Model bundles with their inference settings made concrete for one device.

    The precision is resolved when built (:func:`resolve_inference`); the window layout when
    :meth:`tuned` is first called, before the first scan (:func:`tune_inference`).

    Args:
        bundles: The bundles (an ensemble's members); each needs ``pipeline``, ``network``,
            ``info`` and ``sha256``.
        options: Overrides of their ``inference`` sections.
        device: Where the networks run.
        cpu: The processor's capabilities (default: this machine's).
        cache: Where layout measurements are kept (default: the process's, backed by a file).
    """

    def __init__(
        self,
        bundles: Sequence[Bundle],
        options: InferenceOptions,
        *,
        device: torch.device | str,
        cpu: CpuCapabilities | None = None,
        cache: LayoutCache | None = None,
    ) -> None:
        self.device, self.options, self.cache, self.cpu = torch.device(device), options, cache, cpu
        self.loaded = list(bundles)
        self.precisions: list[PrecisionChoice] = []
        self.bundles: list[Bundle] = []
        for i, b in enumerate(bundles):
            name = str(b.info.get("path") or f"model {i}")
            cfg, choice = resolve_inference(
                b.pipeline.inference, options, device=self.device, info=b.info, cpu=cpu, name=name
            )
            self.bundles.append(
                dataclasses.replace(b, pipeline=b.pipeline.model_copy(update={"inference": cfg}))
            )
            self.precisions.append(choice)
        self.layouts: list[WindowLayout] | None = None
        self._lock = threading.Lock()

    def for_device(self, device: torch.device | str) -> BundleRuntime:
        """The same bundles and options resolved for another device (layouts measured anew)."""
        return BundleRuntime(self.loaded, self.options, device=device, cpu=self.cpu, cache=self.cache)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (Ray workers) without the lock; a worker measures the layout unless it is known."""
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def tuned(self) -> list[Bundle]:
        """The bundles with their batch size and memory format chosen (measured on the first call)."""
        with self._lock:
            if self.layouts is None:
                from medseg.tiling.settings import TilingSettings, plan_for

                layouts, bundles = [], []
                for b in self.bundles:
                    cfg = b.pipeline.inference
                    window = tuple(b.pipeline.window)
                    settings = TilingSettings.from_config(cfg, window)
                    run_window = plan_for(b.network, window, settings).patch_size
                    cfg, layout = tune_inference(
                        cfg,
                        network=b.network,
                        window=run_window,
                        in_channels=len(b.spec.channels),
                        model=b.sha256,
                        device=self.device,
                        cache=self.cache,
                    )
                    bundles.append(
                        dataclasses.replace(b, pipeline=b.pipeline.model_copy(update={"inference": cfg}))
                    )
                    layouts.append(layout)
                self.bundles, self.layouts = bundles, layouts
            return self.bundles

    def facts(self) -> list[dict[str, Any]]:
        """Per member: the precision (asked, run, why) and the window layout (once tuned)."""
        out = []
        for i, choice in enumerate(self.precisions):
            entry: dict[str, Any] = {"precision": choice.dtype, "precision_requested": choice.requested}
            entry["precision_reason"] = choice.reason
            if self.layouts is not None:
                layout = self.layouts[i]
                entry |= {"batch_size": layout.batch_size, "memory_format": layout.memory_format}
                entry["layout_source"] = layout.source
            out.append(entry)
        return out
