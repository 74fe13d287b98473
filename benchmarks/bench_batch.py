"""Batch throughput: a folder of synthetic CT scans (half NIfTI, half DICOM) through `run_prediction`.

Prints one JSON line with ``scans_per_hour``, ``total_s``, ``model_s`` (sum of pure network time: the
forward passes alone), ``outside_model_s_per_scan`` and ``overhead_ratio`` = total_s / model_s (target
<= 1.15 on 2 cores). ``tiling_s`` adds cutting windows and stitching to the network time (the tiled
inference as a whole) and ``overhead_ratio_vs_tiling`` = total_s / tiling_s.

With ``--engine ray`` the same folder and model go through the local runner and then through the Ray
engine (a local Ray instance started before the clock runs, as a cluster would be; the workers'
start-up and model loading are timed), and the line holds both and ``ray_vs_local_throughput``
(target >= 0.85 on 2 cores). With several workers, ``outside_model_s_per_scan`` counts worker-seconds:
(total_s * workers - model_s) / scans, and ``overhead_ratio`` is total_s * workers / model_s;
``workers_start_s`` is how long the pool took to start (workers importing torch and loading the model,
paid once per batch) and ``scans_per_hour_after_start`` the throughput without it.
``fsync_s_per_scan`` is the time spent flushing outputs to the disk (durable writes, see
docs/reliability.md) per scan and ``fsync_share`` its fraction of the run's wall time (target <= 0.01);
local engine only (Ray workers flush in their own processes).
Each Ray worker uses one CPU and one torch thread; ``--threads`` sets the local runner's torch threads
(default: torch's, one per core), e.g. ``--threads 1`` for the same arithmetic as a Ray worker.
The local runner segments ``--parallel-scans`` scans at once (default: the runner's, 2 on CPU), each
on an equal share of the threads; it counts as that many workers in the formulas above, so that
``overhead_ratio`` stays core-seconds of the whole run over core-seconds of the network.

Precision: the local runner also segments the same scans with ``precision: float32`` and with
``precision: auto`` (bfloat16 where the CPU computes it natively), one after the other, each
measuring its window layout on its first scan; ``precision`` in the line holds both runs,
``auto_throughput_ratio`` (scans per hour, auto / float32), ``auto_network_speedup`` (network time,
float32 / auto) and ``auto_throughput_vs_network_speedup`` (the first over the second: how much of
the network's gain reaches the batch; target >= 0.85). ``--no-precision-compare`` skips it.

Usage:
    .venv/bin/python benchmarks/bench_batch.py [--model demo_out/model/bundle] [--quick] [--engine ray]

Without ``--model`` an untrained bundle of the demo's pipeline is used: the same network and the same
cost per scan as the trained demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_facts  # benchmarks/ is on sys.path when a benchmark runs as a script

from medseg.batch.runner import BatchSummary, PredictionSettings, run_prediction
from medseg.bundle import build_network, save_bundle
from medseg.config.spec import DatasetSpec
from medseg.demo import demo_pipeline
from medseg.io.atomic import fsync_seconds
from medseg.synth import make_phantom, write_dicom_series, write_nifti
from medseg.synth.dataset import dataset_spec


def make_folder(root: Path, n: int, shape: tuple[int, int, int], spacing: float) -> None:
    """Write ``n`` phantoms, even ones as NIfTI and odd ones as DICOM series."""
    for i in range(n):
        image, _label, affine = make_phantom(shape=shape, spacing=(spacing,) * 3, seed=100 + i)
        if i % 2 == 0:
            write_nifti(image.astype(np.int16), affine, root / f"ct{i:02d}.nii.gz")
        else:
            write_dicom_series(image, affine, root / f"ct{i:02d}", patient_name=f"Bench^{i}")


def report(summary: BatchSummary, total: float) -> dict:
    """Throughput and time outside the network of one run."""
    n = summary.ok + summary.failed
    worker_s = total * summary.workers
    tiling = sum(e["seconds"].get("model", 0.0) for e in summary.entries if e["status"] == "ok")
    return {
        "engine": summary.engine,
        "workers": summary.workers,
        "scans": n,
        "failed": summary.failed,
        "scans_per_hour": round(3600 * n / total, 1),
        "total_s": round(total, 2),
        "model_s": round(summary.model_seconds, 2),
        "outside_model_s_per_scan": round((worker_s - summary.model_seconds) / n, 3),
        "overhead_ratio": round(worker_s / summary.model_seconds, 3),
        "tiling_s": round(tiling, 2),
        "overhead_ratio_vs_tiling": round(worker_s / tiling, 3),
        "workers_start_s": round(summary.start_seconds, 2),
        "scans_per_hour_after_start": round(3600 * n / (total - summary.start_seconds), 1),
        "torch_threads_per_worker": max(1, torch.get_num_threads() // summary.workers)
        if summary.engine == "local"
        else 1,
    }


def compare_precisions(scans: Path, model: str, work: Path, uri: str, parallel: int | None) -> dict:
    """The same scans through the local runner in float32, then with ``precision: auto``."""
    runs = {}
    for precision in ("float32", "auto"):
        out = work / f"out_{precision}_{time.time_ns()}"
        settings = PredictionSettings(
            tracking_uri=uri, parallel_scans=parallel, model_options={"precision": precision}
        )
        t0 = time.perf_counter()
        summary = run_prediction(scans, out, models=[model], settings=settings)
        runs[precision] = report(summary, time.perf_counter() - t0)
    throughput = runs["auto"]["scans_per_hour"] / runs["float32"]["scans_per_hour"]
    network = runs["float32"]["model_s"] / runs["auto"]["model_s"]
    return {
        "precision": runs,
        "auto_throughput_ratio": round(throughput, 3),
        "auto_network_speedup": round(network, 3),
        "auto_throughput_vs_network_speedup": round(throughput / network, 3),
    }


def main() -> None:
    """Write the folder (once), run the batch, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle folder (default: untrained demo network)")
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="128x128x100 scans instead of 256x256x200")
    parser.add_argument("--workdir", default=None, help="keep the scans here between runs")
    parser.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: compare both")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the local runner")
    parser.add_argument(
        "--parallel-scans", type=int, default=None, help="scans the local runner segments at once"
    )
    parser.add_argument(
        "--no-precision-compare", action="store_true", help="skip the float32 / auto comparison"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (128, 128, 100) if args.quick else (256, 256, 200)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="medseg-bench-batch-"))
    scans = work / f"scans_{shape[0]}_{args.scans}"
    if not scans.is_dir():
        make_folder(scans, args.scans, shape, 1.5)
    model = args.model
    if model is None:
        cfg = demo_pipeline(1.0)
        spec = DatasetSpec.model_validate({**dataset_spec("bench", "CT"), "case_patterns": None, "cases": []})
        model = str(save_bundle(work / "untrained", cfg, spec, build_network(cfg, spec)))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    engines = ["local", "ray"] if args.engine == "ray" else ["local"]
    results = {}
    try:
        for engine in engines:
            if engine == "ray":  # started after the local run, so that it cannot slow that one down
                import ray

                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
            out = work / f"out_{engine}_{time.time_ns()}"
            t0 = time.perf_counter()
            fsync0 = fsync_seconds()
            parallel = args.parallel_scans if engine == "local" else None
            summary = run_prediction(
                scans,
                out,
                models=[model],
                settings=PredictionSettings(tracking_uri=uri, engine=engine, parallel_scans=parallel),
            )
            results[engine] = report(summary, time.perf_counter() - t0)
            if engine == "local":
                fsync = fsync_seconds() - fsync0
                results[engine]["fsync_s_per_scan"] = round(fsync / max(1, results[engine]["scans"]), 4)
                results[engine]["fsync_share"] = round(fsync / results[engine]["total_s"], 4)
    finally:
        if "ray" in engines:
            import ray

            ray.shutdown()
    if not args.no_precision_compare:
        results["local"] |= compare_precisions(scans, model, work, uri, args.parallel_scans)
    if args.engine == "local":
        print(json.dumps({**results["local"], "shape": list(shape), **machine_facts()}))
        return
    ratio = results["ray"]["scans_per_hour"] / results["local"]["scans_per_hour"]
    out = {"shape": list(shape), **results, "ray_vs_local_throughput": round(ratio, 3), **machine_facts()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
