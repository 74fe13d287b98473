"""A simple intensity-threshold baseline: what a model has to beat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ThresholdBaseline:
    """Classify each voxel by the nearest class mean of the lightly smoothed intensity.

    Attributes:
        labels: Label values, ordered by their mean intensity.
        means: Mean smoothed intensity of each label in the training data.
        sigma: Gaussian smoothing (voxels) applied before thresholding.
    """

    labels: tuple[int, ...]
    means: tuple[float, ...]
    sigma: float = 1.0

    @classmethod
    def fit(
        cls, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], sigma: float = 1.0
    ) -> ThresholdBaseline:
        """Learn the class means from training images and label maps.

        Args:
            images: Training images (3D).
            labels: Their label maps.
            sigma: Smoothing in voxels.

        Returns:
            The fitted baseline.
        """
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        for img, lab in zip(images, labels):
            smooth = ndimage.gaussian_filter(np.asarray(img, dtype=np.float32), sigma)
            lab = np.asarray(lab)
            for v in np.unique(lab):
                mask = lab == v
                sums[int(v)] = sums.get(int(v), 0.0) + float(smooth[mask].sum())
                counts[int(v)] = counts.get(int(v), 0) + int(mask.sum())
        order = sorted(sums, key=lambda v: sums[v] / counts[v])
        return cls(tuple(order), tuple(sums[v] / counts[v] for v in order), sigma)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label map of an image: thresholds halfway between neighbouring class means."""
        smooth = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), self.sigma)
        cuts = [(a + b) / 2 for a, b in zip(self.means[:-1], self.means[1:])]
        index = np.digitize(smooth, cuts)
        return np.asarray(self.labels, dtype=np.uint8)[index]
