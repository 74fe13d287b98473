"""What the processor computes natively: its model name and the instruction-set flags that matter.

One detection for the whole package: training's mixed precision, inference's ``precision: auto``
and the benchmarks' records all read :func:`cpu_capabilities`. Tests and callers that want another
machine's answer build a :class:`CpuCapabilities` themselves and pass it on.

Examples:
    >>> caps = CpuCapabilities(model="Example CPU", flags=frozenset({"avx512_bf16"}))
    >>> caps.native_bf16, caps.amx_bf16
    (True, False)
    >>> CpuCapabilities(model="Old CPU", flags=frozenset({"avx2"})).native_bf16
    False
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""The CPU flags under which oneDNN computes bfloat16 natively (AVX512-BF16, AMX tiles)."""
RECORDED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
"""The flags benchmarks record."""


@dataclass(frozen=True)
class CpuCapabilities:
    """A processor: its model name and its instruction-set flags (as ``/proc/cpuinfo`` names them).

    Attributes:
        model: The model name.
        flags: The flags it has.
    """

    model: str
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def avx512_bf16(self) -> bool:
        """AVX512-BF16 (bfloat16 dot products in vector registers)."""
        return "avx512_bf16" in self.flags

    @property
    def amx_bf16(self) -> bool:
        """AMX tiles with bfloat16 (Intel Sapphire Rapids and later)."""
        return "amx_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """Whether bfloat16 convolutions and matrix products run natively (not emulated)."""
        return self.avx512_bf16 or self.amx_bf16

    def as_dict(self) -> dict[str, object]:
        """Model, the recorded flags present and the two bfloat16 flags (for benchmark JSON)."""
        return {
            "cpu_model": self.model,
            "cpu_flags": sorted(f for f in RECORDED_FLAGS if f in self.flags),
            "avx512_bf16": self.avx512_bf16,
            "amx_bf16": self.amx_bf16,
        }


def _proc_cpuinfo(path: Path) -> tuple[str, set[str]]:
    model, flags = "", set[str]()
    try:
        text = path.read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _torch_probes() -> set[str]:
    """Flags torch's own CPU probes confirm (where ``/proc/cpuinfo`` is absent, e.g. macOS)."""
    found = set()
    for flag, name in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported")):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                found.add(flag)
        except RuntimeError:  # pragma: no cover - a build without the probe's backend
            continue
    if "amx_tile" in found:
        found.add("amx_bf16")  # every AMX processor so far has the bfloat16 tiles
    return found


@functools.cache
def cpu_capabilities() -> CpuCapabilities:
    """This machine's processor (read once per process)."""
    model, flags = _proc_cpuinfo(Path("/proc/cpuinfo"))
    flags |= _torch_probes()
    return CpuCapabilities(model=model or platform.processor() or "unknown", flags=frozenset(flags))
