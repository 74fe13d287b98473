"""Choose the post-processing on validation cases at the end of training, nnU-Net style.

The best model predicts every validation volume (on the preprocessed grid, refined by the CRF when
the pipeline enables it); :func:`~medseg.refine.choose_postprocessing` keeps, per label, only the
operations that raise that label's mean Dice; the choice is stored in the bundle's pipeline config,
so every later prediction with the bundle applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medseg.config.pipeline import PipelineConfig
from medseg.preprocess import spacing_from_affine
from medseg.refine import PostprocessConfig, choose_postprocessing, dense_crf, postprocess
from medseg.tiling import sliding_window_probabilities
from medseg.training.metrics import dice_per_label


@dataclass(frozen=True)
class PostprocessChoice:
    """The chosen post-processing and what it did on the validation cases.

    Attributes:
        config: The chosen per-label operations (to store with the model).
        dice_before: Mean foreground Dice per label before post-processing (after the CRF if on).
        dice_after: The same after the chosen post-processing.
    """

    config: PostprocessConfig
    dice_before: dict[int, float]
    dice_after: dict[int, float]

    def metrics(self, label_names: dict[int, str]) -> dict[str, float]:
        """MLflow metrics: ``val_dice_refined_<label>`` and the means before and after."""
        out = {f"val_dice_refined_{label_names[v]}": d for v, d in self.dice_after.items()}
        if self.dice_before:
            out["val_dice_mean_before_post"] = float(np.mean(list(self.dice_before.values())))
            out["val_dice_mean_refined"] = float(np.mean(list(self.dice_after.values())))
        return out


def _mean_dice(preds: list[np.ndarray], truths: list[np.ndarray], labels: list[int]) -> dict[int, float]:
    scores: dict[int, list[float]] = {v: [] for v in labels}
    for p, t in zip(preds, truths):
        for v, d in dice_per_label(p, t, labels).items():
            scores[v].append(d)
    return {v: float(np.mean(s)) for v, s in scores.items() if s}


def choose_on_validation(
    network: torch.nn.Module, volumes: list[dict[str, Any]], cfg: PipelineConfig, labels: list[int]
) -> PostprocessChoice:
    """Predict the validation volumes with ``network`` and choose the post-processing on them.

    Args:
        network: The best model (left in ``eval()`` mode).
        volumes: Preprocessed validation samples (``image``, ``label`` MetaTensors).
        cfg: The pipeline (inference window, CRF settings, post-processing connectivity).
        labels: The foreground label values.

    Returns:
        The :class:`PostprocessChoice`; its config keeps ``enabled`` and ``choose`` from ``cfg``.
    """
    network.eval()
    preds, truths = [], []
    spacing: tuple[float, ...] | None = None
    for item in volumes:
        image = item["image"]
        probs = sliding_window_probabilities(
            network,
            image,
            cfg.window,
            overlap=cfg.inference.overlap,
            batch_size=cfg.inference.batch_size,
            blend=cfg.inference.blend,
        )
        item_spacing = spacing_from_affine(np.asarray(image.affine))
        spacing = spacing or item_spacing
        if cfg.refine.crf.enabled:
            probs = dense_crf(probs, image.as_tensor(), item_spacing, cfg.refine.crf)
        preds.append(probs.argmax(0).numpy().astype(np.uint8))
        truths.append(np.asarray(item["label"][0]).astype(np.uint8))
    post = cfg.refine.postprocess
    chosen = choose_postprocessing(preds, truths, labels, spacing, post.connectivity)
    chosen = chosen.model_copy(update={"enabled": post.enabled, "choose": post.choose})
    after = [postprocess(p, chosen, spacing) for p in preds] if chosen.labels else preds
    return PostprocessChoice(chosen, _mean_dice(preds, truths, labels), _mean_dice(after, truths, labels))
