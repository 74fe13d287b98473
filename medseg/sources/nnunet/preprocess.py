"""nnU-Net's preprocessing of one case, reproduced: transpose, crop, normalise, resample.

The order is nnU-Net's: the array (in SimpleITK's ``(C, z, y, x)`` order) is transposed by the plans'
``transpose_forward``, cropped to the bounding box of its non-zero voxels (holes filled), normalised
per channel (before resampling, so a non-zero mask still fits the image), then resampled to the
configuration's spacing (2D configurations keep the spacing between slices).

Examples:
    >>> data = np.zeros((1, 4, 5, 6), dtype=np.float32)
    >>> data[0, 1:3, 2:4, 1:5] = 1.0
    >>> nonzero_bbox(data)
    ((1, 3), (2, 4), (1, 5))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_fill_holes

from medseg.errors import InputError
from medseg.sources.nnunet.plans import Configuration
from medseg.sources.nnunet.resample import new_shape, resample_to_shape

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Preprocessed:
    """A case ready for the network, and what is needed to undo each step.

    Attributes:
        data: ``(C, *spatial)`` float32, transposed, cropped, normalised and resampled.
        spacing: The transposed original spacing.
        shape_before_crop: Spatial shape after the transpose, before cropping.
        bbox: The crop, half-open per axis.
        shape_after_crop: Spatial shape of the crop (before resampling).
        network_spacing: The spacing of ``data``.
    """

    data: np.ndarray
    spacing: tuple[float, ...]
    shape_before_crop: tuple[int, ...]
    bbox: Box
    shape_after_crop: tuple[int, ...]
    network_spacing: tuple[float, ...]


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels non-zero in any channel, holes filled (nnU-Net's ``create_nonzero_mask``)."""
    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    return np.asarray(binary_fill_holes(mask))


def nonzero_bbox(data: np.ndarray, mask: np.ndarray | None = None) -> Box:
    """The half-open bounding box of the non-zero mask (the whole grid when it is empty)."""
    mask = nonzero_mask(data) if mask is None else mask
    box = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return tuple(box)


def normalize_channel(
    image: np.ndarray,
    *,
    scheme: str,
    use_mask: bool,
    inside: np.ndarray,
    properties: Mapping[str, float],
) -> np.ndarray:
    """One channel normalised as nnU-Net's scheme of that name does (in place, float32).

    Args:
        image: The channel (float32; changed in place).
        scheme: The plans' scheme name.
        use_mask: z-score over the non-zero mask only.
        inside: The non-zero mask of the crop.
        properties: The channel's foreground intensity statistics (CT).

    Raises:
        InputError: RGB data outside 0-255.
    """
    eps = 1e-8
    if scheme == "ZScoreNormalization":
        if use_mask:
            mean, std = image[inside].mean(), image[inside].std()
            image[inside] = (image[inside] - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme == "CTNormalization":
        np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"], out=image)
        image -= properties["mean"]
        image /= max(properties["std"], eps)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            msg = f"RGB channels must hold values 0-255, got {image.min()}..{image.max()}"
            raise InputError(msg)
        image /= 255.0
    return image


def preprocess(
    data: np.ndarray,
    *,
    spacing: Sequence[float],
    config: Configuration,
    transpose_forward: Sequence[int],
    intensity_properties: Mapping[str, Mapping[str, float]],
) -> Preprocessed:
    """Preprocess one case as nnU-Net's ``DefaultPreprocessor`` does at inference.

    Args:
        data: ``(C, z, y, x)`` as SimpleITK reads it (any real dtype).
        spacing: Its spacing, in the same ``(z, y, x)`` order.
        config: The configuration.
        transpose_forward: The plans' axis order.
        intensity_properties: The plans' per-channel foreground statistics.

    Returns:
        The :class:`Preprocessed` case.
    """
    data = data.astype(np.float32)
    data = data.transpose([0, *[i + 1 for i in transpose_forward]])
    original = tuple(float(spacing[i]) for i in transpose_forward)
    before = tuple(int(s) for s in data.shape[1:])
    mask = nonzero_mask(data)
    bbox = nonzero_bbox(data, mask)
    crop = tuple(slice(a, b) for a, b in bbox)
    data = data[(slice(None), *crop)]
    inside = mask[crop]
    after = tuple(int(s) for s in data.shape[1:])
    target = config.spacing if len(config.spacing) == len(after) else (original[0], *config.spacing)
    shape = new_shape(after, original, target)
    for c in range(data.shape[0]):
        data[c] = normalize_channel(
            data[c],
            scheme=config.normalization_schemes[c],
            use_mask=config.use_mask_for_norm[c],
            inside=inside,
            properties=intensity_properties.get(str(c), {}),
        )
    _, kwargs = config.resampling_data
    data = resample_to_shape(
        data,
        shape,
        original,
        target,
        order=int(kwargs.get("order", 3)),
        order_z=int(kwargs.get("order_z", 0)),
        force_separate_z=kwargs.get("force_separate_z"),
    )
    return Preprocessed(
        data=np.ascontiguousarray(data, dtype=np.float32),
        spacing=original,
        shape_before_crop=before,
        bbox=bbox,
        shape_after_crop=after,
        network_spacing=tuple(float(t) for t in target),
    )
