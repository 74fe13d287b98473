"""Sliding-window inference over a whole volume (MONAI's inferer, with sizes the network accepts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.models.registry import check_input_size


def sliding_window_probabilities(
    network: nn.Module,
    image: torch.Tensor,
    window: Sequence[int],
    *,
    overlap: float = 0.25,
    batch_size: int = 4,
    blend: str = "gaussian",
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Class probabilities for a whole ``(C, X, Y, Z)`` volume.

    Args:
        network: The segmentation network (logits out); its ``size_divisor`` is honoured.
        image: The preprocessed image, channel first, no batch dimension.
        window: Window size; every entry must be divisible by the network's size divisor.
        overlap: Overlap fraction between windows.
        batch_size: Windows per forward pass.
        blend: ``"gaussian"`` or ``"constant"`` weighting.
        device: Where the network runs; the result is on the CPU.

    Returns:
        ``(K, X, Y, Z)`` softmax probabilities, float32, on the CPU, same spatial size as the image.
    """
    check_input_size(window, int(getattr(network, "size_divisor", 1)))
    x = torch.as_tensor(image, dtype=torch.float32)[None]
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi_size=tuple(window),
            sw_batch_size=batch_size,
            predictor=network,
            overlap=overlap,
            mode=blend,
            sw_device=device,
            device="cpu",
        )
        logits = torch.as_tensor(logits)
        return torch.softmax(logits[0].float(), dim=0)
