"""Classic post-processing of label maps, per label, and choosing it on validation data (as nnU-Net).

Three operations, each doing exactly one thing to one label's mask:

* :func:`keep_largest_component`: only the largest connected component stays; the rest becomes
  background.
* :func:`remove_small_components`: components smaller than a volume in mm^3 become background.
* :func:`fill_holes`: background voxels enclosed by the label (not connected to the grid's border
  through background or other labels' voxels) get the label; other labels are never overwritten.

:func:`postprocess` applies a :class:`~medseg.config.refine.PostprocessConfig`;
:func:`choose_postprocessing` picks, per label, the operations that raise the mean Dice on validation
cases (greedily, each kept only if it improves), and returns a config that can be stored with the model.

Examples:
    >>> labels = np.zeros((7, 7), np.uint8)
    >>> labels[1:4, 1:4] = 1
    >>> labels[5, 5] = 1
    >>> labels[2, 2] = 0
    >>> cfg = PostprocessConfig(labels={1: LabelPostprocess(keep_largest=True, fill_holes=True)})
    >>> out = postprocess(labels, cfg)
    >>> int(out[5, 5]), int(out[2, 2])
    (0, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from medseg.config.refine import LabelPostprocess, PostprocessConfig
from medseg.errors import InputError
from medseg.labelmap import dice

_MIN_SIZE_FRACTIONS = (0.1, 0.25, 0.5)
"""Candidate island sizes, as fractions of the smallest true component of a label."""


def _structure(ndim: int, connectivity: str) -> np.ndarray:
    return ndi.generate_binary_structure(ndim, 1 if connectivity == "face" else ndim)


def _box(mask: np.ndarray, grow: int = 1) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` grown by ``grow`` voxels (clipped), or ``None`` if empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(0, int(hit[0]) - grow), min(mask.shape[axis], int(hit[-1]) + 1 + grow)))
    return tuple(box)


def _components(mask: np.ndarray, connectivity: str) -> tuple[np.ndarray, np.ndarray]:
    """Component ids (0 = outside) and the size of each component (index 0 unused)."""
    ids, n = ndi.label(mask, structure=_structure(mask.ndim, connectivity))
    return ids, np.bincount(ids.ravel(), minlength=n + 1)


def keep_largest_component(labels: np.ndarray, label: int, connectivity: str = "full") -> np.ndarray:
    """Keep only the largest connected component of ``label``; its other voxels become background.

    Args:
        labels: Integer label map (2D or 3D); not modified.
        label: The label to clean.
        connectivity: ``"face"`` or ``"full"``.

    Returns:
        A new label map. Ties between equally large components keep the first one found.
    """
    out = labels.copy()
    box = _box(labels == label, grow=0)
    if box is None:
        return out
    mask = labels[box] == label
    ids, sizes = _components(mask, connectivity)
    if sizes.size <= 2:
        return out
    sizes[0] = 0
    drop = mask & (ids != int(np.argmax(sizes)))
    out[box][drop] = 0
    return out


def remove_small_components(
    labels: np.ndarray,
    label: int,
    min_mm3: float,
    spacing: Sequence[float] | None = None,
    connectivity: str = "full",
) -> np.ndarray:
    """Turn the connected components of ``label`` smaller than ``min_mm3`` into background.

    Args:
        labels: Integer label map; not modified.
        label: The label to clean.
        min_mm3: Smallest volume kept, in mm^3 (mm^2 in 2D).
        spacing: Voxel spacing in mm (1 mm per axis when omitted).
        connectivity: ``"face"`` or ``"full"``.

    Returns:
        A new label map.
    """
    out = labels.copy()
    box = _box(labels == label, grow=0)
    if box is None:
        return out
    voxel = math.prod(spacing) if spacing is not None else 1.0
    mask = labels[box] == label
    ids, sizes = _components(mask, connectivity)
    small = sizes * voxel < min_mm3
    small[0] = False
    out[box][small[ids]] = 0
    return out


def fill_holes(labels: np.ndarray, label: int, connectivity: str = "full") -> np.ndarray:
    """Give ``label`` to the background voxels it encloses.

    A hole is a connected region of voxels outside the label's mask that does not touch the grid's
    border; within it only background (0) voxels are filled, so an enclosed region of another label
    (say a lesion inside an organ) stays as it is. Holes are connected through faces when
    ``connectivity`` is ``"full"`` (the complement of a full-connected object) and vice versa.

    Args:
        labels: Integer label map; not modified.
        label: The label whose holes to fill.
        connectivity: Connectivity of the label's components, ``"face"`` or ``"full"``.

    Returns:
        A new label map.
    """
    out = labels.copy()
    # The crop keeps a one-voxel margin of non-label voxels wherever it is inside the grid, and every
    # voxel outside the label's bounding box is connected to the grid's border, so holes in the crop
    # are exactly the holes in the whole grid.
    box = _box(labels == label, grow=1)
    if box is None:
        return out
    mask = labels[box] == label
    background = "face" if connectivity == "full" else "full"  # (26, 6) or (6, 26) digital topology
    holes = ndi.binary_fill_holes(mask, structure=_structure(mask.ndim, background))
    out[box][holes & ~mask & (labels[box] == 0)] = label
    return out


def apply_label_ops(
    labels: np.ndarray,
    label: int,
    ops: LabelPostprocess,
    spacing: Sequence[float] | None = None,
    connectivity: str = "full",
) -> np.ndarray:
    """Apply one label's operations in order: keep largest, remove small components, fill holes."""
    out = labels
    if ops.keep_largest:
        out = keep_largest_component(out, label, connectivity)
    if ops.min_component_mm3:
        out = remove_small_components(out, label, ops.min_component_mm3, spacing, connectivity)
    if ops.fill_holes:
        out = fill_holes(out, label, connectivity)
    return out if out is not labels else labels.copy()


