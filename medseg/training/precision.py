"""Mixed precision for training: which half-precision type, if any, the network's forward pass uses.

On CUDA, autocast to float16 (with gradient scaling), as nnU-Net and MONAI do. On a CPU, bfloat16 only
where the CPU computes it natively (AVX512-BF16 or AMX): oneDNN's bfloat16 convolutions there are
faster than float32 (measured in ``docs/benchmarks.md``), while elsewhere they would be emulated and
slower. Weights, optimiser state and the loss stay float32.
"""

from __future__ import annotations

from typing import Any

import torch

from medseg.hardware import cpu_capabilities


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    return cpu_capabilities().native_bf16


def autocast_dtype(device: torch.device | str, enabled: bool) -> torch.dtype | None:
    """The type the forward pass is autocast to during training, or ``None`` for float32.

    Args:
        device: Where the network trains.
        enabled: The pipeline's ``train.mixed_precision``.

    Returns:
        ``torch.float16`` on CUDA, ``torch.bfloat16`` on a CPU with native bfloat16, else ``None``.
    """
    kind = torch.device(device).type
    if not enabled:
        return None
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def as_float32(output: Any) -> Any:
    """Network output (a tensor, or a list of deep-supervision heads) as float32 for the loss."""
    if isinstance(output, (list, tuple)):
        return type(output)(o.float() for o in output)
    return output.float()
