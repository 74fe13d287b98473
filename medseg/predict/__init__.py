"""Prediction of one scan as planned stages.

* :mod:`~medseg.predict.records`: :class:`StageRecord` (what a stage did), :class:`Prediction`,
  :class:`Preprocessed`.
* :mod:`~medseg.predict.plan`: :func:`plan_scan` decides a :class:`ScanPlan` before any network runs.
* :mod:`~medseg.predict.stages`: the stage functions that carry the plan out.

:class:`medseg.pipeline.Predictor` joins them.
"""

from medseg.predict.plan import MemberPlan, ScanPlan, plan_scan
from medseg.predict.records import Prediction, Preprocessed, StageRecord, seconds_by_stage

__all__ = [
    "MemberPlan",
    "Prediction",
    "Preprocessed",
    "ScanPlan",
    "StageRecord",
    "plan_scan",
    "seconds_by_stage",
]
