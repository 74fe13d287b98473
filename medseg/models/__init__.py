"""Segmentation networks, registered by name (see :mod:`medseg.models.registry`)."""

from medseg.models import unet as _unet  # noqa: F401  (registers the U-Nets)
from medseg.models.registry import available_models, create_model, model_entry, size_divisor

__all__ = ["available_models", "create_model", "model_entry", "size_divisor"]
