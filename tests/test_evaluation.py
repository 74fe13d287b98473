"""Evaluation: metrics against MONAI's, the empty-mask policy, tables, folder and model modes, the CLI."""

from __future__ import annotations

import json
import math
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.metrics import DiceMetric, compute_dice, compute_hausdorff_distance, compute_surface_dice
from typer.testing import CliRunner

from medseg.bundle import build_network, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec, load_spec
from medseg.errors import ConfigError, InputError
from medseg.evaluation import (
    evaluate_folder,
    evaluate_model,
    log_evaluation,
    read_case_table,
    score_labels,
    spacing_from_affine,
    voxel_volume_ml,
    write_evaluation,
)
from medseg.evaluation.summary import ALL_LABELS, describe, summarise, summary_metrics
from medseg.io import write_label_map

LABELS = {"background": 0, "liver": 1, "tumour": 2}
FG = {"liver": 1, "tumour": 2}


def _ball(shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return r2 <= 1.0


def _pair(shape: tuple[int, ...] = (28, 24, 14)) -> tuple[np.ndarray, np.ndarray]:
    """A reference and a prediction with a shifted organ, a grown tumour and a stray blob."""
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    ref[_ball(shape, (13, 11, 7), (9, 7, 5))] = 1
    ref[_ball(shape, (15, 12, 7), (3, 3, 2))] = 2
    pred[_ball(shape, (14, 10, 7), (9, 8, 4))] = 1
    pred[_ball(shape, (15, 12, 7), (4, 3, 3))] = 2
    pred[1:3, 20:23, 11:13] = 2  # a false positive far away: HD95 and NSD must see it
    return pred, ref


def _onehot(labels: np.ndarray, n: int = 3) -> torch.Tensor:
    t = torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), n)
    return t.permute(labels.ndim, *range(labels.ndim))[None].float()


def _monai(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float
) -> dict[str, np.ndarray]:
    p, r = _onehot(pred), _onehot(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty classes
        metric = DiceMetric(include_background=False, ignore_empty=False, reduction="none")
        metric(p, r)
        return {
            "dice": metric.aggregate()[0].numpy(),
            "dice_fn": compute_dice(p, r, include_background=False, ignore_empty=False)[0].numpy(),
            "hd95": compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))[0].numpy(),
            "nsd": compute_surface_dice(p, r, class_thresholds=[tol, tol], spacing=list(spacing))[0].numpy(),
        }


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 3.0), (2.5, 0.6, 0.9)])
@pytest.mark.parametrize("tol", [1.0, 2.5])
def test_metrics_match_monai(spacing: tuple[float, float, float], tol: float) -> None:
    pred, ref = _pair()
    ours = score_labels(pred, ref, FG, spacing, tolerance_mm=tol)
    ref_m = _monai(pred, ref, spacing, tol)
    assert [s.label for s in ours] == ["liver", "tumour"]
    for i, s in enumerate(ours):
        assert s.note == ""
        assert s.dice == pytest.approx(float(ref_m["dice"][i]), rel=1e-6)
        assert s.dice == pytest.approx(float(ref_m["dice_fn"][i]), rel=1e-6)
        assert s.hd95 == pytest.approx(float(ref_m["hd95"][i]), rel=1e-5)
        assert s.surface_dice == pytest.approx(float(ref_m["nsd"][i]), rel=1e-5)
    assert ours[1].hd95 > 5.0  # the stray blob counts
    assert 0.0 < ours[1].surface_dice < 1.0


def test_metrics_match_monai_in_2d() -> None:
    pred, ref = _pair()
    p2, r2 = pred[:, :, 7], ref[:, :, 7]
    ours = score_labels(p2, r2, FG, (0.8, 1.6), tolerance_mm=1.5)
    ref_m = _monai(p2, r2, (0.8, 1.6), 1.5)
    assert [s.hd95 for s in ours] == pytest.approx(ref_m["hd95"].tolist(), rel=1e-5)
    assert [s.surface_dice for s in ours] == pytest.approx(ref_m["nsd"].tolist(), rel=1e-5)


