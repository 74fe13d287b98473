"""Overlap metrics on label maps."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from medseg.labelmap import dice


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice coefficient per label.

    Both empty counts as a perfect match (1.0), by convention.

    Args:
        pred: Predicted label map.
        truth: Reference label map of the same shape.
        labels: Label values to score (usually the foreground ones).

    Returns:
        Map from label value to Dice.

    Examples:
        >>> a = np.array([0, 1, 1, 2]); b = np.array([0, 1, 2, 2])
        >>> dice_per_label(a, b, [1, 2])
        {1: 0.6666666666666666, 2: 0.6666666666666666}
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        msg = f"prediction and reference must have one shape, got {pred.shape} and {truth.shape}"
        raise ValueError(msg)
    out: dict[int, float] = {}
    for v in labels:
        out[int(v)] = dice(pred, truth, int(v))
    return out
