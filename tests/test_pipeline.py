"""The walking skeleton: bundles, predict on the source grid (NIfTI and DICOM), train → predict → MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.bundle import build_network, load_bundle, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.errors import ConfigError, InputError
from medseg.io import load_image
from medseg.pipeline import Predictor
from medseg.synth import write_dicom_series, write_nifti

LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}


def _passthrough_bundle(tmp_path: Path, target_spacing=None) -> Path:
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": LABELS,
            "cases": [],
            "target_spacing": target_spacing,
        }
    )
    cfg = PipelineConfig.model_validate(
        {"name": "identity", "model": {"name": "passthrough"}, "train": {"patch_size": [16, 16, 8]}}
    )
    return save_bundle(tmp_path / "bundle", cfg, spec, build_network(cfg, spec))


def _label_volume(shape=(23, 19, 9), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, dtype=np.int16)
    for v in (1, 2, 3):  # random boxes, so any shift or flip shows
        lo = rng.integers(0, np.array(shape) // 2)
        hi = lo + rng.integers(2, np.array(shape) // 2 + 1)
        vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = v
    return vol


def _oblique(flip: bool) -> np.ndarray:
    a = np.radians(17)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    if flip:
        rot = rot @ np.diag([1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.9, 1.1, 2.5])
    aff[:3, 3] = [12.0, -40.0, 7.5]
    return aff


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_passthrough_prediction_lands_on_input_voxels(tmp_path: Path, fmt: str, flip: bool) -> None:
    vol = _label_volume()
    aff = _oblique(flip)
    if fmt == "nifti":
        src = write_nifti(vol, aff, tmp_path / "scan.nii.gz")
    else:
        src = tmp_path / "series"
        write_dicom_series(vol, aff, src, modality="MR", shuffle_instance_numbers=True)
    predictor = Predictor.from_path(_passthrough_bundle(tmp_path))
    result = predictor.predict_to_file(src, tmp_path / "out" / "labels.nii.gz")
    source = load_image(src)
    written = load_image(tmp_path / "out" / "labels.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine.numpy(), source.affine.numpy(), atol=1e-5)
    np.testing.assert_array_equal(written[0].numpy(), source[0].numpy())
    assert set(result.seconds) >= {"load", "preprocess", "model", "to_source", "write"}


def test_passthrough_through_resampling_keeps_labels(tmp_path: Path) -> None:
    """A round trip through a finer grid and back must still land on the input's voxels."""
    vol = _label_volume(shape=(20, 18, 8))
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    src = write_nifti(vol, aff, tmp_path / "scan.nii.gz")
    predictor = Predictor.from_path(_passthrough_bundle(tmp_path, target_spacing=[0.5, 0.5, 1.0]))
    result = predictor.predict_path(src)
    assert result.labels.shape == vol.shape
    assert (result.labels == vol).mean() > 0.97  # only boundary voxels may move


def test_bundle_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    spec = DatasetSpec.model_validate(
        {"name": "t", "channels": [{"name": "ct", "modality": "CT"}], "labels": LABELS, "cases": []}
    )
    cfg = PipelineConfig.model_validate(
        {"name": "t", "model": {"name": "unet3d", "params": {"channels": [4, 8]}}}
    )
    net = build_network(cfg, spec)
    folder = save_bundle(tmp_path / "b", cfg, spec, net, {"note": "x"})
    bundle = load_bundle(folder)
    x = torch.randn(1, 1, 8, 8, 8)
    net.eval()
    with torch.inference_mode():
        torch.testing.assert_close(bundle.network(x), net(x))
    assert bundle.pipeline == cfg
    assert bundle.info["note"] == "x"
    raw = (folder / "weights.pt").read_bytes()
    (folder / "weights.pt").write_bytes(raw[:-8] + b"\x00" * 8)
    with pytest.raises(ConfigError, match="SHA-256"):
        load_bundle(folder)
    with pytest.raises(ConfigError, match=r"must be a folder with bundle\.json"):
        load_bundle(tmp_path / "nothing")


def test_cli_predict_folder_with_a_broken_scan(tmp_path: Path) -> None:
    bundle = _passthrough_bundle(tmp_path)
    scans = tmp_path / "scans"
    write_nifti(_label_volume(seed=1), _oblique(False), scans / "good.nii.gz")
    write_dicom_series(_label_volume(seed=2), _oblique(True), scans / "series", modality="MR")
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 definitely not gzip")
    result = CliRunner().invoke(app, ["predict", str(scans), str(tmp_path / "out"), "--model", str(bundle)])
    assert result.exit_code == 1, result.output
    assert "2 scan(s) segmented (0 kept from an earlier run), 1 failed" in result.output
    assert "broken: failed" in result.output
    assert (tmp_path / "out" / "good" / "labels.nii.gz").is_file()
    dicom_out = list((tmp_path / "out").glob("dicom-*/labels.nii.gz"))
    assert len(dicom_out) == 1
    np.testing.assert_array_equal(
        load_image(dicom_out[0])[0].numpy(), load_image(scans / "series")[0].numpy()
    )


