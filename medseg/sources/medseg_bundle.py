"""The built-in model source: medseg bundle folders and MLflow ``runs:/`` / ``models:/`` URIs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medseg.sources.models import DEFAULT_SCHEME, register_model_source


@register_model_source(DEFAULT_SCHEME)
def load_medseg_bundles(locations: Sequence[str], *, device: str = "cpu", options: Mapping[str, Any]) -> Any:
    """Load medseg bundles (several are an ensemble) into a :class:`~medseg.pipeline.Predictor`.

    Args:
        locations: Bundle folders or MLflow URIs.
        device: Where the network runs.
        options: Unused; medseg bundles carry their settings.

    Returns:
        The :class:`~medseg.pipeline.Predictor`.
    """
    from medseg.pipeline import Predictor

    return Predictor.from_path(*locations, device=device)
