"""Refinement of stitched probabilities: a dense CRF, then classic post-processing.

* :mod:`~medseg.config.refine`: :class:`DenseCRFConfig`, :class:`PostprocessConfig` (per label
  :class:`LabelPostprocess`) and :class:`RefineConfig`, the ``refine:`` section of a pipeline.
* :mod:`~medseg.refine.crf`: :func:`dense_crf`, mean-field inference of a fully connected CRF (2D/3D,
  spacing-aware, CPU and CUDA).
* :mod:`~medseg.refine.lattice`: :class:`PermutohedralLattice`, the bilateral filter behind it, and
  :mod:`~medseg.refine.gaussian`, the separable smoothness filter.
* :mod:`~medseg.refine.blocks`: the box around the foreground and slabs with halos (bounded memory).
* :mod:`~medseg.refine.components`: keep the largest component, remove small islands, fill holes;
  :func:`choose_postprocessing` on validation data.
* :mod:`~medseg.refine.stage`: :func:`refine`, the pipeline stage, with its :class:`RefineReport`.

The configs import without torch (pipeline configs load them); everything else is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medseg.config.refine import DenseCRFConfig, LabelPostprocess, PostprocessConfig, RefineConfig

_LAZY = {
    "Block": "blocks",
    "CRFInfo": "blocks",
    "foreground_box": "blocks",
    "plan_blocks": "blocks",
    "choose_postprocessing": "components",
    "fill_holes": "components",
    "keep_largest_component": "components",
    "postprocess": "components",
    "remove_small_components": "components",
    "dense_crf": "crf",
    "dense_crf_with_info": "crf",
    "mean_field": "crf",
    "SeparableGaussian": "gaussian",
    "PermutohedralLattice": "lattice",
    "RefineReport": "stage",
    "postprocess_with_report": "stage",
    "refine": "stage",
}

__all__ = [
    "Block",
    "CRFInfo",
    "DenseCRFConfig",
    "LabelPostprocess",
    "PermutohedralLattice",
    "PostprocessConfig",
    "RefineConfig",
    "RefineReport",
    "SeparableGaussian",
    "choose_postprocessing",
    "dense_crf",
    "dense_crf_with_info",
    "fill_holes",
    "foreground_box",
    "keep_largest_component",
    "mean_field",
    "plan_blocks",
    "postprocess",
    "postprocess_with_report",
    "refine",
    "remove_small_components",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'medseg.refine' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f"medseg.refine.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from medseg.refine.blocks import Block, CRFInfo, foreground_box, plan_blocks
    from medseg.refine.components import (
        choose_postprocessing,
        fill_holes,
        keep_largest_component,
        postprocess,
        remove_small_components,
    )
    from medseg.refine.crf import dense_crf, dense_crf_with_info, mean_field
    from medseg.refine.gaussian import SeparableGaussian
    from medseg.refine.lattice import PermutohedralLattice
    from medseg.refine.stage import RefineReport, postprocess_with_report, refine
