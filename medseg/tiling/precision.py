"""Inference precision: which type the network's forward pass computes in, and the context that does it.

A pipeline's ``inference.precision`` (or ``--precision``) is one of :data:`PRECISIONS`. ``auto``
means the fastest type the device computes natively: bfloat16 on a CPU with AVX512-BF16 or AMX
(oneDNN's bfloat16 convolutions there), float16 on CUDA (bfloat16 where asked for), float32
elsewhere (emulated half precision would be slower). A bundle whose agreement check failed
(:mod:`medseg.training.precision_guard`) keeps float32 under ``auto``.

Only the network's forward pass runs under autocast; each window's answer is cast to float32
before it reaches the merger, so blending, probabilities and the argmax are float32 whatever the
precision.

Examples:
    >>> from medseg.hardware import CpuCapabilities
    >>> bf16_cpu = CpuCapabilities(model="test", flags=frozenset({"avx512_bf16"}))
    >>> plain_cpu = CpuCapabilities(model="test", flags=frozenset({"avx2"}))
    >>> resolve_precision("auto", device="cpu", cpu=bf16_cpu).dtype
    'bfloat16'
    >>> resolve_precision("auto", device="cpu", cpu=plain_cpu).dtype
    'float32'
    >>> resolve_precision("auto", device="cuda", cpu=plain_cpu).dtype
    'float16'
    >>> choice = resolve_precision("auto", device="cpu", cpu=bf16_cpu, guard_passed=False)
    >>> choice.dtype, choice.reason
    ('float32', 'the bundle failed its precision check')
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from medseg.config.pipeline import Precision
from medseg.errors import ConfigError, choice_error
from medseg.hardware import CpuCapabilities, cpu_capabilities

PRECISIONS: tuple[str, ...] = get_args(Precision)
"""The names ``inference.precision`` accepts (the config's schema is their one definition)."""
ComputeType = Literal["float32", "bfloat16", "float16"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The type a forward pass computes in, and why.

    Attributes:
        requested: What the settings asked for (one of :data:`PRECISIONS`).
        dtype: What runs: ``float32``, ``bfloat16`` or ``float16``.
        reason: Why (for provenance and the one log line of a fallback).
    """

    requested: str
    dtype: ComputeType
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """:attr:`dtype` as a ``torch.dtype``."""
        return TORCH_DTYPES[self.dtype]

    @property
    def reduced(self) -> bool:
        """Whether the forward pass runs in less than float32."""
        return self.dtype != "float32"


def check_precision(value: str) -> Precision:
    """``value`` if it is one of :data:`PRECISIONS`.

    Raises:
        ConfigError: Naming the choices (and the nearest one).
    """
    if value not in PRECISIONS:
        raise ConfigError(choice_error("precision", value, PRECISIONS))
    return value  # type: ignore[return-value]


def resolve_precision(
    requested: str,
    *,
    device: torch.device | str,
    cpu: CpuCapabilities | None = None,
    guard_passed: bool | None = None,
) -> PrecisionChoice:
    """The type a forward pass computes in on ``device``.

    Args:
        requested: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        device: Where the network runs.
        cpu: The processor's capabilities (default: this machine's,
            :func:`~medseg.hardware.cpu_capabilities`); pass another to decide for it.
        guard_passed: The bundle's precision check (``None``: not checked). ``False`` keeps
            ``auto`` at float32.

    Returns:
        The choice. An explicit type is honoured as asked (on any device).

    Raises:
        ConfigError: For an unknown precision.
    """
    check_precision(requested)
    if requested != "auto":
        return PrecisionChoice(requested, requested, "asked for")  # type: ignore[arg-type]
    kind = torch.device(device).type
    if guard_passed is False:
        return PrecisionChoice(requested, "float32", "the bundle failed its precision check")
    if kind == "cuda":
        return PrecisionChoice(requested, "float16", "CUDA computes float16 natively")
    if kind == "cpu":
        caps = cpu if cpu is not None else cpu_capabilities()
        if caps.native_bf16:
            flag = "amx_bf16" if caps.amx_bf16 else "avx512_bf16"
            return PrecisionChoice(requested, "bfloat16", f"the CPU computes bfloat16 natively ({flag})")
        return PrecisionChoice(requested, "float32", "the CPU has no native bfloat16")
    return PrecisionChoice(requested, "float32", f"no reduced precision on {kind}")


def forward_context(dtype: str, device: torch.device | str) -> contextlib.AbstractContextManager[object]:
    """The context a forward pass in ``dtype`` runs in: autocast for a reduced type, else nothing.

    Args:
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: Where the network runs.

    Examples:
        >>> net = torch.nn.Conv3d(1, 2, 3)
        >>> with forward_context("bfloat16", "cpu"):
        ...     y = net(torch.randn(1, 1, 5, 5, 5))
        >>> y.dtype
        torch.bfloat16
    """
    if dtype == "float32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=TORCH_DTYPES[dtype])
