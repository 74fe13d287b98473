"""Variants of an experiment: runs grouped by parameters (seeds and folds pooled), mean ± sd per group.

An ablation trains each variant with several seeds (or folds); what matters is whether a variant's
difference to a baseline variant is larger than the spread between seeds. For every group (runs
sharing the values of the ``by`` params), each metric's mean and sd over the group's runs; against the
baseline group, per metric and label:

* ``diff``: the difference of the group means, with ``noise`` = ``sqrt(sd_b^2 / n_b + sd_o^2 / n_o)``
  from the seed-to-seed sds, and ``beyond_noise`` when ``|diff| > 2 * noise`` (about a two-sided 5%
  test on the run means; undecided, ``None``, with fewer than two runs in a group);
* paired per-case statistics (for ``evaluate`` runs): each case's value averaged over the group's runs,
  then :func:`~medseg.evaluation.compare.paired_difference` over the cases both groups scored.

Examples:
    >>> import tempfile
    >>> from medseg.evaluation.compare import compare_runs
    >>> from medseg.tracking import tracked_run
    >>> tmp = tempfile.TemporaryDirectory()
    >>> uri = f"sqlite:///{tmp.name}/mlflow.db"
    >>> for seed, crf, dice in ((0, False, 0.80), (1, False, 0.82), (0, True, 0.78), (1, True, 0.79)):
    ...     with tracked_run("evaluate", uri=uri, params={"seed": seed, "crf": crf}) as run:
    ...         run.log_metric("dice_mean", dice)
    >>> grouped = group_runs(compare_runs(kind="evaluate", uri=uri), ["crf"], baseline="False", uri=uri)
    >>> [(s.group, s.n_runs, round(s.mean, 3)) for s in grouped.stats]
    [('False', 2, 0.81), ('True', 2, 0.785)]
    >>> [(d.group, round(d.diff, 3), d.beyond_noise) for d in grouped.diffs]
    [('True', -0.025, True)]
    >>> tmp.cleanup()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import ConfigError
from medseg.evaluation.compare import Comparison, PairedDiff, paired_difference
from medseg.evaluation.runs import RunRecord, fetch_case_table, split_metric
from medseg.evaluation.summary import SUMMARY_METRICS, case_values, to_csv
from medseg.io.atomic import atomic_write_text


@dataclass(frozen=True)
class GroupStat:
    """One metric of one group: mean and sd over its runs."""

    group: str
    metric: str
    n_runs: int
    mean: float
    sd: float


@dataclass(frozen=True)
class GroupDiff:
    """One group against the baseline group, for one metric (and, paired, one label)."""

    baseline: str
    group: str
    metric: str
    diff: float
    noise: float
    beyond_noise: bool | None
    paired: PairedDiff | None


@dataclass
class GroupedComparison:
    """Runs grouped into variants.

    Attributes:
        by: The param keys that define a group.
        groups: Group name (the params' values joined by ``" | "``) to its runs, in first-seen order.
        stats: Mean and sd per group and metric.
        baseline: The baseline group.
        diffs: Every other group against the baseline, per compared metric.
    """

    by: list[str]
    groups: dict[str, list[RunRecord]]
    stats: list[GroupStat] = field(default_factory=list)
    baseline: str = ""
    diffs: list[GroupDiff] = field(default_factory=list)

    def stat(self, group: str, metric: str) -> GroupStat | None:
        """The stat of ``group`` and ``metric``, if any run of the group logged it."""
        return next((s for s in self.stats if s.group == group and s.metric == metric), None)

    def rows(self) -> list[dict[str, object]]:
        """Rows for ``groups.csv``: one per group and metric, with its difference to the baseline."""
        out = []
        for s in self.stats:
            d = next((x for x in self.diffs if x.group == s.group and x.metric == s.metric), None)
            out.append(
                {
                    **asdict(s),
                    "diff_vs_baseline": d.diff if d else (0.0 if s.group == self.baseline else math.nan),
                    "noise": d.noise if d else math.nan,
                    "beyond_noise": "" if d is None or d.beyond_noise is None else str(d.beyond_noise),
                }
            )
        return out

    def paired_rows(self) -> list[dict[str, object]]:
        """Rows for ``group_paired.csv``: the paired per-case statistics against the baseline."""
        return [
            {"baseline": d.baseline, "group": d.group, **asdict(d.paired)}
            for d in self.diffs
            if d.paired is not None
        ]


def _group_name(run: RunRecord, by: Sequence[str]) -> str:
    return " | ".join(run.params.get(k, "-") for k in by)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _case_means(runs: list[RunRecord], base: str, label: str, uri: str | None) -> dict[str, float]:
    """Per case, the metric averaged over the runs' per-case tables (defined values only)."""
    pooled: dict[str, list[float]] = {}
    for run in runs:
        rows = fetch_case_table(run.run_id, uri)
        if not rows:
            continue
        for (case, lab), value in case_values(rows, base).items():
            if lab == label and math.isfinite(value):
                pooled.setdefault(case, []).append(value)
    return {case: float(np.mean(v)) for case, v in pooled.items()}


def group_runs(
    comp: Comparison, by: Sequence[str], baseline: str | None = None, uri: str | None = None
) -> GroupedComparison:
    """Group a comparison's runs by params and compare every group with a baseline group.

    Args:
        comp: The comparison (its runs and metrics).
        by: Param keys (as flattened in MLflow, e.g. ``pipeline`` or ``refine.crf.enabled``).
        baseline: The baseline group's name (values joined by ``" | "``); default the first group.
        uri: Tracking URI (for the per-case tables).

    Returns:
        The :class:`GroupedComparison`.

    Raises:
        ConfigError: No ``by`` keys, a key no run logged, or an unknown baseline group.
    """
    keys = [k.strip() for k in by if k.strip()]
    if not keys:
        msg = "group-by must name at least one param, got none"
        raise ConfigError(msg)
    for key in keys:
        if not any(key in r.params for r in comp.runs):
            msg = f"group-by param '{key}' must be logged by at least one of the runs"
            raise ConfigError(msg)
    groups: dict[str, list[RunRecord]] = {}
    for run in comp.runs:
        groups.setdefault(_group_name(run, keys), []).append(run)
    if baseline is not None and baseline not in groups:
        msg = f"baseline group must be one of {sorted(groups)}, got {baseline!r}"
        raise ConfigError(msg)
    base = baseline if baseline is not None else next(iter(groups))
    out = GroupedComparison(keys, groups, baseline=base)
    for name, runs in groups.items():
        for m in comp.metrics:
            values = [r.metrics[m] for r in runs if m in r.metrics]
            if values:
                mean, sd = _mean_sd(values)
                out.stats.append(GroupStat(name, m, len(values), mean, sd))
    labels = comp.runs[0].labels if comp.runs else []
    for name, runs in groups.items():
        if name == base:
            continue
        for m in comp.metrics:
            b, o = out.stat(base, m), out.stat(name, m)
            if b is None or o is None:
                continue
            diff = o.mean - b.mean
            if b.n_runs > 1 and o.n_runs > 1:
                noise = math.sqrt(b.sd**2 / b.n_runs + o.sd**2 / o.n_runs)
                beyond: bool | None = abs(diff) > 2 * noise
            else:
                noise, beyond = math.nan, None
            paired = None
            metric, label = split_metric(m, labels)
            if metric in SUMMARY_METRICS and m.endswith("_mean"):
                pb = _case_means(groups[base], metric, label, uri)
                po = _case_means(runs, metric, label, uri)
                if pb and po:
                    paired = paired_difference(pb, po, (base, name, metric, label))
            out.diffs.append(GroupDiff(base, name, m, diff, noise, beyond, paired))
    return out


def write_groups(grouped: GroupedComparison, out_dir: str | Path) -> dict[str, Path]:
    """Write ``groups.csv`` and (when there are pairs) ``group_paired.csv``.

    Returns:
        The written files by name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = grouped.rows()
    files = {"groups.csv": out / "groups.csv"}
    atomic_write_text(files["groups.csv"], to_csv(rows, list(rows[0]) if rows else ["group"]))
    paired = grouped.paired_rows()
    if paired:
        files["group_paired.csv"] = out / "group_paired.csv"
        atomic_write_text(files["group_paired.csv"], to_csv(paired, list(paired[0])))
    return files
