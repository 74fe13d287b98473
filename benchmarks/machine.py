"""The machine a benchmark ran on, for every benchmark's JSON: CPU model and flags, threads, torch.

Targets are judged per class of CPU (AMX, AVX512-BF16 only, neither), so each result says which
class it was measured on.

Examples:
    >>> facts = machine_facts()
    >>> sorted(k for k in facts if k in ("avx512_bf16", "amx_bf16", "cpu_model"))
    ['amx_bf16', 'avx512_bf16', 'cpu_model']
"""

from __future__ import annotations

import os

import torch

from medseg.hardware import cpu_capabilities


def cpu_class() -> str:
    """``amx``, ``avx512_bf16`` or ``no_native_bf16``: the class targets are judged for."""
    caps = cpu_capabilities()
    return "amx" if caps.amx_bf16 else "avx512_bf16" if caps.avx512_bf16 else "no_native_bf16"


def machine_facts() -> dict[str, object]:
    """CPU model, its recorded flags, ``avx512_bf16``, ``amx_bf16``, class, cores, torch threads."""
    return {
        **cpu_capabilities().as_dict(),
        "cpu_class": cpu_class(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
