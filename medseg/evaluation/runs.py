"""Runs as compared: fetched through MLflow's client API (a SQLite store or a server alike)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medseg.errors import ConfigError
from medseg.evaluation.summary import ALL_LABELS, read_case_table
from medseg.tracking.params import sanitize_key

PER_CASE_ARTIFACT = "evaluation/per_case.csv"


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as compared: identity, params, latest metrics and tags."""

    run_id: str
    name: str
    kind: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Label names an ``evaluate`` run logged (param ``labels``, a JSON list), else none."""
        try:
            found = json.loads(self.params.get("labels", "[]"))
        except json.JSONDecodeError:
            return []
        return [str(x) for x in found] if isinstance(found, list) else []


def split_metric(key: str, labels: Sequence[str]) -> tuple[str, str]:
    """Split ``<base>_<label>_mean`` into ``(base, label)``; ``(base, "all")`` when no label matches.

    Examples:
        >>> split_metric("surface_dice_left_kidney_mean", ["left_kidney", "kidney"])
        ('surface_dice', 'left_kidney')
        >>> split_metric("dice_mean", ["liver"])
        ('dice', 'all')
    """
    stem = key[: -len("_mean")] if key.endswith("_mean") else key
    for label in sorted(labels, key=len, reverse=True):
        suffix = "_" + sanitize_key(label)
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)], label
    return stem, ALL_LABELS


def _record(run: Any) -> RunRecord:
    from medseg.tracking import TAG_KIND

    tags = dict(run.data.tags)
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        kind=tags.get(TAG_KIND, ""),
        status=run.info.status,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=tags,
    )


def fetch_runs(
    run_ids: Sequence[str] | None = None,
    *,
    experiment: str = "medseg",
    kind: str | None = None,
    uri: str | None = None,
    max_runs: int | None = None,
) -> list[RunRecord]:
    """The runs to compare: the given ids, else the experiment's runs (newest first, of one kind if given).

    Args:
        run_ids: Exactly these runs (in this order); else the experiment's.
        experiment: The experiment's name.
        kind: Only runs of this kind (``train``, ``evaluate``, ...).
        uri: The tracking URI (a SQLite store or a server); default :func:`~medseg.tracking.tracking_uri`.
        max_runs: At most this many runs of the experiment.

    Returns:
        One :class:`RunRecord` per run.

    Raises:
        ConfigError: An unknown run id, experiment or kind.
    """
    from medseg.tracking import find_runs
    from medseg.tracking.store import client, mlflow_module

    mlflow_client = client(uri)
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(_record(mlflow_client.get_run(run_id)))
            except mlflow_module().exceptions.MlflowException as exc:
                msg = f"run id must name a run in {uri or 'the tracking store'}, got {run_id!r}"
                raise ConfigError(msg) from exc
        return runs
    if mlflow_client.get_experiment_by_name(experiment) is None:
        msg = f"experiment must exist in {uri or 'the tracking store'}, got unknown '{experiment}'"
        raise ConfigError(msg)
    found = find_runs(experiment, kind, uri, max_results=max_runs)
    return [
        RunRecord(
            r["run_id"], r["name"] or "", r["kind"] or "", r["status"], r["params"], r["metrics"], r["tags"]
        )
        for r in found
    ]


def differing_params(runs: Sequence[RunRecord]) -> list[str]:
    """Param keys whose value differs between runs (missing counts as a value), sorted."""
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def default_metrics(runs: Sequence[RunRecord]) -> list[str]:
    """Every ``*_mean`` metric of the runs: over-label means first, then per label, sorted."""
    keys = {k for r in runs for k in r.metrics if k.endswith("_mean")}
    labels = {lab for r in runs for lab in r.labels}
    return sorted(keys, key=lambda k: (split_metric(k, sorted(labels))[1] != ALL_LABELS, k))


def fetch_case_table(run_id: str, uri: str | None = None) -> list[dict[str, Any]] | None:
    """The per-case table an ``evaluate`` run logged, or None if it has none."""
    from medseg.tracking.store import client, mlflow_module

    with tempfile.TemporaryDirectory(prefix="medseg-compare-") as tmp:
        try:
            local = client(uri).download_artifacts(run_id, PER_CASE_ARTIFACT, tmp)
        except (mlflow_module().exceptions.MlflowException, OSError):
            return None
        return read_case_table(local)