def test_identical_masks_score_perfectly() -> None:
    _, ref = _pair()
    for s in score_labels(ref, ref, FG, (0.7, 1.3, 3.0)):
        assert (s.dice, s.hd95, s.surface_dice, s.vol_diff_ml, s.vol_diff_rel) == (1.0, 0.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("pred_has", "ref_has", "expected", "monai_hd", "monai_nsd"),
    [
        # (dice, hd95, surface dice, relative volume difference)
        (False, False, (1.0, math.nan, 1.0, 0.0), math.nan, math.nan),
        (True, False, (0.0, math.nan, 0.0, math.nan), "not finite", 0.0),
        (False, True, (0.0, math.nan, 0.0, -1.0), "not finite", 0.0),
    ],
)
def test_empty_mask_policy(pred_has, ref_has, expected, monai_hd, monai_nsd) -> None:
    shape = (12, 10, 6)
    blob = np.zeros(shape, np.uint8)
    blob[3:7, 2:6, 1:4] = 2  # only the tumour label is ever present
    pred = blob.copy() if pred_has else np.zeros(shape, np.uint8)
    ref = blob.copy() if ref_has else np.zeros(shape, np.uint8)
    liver_only = np.where(ref == 2, 0, ref)  # liver (1) is empty in both: policy "both empty"
    s = score_labels(pred, ref, {"tumour": 2}, (0.5, 0.5, 2.0), tolerance_mm=1.0)[0]
    got = (s.dice, s.hd95, s.surface_dice, s.vol_diff_rel)
    np.testing.assert_equal(got, expected)  # NaN equals NaN here
    assert s.note == {(False, False): "both empty", (True, False): "reference empty"}.get(
        (pred_has, ref_has), "prediction empty"
    )
    # Where MONAI differs: HD95 NaN/inf (its quantile of inf distances), NSD NaN when both are empty;
    # our Dice is its ignore_empty=False.
    m = _monai(pred, ref, (0.5, 0.5, 2.0), 1.0)
    if monai_hd == "not finite":
        assert not math.isfinite(float(m["hd95"][1]))
    else:
        np.testing.assert_equal(float(m["hd95"][1]), monai_hd)
    np.testing.assert_equal(float(m["nsd"][1]), monai_nsd)
    assert float(m["dice_fn"][1]) == expected[0]
    assert score_labels(liver_only, liver_only, {"liver": 1}, (1.0, 1.0, 1.0))[0].note == "both empty"


def test_volumes_use_the_affine() -> None:
    affine = np.diag([0.5, 0.8, 2.5, 1.0])
    affine[:3, :3] = np.array([[0.0, -0.8, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 2.5]])  # rotated axes
    assert spacing_from_affine(affine) == pytest.approx((0.5, 0.8, 2.5))
    assert voxel_volume_ml(affine) == pytest.approx(0.001)
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 2:8] = 1  # 96 voxels
    s = score_labels(pred, ref, {"liver": 1}, spacing_from_affine(affine), voxel_volume_ml(affine))[0]
    assert (s.ref_ml, s.pred_ml, s.vol_diff_ml) == pytest.approx((0.064, 0.096, 0.032))
    assert s.vol_diff_rel == pytest.approx(0.5)
    assert (s.ref_voxels, s.pred_voxels) == (64, 96)


def test_score_labels_checks_its_arguments() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(InputError, match="one shape"):
        score_labels(a, np.zeros((4, 4, 5), np.uint8), FG, (1, 1, 1))
    with pytest.raises(InputError, match="spacing"):
        score_labels(a, a, FG, (1, 1))
    with pytest.raises(InputError, match="tolerance_mm"):
        score_labels(a, a, FG, (1, 1, 1), tolerance_mm=-1)
    with pytest.raises(InputError, match="values > 0"):
        score_labels(a, a, {"background": 0}, (1, 1, 1))


def test_summary_leaves_undefined_out_and_counts_it() -> None:
    assert describe([]) == pytest.approx((math.nan, math.nan, math.nan, 0, 0), nan_ok=True)
    rows = [
        {"case_id": "a", "label": "liver", "dice": 0.8, "hd95": 2.0, "surface_dice": 0.9},
        {"case_id": "a", "label": "tumour", "dice": 0.0, "hd95": math.nan, "surface_dice": 0.0},
        {"case_id": "b", "label": "liver", "dice": 0.6, "hd95": 4.0, "surface_dice": 0.7},
        {"case_id": "b", "label": "tumour", "dice": 1.0, "hd95": math.nan, "surface_dice": 1.0},
    ]
    for row in rows:
        row.update(vol_diff_ml=0.0, vol_diff_rel=0.0)
    stats = {(s.label, s.metric): s for s in summarise(rows, ["liver", "tumour"])}
    hd_t = stats[("tumour", "hd95")]
    assert (hd_t.n, hd_t.n_undefined) == (0, 2)
    assert math.isnan(hd_t.mean)
    assert stats[("liver", "dice")].mean == pytest.approx(0.7)
    assert stats[("liver", "dice")].sd == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert stats[(ALL_LABELS, "dice")].mean == pytest.approx(np.mean([0.4, 0.8]))
    assert stats[(ALL_LABELS, "hd95")].mean == pytest.approx(3.0)  # per case, the defined labels only
    metrics = summary_metrics(stats.values())
    assert metrics["dice_liver_mean"] == pytest.approx(0.7)
    assert metrics["hd95_tumour_n_undefined"] == 2
    assert "hd95_tumour_mean" not in metrics  # undefined: not logged as 0 or NaN
    assert metrics["dice_mean"] == pytest.approx(0.6)


