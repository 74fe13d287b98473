"""Data-parallel training: case shards, and two gloo processes training one model into one MLflow run."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from medseg.bundle import load_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import load_spec
from medseg.tracking import find_runs
from medseg.tracking.store import client
from medseg.training.distributed import DistContext, shard_cases, train_distributed


@pytest.fixture(scope="module")
def four_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medseg.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("ddp") / "ds", 4, shape=(32, 32, 16), seed=5, dicom=False)


def _cfg(epochs: int = 2) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "tiny-ddp",
            "model": {"name": "unet3d", "params": {"channels": [4, 8], "num_res_units": 0}},
            "train": {
                "epochs": epochs,
                "patch_size": [16, 16, 16],
                "batch_size": 1,
                "val_every": 1,
                "val_fraction": 0.25,
            },
            "inference": {"batch_size": 2},
        }
    )


def test_shards_are_equal_and_cover_every_case() -> None:
    cases = [f"c{i}" for i in range(7)]
    for world in (1, 2, 3, 8):
        shards = [shard_cases(cases, rank=r, world_size=world, seed=3) for r in range(world)]
        assert {len(s) for s in shards} == {math.ceil(len(cases) / world)}  # equal batches per rank
        assert set().union(*shards) == set(cases)
    assert shard_cases(cases, rank=1, world_size=2, seed=3) == shard_cases(
        list(cases), rank=1, world_size=2, seed=3
    )  # same on every rank
    assert shard_cases([], rank=0, world_size=2, seed=0) == []
    with pytest.raises(ValueError, match=r"rank must be in 0\.\.1, got 2"):
        shard_cases(cases, rank=2, world_size=2, seed=0)
    ranks = [DistContext(rank=r, world_size=3) for r in range(3)]
    assert [ctx.is_main for ctx in ranks] == [True, False, False]
    for seed in (0, 3):
        shards = [ctx.shard(cases, seed) for ctx in ranks]
        expected = [shard_cases(cases, rank=r, world_size=3, seed=seed) for r in range(3)]
        assert [s[0] for s in shards] == expected
        patch_seeds = [s[1] for s in shards]
        assert len(set(patch_seeds)) == 3  # each rank samples its own patches
        assert patch_seeds[0] == seed  # rank 0 samples as a single process with that seed would
        assert [ctx.shard(cases, seed)[1] for ctx in ranks] == patch_seeds  # the same on every call
    # no two ranks of neighbouring seeds share a patch seed either (runs with seeds 0, 1, 2 stay apart)
    assert len({ctx.shard(cases, seed)[1] for ctx in ranks for seed in range(3)}) == 9


@pytest.mark.slow  # spawns 2 processes that each import torch and MONAI (about 25 s on 2 cores)
def test_two_gloo_processes_train_one_model_and_log_one_run(four_cases: Path, tmp_path: Path) -> None:
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    seen: list[tuple[int, int, dict]] = []
    result = train_distributed(
        _cfg(),
        load_spec(four_cases),
        tmp_path / "model",
        nproc=2,
        experiment=experiment,
        progress=lambda epoch, total, metrics: seen.append((epoch, total, metrics)),
        threads=1,
    )
    assert [(e, t) for e, t, _ in seen] == [(1, 2), (2, 2)]  # rank 0's progress, in this process
    assert all(np.isfinite(m["train_loss"]) and "val_dice_mean" in m for _, _, m in seen)
    runs = find_runs(experiment, "train")
    assert [r["run_id"] for r in runs] == [result.run_id]  # one run, from rank 0
    run = runs[0]
    assert run["status"] == "FINISHED"
    assert run["params"]["nproc"] == "2"
    assert run["params"]["n_train_cases"] == "3"
    history = client().get_metric_history(result.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]  # logged once per epoch, not once per rank
    assert len(result.history) == 2
    assert result.val_cases
    assert np.isfinite(result.best_dice)
    bundle = load_bundle(result.bundle)
    last = load_bundle(tmp_path / "model" / "last")
    assert all(k.split(".")[0] != "module" for k in bundle.network.state_dict())  # not the DDP wrapper
    assert bundle.pipeline.name == last.pipeline.name == "tiny-ddp"
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["bundle", "checkpoint.pt", "last"]


@pytest.mark.slow  # spawns 2 processes (about 15 s)
def test_a_config_error_in_the_ranks_reaches_the_cli(four_cases: Path, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(_cfg(1).model_dump(mode="json")))
    spec = tmp_path / "spec" / "spec.yaml"
    spec.parent.mkdir()
    spec.write_text(
        four_cases.read_text().replace("data_root: nifti", f"data_root: {four_cases.parent / 'nifti'}")
    )
    args = ["train", str(pipeline), "--data", str(spec), "--out", str(tmp_path / "m"), "--nproc", "2"]
    done = CliRunner().invoke(app, [*args, "--fold", "7"])
    assert done.exit_code == 2, done.output
    assert "fold must be in 0..4, got 7" in done.output
    done = CliRunner().invoke(app, [*args, "--nproc", "0"])
    assert done.exit_code == 2
    assert "nproc must be >= 1, got 0" in done.output
