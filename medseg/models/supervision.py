"""Deep supervision: a loss over a network's full- and lower-resolution outputs (nnU-Net's scheme).

A U-Net with ``deep_supervision: true`` returns, in ``train()`` mode, a tuple of logits at strides
1, 2, 4, ...; :func:`deep_supervision_loss` compares each with the label map resized (nearest) to
its size, weighted ``1, 1/2, 1/4, ...`` with the lowest resolution left out and the weights summing
to 1, as nnU-Net does. A plain tensor is passed to the loss unchanged, so a training loop can call it
for every model.

Examples:
    >>> import torch
    >>> from monai.losses import DiceCELoss
    >>> loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    >>> target = torch.randint(0, 3, (2, 1, 16, 16, 8))
    >>> outputs = (torch.randn(2, 3, 16, 16, 8), torch.randn(2, 3, 8, 8, 4), torch.randn(2, 3, 4, 4, 2))
    >>> deep_supervision_loss(loss_fn, outputs, target).ndim
    0
    >>> deep_supervision_weights(3)
    (0.6666666666666666, 0.3333333333333333, 0.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from medseg.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def deep_supervision_weights(n: int) -> tuple[float, ...]:
    """nnU-Net's weights for ``n`` outputs (full resolution first): ``2 ** -i``, the last one 0 when
    there are more than one, normalised to sum to 1.

    Raises:
        ConfigError: If ``n < 1``.
    """
    if n < 1:
        msg = f"number of outputs must be >= 1, got {n}"
        raise ConfigError(msg)
    weights = [0.5**i for i in range(n)]
    if n > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return tuple(w / total for w in weights)


def downsample_labels(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a ``(B, 1, *S)`` label map to ``size`` by nearest neighbour (labels stay labels)."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=tuple(size), mode="nearest").to(target.dtype)


def deep_supervision_loss(
    loss_fn: LossFn,
    outputs: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted sum of ``loss_fn`` over deep-supervision outputs, each against the resized target.

    Args:
        loss_fn: ``loss_fn(logits, target)``, e.g. MONAI's ``DiceCELoss(to_onehot_y=True, ...)``.
        outputs: A logits tensor, or a sequence of them, full resolution first.
        target: ``(B, 1, *S)`` label map at full resolution.
        weights: One weight per output (default :func:`deep_supervision_weights`).

    Returns:
        The scalar loss.

    Raises:
        ConfigError: If the number of weights differs from the number of outputs.
    """
    if isinstance(outputs, torch.Tensor):
        return loss_fn(outputs, target)
    weights = deep_supervision_weights(len(outputs)) if weights is None else tuple(weights)
    if len(weights) != len(outputs):
        msg = f"weights must have one entry per output ({len(outputs)}), got {len(weights)}"
        raise ConfigError(msg)
    total = outputs[0].new_zeros(())
    for w, out in zip(weights, outputs):
        if w:
            total = total + w * loss_fn(out, downsample_labels(target, out.shape[2:]))
    return total
