"""Clinician review exports: DICOM SEG, label tables, RTSTRUCT, statistics, overlays, review page.

Each export works on a :class:`CaseExport` (one case's label map, grid, image, labels and source)
and is registered by name in :data:`CASE_EXPORTS` (see :mod:`medseg.export.registry` for the
list). ``medseg predict --export ...`` runs them per scan; :func:`finish_batch` writes the batch
outputs (``OUT/stats.csv``, ``OUT/report/``); :func:`export_folder` remakes everything from a
prediction folder without the model; :func:`convert_label_map` exports a label map made elsewhere.
"""

from medseg.export.batch import batch_outputs, convert_label_map, export_folder, finish_batch
from medseg.export.case import AlgorithmInfo, CaseExport, case_from_folder, case_from_prediction
from medseg.export.labels import LabelEntry, label_table, read_label_names, spec_label_table
from medseg.export.registry import CASE_EXPORTS, DEFAULT_EXPORTS, export_case, parse_exports
from medseg.export.review_page import ReviewSettings, write_review

__all__ = [
    "CASE_EXPORTS",
    "DEFAULT_EXPORTS",
    "AlgorithmInfo",
    "CaseExport",
    "LabelEntry",
    "ReviewSettings",
    "batch_outputs",
    "case_from_folder",
    "case_from_prediction",
    "convert_label_map",
    "export_case",
    "export_folder",
    "finish_batch",
    "label_table",
    "parse_exports",
    "read_label_names",
    "spec_label_table",
    "write_review",
]
