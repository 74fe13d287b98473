"""The refine stage in the pipeline: config section, predictor (full and memory-bounded), batch records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.bundle import build_network, save_bundle
from medseg.config.pipeline import PipelineConfig, load_pipeline
from medseg.config.spec import DatasetSpec
from medseg.errors import ConfigError
from medseg.pipeline import Predictor, foreground_entropy
from medseg.refine import RefineConfig
from medseg.synth import write_nifti

LABELS = {"background": 0, "a": 1, "b": 2}


def _bundle(
    tmp_path: Path, refine: dict | None = None, target_spacing=None, inference: dict | None = None
) -> Path:
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": LABELS,
            "cases": [],
            "target_spacing": target_spacing,
        }
    )
    raw = {"name": "identity", "model": {"name": "passthrough"}, "train": {"patch_size": [16, 16, 8]}}
    if refine is not None:
        raw["refine"] = refine
    if inference is not None:
        raw["inference"] = inference
    cfg = PipelineConfig.model_validate(raw)
    return save_bundle(tmp_path / "bundle", cfg, spec, build_network(cfg, spec))


def _scan(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Two boxes and a one-voxel island of label 1 far from its box."""
    vol = np.zeros((24, 20, 10), dtype=np.int16)
    vol[3:12, 2:10, 2:7] = 1
    vol[14:22, 11:18, 3:9] = 2
    vol[20, 2, 1] = 1
    return write_nifti(vol, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "scan.nii.gz"), vol


def test_refine_section_in_pipeline_yaml(tmp_path: Path) -> None:
    assert not PipelineConfig(name="x").refine.crf.enabled  # off unless asked for
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "crf",
                "refine": {
                    "crf": {"iterations": 3, "bilateral_sigma_mm": 8.0},
                    "postprocess": {"choose": False, "labels": {1: {"keep_largest": True}}},
                },
            }
        )
    )
    cfg = load_pipeline(path)
    assert cfg.refine.crf.enabled
    assert cfg.refine.crf.iterations == 3
    assert cfg.refine.postprocess.for_label(1).keep_largest
    off = cfg.refine.switched(crf=False, postprocess=False)
    assert not off.crf.enabled
    assert not off.postprocess.enabled
    assert cfg.refine.switched() == cfg.refine
    path.write_text(yaml.safe_dump({"name": "bad", "refine": {"crf": {"iterations": -1}}}))
    with pytest.raises(ConfigError, match=r"refine\.crf\.iterations"):
        load_pipeline(path)


def test_postprocessing_stored_in_the_bundle_is_applied(tmp_path: Path) -> None:
    src, vol = _scan(tmp_path)
    plain = Predictor.from_path(_bundle(tmp_path / "plain")).predict_path(src)
    assert plain.refine is None  # no CRF, nothing chosen: refinement does not run
    assert np.array_equal(plain.labels, vol)
    bundle = _bundle(
        tmp_path / "post", {"postprocess": {"choose": False, "labels": {1: {"keep_largest": True}}}}
    )
    pred = Predictor.from_path(bundle).predict_path(src)
    expected = vol.copy()
    expected[20, 2, 1] = 0
    assert np.array_equal(pred.labels, expected)
    assert pred.refine.post_changed_fraction == pytest.approx(1 / vol.size)
    assert pred.refine.crf_changed_fraction == 0.0
    # switched off at prediction time
    off = Predictor.from_path(bundle, refine=RefineConfig().switched(postprocess=False)).predict_path(src)
    assert np.array_equal(off.labels, vol)


def test_crf_runs_in_full_and_bounded_mode(tmp_path: Path) -> None:
    src, vol = _scan(tmp_path)
    crf = {"iterations": 2, "roi_margin_mm": 4.0, "spatial_weight": 1.0, "bilateral_weight": 1.0}
    refine = {"crf": crf, "postprocess": {"choose": False}}
    predictor = Predictor.from_path(_bundle(tmp_path, refine, target_spacing=[1.0, 1.0, 1.5]))
    unrefined = predictor.predict_path(src)
    predictor.refine = predictor.refine.switched(crf=False)
    plain = predictor.predict_path(src)
    predictor.refine = predictor.refine.switched(crf=True)
    assert np.array_equal(plain.labels, vol)
    full = unrefined
    assert full.refine is not None
    assert full.refine.crf_blocks >= 1
    assert full.refine.crf_roi is not None
    assert "refine" in full.seconds
    # the report says exactly how many voxels the CRF changed (the passthrough model's soft
    # probabilities, 0.58 for the true label, let it change some)
    assert full.refine.crf_changed_fraction == pytest.approx((full.labels != plain.labels).mean())
    assert full.quality["foreground_entropy"] > 0.0
    # bounded memory, as a pipeline config chooses it
    bounded_bundle = _bundle(
        tmp_path / "bounded", refine, target_spacing=[1.0, 1.0, 1.5], inference={"memory": "bounded"}
    )
    bounded = Predictor.from_path(bounded_bundle).predict_path(src)
    plan = next(r for r in bounded.provenance if r.name == "plan")
    assert plan.params["crf"] == "preprocessed_grid"
    assert bounded.labels.shape == vol.shape
    assert bounded.refine is not None
    assert bounded.refine.crf_blocks >= 1
    # on the preprocessed grid, then back to the source grid: close to the source-grid CRF
    assert (bounded.labels == full.labels).mean() > 0.9
    assert "foreground_entropy" not in bounded.quality  # no probabilities kept in that mode


def test_foreground_entropy() -> None:
    import torch

    probs = torch.tensor([[[0.5, 1.0]], [[0.5, 0.0]]])  # (K=2, 1, 2)
    labels = np.array([[1, 0]])
    assert foreground_entropy(probs, labels) == pytest.approx(np.log(2))
    assert foreground_entropy(probs, np.zeros((1, 2), int)) is None


def test_batch_records_what_refinement_changed(tmp_path: Path) -> None:
    from medseg.batch.runner import PredictionSettings, run_prediction

    src, _ = _scan(tmp_path)
    bundle = _bundle(tmp_path, {"postprocess": {"choose": False, "labels": {1: {"keep_largest": True}}}})
    summary = run_prediction(src, tmp_path / "out", models=[bundle])
    assert summary.ok == 1
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["scans"][0]
    assert entry["refine"]["post_changed_fraction"] > 0
    assert "foreground_entropy" in entry["quality"]
    csv_text = (tmp_path / "out" / "manifest.csv").read_text()
    assert "changed_fraction" in csv_text.splitlines()[0]
    summary = run_prediction(
        src, tmp_path / "out2", models=[bundle], settings=PredictionSettings(postprocess=False)
    )
    entry = json.loads((tmp_path / "out2" / "manifest.json").read_text())["scans"][0]
    assert "refine" not in entry
