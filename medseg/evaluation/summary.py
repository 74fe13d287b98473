"""Per-case tables and their summaries: mean, median, sd and n per label and metric, undefined values counted.

The per-case table has one row per case and label (:data:`CASE_COLUMNS`). Its CSV writes an
undefined value as ``undefined`` and its JSON as ``null``; reading either back gives NaN.

Besides the labels, every summary has the pseudo-label ``all``: per case, the mean over the labels
whose value is defined, then summarised over the cases like a label.

Examples:
    >>> describe([1.0, 0.5, float("nan")])
    (0.75, 0.75, 0.3535533905932738, 2, 1)
    >>> metric_key("dice", "liver", "mean"), metric_key("dice", ALL_LABELS, "mean")
    ('dice_liver_mean', 'dice_mean')
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.evaluation.metrics import LabelScores
from medseg.io.atomic import atomic_write_text
from medseg.tracking.params import sanitize_key

ALL_LABELS = "all"
UNDEFINED = "undefined"
SUMMARY_METRICS = ("dice", "hd95", "surface_dice", "vol_diff_ml", "vol_diff_rel")
CASE_COLUMNS = (
    "case_id",
    "label",
    "value",
    "dice",
    "hd95",
    "surface_dice",
    "ref_ml",
    "pred_ml",
    "vol_diff_ml",
    "vol_diff_rel",
    "ref_voxels",
    "pred_voxels",
    "note",
)
_FLOAT_COLUMNS = frozenset(CASE_COLUMNS[3:10])
_INT_COLUMNS = frozenset(("value", "ref_voxels", "pred_voxels"))
SUMMARY_COLUMNS = ("label", "metric", "mean", "median", "sd", "n", "n_undefined")


@dataclass(frozen=True)
class Stat:
    """Summary of one metric of one label over the cases.

    Attributes:
        label: Label name, or ``all`` for the per-case mean over labels.
        metric: One of :data:`SUMMARY_METRICS`.
        mean: Mean of the defined values (NaN if none).
        median: Their median (NaN if none).
        sd: Their sample standard deviation (``ddof=1``; NaN if fewer than two).
        n: How many values are defined.
        n_undefined: How many are undefined (left out of the statistics).
    """

    label: str
    metric: str
    mean: float
    median: float
    sd: float
    n: int
    n_undefined: int


def describe(values: Iterable[float]) -> tuple[float, float, float, int, int]:
    """``(mean, median, sd, n, n_undefined)`` of the finite values; NaN (undefined) ones are counted apart."""
    arr = np.asarray(list(values), dtype=np.float64)
    ok = arr[np.isfinite(arr)]
    n = int(ok.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0, int(arr.size)
    sd = float(np.std(ok, ddof=1)) if n > 1 else math.nan
    return float(np.mean(ok)), float(np.median(ok)), sd, n, int(arr.size - n)


def metric_key(metric: str, label: str, stat: str) -> str:
    """The MLflow key of a summary value: ``<metric>_<label>_<stat>``, or ``<metric>_<stat>`` for all."""
    if label == ALL_LABELS:
        return sanitize_key(f"{metric}_{stat}")
    return sanitize_key(f"{metric}_{label}_{stat}")


def case_values(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[tuple[str, str], float]:
    """Per-case values of one metric keyed ``(case_id, label)``, with the ``all`` pseudo-label added.

    Args:
        rows: Per-case table rows (:data:`CASE_COLUMNS`; NaN for undefined).
        metric: A column of the table, e.g. ``"dice"``.

    Returns:
        ``(case_id, label) -> value``; ``(case_id, "all")`` is the mean of the case's defined values.
    """
    out: dict[tuple[str, str], float] = {}
    per_case: dict[str, list[float]] = {}
    for row in rows:
        value = float(row[metric])
        out[(str(row["case_id"]), str(row["label"]))] = value
        per_case.setdefault(str(row["case_id"]), []).append(value)
    for case_id, values in per_case.items():
        ok = [v for v in values if math.isfinite(v)]
        out[(case_id, ALL_LABELS)] = float(np.mean(ok)) if ok else math.nan
    return out


def summarise(rows: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[Stat]:
    """Summaries per label (and ``all``) and metric.

    Args:
        rows: Per-case table rows.
        labels: The label names, in the order to report them.

    Returns:
        One :class:`Stat` per label and metric, labels first, then ``all``.
    """
    stats = []
    for metric in SUMMARY_METRICS:
        values = case_values(rows, metric)
        for label in [*labels, ALL_LABELS]:
            picked = [v for (_, lab), v in values.items() if lab == label]
            stats.append(Stat(label, metric, *describe(picked)))
    order = {name: i for i, name in enumerate([*labels, ALL_LABELS])}
    return sorted(stats, key=lambda s: (order[s.label], SUMMARY_METRICS.index(s.metric)))


def summary_metrics(stats: Iterable[Stat]) -> dict[str, float]:
    """The summaries as MLflow metrics: ``<metric>[_<label>]_{mean,median,sd,n}`` and ``..._n_undefined``.

    Undefined statistics (NaN) are left out rather than logged.
    """
    out: dict[str, float] = {}
    for s in stats:
        for stat, value in (("mean", s.mean), ("median", s.median), ("sd", s.sd)):
            if math.isfinite(value):
                out[metric_key(s.metric, s.label, stat)] = value
        out[metric_key(s.metric, s.label, "n")] = float(s.n)
        out[metric_key(s.metric, s.label, "n_undefined")] = float(s.n_undefined)
    return out


def rows_from_scores(scores: Mapping[str, Sequence[LabelScores]]) -> list[dict[str, Any]]:
    """Per-case table rows from scores keyed by case id (cases in the given order)."""
    return [{"case_id": case_id, **s.as_dict()} for case_id, per_label in scores.items() for s in per_label]


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return UNDEFINED
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text of ``rows`` with ``columns``; non-finite floats written as ``undefined``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k, "")) for k in columns})
    return buf.getvalue()


def to_json(obj: Any) -> str:
    """JSON text with non-finite floats as ``null`` (strict JSON has no NaN)."""

    def clean(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (np.floating, np.integer)):
            x = x.item()
        return _json_value(x)

    return json.dumps(clean(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_case_table(rows: Sequence[Mapping[str, Any]], csv_path: Path, json_path: Path) -> None:
    """Write the per-case table as CSV and JSON (atomically)."""
    atomic_write_text(csv_path, to_csv(rows, CASE_COLUMNS))
    atomic_write_text(json_path, to_json([{k: row.get(k) for k in CASE_COLUMNS} for row in rows]))


def stats_rows(stats: Iterable[Stat]) -> list[dict[str, Any]]:
    """The summaries as table rows (:data:`SUMMARY_COLUMNS`)."""
    return [asdict(s) for s in stats]


def read_case_table(path: str | Path) -> list[dict[str, Any]]:
    """Read a per-case table (CSV or JSON) back, with undefined values as NaN.

    Raises:
        InputError: If the file lacks a column of :data:`CASE_COLUMNS`.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text) if path.suffix.lower() == ".json" else list(csv.DictReader(io.StringIO(text)))
    rows = []
    for i, item in enumerate(raw):
        missing = [c for c in CASE_COLUMNS if c not in item]
        if missing:
            msg = f"{path}: every per-case table row must have columns {list(CASE_COLUMNS)}, "
            msg += f"got row {i} without {missing}"
            raise InputError(msg)
        row: dict[str, Any] = {}
        for col in CASE_COLUMNS:
            value = item[col]
            if col in _FLOAT_COLUMNS:
                row[col] = math.nan if value in (None, "", UNDEFINED) else float(value)
            elif col in _INT_COLUMNS:
                row[col] = int(value)
            else:
                row[col] = "" if value is None else str(value)
        rows.append(row)
    return rows