def test_cli_refuses_to_start_with_a_bad_model(tmp_path: Path) -> None:
    write_nifti(_label_volume(), np.eye(4), tmp_path / "a.nii.gz")
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "a.nii.gz"), str(tmp_path / "o"), "--model", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "model bundle must be a folder" in result.output


@pytest.mark.slow
def test_tiny_train_predict_and_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from medseg.batch.runner import run_prediction
    from medseg.config.spec import load_spec
    from medseg.synth import generate_dataset
    from medseg.training.loop import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec_path = generate_dataset(tmp_path / "data", 4, shape=(32, 32, 16), seed=1)
    cfg = PipelineConfig.model_validate(
        {
            "name": "tiny",
            "model": {"name": "unet3d", "params": {"channels": [4, 8], "num_res_units": 0}},
            "train": {
                "epochs": 2,
                "patch_size": [16, 16, 16],
                "batch_size": 1,
                "val_every": 1,
                "val_fraction": 0.25,
            },
        }
    )
    result = train(cfg, load_spec(spec_path), tmp_path / "model")
    assert (result.bundle / "bundle.json").is_file()
    assert len(result.history) == 2
    assert 0.0 <= result.best_dice <= 1.0
    summary = run_prediction(
        tmp_path / "data" / "nifti" / "imagesTr", tmp_path / "pred", models=[result.bundle]
    )
    assert summary.ok == 4
    assert summary.failed == 0
    first = load_image(next((tmp_path / "pred").glob("*/labels.nii.gz")))
    assert first.shape[1:] == (32, 32, 16)
    # both runs are in the default embedded store, ./mlflow.db
    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    train_run = client.get_run(result.run_id)
    assert train_run.data.params["pipeline.model.name"] == "unet3d"
    assert len(client.get_metric_history(result.run_id, "train_loss")) == 2
    assert "val_dice_mean" in train_run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "bundle" in artifacts
    # post-processing chosen on the validation case, stored with the model and logged
    assert "postprocess.json" in artifacts
    assert "val_dice_mean_refined" in train_run.data.metrics
    stored = load_bundle(result.bundle)
    assert stored.info["postprocess_chosen_on"] == 1
    assert stored.info["val_dice_mean"] == pytest.approx(result.best_dice)
    assert stored.pipeline.refine.postprocess.choose
    assert train_run.data.params["pipeline.refine.crf.enabled"] == "False"
    pred_run = client.get_run(summary.run_id)
    assert pred_run.data.metrics["scans_ok"] == 4
    assert pred_run.info.status == "FINISHED"


def test_labels_only_prediction_agrees_with_the_probability_path_without_its_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medseg.predict.stages

    vol = _label_volume()
    image = load_image(write_nifti(vol, _oblique(flip=True), tmp_path / "scan.nii.gz"))
    predictor = Predictor.from_path(_passthrough_bundle(tmp_path))  # reoriented, not resampled
    kept = predictor.predict(image, keep_probabilities=True)  # whole-volume probabilities, inverted
    assert kept.probabilities is not None
    with monkeypatch.context() as m:  # labels only: no probability volume is taken back to the source
        m.setattr(medseg.predict.stages, "invert_to_source", None)
        fast = predictor.predict(image)
    routes = {r.params.get("route") for r in fast.provenance if r.name == "model"}
    assert routes == {"labels_to_source"}
    assert [r.name for r in fast.provenance if r.name != "preprocess"][:2] == ["input", "plan"]
    assert {r.params.get("route") for r in kept.provenance if r.name == "model"} == {"probabilities"}
    assert np.array_equal(fast.labels, vol)
    assert np.array_equal(kept.labels, vol)
    assert fast.probabilities is None
    entropy = fast.quality["foreground_entropy"]
    assert entropy == pytest.approx(kept.quality["foreground_entropy"], rel=1e-5)
    assert 0.0 < entropy < np.log(len(LABELS))


def test_predict_array_in_memory_equals_predict_path(tmp_path: Path) -> None:
    vol = _label_volume()
    affine = _oblique(flip=True)
    src = write_nifti(vol, affine, tmp_path / "scan.nii.gz")
    predictor = Predictor.from_path(_passthrough_bundle(tmp_path, target_spacing=[1.0, 1.0, 2.0]))
    from_disk = predictor.predict_path(src)
    in_memory = predictor.predict_array(vol.astype(np.float32), affine, keep_probabilities=True)
    assert np.array_equal(in_memory.labels, from_disk.labels)
    np.testing.assert_allclose(in_memory.affine, from_disk.affine, atol=1e-5)
    assert in_memory.probabilities is not None
    assert in_memory.probabilities.shape == (len(LABELS), *vol.shape)
    # the same scan described in ITK's LPS convention, with a channel axis
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    as_lps = predictor.predict_array(torch.from_numpy(vol)[None], lps, space="LPS")
    assert np.array_equal(as_lps.labels, from_disk.labels)
    with pytest.raises(InputError, match="affine must be a finite, invertible 4 x 4 matrix"):
        predictor.predict_array(vol, np.zeros((4, 4)))
    with pytest.raises(InputError, match="image must be 3D"):
        predictor.predict_array(vol[:, :, 0], affine)
