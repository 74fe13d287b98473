"""Compare MLflow runs: differing parameters, chosen metrics (mean ± sd), and paired per-case differences.

Runs come from an experiment (optionally of one kind) or a list of run ids, through MLflow's client
API only, so a SQLite store and a tracking server work alike. Per-label ``<metric>_<label>_mean``
metrics are recognised from the ``labels`` param that ``evaluate`` runs log; a ``<x>_mean`` metric
shows as ``mean ± sd`` where a ``<x>_sd`` metric was logged beside it.

For ``evaluate`` runs, the logged per-case table (``evaluation/per_case.csv``) gives paired
differences: each run against a baseline (``baseline``, else the first run of the sorted table), per
metric and label, over the cases where both values are defined: mean and sd of ``other - baseline``,
n, and the p-values of the Wilcoxon signed-rank test and the paired t-test.

Examples:
    >>> import tempfile
    >>> from medseg.tracking import tracked_run
    >>> tmp = tempfile.TemporaryDirectory()
    >>> uri = f"sqlite:///{tmp.name}/mlflow.db"
    >>> for seed, dice in ((0, 0.80), (1, 0.84)):
    ...     with tracked_run("evaluate", uri=uri, params={"seed": seed}) as run:
    ...         run.log_metric("dice_mean", dice)
    >>> comp = compare_runs(kind="evaluate", metrics=["dice_mean"], uri=uri)
    >>> [(r.params["seed"], r.metrics["dice_mean"]) for r in comp.runs]  # best first
    [('1', 0.84), ('0', 0.8)]
    >>> sorted(path.name for path in write_comparison(comp, tmp.name).values())
    ['metrics.png', 'runs.csv']
    >>> tmp.cleanup()
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, did_you_mean
from medseg.evaluation.runs import (
    RunRecord,
    default_metrics,
    differing_params,
    fetch_case_table,
    fetch_runs,
    split_metric,
)
from medseg.evaluation.summary import SUMMARY_METRICS, case_values, to_csv
from medseg.io.atomic import atomic_write_text

DEFAULT_CURVES = ("train_loss", "val_dice_mean")
TAG_SPEC = "medseg.spec"
_LOWER_IS_BETTER = ("hd95", "loss")


@dataclass(frozen=True)
class PairedDiff:
    """Paired per-case differences ``other - baseline`` of one metric and label."""

    baseline_run: str
    other_run: str
    metric: str
    label: str
    n: int
    mean_diff: float
    sd_diff: float
    p_wilcoxon: float
    p_ttest: float
    n_only_baseline: int
    n_only_other: int


@dataclass
class Comparison:
    """Runs side by side.

    Attributes:
        runs: The runs, sorted by ``sort_by``.
        params: Param keys whose values differ between the runs.
        metrics: The metric keys compared.
        sort_by: The metric the runs are sorted by (None: newest first).
        paired: Paired per-case differences against the baseline run.
        baseline: The baseline run id of ``paired``.
        histories: Per run id and metric key, the ``(step, value)`` history (learning curves).
    """

    runs: list[RunRecord]
    params: list[str]
    metrics: list[str]
    sort_by: str | None = None
    paired: list[PairedDiff] = field(default_factory=list)
    baseline: str | None = None
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

    def run_label(self, run: RunRecord) -> str:
        """A short display name: the run name, with an id prefix where names repeat."""
        names = [r.name for r in self.runs]
        return (
            run.name if run.name and names.count(run.name) == 1 else f"{run.name or 'run'}-{run.run_id[:6]}"
        )

    def sd_key(self, metric: str) -> str | None:
        """The ``_sd`` companion of a ``_mean`` metric, if any run logged it."""
        if not metric.endswith("_mean"):
            return None
        key = metric[: -len("_mean")] + "_sd"
        return key if any(key in r.metrics for r in self.runs) else None

    def table(self) -> list[dict[str, Any]]:
        """One row per run: ids, differing params, each metric and its sd (NaN where absent)."""
        rows = []
        for run in self.runs:
            row: dict[str, Any] = {
                "run_id": run.run_id,
                "name": run.name,
                "kind": run.kind,
                "status": run.status,
            }
            row.update({f"param.{p}": run.params.get(p, "") for p in self.params})
            for m in self.metrics:
                row[m] = run.metrics.get(m, math.nan)
                sd = self.sd_key(m)
                if sd:
                    row[sd] = run.metrics.get(sd, math.nan)
            rows.append(row)
        return rows

    def columns(self) -> list[str]:
        """The columns of :meth:`table`."""
        cols = ["run_id", "name", "kind", "status", *(f"param.{p}" for p in self.params)]
        for m in self.metrics:
            cols.append(m)
            sd = self.sd_key(m)
            if sd:
                cols.append(sd)
        return cols

    def display(self, transpose: bool = False) -> tuple[list[str], list[list[str]]]:
        """Header and text rows for a terminal: metrics as ``mean ± sd``.

        Args:
            transpose: One row per param and metric, one column per run (reads better for few runs
                and many metrics); else one row per run.
        """
        header = ["run", *self.params, *self.metrics]
        rows = []
        for run in self.runs:
            cells = [self.run_label(run), *(run.params.get(p, "") for p in self.params)]
            for m in self.metrics:
                value, sd = run.metrics.get(m), run.metrics.get(self.sd_key(m) or "")
                text = "" if value is None else f"{value:.4g}"
                cells.append(f"{text} ± {sd:.2g}" if value is not None and sd is not None else text)
            rows.append(cells)
        if transpose:
            columns = [list(col) for col in zip(header, *rows)]
            return columns[0], columns[1:]
        return header, rows

    def bars(self) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
        """Per metric base, run label and label: ``(mean, sd)`` of the compared ``_mean`` metrics."""
        out: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
        for run in self.runs:
            for m in self.metrics:
                if m not in run.metrics or not m.endswith("_mean"):
                    continue
                base, label = split_metric(m, run.labels)
                sd = run.metrics.get(self.sd_key(m) or "", math.nan)
                out.setdefault(base, {}).setdefault(self.run_label(run), {})[label] = (run.metrics[m], sd)
        return out


def paired_difference(
    baseline: Mapping[str, float], other: Mapping[str, float], names: tuple[str, str, str, str]
) -> PairedDiff:
    """Paired statistics of ``other - baseline`` over the cases where both are defined.

    Args:
        baseline: Case id to value.
        other: Case id to value.
        names: ``(baseline_run, other_run, metric, label)`` to record.

    Returns:
        The :class:`PairedDiff`; p-values are NaN below two pairs and 1 when every difference is 0.
    """
    from scipy import stats

    ok_b = {c for c, v in baseline.items() if math.isfinite(v)}
    ok_o = {c for c, v in other.items() if math.isfinite(v)}
    common = sorted(ok_b & ok_o)
    d = np.array([other[c] - baseline[c] for c in common], dtype=np.float64)
    n = int(d.size)
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    if n < 2:
        p_w = p_t = math.nan
    elif np.all(d == 0):
        p_w = p_t = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small samples: scipy warns about exactness and ties
            p_w = float(stats.wilcoxon(d).pvalue)
            p_t = float(stats.ttest_rel([other[c] for c in common], [baseline[c] for c in common]).pvalue)
    return PairedDiff(*names, n, mean, sd, p_w, p_t, len(ok_b - ok_o), len(ok_o - ok_b))


def _paired(comp: Comparison, baseline: RunRecord, uri: str | None) -> list[PairedDiff]:
    tables = {r.run_id: fetch_case_table(r.run_id, uri) for r in comp.runs if r.kind == "evaluate"}
    base_rows = tables.get(baseline.run_id)
    if not base_rows:
        return []
    pairs = []
    for m in comp.metrics:
        base, label = split_metric(m, baseline.labels)
        if base in SUMMARY_METRICS and (base, label) not in pairs:
            pairs.append((base, label))
    out = []
    spec = baseline.tags.get(TAG_SPEC)
    for run in comp.runs:
        rows = tables.get(run.run_id)
        if run.run_id == baseline.run_id or not rows or run.tags.get(TAG_SPEC, spec) != spec:
            continue  # case ids of another data set would pair by accident
        for base, label in pairs:
            b = {c: v for (c, lab), v in case_values(base_rows, base).items() if lab == label}
            o = {c: v for (c, lab), v in case_values(rows, base).items() if lab == label}
            if b and o:
                out.append(paired_difference(b, o, (baseline.run_id, run.run_id, base, label)))
    return out


def _histories(runs: Sequence[RunRecord], keys: Sequence[str], uri: str | None) -> dict:
    from medseg.tracking.store import client

    mlflow_client = client(uri)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run in runs:
        for key in keys:
            if key in run.metrics:
                points = sorted(
                    (int(m.step), float(m.value)) for m in mlflow_client.get_metric_history(run.run_id, key)
                )
                out.setdefault(run.run_id, {})[key] = points
    return out


def compare_runs(
    run_ids: Sequence[str] | None = None,
    *,
    experiment: str = "medseg",
    kind: str | None = None,
    metrics: Sequence[str] | None = None,
    sort_by: str | None = None,
    ascending: bool | None = None,
    baseline: str | None = None,
    curves: Sequence[str] = DEFAULT_CURVES,
    uri: str | None = None,
    max_runs: int | None = None,
) -> Comparison:
    """Compare runs of an experiment (or the given run ids).

    Args:
        run_ids: Compare exactly these runs; else the experiment's.
        experiment: The experiment to take runs from.
        kind: Only runs of this kind (``train``, ``evaluate``, ...).
        metrics: Metric keys to show; default every ``*_mean`` metric of the runs.
        sort_by: Metric to sort by; default the first of ``metrics`` (runs without it go last).
        ascending: Sort order; default descending, ascending for ``hd95``/``loss`` metrics.
        baseline: Run id the paired differences are taken against; default the first run after sorting.
        curves: Metric histories to fetch for learning curves (of runs that logged them).
        uri: Tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``.
        max_runs: At most this many runs of the experiment (newest first).

    Returns:
        The :class:`Comparison`.

    Raises:
        ConfigError: No runs, unknown runs, experiment or metrics, or a baseline that is not among the runs.
    """
    runs = fetch_runs(run_ids, experiment=experiment, kind=kind, uri=uri, max_runs=max_runs)
    if not runs:
        where = f"experiment '{experiment}'" + (f" of kind '{kind}'" if kind else "")
        msg = f"comparison needs at least one run, got none in {where}"
        raise ConfigError(msg)
    chosen = list(metrics) if metrics else default_metrics(runs)
    key = sort_by or (chosen[0] if chosen else None)
    logged = sorted({k for r in runs for k in r.metrics})
    for name in [*chosen, *([key] if key else [])]:
        if name not in logged:
            msg = f"metric '{name}' must be logged by at least one of the runs{did_you_mean(name, logged)}"
            raise ConfigError(msg)
    if key is not None:
        if ascending is None:
            ascending = any(word in key for word in _LOWER_IS_BETTER)
        sign = 1.0 if ascending else -1.0
        have = [r for r in runs if math.isfinite(r.metrics.get(key, math.nan))]
        rest = [r for r in runs if not math.isfinite(r.metrics.get(key, math.nan))]
        runs = sorted(have, key=lambda r: sign * r.metrics[key]) + rest
    comp = Comparison(runs, differing_params(runs), chosen, key)
    if baseline is not None and baseline not in {r.run_id for r in runs}:
        msg = f"baseline must be one of the compared run ids, got {baseline!r}"
        raise ConfigError(msg)
    base_run = next(r for r in runs if r.run_id == baseline) if baseline else runs[0]
    comp.baseline = base_run.run_id
    comp.paired = _paired(comp, base_run, uri)
    comp.histories = _histories(runs, curves, uri)
    return comp


def write_comparison(comp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write ``runs.csv``, ``paired.csv`` (when there are pairs) and the PNG plots.

    Returns:
        The written files by name: ``runs.csv``, ``paired.csv``, ``metrics.png``, ``learning_curves.png``
        (each only when there is something to put in it).
    """
    from medseg.evaluation.plots import plot_learning_curves, plot_metric_bars

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"runs.csv": out / "runs.csv"}
    atomic_write_text(files["runs.csv"], to_csv(comp.table(), comp.columns()))
    if comp.paired:
        rows = [asdict(p) for p in comp.paired]
        files["paired.csv"] = out / "paired.csv"
        atomic_write_text(files["paired.csv"], to_csv(rows, list(rows[0])))
    bars = comp.bars()
    if bars:
        files["metrics.png"] = plot_metric_bars(bars, out / "metrics.png")
    labelled = {comp.run_label(r): comp.histories[r.run_id] for r in comp.runs if r.run_id in comp.histories}
    if labelled:
        files["learning_curves.png"] = plot_learning_curves(labelled, out / "learning_curves.png")
    return files
