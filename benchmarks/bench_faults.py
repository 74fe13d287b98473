"""Random-kill soak: SIGKILL `medseg predict` at random points of its write path, resume, check, repeat.

Each iteration kills a batch at a random named point (see :mod:`medseg.faults`) on a random
occurrence, then checks the output folder: the manifest parses, every case folder that exists holds
a ``result.json`` whose outputs all exist and whose label map equals the expected one. After the
last kill a clean run must finish every scan. Prints one JSON line: ``iterations``, ``kills`` (runs
that did die at their point), ``losses`` (iterations that found a partial or wrong output: must be 0)
and seconds.

Usage:
    .venv/bin/python benchmarks/bench_faults.py [--iterations 50] [--scans 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg import faults
from medseg.bundle import build_network, save_bundle
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.synth import write_nifti


def _bundle(path: Path) -> Path:
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": {"background": 0, "a": 1, "b": 2},
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    return save_bundle(path, cfg, spec, build_network(cfg, spec))


def _check(out: Path, expected: dict[str, np.ndarray]) -> list[str]:
    """Problems found in ``out`` (empty: every output complete and valid or absent)."""
    problems = []
    if (out / "manifest.json").exists():
        try:
            json.loads((out / "manifest.json").read_text())
        except json.JSONDecodeError as exc:
            problems.append(f"manifest.json does not parse: {exc}")
    for case in out.iterdir() if out.is_dir() else ():
        if case.name.startswith(".") or not case.is_dir():
            continue
        try:
            result = json.loads((case / "result.json").read_text())
            missing = [p for p in result["outputs"] if not (out / p).is_file()]
            labels = np.asarray(nib.load(case / "labels.nii.gz").dataobj)
        except Exception as exc:
            problems.append(f"{case.name}: {type(exc).__name__}: {exc}")
            continue
        if missing:
            problems.append(f"{case.name}: outputs missing {missing}")
        if not np.array_equal(labels, expected[case.name]):
            problems.append(f"{case.name}: label map differs from the expected one")
    return problems


def main() -> None:
    """Run the soak and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="medseg-bench-faults-"))
    expected = {}
    for i in range(args.scans):
        vol = np.random.default_rng(i).integers(0, 3, size=(20, 18, 8)).astype(np.int16)
        write_nifti(vol, np.eye(4), work / "in" / f"scan{i:02d}.nii.gz")
        expected[f"scan{i:02d}"] = vol
    bundle = _bundle(work / "bundle")
    out = work / "out"
    cmd = [sys.executable, "-m", "medseg.cli", "predict", str(work / "in"), str(out)]
    cmd += ["--model", str(bundle), "--export", "none", "--overwrite"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    kills = losses = 0
    t0 = time.perf_counter()
    for it in range(args.iterations):
        if it % 3 == 0:  # start over now and then, so that kills also land early in a batch
            subprocess.run(["rm", "-rf", str(out)], check=True)
        spec = f"{rng.choice(faults.POINTS)}:{rng.randint(1, 2 * args.scans)}"
        proc = subprocess.run(cmd, env={**env, faults.KILL_ENV: spec}, capture_output=True, check=False)
        kills += proc.returncode == -signal.SIGKILL
        problems = _check(out, expected)
        if problems:
            losses += 1
            print(f"iteration {it} ({spec}): {problems}", file=sys.stderr)
    final = subprocess.run(cmd, env=env, capture_output=True, check=False)
    complete = final.returncode == 0 and not _check(out, expected)
    complete = complete and all((out / c / "result.json").is_file() for c in expected)
    print(
        json.dumps(
            {
                "iterations": args.iterations,
                "kills": kills,
                "losses": losses,
                "final_run_complete": complete,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
