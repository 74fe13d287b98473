"""Benchmark medseg's tiling engine against MONAI's ``sliding_window_inference`` on a CT-sized volume.

One named model for both sides: MONAI's ``UNet`` (3D, channels 16-256, strides 2, two residual units,
instance norm, random weights, seeded) with 14 output classes. The volume is a seeded smooth random
field, ``(1, 1, 512, 512, 300)`` float32 by default. Each measurement runs in its own process, one
after the other:

* ``forward``: the network alone over the windows of medseg's plan (the extraction of windows and
  everything else left out), after trying batch sizes and memory formats on a few windows (MONAI's
  batch of 4 is kept unless another is at least 5% faster, contiguous unless channels-last is at
  least 5% faster); also the FLOPs of one
  window (``torch.utils.flop_counter``) and a float32 matrix multiply's GFLOP/s, for
  ``net_efficiency``;
* ``monai``: volume tensor to label map with ``sliding_window_inference(sw_batch_size=4,
  mode="gaussian")`` and ``AsDiscrete(argmax=True)``; the predictor is wrapped to time the network;
* ``medseg``: volume tensor to label map with :func:`medseg.tiling.infer` (``output="labels"``,
  memory mode ``--memory``, batch size and memory format from ``forward``); the network time
  comes from the engine's own timings;
* ``medseg_auto``: as ``medseg`` with ``precision: auto`` (bfloat16 where the CPU computes it
  natively, see :mod:`medseg.tiling.precision`), same batch size and memory format;
* ``compare``: one pass where MONAI's loop hands each window's answer (same windows: medseg plans
  with ``placement="monai"``) to a full and a memory-bounded medseg merger as well; gives
  ``max_abs_diff`` (softmax probabilities, full mode vs MONAI) and ``label_agreement`` (bounded vs
  full).

Peak memory is the growth of the resident set during the timed call (``VmHWM`` reset through
``/proc/self/clear_refs`` before it): the interpreter, the libraries, the model and the input
volume are there before and count on neither side.

Reduced precision: the ``forward`` role also runs every batch of windows with ``precision: auto``,
alternating with float32 batch by batch (one process: both see the same machine load), and times a
bfloat16 matrix multiply. ``auto_forward_speedup`` = float32 forward time / auto forward time on the
same windows; ``auto_time_ratio`` = medseg auto total / MONAI float32 total; ``auto_net_efficiency``
= the network's GFLOP/s under auto / the bfloat16 matmul's GFLOP/s (``bf16_matmul_gflops``);
``auto_label_agreement_vs_float32`` compares the two medseg runs' labels (random weights: near-tied
logits flip under any rounding, so it is no accuracy measure; see docs/benchmarks.md). The CPU
model and its flags (``avx512_bf16``, ``amx_bf16``) are recorded (``benchmarks/machine.py``).

Printed: one JSON line with ``forward_s``, ``medseg_s``, ``monai_s``, ``time_ratio``,
``non_forward_ratio`` (``(medseg_s - its forward) / (monai_s - its forward)``), ``stitch_overhead``
(medseg's non-forward time over its forward time; with ``--repeats`` the medians of each, the
sides taking turns), ``time_ratio_at_equal_forward`` (the ratio had both forwards taken MONAI's
time: the network is the same, so on a busy machine their difference is noise), ``max_abs_diff``,
``label_agreement``, the peaks, ``mem_ratio`` and ``net_efficiency``, plus the details.

Examples:
    Full size (several minutes, about 11 GB peak in the compare process)::

        python benchmarks/bench_inference.py

    Smoke run::

        python benchmarks/bench_inference.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import machine_facts  # benchmarks/ is on sys.path when a benchmark runs as a script

FULL_SHAPE = (512, 512, 300)
QUICK_SHAPE = (192, 160, 112)
MODEL = "monai.networks.nets.UNet(3D, channels 16-256, strides 2, num_res_units=2, instance norm)"
MONAI_BATCH = 4
VARIANTS = [
    (4, "contiguous"),
    (2, "contiguous"),
    (1, "contiguous"),
    (4, "channels_last"),
    (2, "channels_last"),
]
TUNE_MARGIN = 0.95  # another batch size or memory format must be 5% faster than MONAI's to be kept


def build_model(classes: int, seed: int) -> torch.nn.Module:
    """The benchmark's network (random weights, seeded)."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(3, 1, classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    net.size_divisor = 16
    net.spatial_dims = 3
    return net.eval()


