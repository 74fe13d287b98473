"""The seed's ablation on the hippocampus data: U-Net (transposed conv) vs U-Net (resize-conv) vs
DeepLabV3+, each with and without the dense CRF, several seeds, one MLflow experiment, one table.

Each variant of ``pipelines/ablation/`` is trained on the training cases of fold 0 once per seed
(``medseg train --fold 0 --seed S``), then evaluated on fold 0's validation cases twice
(``medseg evaluate --no-crf`` and ``--crf``); finally ``medseg compare --group-by
pipeline,refine.crf.enabled`` prints mean ± sd per variant over the seeds and the differences to the
plain U-Net, marking those larger than twice the seed noise. Everything goes through the CLI, exactly
as a user would run it.

Usage:
    .venv/bin/python benchmarks/bench_ablation.py [--seeds 3] [--work /tmp/ablation]

Needs ``../shared/data/hippocampus``. About 3-5 minutes of training per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("unet_transpose", "unet_resize", "deeplab")
EXPERIMENT = "ablation-hippocampus"


def medseg(*args: str) -> None:
    """Run a medseg command, echoing it; stop on failure."""
    cmd = [sys.executable, "-m", "medseg.cli", *args]
    print("$ medseg " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    """Train, evaluate and compare every variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg-ablation"))
    parser.add_argument("--spec", default=str(REPO / "data_specs" / "hippocampus.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compare-only", action="store_true")
    args = parser.parse_args()
    work: Path = args.work
    start = time.perf_counter()
    if not args.compare_only:
        for variant in args.variants.split(","):
            for seed in range(args.seeds):
                model = work / f"{variant}-s{seed}"
                if not (model / "bundle" / "bundle.json").is_file():
                    medseg(
                        "train", f"pipelines/ablation/{variant}.yaml", "--data", args.spec, "--fold", "0",
                        "--seed", str(seed), "--out", str(model), "--experiment", EXPERIMENT,
                    )  # fmt: skip
                for crf in ("--no-crf", "--crf"):
                    name = f"{variant}-s{seed}-{crf.lstrip('-')}"
                    out = str(work / "eval" / name)
                    medseg(
                        "evaluate", "--data", args.spec, "--model", str(model / "bundle"), "--fold", "0",
                        crf, "--experiment", EXPERIMENT, "--run-name", name, "--out", out,
                    )  # fmt: skip
    medseg(
        "compare", "--experiment", EXPERIMENT, "--kind", "evaluate",
        "--metric", "dice_anterior_mean", "--metric", "dice_posterior_mean", "--metric", "dice_mean",
        "--group-by", "pipeline,refine.crf.enabled",
        "--baseline-group", "ablation-unet-transpose | False", "--out", str(work / "comparison"),
    )  # fmt: skip
    print(f"ablation done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
