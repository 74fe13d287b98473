"""Batch throughput: a folder of synthetic CT scans (half NIfTI, half DICOM) through `run_prediction`.

Prints one JSON line with ``scans_per_hour``, ``total_s``, ``model_s`` (sum of pure network time),
``outside_model_s_per_scan`` and ``overhead_ratio`` = total_s / model_s (target <= 1.15 on 2 cores).

Usage:
    .venv/bin/python benchmarks/bench_batch.py [--model demo_out/model/bundle] [--quick]

Without ``--model`` an untrained bundle of the demo's pipeline is used: the same network and the same
cost per scan as the trained demo model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from medseg.batch.runner import run_prediction
from medseg.bundle import build_network, save_bundle
from medseg.config.spec import DatasetSpec
from medseg.demo import demo_pipeline
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


def main() -> None:
    """Write the folder (once), run the batch, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle folder (default: untrained demo network)")
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="128x128x100 scans instead of 256x256x200")
    parser.add_argument("--workdir", default=None, help="keep the scans here between runs")
    args = parser.parse_args()
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
    out = work / f"out_{time.time_ns()}"
    t0 = time.perf_counter()
    summary = run_prediction(scans, out, [model], tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    total = time.perf_counter() - t0
    n = summary.ok + summary.failed
    print(
        json.dumps(
            {
                "scans": n,
                "failed": summary.failed,
                "shape": list(shape),
                "scans_per_hour": round(3600 * n / total, 1),
                "total_s": round(total, 2),
                "model_s": round(summary.model_seconds, 2),
                "outside_model_s_per_scan": round((total - summary.model_seconds) / n, 3),
                "overhead_ratio": round(total / summary.model_seconds, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
