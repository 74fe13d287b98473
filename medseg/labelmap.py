"""Label maps: the file each case's labels are written to, the integer type that holds them, Dice.

Examples:
    >>> LABEL_FILE
    'labels.nii.gz'
    >>> label_dtype(3), label_dtype(256), label_dtype(257), label_dtype(70000)
    (dtype('uint8'), dtype('uint8'), dtype('uint16'), dtype('int32'))
    >>> torch_label_dtype(3), torch_label_dtype(300)
    (torch.uint8, torch.int32)
    >>> dice(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 1)
    0.6666666666666666
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

LABEL_FILE = "labels.nii.gz"
"""The label map of a case inside its output folder (``OUT/<case_id>/labels.nii.gz``)."""


def label_dtype(num_labels: int) -> np.dtype:
    """The narrowest integer dtype that holds labels ``0 .. num_labels - 1``.

    ``uint8`` up to 256 labels, ``uint16`` up to 65536, ``int32`` beyond.

    Args:
        num_labels: How many label values there are (background included), i.e. the largest
            value plus one.

    Returns:
        The numpy dtype.
    """
    if num_labels <= 1 << 8:
        return np.dtype(np.uint8)
    if num_labels <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def torch_label_dtype(num_labels: int) -> torch.dtype:
    """The torch dtype of :func:`label_dtype` (``int32`` where it says ``uint16``: torch computes
    little on ``uint16``)."""
    import torch

    dtype = label_dtype(num_labels)
    return torch.uint8 if dtype == np.uint8 else torch.int32


def dice_from_counts(intersection: int, n_pred: int, n_ref: int, *, empty: float = 1.0) -> float:
    """Dice ``2 |P & R| / (|P| + |R|)`` from voxel counts; ``empty`` when both are empty.

    Examples:
        >>> dice_from_counts(3, 4, 4), dice_from_counts(0, 0, 0)
        (0.75, 1.0)
        >>> dice_from_counts(0, 0, 0, empty=float("nan"))
        nan
    """
    total = n_pred + n_ref
    return 2.0 * intersection / total if total else empty


def dice(pred: np.ndarray, truth: np.ndarray, label: int, *, empty: float = 1.0) -> float:
    """Dice of one label between two label maps of one shape; ``empty`` when it is absent from both.

    Both empty counts as a perfect match (1.0) by default, as MONAI's
    ``compute_dice(..., ignore_empty=False)``; pass ``empty=float("nan")`` to leave such cases out
    of a mean.
    """
    p, t = pred == label, truth == label
    return dice_from_counts(int(np.logical_and(p, t).sum()), int(p.sum()), int(t.sum()), empty=empty)
