"""The earlier entry point, kept for callers that want probabilities of a whole volume."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.tiling.engine import infer
from medseg.tiling.settings import TilingSettings
from medseg.tiling.weights import Blend


def sliding_window_probabilities(
    network: nn.Module,
    image: torch.Tensor,
    window: Sequence[int],
    *,
    overlap: float = 0.25,
    batch_size: int = 4,
    blend: Blend = "gaussian",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Class probabilities for a whole ``(C, X, Y, Z)`` volume, through :func:`~medseg.tiling.infer`.

    Args:
        network: The segmentation network (logits out); its size divisors are honoured (the window is
            rounded up to a size it accepts).
        image: The preprocessed image, channel first, no batch dimension.
        window: Requested window size.
        overlap: Overlap fraction between windows.
        batch_size: Windows per forward pass.
        blend: ``"gaussian"`` or ``"constant"`` weighting.
        device: Where the network runs (default: where its parameters are); the result is on the CPU.

    Returns:
        ``(K, X, Y, Z)`` softmax probabilities, float32, on the CPU, same spatial size as the image.
    """
    settings = TilingSettings(
        patch_size=tuple(window), overlap=overlap, batch_size=batch_size, blend=blend, memory="full"
    )
    result = infer(network, image, settings, output="probabilities", device=device)
    assert result.probabilities is not None
    return result.probabilities