def build_volume(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A ``(1, 1, *shape)`` smooth random field with some noise (CT-like structure at many scales)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, *(s // 24 + 2 for s in shape)), generator=gen) * 2 - 1
    vol = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)
    fine = torch.rand((1, 1, *(s // 6 + 2 for s in shape)), generator=gen) - 0.5
    vol += 0.5 * torch.nn.functional.interpolate(fine, size=shape, mode="trilinear", align_corners=False)
    return vol.contiguous()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


class PeakMemory:
    """Growth of the resident set during a ``with`` block (Linux: VmHWM after a reset)."""

    def __enter__(self) -> PeakMemory:
        with contextlib.suppress(OSError):  # reset the peak (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        self.base = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_abs = _status_mb("VmHWM")
        self.peak = self.peak_abs - self.base


def _settings(args: argparse.Namespace, **kw: Any):
    from medseg.tiling import TilingSettings

    values = {
        "patch_size": (args.patch,) * 3,
        "overlap": args.overlap,
        "blend": "gaussian",
        "batch_size": args.batch or MONAI_BATCH,
        "memory": args.memory,
        "memory_format": args.memory_format or "auto",
    }
    values.update(kw)
    return TilingSettings(**values)


def role_forward(args: argparse.Namespace) -> dict[str, Any]:
    """The network alone over the windows; batch size and memory format tried; FLOPs; matmul speed."""
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.tiling import plan_for
    from medseg.tiling.precision import forward_context, resolve_precision

    net = build_model(args.classes, args.seed)
    vol = build_volume(args.shape, args.seed)[0]
    plan = plan_for(net, vol.shape[1:], _settings(args))
    locs = list(plan.locations(plan.stream_axis()))

    def window_batch(n: int, offset: int = 0, channels_last: bool = False) -> torch.Tensor:
        idx = [(offset + i) % len(locs) for i in range(n)]
        x = torch.stack([vol[(slice(None), *locs[i].slices)] for i in idx])
        return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x

    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            net(window_batch(1))
        flops = counter.get_total_flops()
        variants = {}
        for batch, fmt in VARIANTS:
            x = window_batch(batch, channels_last=fmt == "channels_last")
            net(x)  # warm-up (oneDNN primitives for this shape)
            times = []
            for _ in range(args.tune_repeats):
                t0 = time.perf_counter()
                net(x)
                times.append((time.perf_counter() - t0) / batch)
            variants[f"{fmt}-b{batch}"] = (statistics.median(times), batch, fmt)
        # keep MONAI's setting unless another is clearly faster (timings on a shared machine are
        # noisy); channels-last only if clearly faster than contiguous at that batch size, as its
        # stitching costs more (the argmax reduces over the short innermost axis)
        default = variants[f"contiguous-b{MONAI_BATCH}"]
        best = min(v for v in variants.values() if v[2] == "contiguous")
        best = best if best[0] < TUNE_MARGIN * default[0] else default
        cl = variants.get(f"channels_last-b{best[1]}")
        _, batch, fmt = cl if cl is not None and cl[0] < TUNE_MARGIN * best[0] else best
        auto = resolve_precision("auto", device="cpu").dtype
        with forward_context(auto, "cpu"):
            net(window_batch(batch, 0, fmt == "channels_last"))  # warm-up of the reduced kernels
        forward = auto_forward = 0.0
        for i in range(0, len(locs), batch):  # float32 and auto take turns on the same windows
            x = window_batch(min(batch, len(locs) - i), i, fmt == "channels_last")
            t0 = time.perf_counter()
            net(x)
            t1 = time.perf_counter()
            with forward_context(auto, "cpu"):
                net(x)
            t2 = time.perf_counter()
            forward += t1 - t0
            auto_forward += t2 - t1
        a = torch.randn(4096, 4096)
        net(window_batch(1))
        mm = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            mm.append(time.perf_counter() - t0)
        b16 = a.to(torch.bfloat16)
        b16 @ b16  # warm-up
        mm16 = []
        for _ in range(3):
            t0 = time.perf_counter()
            b16 @ b16
            mm16.append(time.perf_counter() - t0)
    matmul_gflops = 2 * 4096**3 / min(mm) / 1e9
    net_gflops = flops * len(locs) / forward / 1e9
    bf16_gflops = 2 * 4096**3 / min(mm16) / 1e9
    return {
        "forward_s": forward,
        "auto_precision": auto,
        "auto_forward_s": auto_forward,
        "auto_net_gflops": flops * len(locs) / auto_forward / 1e9,
        "bf16_matmul_gflops": bf16_gflops,
        "windows": len(locs),
        "plan": str(plan),
        "gflop_per_window": flops / 1e9,
        "net_gflops": net_gflops,
        "matmul_gflops": matmul_gflops,
        "batch": batch,
        "memory_format": fmt,
        "variants_s_per_window": {k: round(v[0], 4) for k, v in variants.items()},
    }


def role_monai(args: argparse.Namespace) -> dict[str, Any]:
    """MONAI's sliding_window_inference + AsDiscrete(argmax=True), timed from volume to labels."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscrete

    net = build_model(args.classes, args.seed)
    vol = build_volume(args.shape, args.seed)
    forward = [0.0]

    def predictor(x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = net(x)
        forward[0] += time.perf_counter() - t0
        return y

    with torch.inference_mode():
        net(vol[:, :, : args.patch, : args.patch, : args.patch])  # warm-up, as on our side
        forward[0] = 0.0
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            logits = sliding_window_inference(
                vol, (args.patch,) * 3, MONAI_BATCH, predictor, overlap=args.overlap, mode="gaussian"
            )
            labels = AsDiscrete(argmax=True)(logits[0])
            seconds = time.perf_counter() - t0
            del logits
    np.save(Path(args.workdir) / "monai_labels.npy", np.asarray(labels[0], dtype=np.uint8))
    return {
        "monai_s": seconds,
        "monai_forward_s": forward[0],
        "monai_peak_mb": mem.peak,
        "monai_peak_abs_mb": mem.peak_abs,
    }


def role_medseg(args: argparse.Namespace, precision: str = "float32") -> dict[str, Any]:
    """medseg.tiling.infer to labels, timed from volume to labels."""
    from medseg.tiling import infer
    from medseg.tiling.precision import forward_context, resolve_precision

    net = build_model(args.classes, args.seed)
    vol = build_volume(args.shape, args.seed)[0]
    settings = _settings(args, precision=precision)
    dtype = resolve_precision(precision, device="cpu").dtype
    with torch.inference_mode(), forward_context(dtype, "cpu"):
        net(vol[None, :, : args.patch, : args.patch, : args.patch])  # warm-up, as on MONAI's side
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = infer(net, vol, settings, output="labels")
        seconds = time.perf_counter() - t0
    assert result.labels is not None
    name = "medseg_labels.npy" if precision == "float32" else "medseg_auto_labels.npy"
    np.save(Path(args.workdir) / name, result.labels.numpy().astype(np.uint8))
    return {
        "medseg_s": seconds,
        "medseg_forward_s": result.timings["forward"],
        "medseg_peak_mb": mem.peak,
        "medseg_peak_abs_mb": mem.peak_abs,
        "medseg_mode": result.mode,
        "medseg_buffer_mb": result.buffer_mb,
        "medseg_timings": {k: round(v, 3) for k, v in result.timings.items()},
        "plan": str(result.plan),
    }


def role_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Same windows, same network answers: MONAI's stitching vs medseg's full and bounded mergers."""
    from monai.inferers import sliding_window_inference

    from medseg.tiling import LabelSink, Merger, ProbabilitySink, importance_map, plan_for

    net = build_model(args.classes, args.seed)
    vol = build_volume(args.shape, args.seed)
    plan = plan_for(net, vol.shape[2:], _settings(args, placement="monai"))
    weights = importance_map(plan.patch_size, "gaussian")
    full_sinks = [LabelSink(plan.shape), ProbabilitySink("probabilities")]  # labels from the raw sums
    bounded_sink = LabelSink(plan.shape)
    full = Merger(plan, weights, full_sinks, outer_axis=0)
    bounded = Merger(plan, weights, [bounded_sink], bounded=True, outer_axis=0)
    by_start = {loc.start: loc for loc in plan.locations(0)}

    def predictor(x: torch.Tensor, coords: list) -> torch.Tensor:
        y = net(x)
        locs = [by_start[tuple(s.start for s in c[2:])] for c in coords]
        full.add(locs, y)
        bounded.add(locs, y)
        return y

    with torch.inference_mode():
        logits = sliding_window_inference(
            vol,
            plan.patch_size,
            MONAI_BATCH,
            predictor,
            overlap=args.overlap,
            mode="gaussian",
            with_coord=True,
        )[0]
        full.finish()
        bounded.finish()
        ours = full_sinks[1].result()
        diff = 0.0
        agree_monai = 0
        for i in range(0, ours.shape[1], 16):  # chunks keep the temporaries small
            ref = torch.softmax(logits[:, i : i + 16], dim=0)
            diff = max(diff, float((ours[:, i : i + 16] - ref).abs().max()))
            agree_monai += int((ref.argmax(0) == full_sinks[0].result()[i : i + 16]).sum())
    same = int((bounded_sink.result() == full_sinks[0].result()).sum())
    n = math.prod(plan.shape)
    return {
        "max_abs_diff": diff,
        "label_agreement": same / n,
        "label_agreement_full_vs_monai": agree_monai / n,
        "compare_plan": str(plan),
    }


def _run_role(role: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--role", role, "--workdir", args.workdir]
    cmd += ["--shape", *map(str, args.shape), "--classes", str(args.classes), "--patch", str(args.patch)]
    cmd += ["--overlap", str(args.overlap), "--seed", str(args.seed), "--memory", args.memory]
    cmd += ["--batch", str(args.batch), "--memory-format", args.memory_format]
    cmd += ["--tune-repeats", str(args.tune_repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        msg = f"benchmark role '{role}' must succeed, got exit status {proc.returncode}"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one role of it) and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_SHAPE} volume, memory-bounded mode")
    parser.add_argument("--shape", type=int, nargs=3, default=None)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--memory", choices=("auto", "full", "bounded"), default=None)
    parser.add_argument("--batch", type=int, default=0, help="medseg batch size (0: the fastest measured)")
    parser.add_argument("--memory-format", default="", help="medseg memory format ('': the fastest measured)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each side (median)")
    parser.add_argument("--tune-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compare", action="store_true", help="skip the accuracy pass")
    parser.add_argument(
        "--role", choices=("forward", "monai", "medseg", "medseg_auto", "compare"), help=argparse.SUPPRESS
    )
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shape = tuple(args.shape or (QUICK_SHAPE if args.quick else FULL_SHAPE))
    args.memory = args.memory or ("bounded" if args.quick else "auto")
    if args.role:
        roles = {
            "forward": role_forward,
            "monai": role_monai,
            "medseg": role_medseg,
            "medseg_auto": functools.partial(role_medseg, precision="auto"),
            "compare": role_compare,
        }
        print(json.dumps(roles[args.role](args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as workdir:
        args.workdir = workdir
        fwd = _run_role("forward", args)
        args.batch = args.batch or fwd["batch"]
        args.memory_format = args.memory_format or fwd["memory_format"]
        runs: dict[str, list[dict[str, Any]]] = {"monai": [], "medseg": [], "medseg_auto": []}
        for _ in range(args.repeats):
            for role in ("monai", "medseg", "medseg_auto"):
                runs[role].append(_run_role(role, args))
        labels = {r: np.load(Path(workdir) / f"{r}_labels.npy") for r in ("monai", "medseg", "medseg_auto")}
        agreement_vs_monai = float((labels["monai"] == labels["medseg"]).mean())
        auto_agreement = float((labels["medseg_auto"] == labels["medseg"]).mean())
        del labels
        cmp = {} if args.no_compare else _run_role("compare", args)

    def med(role: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[role])

    for r in runs["medseg"]:
        r["non_forward_s"] = r["medseg_s"] - r["medseg_forward_s"]
    for r in runs["monai"]:
        r["non_forward_s"] = r["monai_s"] - r["monai_forward_s"]
    medseg_s, monai_s = med("medseg", "medseg_s"), med("monai", "monai_s")
    auto_s = med("medseg_auto", "medseg_s")
    ours_fwd, theirs_fwd = med("medseg", "medseg_forward_s"), med("monai", "monai_forward_s")
    ours_rest, theirs_rest = med("medseg", "non_forward_s"), med("monai", "non_forward_s")
    out = {
        "shape": list(args.shape),
        "classes": args.classes,
        "patch": args.patch,
        "overlap": args.overlap,
        "model": MODEL,
        "threads": torch.get_num_threads(),
        "forward_s": round(fwd["forward_s"], 3),
        "medseg_s": round(medseg_s, 3),
        "monai_s": round(monai_s, 3),
        "time_ratio": round(medseg_s / monai_s, 4),
        "non_forward_ratio": round(ours_rest / theirs_rest, 4),
        "stitch_overhead": round(ours_rest / ours_fwd, 4),
        "max_abs_diff": cmp.get("max_abs_diff"),
        "label_agreement": cmp.get("label_agreement"),
        "medseg_peak_mb": round(med("medseg", "medseg_peak_mb"), 1),
        "monai_peak_mb": round(med("monai", "monai_peak_mb"), 1),
        "mem_ratio": round(med("medseg", "medseg_peak_mb") / med("monai", "monai_peak_mb"), 4),
        "net_efficiency": round(fwd["net_gflops"] / fwd["matmul_gflops"], 4),
        "auto_precision": fwd["auto_precision"],
        "auto_forward_speedup": round(fwd["forward_s"] / fwd["auto_forward_s"], 4),
        "auto_time_ratio": round(auto_s / monai_s, 4),
        "auto_net_efficiency": round(fwd["auto_net_gflops"] / fwd["bf16_matmul_gflops"], 4),
        "auto_forward_s": round(fwd["auto_forward_s"], 3),
        "medseg_auto_s": round(auto_s, 3),
        "medseg_auto_forward_s": round(med("medseg_auto", "medseg_forward_s"), 3),
        "auto_vs_float32_time": round(auto_s / medseg_s, 4),
        "auto_label_agreement_vs_float32": round(auto_agreement, 6),
        "auto_net_gflops": round(fwd["auto_net_gflops"], 2),
        "bf16_matmul_gflops": round(fwd["bf16_matmul_gflops"], 2),
        "medseg_forward_s": round(ours_fwd, 3),
        "monai_forward_s": round(theirs_fwd, 3),
        "medseg_non_forward_s": round(ours_rest, 3),
        "monai_non_forward_s": round(theirs_rest, 3),
        # the same network on both sides: what time_ratio is when both forwards take the same time
        "time_ratio_at_equal_forward": round((theirs_fwd + ours_rest) / (theirs_fwd + theirs_rest), 4),
        "medseg_runs_s": [[round(r["medseg_s"], 2), round(r["medseg_forward_s"], 2)] for r in runs["medseg"]],
        "monai_runs_s": [[round(r["monai_s"], 2), round(r["monai_forward_s"], 2)] for r in runs["monai"]],
        "medseg_timings": runs["medseg"][-1]["medseg_timings"],
        "medseg_mode": runs["medseg"][-1]["medseg_mode"],
        "medseg_buffer_mb": round(runs["medseg"][-1]["medseg_buffer_mb"], 1),
        "medseg_peak_abs_mb": round(med("medseg", "medseg_peak_abs_mb"), 1),
        "monai_peak_abs_mb": round(med("monai", "monai_peak_abs_mb"), 1),
        "label_agreement_full_vs_monai": cmp.get("label_agreement_full_vs_monai"),
        "label_agreement_vs_monai_default": round(agreement_vs_monai, 6),
        "batch": args.batch,
        "memory_format": args.memory_format,
        "windows": fwd["windows"],
        "gflop_per_window": round(fwd["gflop_per_window"], 3),
        "net_gflops": round(fwd["net_gflops"], 2),
        "matmul_gflops": round(fwd["matmul_gflops"], 2),
        "forward_variants_s_per_window": fwd["variants_s_per_window"],
        "plan": fwd["plan"],
        "compare_plan": cmp.get("compare_plan"),
        "repeats": args.repeats,
        **machine_facts(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