def postprocess(
    labels: np.ndarray, cfg: PostprocessConfig, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Post-process a label map, label by label in ascending order.

    Args:
        labels: Integer label map (2D or 3D); not modified.
        cfg: The operations per label.
        spacing: Voxel spacing in mm (needed for ``min_component_mm3``; 1 mm when omitted).

    Returns:
        A new label map (a copy when nothing applies).

    Raises:
        InputError: If ``labels`` is not 2D or 3D or not integer, or ``spacing`` does not match it.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or not np.issubdtype(labels.dtype, np.integer):
        msg = f"labels must be a 2D or 3D integer array, got {labels.ndim}D {labels.dtype}"
        raise InputError(msg)
    if spacing is not None and len(spacing) != labels.ndim:
        msg = f"spacing must give {labels.ndim} values, got {tuple(spacing)}"
        raise InputError(msg)
    out = labels.copy()
    if not cfg.enabled:
        return out
    for label in sorted(cfg.labels):
        ops = cfg.labels[label]
        if not ops.is_identity:
            out = apply_label_ops(out, label, ops, spacing, cfg.connectivity)
    return out


def _mean_dice(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], label: int) -> float:
    """Mean Dice of one label over cases, leaving out those where it is absent from both."""
    scores = [dice(p, t, label, empty=math.nan) for p, t in zip(preds, truths)]
    scores = [s for s in scores if not math.isnan(s)]
    return float(np.mean(scores)) if scores else float("nan")


def _smallest_true_component(
    truths: Sequence[np.ndarray], label: int, voxel: float, connectivity: str
) -> float:
    smallest = math.inf
    for t in truths:
        mask = t == label
        if mask.any():
            _, sizes = _components(mask, connectivity)
            smallest = min(smallest, float(sizes[1:].min()) * voxel)
    return smallest


def choose_postprocessing(
    preds: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    labels: Sequence[int],
    spacing: Sequence[float] | None = None,
    connectivity: Literal["face", "full"] = "full",
    min_gain: float = 0.0,
) -> PostprocessConfig:
    """Choose per-label post-processing on validation cases, keeping only what improves the Dice.

    For each label, greedily: try keeping the largest component, then removing islands smaller than a
    fraction (10%, 25% or 50%) of the label's smallest true component, then filling holes; each step is
    kept only if it raises the label's mean Dice over the cases (those where the label is absent from
    both prediction and truth do not count) by more than ``min_gain``, the next step being tried on
    top of the steps kept. Operations on one label only change that label's and background voxels, so
    labels are chosen independently, as nnU-Net does.

    Args:
        preds: Predicted label maps of the validation cases.
        truths: Their ground truth, same shapes.
        labels: The foreground labels to consider.
        spacing: Voxel spacing in mm shared by the cases (1 mm when omitted).
        connectivity: ``"face"`` or ``"full"``.
        min_gain: Smallest mean Dice improvement for a step to be kept.

    Returns:
        The chosen config (serialisable, to store with the model).

    Raises:
        InputError: If the lists differ in length, are empty, or a pair differs in shape.
    """
    if not preds or len(preds) != len(truths):
        msg = (
            f"preds and truths must be non-empty lists of the same length, got {len(preds)} and {len(truths)}"
        )
        raise InputError(msg)
    for i, (p, t) in enumerate(zip(preds, truths)):
        if np.shape(p) != np.shape(t):
            msg = f"case {i}: prediction and truth must have the same shape, got {np.shape(p)}, {np.shape(t)}"
            raise InputError(msg)
    voxel = math.prod(spacing) if spacing is not None else 1.0
    preds = [np.asarray(p) for p in preds]
    truths = [np.asarray(t) for t in truths]
    chosen: dict[int, LabelPostprocess] = {}
    for label in sorted(int(lbl) for lbl in labels):
        if label <= 0:
            continue
        current = LabelPostprocess()
        score = _mean_dice(preds, truths, label)
        if math.isnan(score):
            continue
        smallest = _smallest_true_component(truths, label, voxel, connectivity)
        steps: list[list[dict[str, object]]] = [[{"keep_largest": True}]]
        if math.isfinite(smallest):
            steps.append([{"min_component_mm3": f * smallest} for f in _MIN_SIZE_FRACTIONS])
        steps.append([{"fill_holes": True}])
        for options in steps:
            best, best_score = None, score
            for update in options:
                trial = current.model_copy(update=update)
                outs = [apply_label_ops(p, label, trial, spacing, connectivity) for p in preds]
                trial_score = _mean_dice(outs, truths, label)
                if trial_score > best_score + min_gain:
                    best, best_score = trial, trial_score
            if best is not None:
                current, score = best, best_score
        if not current.is_identity:
            chosen[label] = current
    return PostprocessConfig(connectivity=connectivity, labels=chosen)
