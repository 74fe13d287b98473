"""Preprocessing: orientation, spacing and intensity, as pure functions and invertible MONAI transforms.

* :mod:`~medseg.preprocess.geometry`: spacing from an affine, nnU-Net's anisotropy rule, the
  resampling plan (pure functions).
* :mod:`~medseg.preprocess.spacing`: :class:`ResampleToSpacingd`.
* :mod:`~medseg.preprocess.intensity`: per-channel normalisation, :class:`NormalizeChannelsd`.
* :mod:`~medseg.preprocess.pipeline`: :func:`build_preprocess` from a data spec, and
  :func:`invert_to_source` to take predictions back to the source grid.
"""

from medseg.preprocess.geometry import (
    ResampleStep,
    is_anisotropic,
    plan_resampling,
    separate_slice_axis,
    slice_axis,
    spacing_from_affine,
)
from medseg.preprocess.intensity import (
    ChannelNorm,
    NormalizeChannelsd,
    denormalize_channel,
    normalize_channel,
)
from medseg.preprocess.pipeline import (
    CANONICAL_AXCODES,
    PreprocessCompose,
    build_preprocess,
    invert_to_source,
)
from medseg.preprocess.spacing import ResampleToSpacingd

__all__ = [
    "CANONICAL_AXCODES",
    "ChannelNorm",
    "NormalizeChannelsd",
    "PreprocessCompose",
    "ResampleStep",
    "ResampleToSpacingd",
    "build_preprocess",
    "denormalize_channel",
    "invert_to_source",
    "is_anisotropic",
    "normalize_channel",
    "plan_resampling",
    "separate_slice_axis",
    "slice_axis",
    "spacing_from_affine",
]
