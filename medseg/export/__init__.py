"""Clinician review exports: DICOM SEG, label tables, RTSTRUCT, statistics, overlays, review page.

Each export works on a :class:`CaseExport` (one case's label map, grid, image, labels and source,
built once per scan) and is registered by name in :data:`CASE_EXPORTS` (see
:mod:`medseg.export.registry` for the list); :func:`export_case` runs some of them on a case and
writes its ``case.json``. ``medseg predict --export ...`` runs them per scan (the batch,
:mod:`medseg.batch`, calls them and records what they wrote); :func:`batch_outputs` writes the
batch outputs (``OUT/stats.csv``, ``OUT/report/``); :func:`convert_label_map` exports a label map
made elsewhere. Nothing here imports :mod:`medseg.batch`.
"""

from medseg.export.batch import BatchCase, batch_outputs, convert_label_map, remake_exports
from medseg.export.case import CaseExport, case_from_folder, case_from_prediction
from medseg.export.facts import AlgorithmInfo, CaseFacts, read_case_facts
from medseg.export.labels import LabelEntry, label_table, read_label_names, spec_label_table
from medseg.export.registry import CASE_EXPORTS, DEFAULT_EXPORTS, export_case, parse_exports
from medseg.export.review_page import ReviewSettings, write_review

__all__ = [
    "CASE_EXPORTS",
    "DEFAULT_EXPORTS",
    "AlgorithmInfo",
    "BatchCase",
    "CaseExport",
    "CaseFacts",
    "LabelEntry",
    "ReviewSettings",
    "batch_outputs",
    "case_from_folder",
    "case_from_prediction",
    "convert_label_map",
    "export_case",
    "label_table",
    "parse_exports",
    "read_case_facts",
    "read_label_names",
    "remake_exports",
    "spec_label_table",
    "write_review",
]
