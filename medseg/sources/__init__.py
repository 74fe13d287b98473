"""Where models and scans come from: registries of model sources and scan sources.

A model reference (``--model``) is ``SCHEME:LOCATION`` for a registered model source, or a medseg
bundle folder or MLflow ``runs:/``/``models:/`` URI; a scan source (the batch's input) is
``SCHEME:LOCATION`` for a registered scan source, or a local file or folder. New kinds of model
(another framework's trained folders) or of input (an archive) register here and never touch the
prediction stages.
"""

from medseg.sources.models import (
    MODEL_SOURCES,
    ModelDescription,
    SegmentationModel,
    load_model,
    register_model_source,
    split_model_ref,
)
from medseg.sources.scans import SCAN_SOURCES, ScanSource, open_scan_source, register_scan_source

__all__ = [
    "MODEL_SOURCES",
    "SCAN_SOURCES",
    "ModelDescription",
    "ScanSource",
    "SegmentationModel",
    "load_model",
    "open_scan_source",
    "register_model_source",
    "register_scan_source",
    "split_model_ref",
]
