"""nnU-Net's ``postprocessing.pkl``, read without unpickling code, and applied to label maps.

``nnUNetv2_find_best_configuration`` pickles ``(functions, kwargs)``: a list of nnU-Net functions
and their keyword arguments. The only function it writes is
``remove_all_but_largest_component_from_segmentation``; the file is read with an unpickler that
maps that one name to medseg's own implementation and refuses every other global.

Examples:
    >>> seg = np.zeros((6, 1, 1), dtype=np.uint8)
    >>> seg[[0, 1, 4], 0, 0] = 1
    >>> keep_largest_component(seg, labels_or_regions=1)[:, 0, 0].tolist()
    [1, 1, 0, 0, 0, 0]
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import ConfigError

_KEEP_LARGEST = (
    "nnunetv2.postprocessing.remove_connected_components",
    "remove_all_but_largest_component_from_segmentation",
)


def _mask(segmentation: np.ndarray, label_or_region: int | Sequence[int]) -> np.ndarray:
    if isinstance(label_or_region, (list, tuple)):
        return np.isin(segmentation, list(label_or_region))
    return np.asarray(segmentation == label_or_region)


def keep_largest_component(
    segmentation: np.ndarray,
    *,
    labels_or_regions: int | Sequence[int] | list[int | Sequence[int]],
    background_label: int = 0,
) -> np.ndarray:
    """Keep the largest connected component (full connectivity; ties all kept) of the union of labels.

    Args:
        segmentation: The label map (not modified).
        labels_or_regions: A label, a region (tuple of labels), or a list of them (one union).
        background_label: What removed voxels become.

    Returns:
        A new label map.
    """
    items = labels_or_regions if isinstance(labels_or_regions, list) else [labels_or_regions]
    mask = np.zeros(segmentation.shape, dtype=bool)
    for item in items:
        mask |= _mask(segmentation, item)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, n = ndimage.label(mask, structure=structure)
    out = np.copy(segmentation)
    if n == 0:
        return out
    sizes = np.bincount(labelled.ravel())[1:]
    keep = np.flatnonzero(sizes == sizes.max()) + 1
    out[mask & ~np.isin(labelled, keep)] = background_label
    return out


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _KEEP_LARGEST:
            return keep_largest_component
        msg = f"postprocessing.pkl may name only {'.'.join(_KEEP_LARGEST)}, got {module}.{name}"
        raise pickle.UnpicklingError(msg)


@dataclass(frozen=True)
class Postprocessing:
    """The steps of a ``postprocessing.pkl``: keyword arguments of each largest-component step."""

    steps: tuple[dict[str, Any], ...]

    def apply(self, segmentation: np.ndarray) -> np.ndarray:
        """Apply every step in order."""
        for kwargs in self.steps:
            segmentation = keep_largest_component(segmentation, **kwargs)
        return segmentation

    def describe(self) -> str:
        """One line for tracking."""
        return "; ".join(f"keep largest {s['labels_or_regions']}" for s in self.steps) or "none"


def read_postprocessing(path: Path) -> Postprocessing:
    """Read ``postprocessing.pkl`` with the restricted unpickler.

    Raises:
        ConfigError: A missing file, a global outside the allow-list, or an unexpected layout.
    """
    if not path.is_file():
        msg = f"{path} must exist to apply nnU-Net's post-processing, got a missing file"
        raise ConfigError(msg)
    try:
        fns, kwargs = _Unpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as exc:
        msg = f"{path} must be nnU-Net's (functions, kwargs) post-processing, got: {exc}"
        raise ConfigError(msg) from exc
    if len(fns) != len(kwargs) or any(f is not keep_largest_component for f in fns):
        msg = (
            f"{path} must pair each largest-component step with its arguments, "
            f"got {len(fns)} functions and {len(kwargs)} argument sets"
        )
        raise ConfigError(msg)
    steps = []
    for item in kwargs:
        if not isinstance(item, dict) or "labels_or_regions" not in item:
            msg = f"{path}: each step's arguments must name 'labels_or_regions', got {item!r}"
            raise ConfigError(msg)
        steps.append(dict(item))
    return Postprocessing(tuple(steps))
