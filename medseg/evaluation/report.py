"""Write an evaluation to disk (per-case CSV/JSON, summary CSV/JSON) and log it as an MLflow ``evaluate`` run.

Files written to the output folder (and logged under the run's ``evaluation/`` artifacts):

* ``per_case.csv`` / ``per_case.json``: one row per case and label (undefined: ``undefined`` / ``null``).
* ``summary.csv``: mean, median, sd, n and n_undefined per label (and ``all``) and metric.
* ``summary.json``: the same, with the cases that were missing, failed, unlabelled or extra.

Metrics logged: ``<metric>_<label>_{mean,median,sd,n,n_undefined}`` and, over labels,
``<metric>_{mean,...}`` for ``dice``, ``hd95``, ``surface_dice``, ``vol_diff_ml`` and ``vol_diff_rel``,
plus ``n_cases``, ``n_missing``, ``n_failed``; undefined statistics are not logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medseg.evaluation.evaluate import Evaluation
from medseg.evaluation.metrics import HD_PERCENTILE
from medseg.evaluation.summary import (
    SUMMARY_COLUMNS,
    stats_rows,
    summary_metrics,
    to_csv,
    to_json,
    write_case_table,
)
from medseg.io.atomic import atomic_write_text

ARTIFACT_DIR = "evaluation"
PER_CASE_CSV = "per_case.csv"
PER_CASE_JSON = "per_case.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"


def write_evaluation(ev: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write the per-case table and the summary (atomically).

    Args:
        ev: The evaluation.
        out_dir: Destination folder (created).

    Returns:
        The written files by name (``per_case.csv``, ``per_case.json``, ``summary.csv``, ``summary.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in (PER_CASE_CSV, PER_CASE_JSON, SUMMARY_CSV, SUMMARY_JSON)}
    rows = ev.rows()
    write_case_table(rows, files[PER_CASE_CSV], files[PER_CASE_JSON])
    summary = stats_rows(ev.summary())
    atomic_write_text(files[SUMMARY_CSV], to_csv(summary, SUMMARY_COLUMNS))
    document = {
        "spec": ev.spec_name,
        "labels": ev.labels,
        "tolerance_mm": ev.tolerance_mm,
        "params": ev.params,
        "n_cases": len(ev.scores),
        "missing": ev.missing,
        "failed": ev.failed,
        "unlabelled": ev.unlabelled,
        "extra_predictions": ev.extra,
        "summary": summary,
    }
    atomic_write_text(files[SUMMARY_JSON], to_json(document))
    return files


def evaluation_params(ev: Evaluation) -> dict[str, Any]:
    """The parameters an ``evaluate`` run records (no file paths, which may name patients)."""
    return {
        **ev.params,
        "spec_name": ev.spec_name,
        "labels": list(ev.labels),
        "tolerance_mm": ev.tolerance_mm,
        "hd_percentile": HD_PERCENTILE,
        "cases": sorted(ev.scores),
    }


def log_evaluation(
    ev: Evaluation,
    files: Mapping[str, Path],
    *,
    experiment: str = "medseg",
    run_name: str | None = None,
    uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Log an evaluation as an MLflow ``evaluate`` run: params, summary metrics and the files.

    Args:
        ev: The evaluation.
        files: The files of :func:`write_evaluation`, logged under ``evaluation/``.
        experiment: The MLflow experiment.
        run_name: The run's name.
        uri: The tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``.
        tags: Extra tags.

    Returns:
        The run id.
    """
    from medseg.tracking import tracked_run

    all_tags = {"medseg.spec": ev.spec_name, **(tags or {})}
    with tracked_run(
        "evaluate",
        experiment=experiment,
        run_name=run_name,
        params=evaluation_params(ev),
        tags=all_tags,
        uri=uri,
    ) as run:
        metrics = summary_metrics(ev.summary())
        metrics.update({"n_cases": len(ev.scores), "n_missing": len(ev.missing), "n_failed": len(ev.failed)})
        run.log_metrics(metrics)
        for path in files.values():
            run.log_artifact(path, ARTIFACT_DIR)
        return run.run_id
