"""The correction loop end to end on synthetic phantoms: an under-trained model segments three scans,
a reviewer corrects them (NIfTI, NRRD, DICOM SEG by highdicom), ``medseg review collect`` makes a data
set, ``medseg train --init-from`` fine-tunes the model on it, and Dice on held-out phantoms rises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from export_helpers import expected_frame
from typer.testing import CliRunner

from medseg.cli import app

MARGIN = 0.1
"""How much the held-out mean Dice must rise after fine-tuning on the three corrected cases."""
PIPELINE = """
name: tiny
model: {name: unet3d, params: {channels: [8, 16], num_res_units: 0}}
train: {epochs: 1, patch_size: [16, 16, 16], batch_size: 2, samples_per_volume: 4, val_every: 20,
        learning_rate: 0.01, seed: 0}
inference: {batch_size: 2}
"""


def _seg(path: Path, series: Path, labels: np.ndarray, affine: np.ndarray, names: list[str]) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    frames = np.stack([expected_frame(ds, labels, affine) for ds in sources]).astype(np.uint8)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=name,
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.cid7166.ConnectiveTissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n, name in enumerate(names, start=1)
    ]
    hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="reviewer",
        manufacturer_model_name="Slicer",
        software_versions="5",
        device_serial_number="1",
    ).save_as(path)


def _dice_mean(run) -> float:
    return float(run.data.metrics["dice_mean"])  # over labels and cases


@pytest.mark.slow
def test_corrections_fine_tune_the_model(tmp_path: Path) -> None:
    from medseg.synth import generate_dataset
    from medseg.tracking.store import client

    shape = (32, 32, 16)
    train_spec = generate_dataset(tmp_path / "train", 4, shape=shape, seed=3, dicom=False)
    review = generate_dataset(tmp_path / "review", 3, shape=shape, seed=11, dicom=True).parent
    held = generate_dataset(tmp_path / "held", 3, shape=shape, seed=21, dicom=False)
    pipeline = tmp_path / "tiny.yaml"
    pipeline.write_text(PIPELINE)
    run = CliRunner()
    first = run.invoke(
        app, ["train", str(pipeline), "--data", str(train_spec), "--out", str(tmp_path / "m0")]
    )
    assert first.exit_code == 0, first.output

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case in ("case_000", "case_001"):
        shutil.copy(review / "nifti" / "imagesTr" / f"{case}_0000.nii.gz", inputs / f"{case}.nii.gz")
    shutil.copytree(review / "dicom" / "case_002", inputs / "case_002")
    out = tmp_path / "out"
    predicted = run.invoke(
        app, ["predict", str(inputs), str(out), "--model", str(tmp_path / "m0" / "bundle")]
    )
    assert predicted.exit_code == 0, predicted.output
    manifest = json.loads((out / "manifest.json").read_text())
    dicom_case = next(e["case_id"] for e in manifest["scans"] if e["case_id"] not in ("case_000", "case_001"))

    # the reviewer's corrections: the phantoms' ground truth, in three formats
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    truth = review / "nifti" / "labelsTr"
    shutil.copy(truth / "case_000.nii.gz", fixed / "case_000.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(truth / "case_001.nii.gz")), str(fixed / "case_001.nrrd"))
    gt = nib.load(truth / "case_002.nii.gz")
    names = ["organ", "lesion", "vessel"]
    _seg(fixed / f"{dicom_case}.dcm", review / "dicom" / "case_002", np.asarray(gt.dataobj), gt.affine, names)

    collected = run.invoke(
        app,
        [
            "review",
            "collect",
            str(out),
            "--corrected",
            str(fixed),
            "--out",
            str(tmp_path / "data"),
            "--spec",
            str(train_spec),
        ],
    )
    assert collected.exit_code == 0, collected.output
    measures = json.loads((tmp_path / "data" / "corrections.json").read_text())
    assert len(measures) == 3
    assert all(m["dice"] < 0.95 for m in measures)  # the under-trained model left work to do

    tuned = run.invoke(
        app,
        [
            "train",
            str(pipeline),
            "--data",
            str(tmp_path / "data" / "dataset.yaml"),
            "--out",
            str(tmp_path / "m1"),
            "--init-from",
            str(tmp_path / "m0" / "bundle"),
            "--epochs",
            "40",
            "--minutes",
            "2",
            "--seed",
            "0",
        ],
    )
    assert tuned.exit_code == 0, tuned.output

    scores = {}
    for name in ("m0", "m1"):
        evaluated = run.invoke(
            app,
            [
                "evaluate",
                "--data",
                str(held),
                "--model",
                str(tmp_path / name / "bundle"),
                "--run-name",
                f"held-{name}",
            ],
        )
        assert evaluated.exit_code == 0, evaluated.output
        runs = client().search_runs(
            [e.experiment_id for e in client().search_experiments()],
            filter_string=f"tags.mlflow.runName = 'held-{name}'",
        )
        scores[name] = _dice_mean(runs[0])
    print(f"held-out mean Dice: under-trained {scores['m0']:.3f}, fine-tuned {scores['m1']:.3f}")
    assert scores["m1"] >= scores["m0"] + MARGIN, scores
    finetune = client().search_runs(
        [e.experiment_id for e in client().search_experiments()], filter_string="params.init_from != ''"
    )
    bundle_sha = json.loads((tmp_path / "m0" / "bundle" / "bundle.json").read_text())["weights_sha256"]
    assert any(r.data.params["init_from"] == bundle_sha for r in finetune)


def test_init_from_refuses_weights_of_another_shape(tmp_path: Path) -> None:
    from medseg.bundle import build_network, save_bundle
    from medseg.config.pipeline import PipelineConfig
    from medseg.config.spec import DatasetSpec
    from medseg.errors import ConfigError
    from medseg.training.init_from import load_initial_weights

    torch = pytest.importorskip("torch")

    def spec(n_labels: int) -> DatasetSpec:
        labels = {"background": 0, **{f"l{i}": i for i in range(1, n_labels + 1)}}
        return DatasetSpec.model_validate(
            {"name": "s", "channels": [{"name": "ct", "modality": "CT"}], "labels": labels, "cases": []}
        )

    cfg = PipelineConfig.model_validate(
        {"name": "t", "model": {"name": "unet3d", "params": {"channels": [4, 8], "num_res_units": 0}}}
    )
    two = save_bundle(tmp_path / "two", cfg, spec(2), build_network(cfg, spec(2)))
    same = build_network(cfg, spec(2))
    with torch.no_grad():
        for param in same.parameters():
            param.add_(1.0)  # differs from the bundle's weights until loaded
    assert load_initial_weights(same, two) == json.loads((two / "bundle.json").read_text())["weights_sha256"]
    from medseg.bundle import load_bundle

    saved = load_bundle(two).network.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in same.state_dict().items())
    with pytest.raises(ConfigError, match="must have shape"):
        load_initial_weights(build_network(cfg, spec(3)), two)
    other = PipelineConfig.model_validate(
        {"name": "t", "model": {"name": "unet3d", "params": {"channels": [4, 8, 16], "num_res_units": 0}}}
    )
    with pytest.raises(ConfigError, match="parameters"):
        load_initial_weights(build_network(other, spec(2)), two)
