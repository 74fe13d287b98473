"""Viewer data on labels.nii.gz's grid, the batch identity, and ``medseg review import`` on bad input."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.bundle import build_network, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.export.viewer import ViewerSettings, viewer_volume, volume_script
from medseg.synth import write_nifti


def _bundle(path: Path) -> Path:
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "MR", "intensity": {"scheme": "none"}}],
            "labels": {"background": 0, "organ": 1, "lesion": 2},
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    return save_bundle(path, cfg, spec, build_network(cfg, spec))


def _decode(script: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """The data object of a volume.js, with its voxels unpacked (as the viewer reads them)."""
    assert script.startswith("medsegVolume(")
    data = json.loads(script[len("medsegVolume(") : script.rindex(")")])
    shape = tuple(data["shape"])
    image = np.frombuffer(zlib.decompress(base64.b64decode(data["image_data"])), "<i2").reshape(shape)
    dtype = "u1" if data["label_dtype"] == "uint8" else "<u2"
    labels = np.frombuffer(zlib.decompress(base64.b64decode(data["label_data"])), dtype).reshape(shape)
    return data, image, labels


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("import")
    for name, shift in (("a", 0), ("b", 1)):
        v = np.zeros((300, 10, 3), np.float32)  # wider than the viewer's in-plane limit
        v[20 + shift : 200, 2:8, 1] = 1.0
        v[50:60, 3:5, 1] = 2.0
        write_nifti(v, np.diag([0.5, 0.8, 3.0, 1.0]), root / "in" / f"{name}.nii.gz")
    (root / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    bundle = _bundle(root / "bundle")
    result = CliRunner().invoke(app, ["predict", str(root / "in"), str(root / "out"), "--model", str(bundle)])
    assert result.exit_code == 1, result.output  # the broken file fails
    return root / "out"


def test_viewer_data_is_labels_grid_strided_in_plane(batch: Path) -> None:
    data, image, labels = _decode((batch / "a" / "viewer" / "volume.js").read_text())
    truth = np.asarray(nib.load(batch / "a" / "labels.nii.gz").dataobj)
    assert data["factor"] == 2  # 300 voxels along i: every 2nd shown
    assert data["full_shape"] == [300, 10, 3]
    np.testing.assert_array_equal(labels, truth[::2, ::2, :])
    assert data["spacing"] == [1.0, 1.6, 3.0]
    assert data["ras_axes"] == [0, 1, 2]
    assert data["ras_flips"] == [1, 1, 1]
    assert [lab["name"] for lab in data["labels"]] == ["organ", "lesion"]
    assert [w["name"] for w in data["windows"]] == ["percentile"]  # MR: no HU presets
    scan = np.asarray(nib.load(batch.parent / "in" / "a.nii.gz").dataobj)[::2, ::2, :]
    np.testing.assert_allclose(image * data["scale"] + data["offset"], scan)
    page = (batch / "report" / "cases" / "a.html").read_text()
    assert 'src="../../a/viewer/volume.js"' in page
    assert "http://" not in page
    assert "https://" not in page
    assert '<script src="../batch.js">' in page


def test_float_scans_are_scaled_into_int16() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 50.0, (8, 6, 4)).astype(np.float32)
    labels = (image > 120).astype(np.uint8)
    vol = viewer_volume(labels=labels, image=image, affine=np.eye(4), label_table=(), modality="mr")
    shown = vol.image * vol.scale + vol.offset
    assert np.abs(shown - image).max() <= vol.scale
    _, img, lab = _decode(volume_script(vol))
    np.testing.assert_array_equal(img, vol.image)
    np.testing.assert_array_equal(lab, labels)
    with pytest.raises(ValueError, match="max_in_plane"):
        ViewerSettings(max_in_plane=4)


def test_batch_id_is_kept_by_a_rerun_and_new_with_another_model(batch: Path, tmp_path: Path) -> None:
    manifest = json.loads((batch / "manifest.json").read_text())
    assert len(manifest["batch_id"]) == 16
    assert manifest["run_id"]
    identity = (batch / "report" / "batch.js").read_text()
    assert manifest["batch_id"] in identity
    assert manifest["model_sha256"] in identity
    rerun = CliRunner().invoke(
        app, ["predict", str(batch.parent / "in"), str(batch), "--model", str(batch.parent / "bundle")]
    )
    assert rerun.exit_code == 1, rerun.output
    again = json.loads((batch / "manifest.json").read_text())
    assert again["batch_id"] == manifest["batch_id"]
    assert again["run_id"] != manifest["run_id"]  # verdicts go to the latest prediction run


def _review(batch: Path, **changes: object) -> dict:
    manifest = json.loads((batch / "manifest.json").read_text())
    doc = {
        "format": "medseg-review/1",
        "batch_id": manifest["batch_id"],
        "model_sha256": manifest["model_sha256"],
        "reviewer": "R",
        "exported": "2026-12-08T00:00:00Z",
        "cases": [{"case_id": "a", "verdict": "needs correction", "note": "edge", "reviewer": "R"}],
    }
    doc.update(changes)
    return doc


def _snapshot(batch: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(batch)): p.read_bytes()
        for p in sorted(batch.rglob("*.json"))
        if p.is_file() and "mlruns" not in p.parts
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_id": "0123456789abcdef"}, "review must be of batch .* a review of another batch"),
        ({"model_sha256": "f" * 64}, "review must be of model"),
        ({"cases": [{"case_id": "zz", "verdict": "accept"}]}, r"unknown \['zz'\]"),
        ({"cases": [{"case_id": "broken", "verdict": "accept"}]}, "must have been segmented"),
        ({"cases": [{"case_id": "a", "verdict": "maybe"}]}, "verdict must be one of"),
        ({"format": "other/2"}, "format must be 'medseg-review/1'"),
    ],
)
def test_import_refuses_a_review_that_is_not_of_this_batch(
    batch: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    path = tmp_path / "review.json"
    path.write_text(json.dumps(_review(batch, **changes)))
    before = _snapshot(batch)
    result = CliRunner().invoke(app, ["review", "import", str(batch), str(path)])
    assert result.exit_code == 2, result.output
    assert str(path) in result.output
    assert __import__("re").search(message, result.output), result.output
    assert _snapshot(batch) == before  # nothing in the batch folder changed


def test_import_records_and_replaces_verdicts(batch: Path, tmp_path: Path) -> None:
    path = tmp_path / "review.json"
    path.write_text(json.dumps(_review(batch)))
    result = CliRunner().invoke(app, ["review", "import", str(batch), str(path)])
    assert result.exit_code == 0, result.output
    assert "accept" not in result.output.split("reviewed so far:")[1].split(";")[0]
    entry = next(e for e in json.loads((batch / "manifest.json").read_text())["scans"] if e["case_id"] == "a")
    assert entry["review"]["verdict"] == "needs-correction"
    later = _review(
        batch, cases=[{"case_id": "a", "verdict": "accept"}, {"case_id": "b", "verdict": "accept"}]
    )
    path.write_text(json.dumps(later))
    assert CliRunner().invoke(app, ["review", "import", str(batch), str(path)]).exit_code == 0
    manifest = json.loads((batch / "manifest.json").read_text())
    assert {e["case_id"]: e.get("review", {}).get("verdict") for e in manifest["scans"]} == {
        "a": "accept",
        "b": "accept",
        "broken": None,
    }
    from medseg.tracking.store import client

    run = client(manifest["tracking_uri"]).get_run(manifest["run_id"])
    assert run.data.metrics["review/accepted_fraction"] == 1.0
    assert run.data.metrics["review/reviewed"] == 2.0
    assert json.loads((batch / "a" / "case.json").read_text())["review"]["verdict"] == "accept"


def test_verdicts_outlive_a_rerun_and_a_re_export(batch: Path) -> None:
    rerun = CliRunner().invoke(
        app, ["predict", str(batch.parent / "in"), str(batch), "--model", str(batch.parent / "bundle")]
    )
    assert rerun.exit_code == 1, rerun.output
    manifest = json.loads((batch / "manifest.json").read_text())
    assert {e["case_id"]: e.get("review", {}).get("verdict") for e in manifest["scans"]}["a"] == "accept"
    again = CliRunner().invoke(app, ["export", str(batch)])
    assert again.exit_code == 0, again.output
    assert json.loads((batch / "a" / "case.json").read_text())["review"]["verdict"] == "accept"
