"""The inference engine: plan → split → network (with flip TTA) → merge → probabilities or labels.

Every prediction goes through :func:`infer`. It plans the windows (:mod:`medseg.tiling.plan`), cuts
them in batches from the (padded) image, runs the network where it lives (``device``) and
accumulates the answers where the stitching lives (``stitch_device``, the CPU by default) with a
:class:`~medseg.tiling.merge.Merger`. In ``"full"`` memory mode the whole volume is kept and finished
at the end; in ``"bounded"`` mode only the parts still being written are kept and every finished box
goes straight to labels (or to other sinks: a probability file, or the source grid of
:mod:`medseg.tiling.to_source`). ``"auto"`` picks bounded when the full float32 buffer would exceed
``memory_limit_mb`` (see :mod:`medseg.tiling.settings`).

Examples:
    >>> import torch
    >>> net = torch.nn.Conv3d(1, 3, 1)
    >>> settings = TilingSettings(patch_size=(16, 16, 16), batch_size=2)
    >>> result = infer(net, torch.randn(1, 7, 33, 20), settings, output="labels")
    >>> tuple(result.labels.shape), result.mode, result.plan.num_windows
    ((7, 33, 20), 'full', 6)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import InputError
from medseg.tiling.merge import Merger
from medseg.tiling.plan import PatchLocation, PatchPlan
from medseg.tiling.precision import forward_context, resolve_precision
from medseg.tiling.settings import TilingSettings, choose_memory_mode, plan_for
from medseg.tiling.sinks import LabelSink, ProbabilitySink
from medseg.tiling.slab import Sink, Slab
from medseg.tiling.weights import importance_map

Output = Literal["probabilities", "logits", "labels"]


@dataclass(frozen=True)
class TilingResult:
    """What :func:`infer` produced.

    Attributes:
        plan: The plan that ran.
        mode: ``"full"`` or ``"bounded"``.
        probabilities: ``(K, *spatial)`` softmax probabilities (or blended logits), if asked for.
        labels: ``(*spatial)`` argmax labels, if asked for.
        timings: Seconds: ``extract``, ``forward`` (network incl. TTA and the copy to the stitch
            device), ``stitch`` (accumulation), ``finalize`` (sinks: argmax, softmax, resampling,
            writing) and ``total``.
        buffer_mb: Size of the accumulation buffer(s).
    """

    plan: PatchPlan
    mode: str
    probabilities: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    buffer_mb: float = 0.0


class _TimedSink:
    def __init__(self, sink: Sink, clock: dict[str, float]) -> None:
        self.sink, self.clock = sink, clock
        self.needs_weights = sink.needs_weights
        self.needs_planes = getattr(sink, "needs_planes", False)

    def consume(self, slab: Slab) -> None:
        t0 = time.perf_counter()
        self.sink.consume(slab)
        self.clock["finalize"] += time.perf_counter() - t0

    def finish(self) -> None:
        t0 = time.perf_counter()
        self.sink.finish()
        self.clock["finalize"] += time.perf_counter() - t0


def _batches(it: Iterator[PatchLocation], size: int) -> Iterator[list[PatchLocation]]:
    while batch := list(itertools.islice(it, size)):
        yield batch


class _Runner:
    """Cuts windows, runs the network with flips, returns window predictions on the stitch device."""

    def __init__(
        self,
        network: nn.Module,
        image: torch.Tensor,
        plan: PatchPlan,
        settings: TilingSettings,
        device: torch.device,
        stitch_device: torch.device,
    ) -> None:
        self.network, self.plan, self.device, self.stitch_device = network, plan, device, stitch_device
        if any(b or a for b, a in plan.padding):
            pad = [v for b, a in reversed(plan.padding) for v in (b, a)]
            image = F.pad(image, pad, value=settings.pad_value)
        self.image = image
        tta = [a for a in settings.tta_axes if a < plan.ndim]
        if len(tta) != len(settings.tta_axes):
            msg = f"tta_axes must be axes of the {plan.ndim}D volume, got {settings.tta_axes}"
            raise ValueError(msg)
        self.flips = [c for r in range(len(tta) + 1) for c in itertools.combinations(tta, r)]
        fmt = settings.memory_format
        if fmt == "auto":
            fmt = getattr(network, "preferred_memory_format", "contiguous")
        self.channels_last = fmt == "channels_last"
        self.precision = resolve_precision(settings.precision, device=device).dtype
        extent = list(plan.patch_size)
        if plan.slice_axis is not None:
            extent[plan.slice_axis] = 2 * plan.context + 1
        shape = (settings.batch_size, image.shape[0], *extent)
        self.batch = torch.empty(shape, dtype=torch.float32, device=image.device)
        if self.channels_last and plan.slice_axis is None:
            self.batch = self.batch.contiguous(memory_format=_channels_last(self.batch.ndim))

    def extract(self, locations: Sequence[PatchLocation]) -> torch.Tensor:
        batch = self.batch[: len(locations)]
        a = self.plan.slice_axis
        for i, loc in enumerate(locations):
            if a is None or self.plan.context == 0:
                batch[i].copy_(self.image[(slice(None), *loc.slices)])
                continue
            c, n, s = self.plan.context, self.image.shape[1 + a], loc.start[a]
            index = torch.arange(s - c, s + c + 1, device=self.image.device).clamp_(0, n - 1)
            region = list(loc.slices)
            region[a] = slice(None)
            batch[i].copy_(self.image[(slice(None), *region)].index_select(1 + a, index))
        return batch

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        a = self.plan.slice_axis
        if a is not None:  # (B, C, *window with the slice stack) -> (B, C * W, P, Q)
            x = x.movedim(2 + a, 2)
            x = x.reshape(x.shape[0], -1, *x.shape[3:])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        with forward_context(self.precision, self.device):
            y = self.network(x.to(self.device, non_blocking=True))
        if isinstance(y, tuple | list):  # deep supervision heads: the first is full size
            y = y[0]
        if a is not None:
            y = y.unsqueeze(2 + a)
        if tuple(y.shape[2:]) != self.plan.patch_size or y.shape[0] != x.shape[0]:
            msg = f"network must answer (B, K, *{self.plan.patch_size}) for a window, got {tuple(y.shape)}"
            raise InputError(msg)
        return y

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for dims in self.flips:
            axes = [2 + a for a in dims]
            y = self._network(batch.flip(axes) if dims else batch)
            if dims:
                y = y.flip(axes)
            y = y.to(self.stitch_device, torch.float32)
            if total is None:
                shares = y.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr()
                total = y.clone() if len(self.flips) > 1 and shares else y
            else:
                total.add_(y)
        assert total is not None
        return total.div_(len(self.flips)) if len(self.flips) > 1 else total


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


class _StitchThreads:
    """Intra-op threads for the stitching: fixed, or the faster of 1 and torch's number by a probe.

    The probe is an operation shaped like the stitching (a weighted add into a strided box of a
    larger buffer, about 1.4 million values); it is timed twice with each thread count, again
    every ``every`` batches, as a shared machine's load changes during a run.
    """

    def __init__(self, setting: int, device: torch.device, every: int = 12) -> None:
        self.options = [setting] if setting > 0 else sorted({1, torch.get_num_threads()})
        self.every, self.device = every, device
        self.choice = self.options[0]
        self._calls = 0
        self._probe: tuple[torch.Tensor, ...] | None = None

    def __call__(self) -> contextlib.AbstractContextManager[None]:
        if len(self.options) > 1 and self.device.type == "cpu" and self._calls % self.every == 0:
            self.choice = min(self.options, key=self._time)
        self._calls += 1
        return _threads(self.choice)

    def _time(self, n: int) -> float:
        if self._probe is None:
            self._probe = _probe_tensors()
        target, src, w = self._probe
        best = math.inf
        with _threads(n):
            for _ in range(2):
                t0 = time.perf_counter()
                target.addcmul_(src, w)
                best = min(best, time.perf_counter() - t0)
        return best


@functools.cache
def _probe_tensors() -> tuple[torch.Tensor, ...]:
    """The stitching probe's operands, made once per process (not per volume)."""
    buf = torch.zeros(14, 32, 48, 128)
    return buf[:, :, 8:40, 16:112], torch.rand(14, 32, 32, 96), torch.rand(32, 32, 96)


