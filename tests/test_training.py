"""Training: planning, folds, resume, bundles from paths and MLflow URIs, ensembles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.bundle import load_bundle
from medseg.config.pipeline import PipelineConfig, load_pipeline
from medseg.config.spec import load_spec
from medseg.errors import ConfigError
from medseg.models.registry import check_input_size, check_patch, size_divisor
from medseg.pipeline import Predictor
from medseg.training.loop import train
from medseg.training.planning import plan_pipeline, write_plan
from medseg.training.splits import make_splits

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medseg.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("train") / "ds", 4, shape=(32, 32, 16), seed=3)


def _cfg(**train) -> PipelineConfig:
    base = {"epochs": 2, "patch_size": [16, 16, 16], "batch_size": 1, "val_every": 1, "folds": 2}
    base.update(train)
    return PipelineConfig.model_validate(
        {
            "name": "tiny",
            "model": {"name": "unet3d", "params": {"channels": [4, 8], "num_res_units": 0}},
            "train": base,
            "inference": {"batch_size": 2},
        }
    )


def _copy_spec(src: Path, dest: Path) -> Path:
    """A private copy of the spec file (splits get written beside it) pointing at the same data."""
    dest.mkdir(parents=True, exist_ok=True)
    text = src.read_text().replace("data_root: nifti", f"data_root: {src.parent / 'nifti'}")
    (dest / "spec.yaml").write_text(text)
    return dest / "spec.yaml"


def test_plan_synthetic_gives_a_config_the_model_accepts(small_dataset: Path, tmp_path: Path) -> None:
    cfg, text = plan_pipeline(load_spec(small_dataset))
    divisor = size_divisor(cfg.model.name, **cfg.model.params)
    check_input_size(cfg.train.patch_size, divisor)
    assert cfg.preprocess.target_spacing == (1.5, 1.5, 3.0)
    intensity = cfg.preprocess.intensity[0]
    assert intensity.scheme == "ct"
    assert intensity.clip[0] < 40 < intensity.clip[1]  # the phantoms' soft tissue sits at about 40 HU
    assert "# preprocess.target_spacing: median spacing" in text
    # no mirror_axes in the spec: flips and mirroring on every axis, with nnU-Net's augmentation
    assert cfg.train.augment.flip_axes == cfg.inference.tta_axes == (0, 1, 2)
    assert (cfg.train.augment.rotate_prob, cfg.train.augment.scale_prob) == (0.2, 0.2)
    assert "(8 passes averaged)" in text
    path = write_plan(tmp_path / "planned.yaml", text)
    assert load_pipeline(path) == cfg
    # a spec that allows mirroring along fewer axes: the plan flips and mirrors along those only
    loaded = load_spec(small_dataset)
    narrow = loaded.model_copy(update={"spec": loaded.spec.model_copy(update={"mirror_axes": (2, 0)})})
    cfg, text = plan_pipeline(narrow)
    assert cfg.train.augment.flip_axes == cfg.inference.tta_axes == (0, 2)
    assert "flips only along left-right, inferior-superior" in text
    assert "(4 passes averaged)" in text


def test_plan_hippocampus() -> None:
    from geometry_helpers import shared

    shared("hippocampus")
    cfg, text = plan_pipeline(load_spec(REPO / "data_specs" / "hippocampus.yaml"))
    check_input_size(cfg.train.patch_size, size_divisor(cfg.model.name, **cfg.model.params))
    assert cfg.preprocess.intensity[0].scheme == "zscore"
    assert "205 cases" in text
    # the patch holds a median hippocampus volume whole: distinct volumes per step, not repeated crops
    assert (cfg.train.batch_size, cfg.train.samples_per_volume) == (4, 1)
    assert "holds the median volume whole" in text
    # the spec's mirror_axes [0]: its labels name the front and the back, so flips go left-right only
    assert cfg.train.augment.flip_axes == cfg.inference.tta_axes == (0,)
    assert "flips only along left-right (the data spec's mirror_axes [0])" in text
    assert "(2 passes averaged)" in text
    shipped = REPO / "pipelines" / "hippocampus.yaml"
    shipped_cfg = load_pipeline(shipped)
    check_patch(shipped_cfg.model.name, shipped_cfg.train.patch_size, **shipped_cfg.model.params)
    # the shipped pipeline is the plan plus the benchmark's 30-minute budget
    assert shipped_cfg.train.augment == cfg.train.augment
    assert shipped_cfg.inference == cfg.inference
    assert (shipped_cfg.model, shipped_cfg.preprocess) == (cfg.model, cfg.preprocess)


def test_anisotropic_plan_uses_finer_coarse_axis(tmp_path: Path) -> None:
    from medseg.training.planning import Fingerprint, plan_target_spacing

    fp = Fingerprint(spacings=[(0.7, 0.7, 5.0), (0.8, 0.8, 5.0), (0.7, 0.7, 2.5), (0.75, 0.75, 5.0)])
    spacing, why = plan_target_spacing(fp, 3.0)
    assert spacing[2] < 5.0
    assert "10th percentile" in why


def test_splits_are_stable_and_cover_every_case() -> None:
    ids = [f"c{i}" for i in range(10)]
    splits = make_splits(ids, 5, seed=0)
    assert sorted(c for s in splits for c in s["val"]) == ids
    assert make_splits(list(reversed(ids)), 5, seed=0) == splits
    for s in splits:
        assert not set(s["val"]) & set(s["train"])
    with pytest.raises(ConfigError, match="folds must be between 2"):
        make_splits(ids, 11)


def test_fold_training_stores_splits_beside_the_spec(small_dataset: Path, tmp_path: Path) -> None:
    spec = _copy_spec(small_dataset, tmp_path / "spec")
    result = train(_cfg(epochs=1), load_spec(spec), tmp_path / "fold1", fold=1)
    splits = json.loads((tmp_path / "spec" / "spec.splits.json").read_text())
    assert result.val_cases == splits[1]["val"]
    with pytest.raises(ConfigError, match=r"fold must be in 0\.\.1"):
        train(_cfg(epochs=1), load_spec(spec), tmp_path / "bad", fold=2)


class _StopError(Exception):
    pass


def test_resume_matches_an_uninterrupted_run(small_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(epochs=4, deterministic=True, val_every=2)
    data = load_spec(small_dataset)
    whole = train(cfg, data, tmp_path / "whole")

    def stop_after_two(epoch: int, total: int, metrics: dict) -> None:
        if epoch == 2:
            raise _StopError

    with pytest.raises(_StopError):
        train(cfg, data, tmp_path / "split", progress=stop_after_two)
    interrupted_run = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["run_id"]
    resumed = train(cfg, data, tmp_path / "split", resume=True)
    assert resumed.run_id == interrupted_run  # the same MLflow run goes on
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    from medseg.tracking.store import client

    mlflow_client = client()
    assert len(mlflow_client.get_metric_history(resumed.run_id, "train_loss")) == 4
    assert mlflow_client.get_run(resumed.run_id).info.status == "FINISHED"
    a = load_bundle(tmp_path / "whole" / "last").network.state_dict()
    b = load_bundle(tmp_path / "split" / "last").network.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert whole.history[-1]["train_loss"] == pytest.approx(resumed.history[-1]["train_loss"])
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        train(cfg, data, tmp_path / "empty", resume=True)


def test_bundle_from_path_and_mlflow_uris_predict_identically(small_dataset: Path, tmp_path: Path) -> None:
    from medseg.tracking import register_bundle

    result = train(_cfg(epochs=1), load_spec(small_dataset), tmp_path / "m")
    scan = next((small_dataset.parent / "nifti" / "imagesTr").glob("*.nii.gz"))
    reference = Predictor.from_path(result.bundle).predict_path(scan).labels
    version = register_bundle(result.run_id, "tiny-test-model", alias="champion")
    for uri in (
        f"runs:/{result.run_id}/bundle",
        f"models:/tiny-test-model/{version}",
        "models:/tiny-test-model@champion",
    ):
        labels = Predictor.from_path(uri).predict_path(scan).labels
        np.testing.assert_array_equal(labels, reference)
    with pytest.raises(ConfigError, match="registered model version"):
        Predictor.from_path("models:/tiny-test-model/99")


def test_two_fold_ensemble_is_the_mean_of_its_members(small_dataset: Path, tmp_path: Path) -> None:
    spec = _copy_spec(small_dataset, tmp_path / "spec")
    bundles = [train(_cfg(epochs=1), load_spec(spec), tmp_path / f"f{k}", fold=k).bundle for k in (0, 1)]
    scan = next((small_dataset.parent / "nifti" / "imagesTr").glob("*.nii.gz"))
    from medseg.io import load_image

    image = load_image(scan)
    members = [Predictor.from_path(b).predict(image, keep_probabilities=True).probabilities for b in bundles]
    predictor = Predictor.from_path(*bundles)
    predictor.refine = predictor.refine.switched(postprocess=False)  # labels: the plain argmax
    ensemble = predictor.predict(image, keep_probabilities=True)
    torch.testing.assert_close(ensemble.probabilities, (members[0] + members[1]) / 2)
    np.testing.assert_array_equal(ensemble.labels, ensemble.probabilities.argmax(0).numpy())
    shutil.rmtree(tmp_path / "f0")


def test_mixed_precision_autocasts_where_the_hardware_computes_half_precision(
    small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.tracking.store import client
    from medseg.training import precision

    assert precision.autocast_dtype("cpu", enabled=False) is None
    assert precision.autocast_dtype("cuda", enabled=True) is torch.float16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.autocast_dtype("cpu", enabled=True) is None  # emulated bfloat16 would be slower
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.autocast_dtype("cpu", enabled=True) is torch.bfloat16
    result = train(_cfg(epochs=2, mixed_precision=True), load_spec(small_dataset), tmp_path / "bf16")
    assert client().get_run(result.run_id).data.params["autocast"] == "bfloat16"
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    weights = load_bundle(tmp_path / "bf16" / "last").network.state_dict().values()
    assert {w.dtype for w in weights if w.is_floating_point()} == {torch.float32}  # autocast, not a cast
    plain = train(_cfg(epochs=1, mixed_precision=False), load_spec(small_dataset), tmp_path / "fp32")
    assert client().get_run(plain.run_id).data.params["autocast"] == "float32"


def test_flips_stay_on_the_configured_axes_and_prediction_mirrors_only_those() -> None:
    import pydantic

    from medseg.config.pipeline import TrainConfig
    from medseg.training.data import random_transforms

    image = torch.arange(8 * 6 * 4, dtype=torch.float32).reshape(1, 8, 6, 4)
    label = torch.ones(1, 8, 6, 4, dtype=torch.uint8)
    seen = set()
    for axes in ((0,), (1, 2), ()):
        aug = {"flip_prob": 1.0, "flip_axes": list(axes), "intensity_prob": 0.0, "noise_prob": 0.0}
        tcfg = TrainConfig.model_validate({"patch_size": [8, 6, 4], "samples_per_volume": 1, "augment": aug})
        out = random_transforms(tcfg)({"image": image.clone(), "label": label.clone()})[0]["image"]
        want = torch.flip(image, dims=[a + 1 for a in axes]) if axes else image
        assert torch.equal(torch.as_tensor(out), want)
        seen.add(tuple(torch.as_tensor(out).flatten()[:3].tolist()))
    assert len(seen) == 3  # three different outcomes, so the check above could fail

    def pipeline(flip_axes: list[int], tta_axes: list[int], flip_prob: float = 0.5) -> PipelineConfig:
        return PipelineConfig.model_validate(
            {
                "name": "p",
                "train": {"augment": {"flip_axes": flip_axes, "flip_prob": flip_prob}},
                "inference": {"tta_axes": tta_axes},
            }
        )

    assert pipeline([0], [0]).inference.tta_axes == (0,)
    assert pipeline([0, 1, 2], [0, 1, 2]).train.augment.flip_axes == (0, 1, 2)
    with pytest.raises(pydantic.ValidationError, match=r"never saw flips along \[1, 2\]"):
        pipeline([0], [0, 1, 2])
    with pytest.raises(pydantic.ValidationError, match=r"never saw flips along \[0\]"):
        pipeline([0, 1, 2], [0], flip_prob=0.0)
    with pytest.raises(pydantic.ValidationError, match="flip_axes must be distinct spatial axes"):
        pipeline([1, 1], [])
