"""A bundle for batch tests: the passthrough model, whose labels are the rounded intensities (0-2)."""

from __future__ import annotations

from pathlib import Path

from medseg.bundle import build_network, save_bundle
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec


def passthrough_bundle(path: Path) -> Path:
    """A weightless bundle: the passthrough model returns round(intensity) as labels 0-2."""
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": {"background": 0, "a": 1, "b": 2},
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    return save_bundle(path, cfg, spec, build_network(cfg, spec))