def _channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _network_device(network: nn.Module) -> torch.device:
    param = next(itertools.chain(network.parameters(), network.buffers()), None)
    return torch.device("cpu") if param is None else param.device


def infer(
    network: nn.Module,
    image: torch.Tensor,
    settings: TilingSettings,
    *,
    plan: PatchPlan | None = None,
    output: Output | None = "probabilities",
    sinks: Sequence[Sink] = (),
    device: torch.device | str | None = None,
    stitch_device: torch.device | str = "cpu",
) -> TilingResult:
    """Run a network over a whole image in windows and stitch the answers.

    Args:
        network: Logits out, ``(B, C, *window) -> (B, K, *window)`` (the caller puts it in eval mode).
        image: ``(C, *spatial)`` preprocessed image, 2 or 3 spatial axes.
        settings: Tiling, blending, TTA and memory settings.
        plan: A plan to run (default: :func:`plan_for` the image).
        output: What to return: ``"probabilities"`` (softmax, ``(K, *spatial)``; keeps the whole
            volume, so the memory mode is full), ``"logits"`` (blended logits, likewise), ``"labels"``
            (argmax) or ``None`` (only ``sinks`` receive the result).
        sinks: Further receivers of the finished slabs (e.g. a
            :class:`~medseg.tiling.sinks.ProbabilityWriter`).
        device: Where the network runs (default: where its parameters are).
        stitch_device: Where the accumulation lives.

    Returns:
        The :class:`TilingResult`; ``mode`` says which memory mode ran.

    Raises:
        InputError: If the image is not ``(C, *spatial)`` with 2 or 3 spatial axes, or its shape
            differs from the plan's, or the network does not keep the window size.
        ValueError: If ``output`` is ``"probabilities"``/``"logits"`` with ``memory="bounded"``.
    """
    t_start = time.perf_counter()
    x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    x = x.float()
    if x.ndim not in (3, 4):
        msg = f"image must be (C, *spatial) with 2 or 3 spatial axes, got shape {tuple(x.shape)}"
        raise InputError(msg)
    plan = plan_for(network, x.shape[1:], settings) if plan is None else plan
    if tuple(x.shape[1:]) != plan.shape:
        msg = f"image must have the plan's spatial shape {plan.shape}, got {tuple(x.shape[1:])}"
        raise InputError(msg)
    in_memory = output in ("probabilities", "logits")
    if in_memory and settings.memory == "bounded":
        msg = f"output must be 'labels' or None in bounded memory mode (or use sinks), got {output!r}"
        raise ValueError(msg)
    clock = {"extract": 0.0, "forward": 0.0, "stitch": 0.0, "finalize": 0.0}
    stitch = torch.device(stitch_device)
    runner = _Runner(network, x, plan, settings, torch.device(device or _network_device(network)), stitch)
    weights = importance_map(plan.patch_size, settings.blend, settings.sigma_scale)
    own: ProbabilitySink | LabelSink | None = None
    if in_memory:
        own = ProbabilitySink("probabilities" if output == "probabilities" else "logits")
    elif output == "labels":
        own = LabelSink(plan.shape)
    merger: Merger | None = None
    mode = "full"
    outer = plan.stream_axis()
    stitching = _StitchThreads(settings.stitch_threads, stitch)
    with torch.inference_mode():
        for locations in _batches(plan.locations(outer), settings.batch_size):
            t0 = time.perf_counter()
            with stitching():
                batch = runner.extract(locations)
            t1 = time.perf_counter()
            pred = runner.forward(batch)
            t2 = time.perf_counter()
            if merger is None:
                mode = "full" if in_memory else choose_memory_mode(settings, plan, pred.shape[1])
                timed = [_TimedSink(s, clock) for s in ([own] if own is not None else []) + list(sinks)]
                bounded = mode == "bounded"
                merger = Merger(plan, weights, timed, bounded=bounded, outer_axis=outer, device=stitch)
            before = clock["finalize"]
            with stitching():
                merger.add(locations, pred)
            del pred  # not alive during the next forward pass
            t3 = time.perf_counter()
            clock["extract"] += t1 - t0
            clock["forward"] += t2 - t1
            clock["stitch"] += t3 - t2 - (clock["finalize"] - before)
        assert merger is not None
        with stitching():
            merger.finish()
    clock["total"] = time.perf_counter() - t_start
    return TilingResult(
        plan=plan,
        mode=mode,
        probabilities=own.result() if isinstance(own, ProbabilitySink) else None,
        labels=own.result() if isinstance(own, LabelSink) else None,
        timings=clock,
        buffer_mb=merger.peak_buffer_bytes / 2**20,
    )
