"""Comparing runs: table, paired per-case tests, CSV and PNG outputs, the CLI, and an MLflow server."""

from __future__ import annotations

import csv
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import ConfigError
from medseg.evaluation import (
    Evaluation,
    compare_runs,
    log_evaluation,
    score_labels,
    write_comparison,
    write_evaluation,
)
from medseg.evaluation.compare import paired_difference, split_metric
from medseg.evaluation.summary import case_values
from medseg.tracking import find_runs, tracked_run

FG = {"liver": 1, "tumour": 2}
CASES = [f"case{i}" for i in range(6)]
SPACING = (0.8, 0.8, 2.0)


def _evaluation(noise: float, seed: int) -> Evaluation:
    """Scores of six cases whose predictions are the references with ``noise`` of the voxels flipped."""
    rng = np.random.default_rng(seed)
    ev = Evaluation("evalset", FG, 1.0, params={"mode": "folder", "variant": f"noise{noise}"})
    for i, case_id in enumerate(CASES):
        ref = np.zeros((20, 18, 8), np.uint8)
        ref[3 : 15 + i % 3, 4:14, 1:7] = 1
        ref[6:10, 6 : 9 + i % 2, 2:5] = 2
        pred = ref.copy()
        flip = rng.random(ref.shape) < noise
        pred[flip] = rng.integers(0, 3, int(flip.sum()))
        ev.scores[case_id] = score_labels(pred, ref, FG, SPACING)
    return ev


def _log_two_evaluations(tmp_path: Path, experiment: str) -> tuple[Evaluation, Evaluation, str, str]:
    good, bad = _evaluation(0.01, 1), _evaluation(0.05, 2)
    id_good = log_evaluation(
        good, write_evaluation(good, tmp_path / "good"), experiment=experiment, run_name="good"
    )
    id_bad = log_evaluation(
        bad, write_evaluation(bad, tmp_path / "bad"), experiment=experiment, run_name="bad"
    )
    return good, bad, id_good, id_bad


def _log_train_runs(experiment: str) -> None:
    for lr, speed in ((0.01, 1.0), (0.001, 0.5)):
        with tracked_run(
            "train", experiment=experiment, run_name=f"lr{lr}", params={"lr": lr, "epochs": 5}
        ) as run:
            for epoch in range(1, 6):
                loss = 1.0 / (1 + speed * epoch)
                run.log_metrics({"train_loss": loss, "val_dice_mean": 1 - loss}, step=epoch)
            run.log_metrics({"best_val_dice_mean": 1 - loss})


def _check_png(path: Path) -> None:
    from matplotlib import image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.ndim == 3
    assert pixels.shape[0] > 150
    assert pixels.shape[1] > 150
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 20  # bars, text, error bars: not a blank canvas
    assert float(pixels[..., :3].std()) > 0.02


def test_split_metric_and_paired_statistics() -> None:
    assert split_metric("dice_liver_mean", ["liver"]) == ("dice", "liver")
    assert split_metric("hd95_mean", ["liver"]) == ("hd95", "all")
    assert split_metric("val_dice_mean", []) == ("val_dice", "all")
    base = {"a": 0.5, "b": 0.6, "c": 0.7, "d": math.nan}
    other = {"a": 0.6, "b": 0.65, "c": 0.9, "e": 0.1}
    p = paired_difference(base, other, ("r1", "r2", "dice", "liver"))
    d = np.array([0.1, 0.05, 0.2])
    assert (p.n, p.n_only_baseline, p.n_only_other) == (3, 0, 1)
    assert p.mean_diff == pytest.approx(d.mean())
    assert p.sd_diff == pytest.approx(d.std(ddof=1))
    assert p.p_wilcoxon == pytest.approx(stats.wilcoxon(d).pvalue)
    assert p.p_ttest == pytest.approx(stats.ttest_rel([0.6, 0.65, 0.9], [0.5, 0.6, 0.7]).pvalue)
    same = paired_difference({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}, ("r1", "r2", "dice", "all"))
    assert (same.mean_diff, same.p_wilcoxon, same.p_ttest) == (0.0, 1.0, 1.0)
    one = paired_difference({"a": 1.0}, {"a": 2.0}, ("r1", "r2", "dice", "all"))
    assert math.isnan(one.p_wilcoxon)
    assert math.isnan(one.sd_diff)


