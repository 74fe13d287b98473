"""Segmentation metrics per label: Dice, HD95, surface Dice (NSD) and volume differences, in millimetres.

Surfaces and distances follow MONAI's ``compute_hausdorff_distance`` and ``compute_surface_dice``
(``use_subvoxels=False``): a mask's surface is its voxels with a 6-connected neighbour outside the mask
(or outside the volume), and distances run between surface voxel centres, scaled by the voxel
spacing, in both directions. They are computed with exact Euclidean distance transforms
(``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``) over the bounding box of the two
masks only.

Empty masks (the policy, and MONAI's results where they differ):

=====================  ====  ===============  ==================
reference, prediction  Dice  HD95             surface Dice
=====================  ====  ===============  ==================
both empty             1     undefined (NaN)  1 (MONAI: NaN)
only one empty         0     undefined (NaN)  0
=====================  ====  ===============  ==================

* Dice is MONAI's ``compute_dice(..., ignore_empty=False)``; MONAI's default (``ignore_empty=True``)
  gives NaN whenever the reference is empty.
* HD95 is undefined without two surfaces. MONAI gives NaN for HD95 there too, but only because its
  quantile of infinite distances is NaN; its maximum Hausdorff distance is inf.
* An undefined value is never reported as 0 or inf: summaries leave it out of the mean and count it.
* Volume difference is ``prediction - reference`` in mL; the relative one divides by the reference
  volume, is 0 when both are empty and undefined when only the reference is empty.

Spacing is the length of each voxel axis (the column norms of the affine); on a sheared grid
(gantry tilt) distances along oblique directions are approximate, while volumes use the exact voxel
volume ``|det(affine[:3, :3])|``.

Examples:
    >>> ref = np.zeros((8, 8, 8), dtype=np.uint8); ref[2:6, 2:6, 2:6] = 1
    >>> pred = np.zeros_like(ref); pred[2:6, 2:6, 3:7] = 1
    >>> s = score_labels(pred, ref, {"organ": 1}, spacing=(1.0, 1.0, 2.0))[0]
    >>> round(s.dice, 3), s.hd95, round(s.vol_diff_ml, 3)
    (0.75, 2.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from medseg.errors import InputError
from medseg.geometry import spacing_from_affine as spacing_from_affine  # re-exported
from medseg.geometry import voxel_volume_ml as voxel_volume_ml  # re-exported
from medseg.labelmap import dice_from_counts, label_dtype

DEFAULT_TOLERANCE_MM = 1.0
HD_PERCENTILE = 95.0
NOTE_BOTH_EMPTY = "both empty"
NOTE_REF_EMPTY = "reference empty"
NOTE_PRED_EMPTY = "prediction empty"


@dataclass(frozen=True)
class LabelScores:
    """The scores of one label in one case.

    Attributes:
        label: The label's name.
        value: Its value in the label maps.
        dice: Dice coefficient in [0, 1].
        hd95: 95th-percentile symmetric Hausdorff distance in mm; NaN when undefined.
        surface_dice: Fraction of both surfaces within the tolerance of the other, in [0, 1].
        ref_ml: Reference volume in mL.
        pred_ml: Predicted volume in mL.
        vol_diff_ml: ``pred_ml - ref_ml``.
        vol_diff_rel: ``vol_diff_ml / ref_ml``; 0 when both are empty, NaN when only the reference is.
        ref_voxels: Reference voxel count.
        pred_voxels: Predicted voxel count.
        note: ``""``, ``"both empty"``, ``"reference empty"`` or ``"prediction empty"``.
    """

    label: str
    value: int
    dice: float
    hd95: float
    surface_dice: float
    ref_ml: float
    pred_ml: float
    vol_diff_ml: float
    vol_diff_rel: float
    ref_voxels: int
    pred_voxels: int
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        """The fields as a plain dict (NaN kept)."""
        return asdict(self)


def surface(mask: np.ndarray) -> np.ndarray:
    """The surface voxels of a boolean mask: those with a face neighbour outside it (or off the grid).

    Examples:
        >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
        >>> int(surface(m).sum())
        8
    """
    mask = np.asarray(mask, dtype=bool)
    inner: np.ndarray = ndimage.binary_erosion(mask, border_value=0)
    edge: np.ndarray = mask & ~inner
    return edge


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each predicted surface voxel to the reference surface, and back.

    Only the bounding box of the two masks is transformed: every surface voxel lies inside it, so the
    distances are the same as over the whole grid.

    Args:
        pred: Boolean predicted mask.
        ref: Boolean reference mask of the same shape; both must be non-empty.
        spacing: Voxel size along each axis in mm.

    Returns:
        ``(pred_to_ref, ref_to_pred)``, one distance per surface voxel of ``pred`` and of ``ref``.

    Raises:
        InputError: If a mask is empty, the shapes differ or the spacing does not fit.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    _check_pair(pred, ref, spacing)
    if not pred.any() or not ref.any():
        msg = "surface distances need non-empty masks, got an empty prediction or reference"
        raise InputError(msg)
    box = _bounding_box(pred | ref)
    pred_s, ref_s = surface(pred[box]), surface(ref[box])
    sampling = [float(s) for s in spacing]
    to_ref = ndimage.distance_transform_edt(~ref_s, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_s, sampling=sampling)
    return to_ref[pred_s], to_pred[ref_s]


def hausdorff_percentile(
    pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, percentile: float = HD_PERCENTILE
) -> float:
    """Symmetric percentile Hausdorff distance: the larger of the two directed percentiles.

    Percentiles interpolate linearly, as ``torch.quantile`` does in MONAI.
    """
    if len(pred_to_ref) == 0 or len(ref_to_pred) == 0:
        return math.nan
    return float(max(np.percentile(pred_to_ref, percentile), np.percentile(ref_to_pred, percentile)))


def surface_dice_from_distances(
    pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, tolerance_mm: float
) -> float:
    """Normalised surface distance: surface voxels of both within ``tolerance_mm`` of the other, over all."""
    total = len(pred_to_ref) + len(ref_to_pred)
    if total == 0:
        return math.nan
    good = int(np.count_nonzero(pred_to_ref <= tolerance_mm)) + int(
        np.count_nonzero(ref_to_pred <= tolerance_mm)
    )
    return good / total


def score_labels(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Mapping[str, int],
    spacing: Sequence[float],
    voxel_ml: float | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    percentile: float = HD_PERCENTILE,
) -> list[LabelScores]:
    """Score every label of a predicted label map against a reference label map on the same grid.

    Args:
        pred: Predicted integer label map (2D or 3D).
        ref: Reference label map of the same shape.
        labels: Label name to value, usually the foreground labels.
        spacing: Voxel size along each axis in mm.
        voxel_ml: Volume of one voxel in mL; default the product of ``spacing`` / 1000.
        tolerance_mm: Surface Dice tolerance in mm.
        percentile: Hausdorff percentile (95 for HD95).

    Returns:
        One :class:`LabelScores` per label, in the order of ``labels``.

    Raises:
        InputError: If shapes differ, the spacing does not fit, or the tolerance or percentile is invalid.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    _check_pair(pred, ref, spacing)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        msg = f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}"
        raise InputError(msg)
    if not 0 <= percentile <= 100:
        msg = f"percentile must be in [0, 100], got {percentile}"
        raise InputError(msg)
    if voxel_ml is None:
        voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    values = [int(v) for v in labels.values()]
    if any(v <= 0 for v in values):
        msg = f"labels to score must have values > 0, got {dict(labels)}"
        raise InputError(msg)
    top = max(values, default=0)
    # Values outside the scored ones collapse to 0 or ``top + 1``, in the narrowest dtype that holds them.
    dtype = label_dtype(top + 2)
    pred_i = np.clip(pred, 0, top + 1).astype(dtype, copy=False)
    ref_i = np.clip(ref, 0, top + 1).astype(dtype, copy=False)
    n = top + 2
    pred_count = _bincount(pred_i, n)
    ref_count = _bincount(ref_i, n)
    inter = _bincount(np.where(ref_i == pred_i, ref_i, 0), n)
    # Per-label bounding boxes in one pass each (values above ``top`` fall into an ignored bin).
    pred_boxes = ndimage.find_objects(pred_i, max_label=top)
    ref_boxes = ndimage.find_objects(ref_i, max_label=top)
    out = []
    for name, value in labels.items():
        v = int(value)
        n_pred, n_ref = int(pred_count[v]), int(ref_count[v])
        ref_ml, pred_ml = n_ref * voxel_ml, n_pred * voxel_ml
        diff_ml = pred_ml - ref_ml
        if n_pred == 0 and n_ref == 0:
            dice, hd, nsd, rel, note = 1.0, math.nan, 1.0, 0.0, NOTE_BOTH_EMPTY
        elif n_pred == 0 or n_ref == 0:
            note = NOTE_REF_EMPTY if n_ref == 0 else NOTE_PRED_EMPTY
            rel = math.nan if n_ref == 0 else diff_ml / ref_ml
            dice, hd, nsd = 0.0, math.nan, 0.0
        else:
            box = _union_box(pred_boxes[v - 1], ref_boxes[v - 1])
            d_pr, d_rp = surface_distances(pred_i[box] == v, ref_i[box] == v, spacing)
            dice = dice_from_counts(int(inter[v]), n_pred, n_ref)
            hd = hausdorff_percentile(d_pr, d_rp, percentile)
            nsd = surface_dice_from_distances(d_pr, d_rp, tolerance_mm)
            rel, note = diff_ml / ref_ml, ""
        out.append(
            LabelScores(str(name), v, dice, hd, nsd, ref_ml, pred_ml, diff_ml, rel, n_ref, n_pred, note)
        )
    return out


def _check_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> None:
    if pred.shape != ref.shape:
        msg = f"prediction and reference must have one shape, got {pred.shape} and {ref.shape}"
        raise InputError(msg)
    if len(spacing) != pred.ndim:
        msg = f"spacing must give one value per axis ({pred.ndim}), got {tuple(spacing)}"
        raise InputError(msg)
    if not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing):
        msg = f"spacing must be finite and > 0, got {tuple(spacing)}"
        raise InputError(msg)


def _bincount(labels: np.ndarray, n: int, chunk: int = 1 << 24) -> np.ndarray:
    """``np.bincount`` over a flattened label map, in chunks (it would copy the whole map as int64)."""
    flat = labels.reshape(-1)
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start : start + chunk], minlength=n)[:n]
    return counts


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    found = ndimage.find_objects(mask.astype(np.int8))
    return found[0] if found and found[0] is not None else tuple(slice(0, 0) for _ in mask.shape)


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...]:
    boxes = [x for x in (a, b) if x is not None]
    return tuple(
        slice(min(s.start for s in axis), max(s.stop for s in axis)) for axis in zip(*boxes, strict=True)
    )
