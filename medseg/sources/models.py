"""Model sources: what ``--model REF`` names, by scheme.

``REF`` is ``SCHEME:LOCATION`` for a registered source (``medseg:PATH`` explicitly; others such as
another framework's trained model folders register their own scheme), or, without a scheme, a medseg
bundle folder or an MLflow ``runs:/`` / ``models:/`` URI. A source turns its locations (several are
an ensemble) into a :class:`SegmentationModel`: anything that segments a loaded scan on its own grid
and says what it is, so the batch runner, exports and tracking treat every kind of model alike.

Examples:
    >>> split_model_ref("nnunet:/models/Dataset004")
    ('nnunet', '/models/Dataset004')
    >>> split_model_ref("runs:/0123abcd/bundle")
    ('medseg', 'runs:/0123abcd/bundle')
    >>> split_model_ref("demo_out/model/bundle")
    ('medseg', 'demo_out/model/bundle')
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, choice_error
from medseg.predict.records import ModelDescription as ModelDescription
from medseg.predict.records import SegmentationModel as SegmentationModel

DEFAULT_SCHEME = "medseg"
BUILTIN_MODEL_SOURCES = {
    DEFAULT_SCHEME: "medseg.sources.medseg_bundle",
    "monai-bundle": "medseg.sources.monai_bundle",
    "nnunet": "medseg.sources.nnunet",
}
"""The built-in model sources by scheme: the module whose import registers each (imported when the
scheme is first named, so a source's heavy imports cost nothing until it is used)."""
_MLFLOW_SCHEMES = ("runs", "models", "mlflow-artifacts")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):(?!//)(.+)$")


ModelLoader = Callable[..., SegmentationModel]
"""Called as ``loader(locations, device=..., options=...)``; returns the loaded model."""

MODEL_SOURCES: dict[str, ModelLoader] = {}


def register_model_source(scheme: str) -> Callable[[ModelLoader], ModelLoader]:
    """Register a model loader under a scheme (a decorator).

    Args:
        scheme: The prefix of model references it loads (``scheme:LOCATION``).

    Returns:
        The decorator, which returns the loader unchanged.
    """

    def decorate(loader: ModelLoader) -> ModelLoader:
        MODEL_SOURCES[scheme] = loader
        return loader

    return decorate


def split_model_ref(ref: str | Path) -> tuple[str, str]:
    """The scheme and location of a model reference (see the module docstring)."""
    text = str(ref)
    match = _SCHEME.match(text)
    if match is None or match.group(1) in _MLFLOW_SCHEMES or isinstance(ref, Path):
        return DEFAULT_SCHEME, text
    return match.group(1), match.group(2)


def load_model(
    refs: Sequence[str | Path], *, device: str = "cpu", options: Mapping[str, Any] | None = None
) -> SegmentationModel:
    """Load the model(s) named by ``refs`` through their source; several are an ensemble.

    Args:
        refs: Model references, all of one scheme.
        device: Where the network runs.
        options: Source-specific settings (folds, checkpoint, trust flags, ...).

    Returns:
        The loaded :class:`SegmentationModel`.

    Raises:
        ConfigError: No reference, mixed schemes or an unknown scheme.
    """
    if not refs:
        msg = "model references must name at least one model, got none"
        raise ConfigError(msg)
    split = [split_model_ref(r) for r in refs]
    schemes = sorted({s for s, _ in split})
    if len(schemes) > 1:
        msg = f"an ensemble's models must come from one source, got {schemes}"
        raise ConfigError(msg)
    scheme = schemes[0]
    _register_builtin_sources(scheme)
    if scheme not in MODEL_SOURCES:
        raise ConfigError(choice_error("model source", scheme, {*MODEL_SOURCES, *BUILTIN_MODEL_SOURCES}))
    return MODEL_SOURCES[scheme]([loc for _, loc in split], device=device, options=dict(options or {}))


def _register_builtin_sources(scheme: str) -> None:
    """Import the built-in source of ``scheme`` (its module registers it) unless a loader holds it."""
    if scheme not in MODEL_SOURCES and scheme in BUILTIN_MODEL_SOURCES:
        importlib.import_module(BUILTIN_MODEL_SOURCES[scheme])
