"""The batch path through the source registries: any scan source, any segmentation model."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from monai.data import MetaTensor

from medseg.batch.runner import PredictionSettings, run_prediction
from medseg.bundle import build_network, save_bundle
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.errors import ConfigError
from medseg.io import load_image
from medseg.pipeline import Prediction, Predictor
from medseg.sources import MODEL_SOURCES, SCAN_SOURCES, ModelDescription
from medseg.sources.folder import Discovery, Scan, ScanFilter, discover
from medseg.synth import write_nifti

SPEC = {
    "name": "identity",
    "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
    "labels": {"background": 0, "a": 1, "b": 2},
    "cases": [],
}


class CopyingSource:
    """A scan source that copies a scan's files into a fresh temporary folder while it is fetched
    (as an archive's download would), and removes them afterwards."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.fetched: list[Path] = []
        self.open = 0
        self.most_open = 0

    def discover(self, scan_filter: ScanFilter | None = None) -> Discovery:
        return discover(self.location, scan_filter)

    @contextlib.contextmanager
    def fetch(self, scan: Scan) -> Iterator[Scan]:
        tmp = Path(tempfile.mkdtemp(prefix="medseg-test-fetch-"))
        self.fetched.append(tmp)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            copies = []
            for f in scan.inputs:
                copies.append(tmp / f.name)
                shutil.copy2(f, copies[-1])
            if scan.files:
                yield replace(scan, path=tmp, files=tuple(copies))
            else:
                yield replace(scan, path=copies[0])
        finally:
            self.open -= 1
            shutil.rmtree(tmp)


class Threshold:
    """A segmentation model that is not a medseg bundle: label 1 above a threshold, on the scan's grid."""

    def __init__(self, level: float) -> None:
        self.level = level
        self.spec = DatasetSpec.model_validate(SPEC)
        self.seen: list[str] = []

    @property
    def sha256(self) -> str:
        return f"threshold-{self.level}"

    def predict(self, image: MetaTensor, *, keep_probabilities: bool = False) -> Prediction:
        self.seen.append(str(image.meta.get("filename_or_obj", "")))
        labels = (image[0].numpy() > self.level).astype(np.uint8)
        return Prediction(labels, np.asarray(image.affine, dtype=np.float64))

    def describe(self) -> ModelDescription:
        return ModelDescription("threshold", str(self.level), self.sha256, {"level": str(self.level)})


def _bundle(path: Path) -> Path:
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    spec = DatasetSpec.model_validate(SPEC)
    return save_bundle(path, cfg, spec, build_network(cfg, spec))


def _scans(root: Path, n: int) -> list[np.ndarray]:
    vols = []
    for i in range(n):
        v = np.zeros((12, 10, 6), dtype=np.int16)
        v[2 + i : 8, 3:7, 1:5] = 1 + i % 2
        write_nifti(v, np.diag([1.0, 1.2, 2.0, 1.0]), root / f"s{i}.nii.gz")
        vols.append(v)
    return vols


@pytest.mark.parametrize("prefetch", [True, False])
def test_scans_are_fetched_from_their_source_and_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefetch: bool
) -> None:
    vols = _scans(tmp_path / "in", 3)
    sources: list[CopyingSource] = []

    def open_copying(location: str, options: Mapping[str, Any]) -> CopyingSource:
        sources.append(CopyingSource(location))
        return sources[-1]

    monkeypatch.setitem(SCAN_SOURCES, "copying", open_copying)
    summary = run_prediction(
        f"copying:{tmp_path / 'in'}",
        tmp_path / "out",
        models=[_bundle(tmp_path / "b")],
        settings=PredictionSettings(prefetch=prefetch, parallel_scans=2 if prefetch else None),
    )
    assert (summary.ok, summary.failed) == (3, 0)
    source = sources[0]
    assert len(source.fetched) == 3
    assert not any(p.exists() for p in source.fetched)  # every temporary copy is gone
    assert source.most_open <= 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for entry, vol in zip(manifest["scans"], vols):
        # the manifest keeps the scan's own identity, not the temporary copy's
        assert entry["inputs"] == [str(tmp_path / "in" / f"{entry['case_id']}.nii.gz")]
        labels = load_image(tmp_path / "out" / entry["case_id"] / "labels.nii.gz")[0].numpy()
        assert np.array_equal(labels, vol)
        result = json.loads((tmp_path / "out" / entry["case_id"] / "result.json").read_text())
        stages = [r["name"] for r in result["details"]["provenance"]]
        assert stages[:3] == ["input", "preprocess", "plan"]
        assert "model" in stages
    # the provenance of every scan is in the batch's MLflow run too
    import mlflow

    artifacts = mlflow.MlflowClient().list_artifacts(summary.run_id, "provenance")
    assert sorted(Path(a.path).name for a in artifacts) == [f"s{i}.json" for i in range(3)]


def test_any_segmentation_model_runs_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vols = _scans(tmp_path / "in", 2)
    loaded: list[Threshold] = []

    def load_threshold(locations: Sequence[str], *, device: str, options: Mapping[str, Any]) -> Threshold:
        loaded.append(Threshold(float(locations[0])))
        return loaded[-1]

    monkeypatch.setitem(MODEL_SOURCES, "threshold", load_threshold)
    summary = run_prediction(tmp_path / "in", tmp_path / "out", models=["threshold:0.5"])
    assert (summary.ok, summary.failed) == (2, 0)
    assert len(loaded[0].seen) == 2
    for i, vol in enumerate(vols):
        labels = load_image(tmp_path / "out" / f"s{i}" / "labels.nii.gz")[0].numpy()
        assert np.array_equal(labels, (vol > 0.5).astype(np.uint8))
    result = json.loads((tmp_path / "out" / "s0" / "result.json").read_text())
    assert result["model_sha256"] == "threshold-0.5"
    assert "provenance" not in result["details"]  # this model records no stages


def test_medseg_refs_and_options_go_through_the_model_source(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b")
    predictor = Predictor.from_path(f"medseg:{bundle}")
    assert isinstance(predictor, Predictor)
    assert predictor.describe().kind == "medseg"
    from medseg.sources import load_model

    switched = load_model([bundle], options={"crf": True})
    assert isinstance(switched, Predictor)
    assert switched.refine.crf.enabled
    with pytest.raises(ConfigError, match="medseg model options must be among"):
        load_model([bundle], options={"folds": [0]})
