"""Evaluation: score segmentations against reference label maps, log them, and compare runs.

* :mod:`~medseg.evaluation.metrics`: Dice, HD95, surface Dice, volume differences per label (mm, mL),
  with the empty-mask policy.
* :mod:`~medseg.evaluation.evaluate`: a prediction folder or a model against a data spec
  (:mod:`~medseg.evaluation.cases` picks the cases and finds their predictions).
* :mod:`~medseg.evaluation.summary`: per-case tables and their summaries.
* :mod:`~medseg.evaluation.report`: CSV/JSON files and the MLflow ``evaluate`` run.
* :mod:`~medseg.evaluation.compare`, :mod:`~medseg.evaluation.runs` and :mod:`~medseg.evaluation.plots`:
  runs side by side, paired per-case tests, PNG plots.

Examples:
    >>> import numpy as np
    >>> ref = np.zeros((6, 6, 6), dtype=np.uint8); ref[1:5, 1:5, 1:5] = 1
    >>> [round(s.dice, 2) for s in score_labels(ref, ref, {"organ": 1}, spacing=(1.0, 1.0, 1.0))]
    [1.0]
"""

from medseg.evaluation.cases import select_cases
from medseg.evaluation.compare import Comparison, PairedDiff, compare_runs, write_comparison
from medseg.evaluation.evaluate import Evaluation, evaluate_folder, evaluate_model
from medseg.evaluation.metrics import (
    DEFAULT_TOLERANCE_MM,
    LabelScores,
    score_labels,
    spacing_from_affine,
    surface_distances,
    voxel_volume_ml,
)
from medseg.evaluation.report import log_evaluation, write_evaluation
from medseg.evaluation.summary import ALL_LABELS, Stat, read_case_table, summarise

__all__ = [
    "ALL_LABELS",
    "DEFAULT_TOLERANCE_MM",
    "Comparison",
    "Evaluation",
    "LabelScores",
    "PairedDiff",
    "Stat",
    "compare_runs",
    "evaluate_folder",
    "evaluate_model",
    "log_evaluation",
    "read_case_table",
    "score_labels",
    "select_cases",
    "spacing_from_affine",
    "summarise",
    "surface_distances",
    "voxel_volume_ml",
    "write_comparison",
    "write_evaluation",
]
