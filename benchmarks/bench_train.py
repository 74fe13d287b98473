"""Training throughput on the hippocampus pipeline: loader alone, step alone, full loop.

Prints one JSON line with samples/s of each and ``loader_ratio`` = full-loop time / step-only time
(target on 2 CPU cores: <= 1.10, i.e. loading and augmentation are not what training waits for).

Usage:
    .venv/bin/python benchmarks/bench_train.py [--steps 30] [--pipeline pipelines/hippocampus.yaml]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import machine_facts  # benchmarks/ is on sys.path when a benchmark runs as a script
from monai.losses import DiceCELoss

from medseg.bundle import build_network
from medseg.config.pipeline import load_pipeline
from medseg.config.spec import load_spec
from medseg.training.data import PatchLoader

REPO = Path(__file__).resolve().parents[1]


def _batches(patches: PatchLoader, n: int) -> list[dict]:
    out: list[dict] = []
    epoch = 0
    while len(out) < n:
        epoch += 1
        for batch in patches.epoch(epoch):
            out.append(batch)
            if len(out) == n:
                break
    return out


def main() -> None:
    """Run the three measurements and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(REPO / "pipelines" / "hippocampus.yaml"))
    parser.add_argument("--spec", default=str(REPO / "data_specs" / "hippocampus.yaml"))
    parser.add_argument("--cases", type=int, default=40, help="cases to cache")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    cfg = load_pipeline(args.pipeline)
    data = load_spec(args.spec)
    spec = cfg.effective_spec(data.spec)
    cases = data.resolve_cases(require_labels=True)[: args.cases]
    patches = PatchLoader(cases, spec, cfg.train, seed=0)
    _batches(patches, len(cases))  # fill the cache once: the loop measures steady-state epochs
    per_batch = cfg.train.batch_size * cfg.train.samples_per_volume

    t0 = time.perf_counter()
    cached = _batches(patches, args.steps)
    loader_s = time.perf_counter() - t0

    network = build_network(cfg, spec)
    network.train()
    opt = torch.optim.AdamW(network.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def step(batch: dict) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(network(batch["image"]), batch["label"])
        loss.backward()
        opt.step()

    step(cached[0])  # warm-up
    t0 = time.perf_counter()
    for batch in cached:
        step(batch)
    step_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    done = 0
    epoch = 100
    while done < args.steps:
        epoch += 1
        for batch in patches.epoch(epoch):
            step(batch)
            done += 1
            if done == args.steps:
                break
    full_s = time.perf_counter() - t0

    samples = args.steps * per_batch
    print(
        json.dumps(
            {
                **machine_facts(),
                "pipeline": Path(args.pipeline).name,
                "patch_size": list(cfg.train.patch_size),
                "samples_per_step": per_batch,
                "steps": args.steps,
                "loader_samples_per_s": round(samples / loader_s, 2),
                "step_samples_per_s": round(samples / step_s, 2),
                "full_loop_samples_per_s": round(samples / full_s, 2),
                "loader_ratio": round(full_s / step_s, 3),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
