"""Windows batched and laid out for the machine: a short measurement, cached, recorded, pinnable.

How many windows go through the network at once (``batch_size``) and in which memory layout
(``contiguous`` or ``channels_last``, i.e. ``channels_last_3d`` for 3D windows) changes the speed
of the forward pass by tens of per cent on a CPU, differently for every network, precision and
thread count. With ``inference.tuning: measure`` (the default) both are chosen by timing the
network on a few windows of the scan's size before the first scan of a run, and the choice is
cached per model (weights' SHA-256), device, thread count and precision: in the process, and in a
JSON file (``$MEDSEG_CACHE_DIR/window_layouts.json``, default ``~/.cache/medseg``) so the next run
on the machine reuses it. ``tuning: pinned`` (or ``--batch-size``/``--memory-format``) keeps the
configured values: batch size and layout can change float32 results in the last bits, so two runs
pinned alike give identical outputs. The choice is recorded with every scan's plan.

Rule: start from the configured batch size in the contiguous layout; another batch size, then
channels-last at the best batch size, replaces it only when at least 5 % faster per window (a
noisy measurement should not flip the choice).

Examples:
    >>> import torch
    >>> net = torch.nn.Conv3d(1, 2, 3, padding=1)
    >>> layout = measure_layout(net, in_channels=1, window=(8, 8, 8), precision="float32",
    ...                         device="cpu", start=WindowLayout(2, "contiguous"), candidates=(1, 2))
    >>> layout.batch_size in (1, 2), layout.memory_format in ("contiguous", "channels_last")
    (True, True)
    >>> tuning_key(model="ab12", device="cpu", threads=2, precision="bfloat16")
    'ab12|cpu|2|bfloat16'
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from medseg.io.atomic import atomic_write_text
from medseg.tiling.precision import forward_context

MARGIN = 0.95
"""Another choice must take at most this fraction of the current one's time per window."""
CANDIDATES = (1, 2, 4)
"""Batch sizes tried."""
TUNINGS = ("measure", "pinned")


@dataclass(frozen=True)
class WindowLayout:
    """Windows per forward pass and their memory layout.

    Attributes:
        batch_size: Windows per forward pass.
        memory_format: ``contiguous`` or ``channels_last``.
        source: ``measured``, ``cached`` or ``pinned``.
        seconds_per_window: The measured forward time per window (``None``: not measured).
    """

    batch_size: int
    memory_format: str
    source: str = "pinned"
    seconds_per_window: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The layout as JSON-ready values."""
        return asdict(self)


def tuning_key(*, model: str, device: str, threads: int, precision: str) -> str:
    """The cache key of a measurement: model hash, device, thread count and precision."""
    return f"{model}|{device}|{threads}|{precision}"


def _time_forward(
    network: nn.Module, x: torch.Tensor, *, precision: str, device: torch.device, repeats: int
) -> float:
    """Best wall time of ``repeats`` forward passes of ``x`` (after one untimed pass)."""
    best = math.inf
    with torch.inference_mode(), forward_context(precision, device):
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            network(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                best = min(best, time.perf_counter() - t0)
    return best


def measure_layout(
    network: nn.Module,
    *,
    in_channels: int,
    window: Sequence[int],
    precision: str,
    device: torch.device | str,
    start: WindowLayout,
    candidates: Sequence[int] = CANDIDATES,
    repeats: int = 1,
) -> WindowLayout:
    """Time the network on random windows and choose the batch size and memory layout (module rule).

    Args:
        network: The network (in eval mode, on ``device``).
        in_channels: Channels of its input.
        window: The window's spatial size (as the plan runs it).
        precision: ``float32``, ``bfloat16`` or ``float16`` (as the forward pass will run).
        device: Where it runs.
        start: The configured layout, kept unless another is faster by the margin.
        candidates: Batch sizes to try.
        repeats: Timed passes per candidate (the best counts).

    Returns:
        The chosen layout (``source="measured"``).
    """
    dev = torch.device(device)
    shape = (in_channels, *window)
    gen = torch.Generator().manual_seed(0)
    sizes = sorted({*candidates, start.batch_size})
    x = torch.randn((max(sizes), *shape), generator=gen).to(dev)
    per_window = {
        b: _time_forward(network, x[:b], precision=precision, device=dev, repeats=repeats) / b for b in sizes
    }
    best = start.batch_size
    for b in sizes:
        if per_window[b] < MARGIN * per_window[best]:
            best = b
    chosen, fmt = per_window[best], "contiguous"
    if len(window) in (2, 3):
        layout = torch.channels_last_3d if len(window) == 3 else torch.channels_last
        xcl = x[:best].contiguous(memory_format=layout)
        t = _time_forward(network, xcl, precision=precision, device=dev, repeats=repeats) / best
        if t < MARGIN * chosen:
            chosen, fmt = t, "channels_last"
    return WindowLayout(best, fmt, "measured", chosen)


class LayoutCache:
    """Measured layouts by :func:`tuning_key`: in memory, and in a JSON file when one is given.

    Args:
        path: The JSON file (``None``: memory only). Unreadable or unwritable files are ignored:
            the cache only saves time.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._memory: dict[str, WindowLayout] = {}

    def _read_file(self) -> dict[str, dict[str, object]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> WindowLayout | None:
        """The cached layout for ``key`` (``source="cached"``), or ``None``."""
        with self._lock:
            if key in self._memory:
                return self._memory[key]
            entry = self._read_file().get(key)
            if not isinstance(entry, dict):
                return None
            try:
                seconds = entry.get("seconds_per_window")
                per_window = float(seconds) if isinstance(seconds, (int, float)) else None
                size, fmt = int(str(entry["batch_size"])), str(entry["memory_format"])
                layout = WindowLayout(size, fmt, "cached", per_window)
            except (KeyError, TypeError, ValueError):
                return None
            self._memory[key] = layout
            return layout

    def put(self, key: str, layout: WindowLayout) -> None:
        """Remember ``layout`` for ``key`` (and write the file, atomically)."""
        with self._lock:
            self._memory[key] = layout
            if self.path is None:
                return
            data = self._read_file()
            data[key] = layout.as_dict()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))
            except OSError:
                pass


def default_cache_path() -> Path:
    """``$MEDSEG_CACHE_DIR/window_layouts.json`` (default folder ``~/.cache/medseg``)."""
    folder = os.environ.get("MEDSEG_CACHE_DIR") or str(Path.home() / ".cache" / "medseg")
    return Path(folder) / "window_layouts.json"


_CACHE: LayoutCache | None = None


def shared_cache() -> LayoutCache:
    """The process's cache, backed by :func:`default_cache_path`."""
    global _CACHE
    if _CACHE is None:
        _CACHE = LayoutCache(default_cache_path())
    return _CACHE


def choose_layout(
    network: nn.Module,
    *,
    key: str,
    in_channels: int,
    window: Sequence[int],
    precision: str,
    device: torch.device | str,
    start: WindowLayout,
    cache: LayoutCache | None = None,
) -> WindowLayout:
    """The cached layout for ``key``, else a measured one (then cached). See :func:`measure_layout`."""
    store = cache if cache is not None else shared_cache()
    found = store.get(key)
    if found is not None:
        return found
    layout = measure_layout(
        network, in_channels=in_channels, window=window, precision=precision, device=device, start=start
    )
    store.put(key, layout)
    return layout
