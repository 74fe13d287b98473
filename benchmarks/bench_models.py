"""Benchmark the registered segmentation models on this CPU: size, FLOPs, forward time, peak memory.

For every model (default hyper-parameters; the 3D U-Net also with ``upsample: resize``) at a
representative patch (3D: 96³; 2D: 256²), in ``eval()`` mode under ``torch.inference_mode()``:

* parameter count, and FLOPs of one batch-1 forward pass (``torch.utils.flop_counter``:
  convolutions and matrix products, 2 FLOPs per multiply-add; interpolation and norms not counted);
* forward time at batch 1 and batch 4, in the default (contiguous) and the channels-last memory
  format (weights and input): one untimed warm-up pass each, then the two formats take turns (so both
  see the same load on a shared machine) until ``--seconds`` have gone by (at least
  ``--min-repeats`` turns at batch 1, half as many at batch 4, at most 10); the minimum is reported
  (the least disturbed estimate) and the median is in the JSON;
* peak memory of the forward pass: the growth of the process's maximum resident set size
  (``ru_maxrss``) over the first pass of a fresh subprocess, one per batch size and format (activations,
  output and scratch space; not the weights).

The faster format is the one to register as the model's inference default (``memory_format=`` of
``register_model``; applied by ``medseg.models.prepare_for_inference``): channels-last wins when the
geometric mean over both batch sizes of its time over the contiguous time is below 0.95, otherwise
the default layout stays (no conversions for a tie). A line says when the registered default
disagrees; each record carries the load average, since only a quiet machine gives numbers to act on.
A slice-wise model (``*_slices``) costs its 2D model times the slices per window and inherits its
format; ``--slicewise`` times them too (256×256×4 windows).

One JSON line is printed per model, then a markdown table.

Examples:
    Full run (about 8 minutes on 2 otherwise idle cores)::

        python benchmarks/bench_models.py

    Smoke run (48³ and 128² patches, about a second of timing each)::

        python benchmarks/bench_models.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from machine import machine_facts  # benchmarks/ is on sys.path when a benchmark runs as a script

FORMATS = ("contiguous", "channels_last")
BATCHES = (1, 4)
CLASSES = 3
MAX_REPEATS = 10
MARGIN = 0.95  # channels-last must be at least 5 % faster to replace the default layout


@dataclass(frozen=True)
class Case:
    """One model configuration to benchmark."""

    label: str
    name: str
    patch: tuple[int, ...]
    quick_patch: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("unet3d", "unet3d", (96, 96, 96), (48, 48, 48)),
    Case("unet3d (resize)", "unet3d", (96, 96, 96), (48, 48, 48), {"upsample": "resize"}),
    Case("deeplabv3plus3d", "deeplabv3plus3d", (96, 96, 96), (48, 48, 48)),
    Case("unet2d", "unet2d", (256, 256), (128, 128)),
    Case("deeplabv3plus2d", "deeplabv3plus2d", (256, 256), (128, 128)),
]
SLICEWISE = [
    Case("unet2d_slices", "unet2d_slices", (256, 256, 4), (128, 128, 2), {"context": 1}),
    Case("deeplabv3plus2d_slices", "deeplabv3plus2d_slices", (256, 256, 4), (128, 128, 2), {"context": 1}),
]


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _build(job: dict[str, Any], fmt: str) -> tuple[Any, Any]:
    import torch

    from medseg.models import create_model, prepare_for_inference

    torch.manual_seed(0)
    net = create_model(job["name"], 1, CLASSES, **job["params"])
    net.preferred_memory_format = fmt
    prepare_for_inference(net)
    torch.manual_seed(1)
    x = torch.randn(job["batch"], 1, *job["patch"])
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return net, x


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One batch size of one case, in a fresh process.

    ``job["mode"] == "memory"``: the peak memory of one forward pass in ``job["format"]``.
    ``"time"``: the peak memory of the first (contiguous) pass, then both formats timed in turns
    (so both see the same load on a shared machine), then FLOPs and parameters.
    """
    import gc

    import torch

    result: dict[str, Any] = {}
    first = job["format"] if job["mode"] == "memory" else "contiguous"
    nets = {first: _build(job, first)}
    net, x = nets[first]
    gc.collect()
    before = _maxrss_mb()
    with torch.inference_mode():
        net(x)  # warm-up pass
    result["peak_mb"] = max(0.0, _maxrss_mb() - before)
    if job["mode"] == "memory":
        return result
    nets["channels_last"] = _build(job, "channels_last")
    times: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    with torch.inference_mode():
        nets["channels_last"][0](nets["channels_last"][1])  # its warm-up pass
        start = time.perf_counter()
        while len(times[FORMATS[-1]]) < MAX_REPEATS and (
            len(times[FORMATS[-1]]) < job["min_repeats"] or time.perf_counter() - start < job["seconds"]
        ):
            for fmt in FORMATS:
                net, x = nets[fmt]
                t0 = time.perf_counter()
                net(x)
                times[fmt].append(time.perf_counter() - t0)
        result["times_s"] = times
        if job["batch"] == 1:
            from torch.utils.flop_counter import FlopCounterMode

            net, x = nets["contiguous"]
            with FlopCounterMode(display=False) as counter:
                net(x)
            result["flops"] = counter.get_total_flops()
            result["n_params"] = sum(p.numel() for p in net.parameters())
    return result


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`worker` in a fresh Python process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        msg = f"worker for {job} must succeed, got exit {proc.returncode}: {proc.stderr[-2000:]}"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Both batch sizes and formats of one case; returns its JSON record."""
    from medseg.models import model_entry

    patch = case.quick_patch if args.quick else case.patch
    record: dict[str, Any] = {
        "model": case.label,
        "name": case.name,
        "params": case.params,
        "patch": list(patch),
        "time_ms": {},
        "median_ms": {},
        "peak_mb": {},
    }
    for batch in BATCHES:
        job = {
            "name": case.name,
            "params": case.params,
            "patch": list(patch),
            "batch": batch,
            "mode": "time",
            "format": "contiguous",
            "seconds": args.seconds,
            "min_repeats": args.min_repeats if batch == 1 else max(1, args.min_repeats // 2),
        }
        res = run_job(job, timeout=args.timeout)
        record["peak_mb"][f"b{batch}_contiguous"] = round(res["peak_mb"], 1)
        mem = run_job({**job, "mode": "memory", "format": "channels_last"}, timeout=args.timeout)
        record["peak_mb"][f"b{batch}_channels_last"] = round(mem["peak_mb"], 1)
        for fmt, times in res["times_s"].items():
            record["time_ms"][f"b{batch}_{fmt}"] = round(1000 * min(times), 1)
            record["median_ms"][f"b{batch}_{fmt}"] = round(1000 * statistics.median(times), 1)
        record.setdefault("repeats", []).append(len(res["times_s"]["contiguous"]))
        if "flops" in res:
            record["n_params"] = res["n_params"]
            record["gflops_b1"] = round(res["flops"] / 1e9, 2)
    t = record["time_ms"]
    ratios = [t[f"b{b}_channels_last"] / t[f"b{b}_contiguous"] for b in BATCHES]
    record["channels_last_ratio"] = round(math.prod(ratios) ** (1 / len(ratios)), 3)
    record["faster"] = "channels_last" if record["channels_last_ratio"] < MARGIN else "contiguous"
    record["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    record["registered"] = model_entry(case.name).memory_format
    return record


def markdown(records: list[dict[str, Any]]) -> str:
    """The records as a markdown table."""
    head = (
        "| model | patch | params | GFLOPs (b1) | b1 ms (contig / CL) | b4 ms (contig / CL) "
        "| peak MB b1 (contig / CL) | peak MB b4 (contig / CL) | CL / contig | faster | registered |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        t, p = r["time_ms"], r["peak_mb"]
        lines.append(
            f"| {r['model']} | {'×'.join(map(str, r['patch']))} | {r['n_params'] / 1e6:.2f} M "
            f"| {r['gflops_b1']:.1f} | {t['b1_contiguous']:.0f} / {t['b1_channels_last']:.0f} "
            f"| {t['b4_contiguous']:.0f} / {t['b4_channels_last']:.0f} "
            f"| {p['b1_contiguous']:.0f} / {p['b1_channels_last']:.0f} "
            f"| {p['b4_contiguous']:.0f} / {p['b4_channels_last']:.0f} | {r['channels_last_ratio']:.2f} "
            f"| {r['faster']} | {r['registered']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small patches, short timing")
    parser.add_argument("--slicewise", action="store_true", help="also time the *_slices models")
    parser.add_argument("--models", nargs="*", help="only these labels (default: all)")
    parser.add_argument("--seconds", type=float, default=6.0, help="time budget of the timed passes per run")
    parser.add_argument(
        "--min-repeats", type=int, default=4, help="timed passes per format at least (batch 4: half)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per worker process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.min_repeats = min(args.seconds, 1.0), 1
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    cases = CASES + (SLICEWISE if args.slicewise else [])
    if args.models:
        cases = [c for c in cases if c.label in args.models]
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True
    )
    records = []
    start = time.perf_counter()
    for case in cases:
        record = bench_case(case, args)
        records.append(record)
        print(json.dumps({**record, **machine_facts()}), flush=True)
        if record["faster"] != record["registered"]:
            print(
                f"# {case.label}: {record['faster']} was faster here; registered default is"
                f" {record['registered']}",
                flush=True,
            )
    print(f"# {time.perf_counter() - start:.0f} s\n")
    print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