def test_compare_evaluate_runs_table_paired_and_plots(tmp_path: Path) -> None:
    experiment = f"cmp-{uuid.uuid4().hex[:8]}"
    good, bad, id_good, id_bad = _log_two_evaluations(tmp_path, experiment)
    comp = compare_runs(experiment=experiment, kind="evaluate")
    assert [r.run_id for r in comp.runs] == [id_good, id_bad]  # sorted by dice_mean, best first
    assert comp.sort_by == "dice_mean"
    assert comp.metrics[:5] == [
        "dice_mean",
        "hd95_mean",
        "surface_dice_mean",
        "vol_diff_ml_mean",
        "vol_diff_rel_mean",
    ]
    assert "dice_liver_mean" in comp.metrics
    assert comp.params == ["variant"]
    assert comp.baseline == id_good

    paired = {(p.metric, p.label): p for p in comp.paired}
    assert {p.other_run for p in comp.paired} == {id_bad}
    assert ("dice", "tumour") in paired
    d = [
        case_values(bad.rows(), "dice")[(c, "all")] - case_values(good.rows(), "dice")[(c, "all")]
        for c in CASES
    ]
    p = paired[("dice", "all")]
    assert p.n == 6
    assert p.mean_diff == pytest.approx(np.mean(d))
    assert p.mean_diff < 0
    assert p.sd_diff == pytest.approx(np.std(d, ddof=1))
    assert p.p_wilcoxon == pytest.approx(stats.wilcoxon(d).pvalue)

    files = write_comparison(comp, tmp_path / "cmp")
    assert set(files) == {"runs.csv", "paired.csv", "metrics.png"}
    with files["runs.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == [id_good, id_bad]
    assert [r["name"] for r in rows] == ["good", "bad"]
    assert rows[0]["param.variant"] == "noise0.01"
    good_stats = {(s.label, s.metric): s for s in good.summary()}
    assert float(rows[0]["dice_mean"]) == pytest.approx(good_stats[("all", "dice")].mean)
    assert float(rows[0]["dice_sd"]) == pytest.approx(good_stats[("all", "dice")].sd)
    assert float(rows[0]["dice_tumour_mean"]) == pytest.approx(good_stats[("tumour", "dice")].mean)
    with files["paired.csv"].open() as f:
        paired_rows = list(csv.DictReader(f))
    assert len(paired_rows) == len(comp.paired)
    assert {r["other_run"] for r in paired_rows} == {id_bad}
    _check_png(files["metrics.png"])
    header, text_rows = comp.display()
    assert header[0] == "run"
    assert " ± " in text_rows[0][header.index("dice_mean")]
    header, text_rows = comp.display(transpose=True)
    assert header == ["run", "good", "bad"]
    assert text_rows[0][0] == "variant"
    assert text_rows[1][0] == "dice_mean"


def test_compare_train_runs_learning_curves_and_cli(tmp_path: Path) -> None:
    experiment = f"cmp-{uuid.uuid4().hex[:8]}"
    _log_train_runs(experiment)
    comp = compare_runs(experiment=experiment, kind="train", metrics=["best_val_dice_mean"])
    assert [r.name for r in comp.runs] == ["lr0.01", "lr0.001"]
    assert comp.params == ["lr"]
    assert comp.paired == []
    history = comp.histories[comp.runs[0].run_id]["train_loss"]
    assert [step for step, _ in history] == [1, 2, 3, 4, 5]
    files = write_comparison(comp, tmp_path / "train")
    _check_png(files["learning_curves.png"])
    _check_png(files["metrics.png"])

    done = CliRunner().invoke(
        app,
        [
            "compare",
            "--experiment",
            experiment,
            "--metric",
            "best_val_dice_mean",
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert done.exit_code == 0, done.output
    assert "lr0.01" in done.output
    assert (tmp_path / "cli" / "learning_curves.png").is_file()
    ids = [r.run_id for r in comp.runs]
    done = CliRunner().invoke(
        app, ["compare", *ids, "--sort", "best_val_dice_mean", "--ascending", "--out", str(tmp_path / "ids")]
    )
    assert done.exit_code == 0, done.output
    missing = f"missing-{uuid.uuid4().hex[:6]}"
    done = CliRunner().invoke(app, ["compare", "--experiment", missing, "--out", str(tmp_path / "none")])
    assert done.exit_code == 2
    assert "experiment must exist" in done.output


def test_compare_rejects_unknown_runs_and_baselines() -> None:
    with pytest.raises(ConfigError, match="run id must name a run"):
        compare_runs(["0" * 32])
    experiment = f"cmp-{uuid.uuid4().hex[:8]}"
    with tracked_run("evaluate", experiment=experiment) as run:
        run.log_metric("dice_mean", 0.5)
    with pytest.raises(ConfigError, match="baseline must be one of"):
        compare_runs(experiment=experiment, baseline="nope")
    with pytest.raises(ConfigError, match="did you mean 'dice_mean'"):
        compare_runs(experiment=experiment, metrics=["dice_maen"])
    with pytest.raises(ConfigError, match="at least one run"):
        compare_runs(experiment=experiment, kind="train")


# --- against a real tracking server ------------------------------------------------------------------


@pytest.mark.slow  # starts an MLflow tracking server (about 15 s)
def test_evaluate_and_compare_against_an_mlflow_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server_helpers import mlflow_server

    artifacts = tmp_path / "server-artifacts"
    for name in ("NO_PROXY", "no_proxy"):  # loopback traffic must not go through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    backend = f"sqlite:///{(tmp_path / 'server.db').as_posix()}"
    with mlflow_server(backend, artifacts, tmp_path / "server.log") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        experiment = "served"
        _, _, id_good, id_bad = _log_two_evaluations(tmp_path, experiment)

        runs = find_runs(experiment, "evaluate")
        assert {r["run_id"] for r in runs} == {id_good, id_bad}
        assert all(r["status"] == "FINISHED" for r in runs)
        from medseg.tracking.store import client

        info = client().get_run(id_good).info
        assert info.artifact_uri.startswith("mlflow-artifacts:")  # the server chose the location
        stored = list(artifacts.rglob("per_case.csv"))
        assert len(stored) == 2  # uploaded through the server, stored under its destination

        comp = compare_runs(experiment=experiment, metrics=["dice_mean", "dice_liver_mean"])
        assert [r.run_id for r in comp.runs] == [id_good, id_bad]
        assert {(p.metric, p.label) for p in comp.paired} == {("dice", "all"), ("dice", "liver")}
        assert all(p.n == len(CASES) for p in comp.paired)
        files = write_comparison(comp, tmp_path / "cmp")
        _check_png(files["metrics.png"])


def test_group_by_variant_pools_seeds_and_tests_against_seed_noise(tmp_path: Path) -> None:
    from medseg.evaluation.groups import group_runs, write_groups

    experiment = f"groups-{uuid.uuid4().hex[:8]}"
    evaluations = {}
    for noise in (0.01, 0.2):
        for seed in range(3):
            ev = _evaluation(noise, 10 * seed + int(noise * 100))
            files = write_evaluation(ev, tmp_path / f"n{noise}-s{seed}")
            log_evaluation(ev, files, experiment=experiment, run_name=f"n{noise}-s{seed}")
            evaluations[(noise, seed)] = ev
    comp = compare_runs(experiment=experiment, kind="evaluate", metrics=["dice_mean", "dice_liver_mean"])
    grouped = group_runs(comp, ["variant"], baseline="noise0.01")
    assert sorted(grouped.groups) == ["noise0.01", "noise0.2"]
    assert all(len(runs) == 3 for runs in grouped.groups.values())
    # the group's mean is the mean of its three runs' logged means
    base = grouped.stat("noise0.01", "dice_mean")
    logged = [r.metrics["dice_mean"] for r in grouped.groups["noise0.01"]]
    assert base.n_runs == 3
    assert base.mean == pytest.approx(np.mean(logged))
    assert base.sd == pytest.approx(np.std(logged, ddof=1))
    diff = next(d for d in grouped.diffs if d.metric == "dice_mean")
    assert diff.diff < -0.1  # 20% noise is far worse than 1%, well beyond seed noise
    assert diff.beyond_noise is True
    # paired per-case: each case's Dice averaged over the seeds of each variant
    liver = next(d for d in grouped.diffs if d.metric == "dice_liver_mean").paired
    assert liver.n == len(CASES)
    per_case = {
        noise: {c: np.mean([evaluations[(noise, s)].scores[c][0].dice for s in range(3)]) for c in CASES}
        for noise in (0.01, 0.2)
    }
    expected = np.mean([per_case[0.2][c] - per_case[0.01][c] for c in CASES])
    assert liver.mean_diff == pytest.approx(expected)
    files = write_groups(grouped, tmp_path / "out")
    rows = list(csv.DictReader(files["groups.csv"].open()))
    assert {r["group"] for r in rows} == {"noise0.01", "noise0.2"}
    assert "group_paired.csv" in files
    with pytest.raises(ConfigError, match="group-by param 'nope' must be logged"):
        group_runs(comp, ["nope"])
    with pytest.raises(ConfigError, match="baseline group must be one of"):
        group_runs(comp, ["variant"], baseline="missing")
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--experiment",
            experiment,
            "--kind",
            "evaluate",
            "--metric",
            "dice_mean",
            "--group-by",
            "variant",
            "--baseline-group",
            "noise0.01",
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "variants by variant" in result.output
    assert (tmp_path / "cli" / "groups.csv").is_file()
