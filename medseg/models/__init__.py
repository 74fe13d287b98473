"""Segmentation networks, registered by name (see :mod:`medseg.models.registry`).

Registered: ``unet2d``, ``unet3d`` (:mod:`medseg.models.unet`), ``deeplabv3plus2d``,
``deeplabv3plus3d`` (:mod:`medseg.models.deeplab`), ``unet2d_slices``, ``deeplabv3plus2d_slices``
(2D models run slice by slice over volumes, :mod:`medseg.models.slicewise`) and ``passthrough``.
"""

from medseg.models import deeplab as _deeplab  # noqa: F401  (registers DeepLabV3+)
from medseg.models import monai_unet as _monai_unet  # noqa: F401  (registers MONAI's residual U-Nets)
from medseg.models import unet as _unet  # noqa: F401  (registers the U-Nets)
from medseg.models.registry import (
    available_models,
    check_input_size,
    check_patch,
    create_model,
    model_entry,
    prepare_for_inference,
    size_divisor,
    size_divisors,
)
from medseg.models.slicewise import SliceWise, register_slicewise
from medseg.models.supervision import deep_supervision_loss, deep_supervision_weights

for _name in ("unet2d", "deeplabv3plus2d"):
    register_slicewise(_name)

__all__ = [
    "SliceWise",
    "available_models",
    "check_input_size",
    "check_patch",
    "create_model",
    "deep_supervision_loss",
    "deep_supervision_weights",
    "model_entry",
    "prepare_for_inference",
    "register_slicewise",
    "size_divisor",
    "size_divisors",
]