# --- folder and model modes -------------------------------------------------------------------------

AFFINE = np.array(
    [[0.0, -0.9, 0.0, 10.0], [0.8, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0.0, 0.0, 0.0, 1.0]]
)


def _dataset(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Three cases; each image holds a perturbed copy of its labels (what a passthrough model predicts)."""
    root = tmp_path / "data"
    volumes = {}
    cases = []
    for i, case_id in enumerate(["c0", "c1", "c2"]):
        pred, ref = _pair()
        pred = np.roll(pred, i, axis=0)
        if i == 2:
            ref[ref == 2] = 1  # no tumour in the reference of c2
        write_label_map(ref, AFFINE, root / f"{case_id}_seg.nii.gz")
        write_label_map(pred, AFFINE, root / f"{case_id}_img.nii.gz")
        volumes[case_id] = (pred, ref)
        cases.append({"id": case_id, "images": [f"{case_id}_img.nii.gz"], "label": f"{case_id}_seg.nii.gz"})
    spec = {
        "name": "evalset",
        "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
        "labels": LABELS,
        "cases": cases,
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path, volumes


def _check_case(got: list, volumes: dict, case_id: str) -> None:
    """Scores of a case as read from disk equal those of the arrays (NIfTI stores the affine as float32)."""
    pred, ref = volumes[case_id]
    expected = score_labels(pred, ref, FG, spacing_from_affine(AFFINE), voxel_volume_ml(AFFINE))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g_d, e_d = g.as_dict(), e.as_dict()
        assert (g_d.pop("label"), g_d.pop("note")) == (e_d.pop("label"), e_d.pop("note"))
        assert g_d == pytest.approx(e_d, rel=1e-6, nan_ok=True)


def test_evaluate_folder_scores_reports_missing_and_logs(tmp_path: Path) -> None:
    spec_path, volumes = _dataset(tmp_path)
    preds = tmp_path / "preds"
    write_label_map(volumes["c0"][0], AFFINE, preds / "c0" / "labels.nii.gz")  # medseg predict layout
    write_label_map(volumes["c2"][0], AFFINE, preds / "c2.nii.gz")  # flat
    write_label_map(volumes["c2"][0], AFFINE, preds / "stranger.nii.gz")
    ev = evaluate_folder(load_spec(spec_path), preds, tolerance_mm=1.0)
    assert ev.missing == ["c1"]
    assert ev.extra == ["stranger"]
    assert not ev.complete
    assert list(ev.scores) == ["c0", "c2"]
    for case_id, scores in ev.scores.items():
        _check_case(scores, volumes, case_id)
    assert ev.scores["c2"][1].note == "reference empty"

    files = write_evaluation(ev, tmp_path / "out")
    rows = read_case_table(files["per_case.csv"])
    assert len(rows) == 4
    assert "undefined" in files["per_case.csv"].read_text()
    as_json = json.loads(files["per_case.json"].read_text())
    assert as_json[3]["case_id"] == "c2"
    assert as_json[3]["hd95"] is None
    assert math.isnan(rows[3]["hd95"])
    summary = json.loads(files["summary.json"].read_text())
    assert summary["missing"] == ["c1"]
    assert summary["extra_predictions"] == ["stranger"]

    experiment = f"eval-{uuid.uuid4().hex[:8]}"
    run_id = log_evaluation(ev, files, experiment=experiment, run_name="folder")
    from medseg.tracking import find_runs
    from medseg.tracking.store import client

    (run,) = find_runs(experiment, "evaluate")
    assert run["run_id"] == run_id
    assert run["metrics"]["dice_liver_mean"] == pytest.approx(
        np.mean([s[0].dice for s in ev.scores.values()])
    )
    assert run["metrics"]["hd95_tumour_n_undefined"] == 1
    assert run["metrics"]["n_missing"] == 1
    assert json.loads(run["params"]["labels"]) == ["liver", "tumour"]
    listed = {a.path for a in client().list_artifacts(run_id, "evaluation")}
    assert listed == {
        f"evaluation/{n}" for n in ("per_case.csv", "per_case.json", "summary.csv", "summary.json")
    }


def test_evaluate_folder_reports_a_prediction_on_another_grid(tmp_path: Path) -> None:
    spec_path, volumes = _dataset(tmp_path)
    preds = tmp_path / "preds"
    for case_id, (pred, _) in volumes.items():
        write_label_map(
            pred, AFFINE if case_id != "c1" else np.diag([1.0, 1.0, 1.0, 1.0]), preds / f"{case_id}.nii"
        )
    ev = evaluate_folder(load_spec(spec_path), preds, cases=["c1", "c2"])
    assert list(ev.scores) == ["c2"]
    assert "voxel grid" in ev.failed["c1"]
    with pytest.raises(ConfigError, match="did you mean 'c1'"):
        evaluate_folder(load_spec(spec_path), preds, cases=["c11"])
    with pytest.raises(ConfigError, match="stored splits"):
        evaluate_folder(load_spec(spec_path), preds, fold=0)
    with pytest.raises(ConfigError, match="tolerance"):
        evaluate_folder(load_spec(spec_path), preds, tolerance_mm=-1.0)


def _passthrough_bundle(tmp_path: Path, info: dict | None = None) -> Path:
    spec = DatasetSpec.model_validate(
        {
            "name": "evalset",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": LABELS,
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate(
        {
            "name": "identity",
            "model": {"name": "passthrough"},
            "train": {"patch_size": [16, 16, 8], "folds": 2},
        }
    )
    return save_bundle(tmp_path / "model" / "bundle", cfg, spec, build_network(cfg, spec), info)


def test_evaluate_model_in_source_geometry(tmp_path: Path) -> None:
    spec_path, volumes = _dataset(tmp_path)
    bundle = _passthrough_bundle(tmp_path)
    ev = evaluate_model(load_spec(spec_path), [bundle], cases=["c2", "c0"], save_dir=tmp_path / "saved")
    assert list(ev.scores) == ["c2", "c0"]
    for case_id, scores in ev.scores.items():
        _check_case(scores, volumes, case_id)
    assert (tmp_path / "saved" / "c0" / "labels.nii.gz").is_file()
    assert ev.params["model_name"] == "passthrough"

    spec_path.with_name("spec.splits.json").write_text(
        json.dumps([{"train": ["c0", "c1"], "val": ["c2"]}, {"train": ["c2"], "val": ["c0", "c1"]}])
    )
    assert list(evaluate_model(load_spec(spec_path), [bundle], fold=1).scores) == ["c0", "c1"]
    with pytest.raises(ConfigError, match=r"fold must be in 0\.\.1"):
        evaluate_model(load_spec(spec_path), [bundle], fold=2)
    other = _passthrough_bundle(tmp_path / "f0", info={"fold": 0})
    with pytest.raises(ConfigError, match="trained on"):
        evaluate_model(load_spec(spec_path), [other], fold=1)


def test_evaluate_cli(tmp_path: Path) -> None:
    spec_path, volumes = _dataset(tmp_path)
    preds = tmp_path / "preds"
    for case_id, (pred, _) in volumes.items():
        write_label_map(pred, AFFINE, preds / case_id / "labels.nii.gz")
    runner = CliRunner()
    experiment = f"cli-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "ev"
    args = ["evaluate", "--data", str(spec_path), "--out", str(out), "--experiment", experiment]
    done = runner.invoke(app, [*args, "--pred", str(preds), "--tolerance", "2"])
    assert done.exit_code == 0, done.output
    assert "3 case(s) evaluated" in done.output
    assert "undefined" in done.output  # c2's tumour HD95
    assert len(read_case_table(out / "per_case.csv")) == 6

    bundle = _passthrough_bundle(tmp_path)
    done = runner.invoke(app, [*args, "--model", str(bundle), "--cases", "c0", "--save-predictions"])
    assert done.exit_code == 0, done.output
    assert (out / "predictions" / "c0" / "labels.nii.gz").is_file()

    (preds / "c1" / "labels.nii.gz").unlink()
    done = runner.invoke(app, [*args, "--pred", str(preds)])
    assert done.exit_code == 1
    assert "1 case(s) no prediction: c1" in done.output

    done = runner.invoke(app, [*args, "--pred", str(preds), "--model", str(bundle)])
    assert done.exit_code == 2
    assert "exactly one of --pred" in done.output
