"""``medseg review import OUT review.json``: verdicts into the manifest, ``case.json`` and MLflow.

Everything is checked before anything is written (:func:`~medseg.review.verdicts.check_review`);
then the verdicts go to the batch's MLflow prediction run (one tag per case,
``review/<case_id>`` = the verdict, with ``.../note`` and ``.../reviewer``; metrics
``review/accepted_fraction``, ``review/rejected_fraction``, ``review/needs_correction_fraction``
and ``review/reviewed`` over every case reviewed so far), then into each ``case.json`` and last into
``manifest.json`` (through its owner, :func:`medseg.batch.manifest.record_reviews`), each file
replaced atomically. An import of a later ``review.json`` replaces the verdicts of the cases it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.io.atomic import atomic_write_text
from medseg.review.verdicts import CaseVerdict, Verdict, check_review, read_review


@dataclass(frozen=True)
class ImportSummary:
    """What an import did.

    Attributes:
        cases: Verdicts imported.
        counts: Per verdict, over every case reviewed so far.
        run_id: The MLflow run they were logged to ("" where the batch has none).
    """

    cases: int
    counts: dict[str, int]
    run_id: str


def case_key(prefix: str, case_id: str) -> str:
    """An MLflow key for a case (characters MLflow refuses become ``_``).

    Examples:
        >>> case_key("review", "case 1:a")
        'review/case 1_a'
    """
    return f"{prefix}/" + re.sub(r"[^A-Za-z0-9_.\- /]", "_", case_id)


def review_metrics(counts: dict[str, int]) -> dict[str, float]:
    """The review metrics from verdict counts.

    Examples:
        >>> review_metrics({"accept": 3, "reject": 1})["review/accepted_fraction"]
        0.75
    """
    n = sum(counts.values())
    share = {v.value: counts.get(v.value, 0) / n if n else 0.0 for v in Verdict}
    return {
        "review/reviewed": float(n),
        "review/accepted_fraction": share["accept"],
        "review/rejected_fraction": share["reject"],
        "review/needs_correction_fraction": share["needs-correction"],
    }


def _log_to_mlflow(uri: str, run_id: str, verdicts: tuple[CaseVerdict, ...], counts: dict[str, int]) -> None:
    import time

    from mlflow.entities import Metric, RunTag

    from medseg.tracking.store import client

    mlflow_client = client(uri)
    mlflow_client.get_run(run_id)  # fails clearly before anything is logged where the run is gone
    tags = []
    for v in verdicts:
        key = case_key("review", v.case_id)
        tags.append(RunTag(key, v.verdict.value))
        if v.note:
            tags.append(RunTag(f"{key}/note", v.note[:5000]))
        if v.reviewer:
            tags.append(RunTag(f"{key}/reviewer", v.reviewer[:250]))
    now = int(time.time() * 1000)
    metrics = [Metric(k, val, now, 0) for k, val in review_metrics(counts).items()]
    mlflow_client.log_batch(run_id, metrics=metrics, tags=tags)


def import_review(
    out_dir: str | Path, review_file: str | Path, *, tracking_uri: str | None = None
) -> ImportSummary:
    """Check a ``review.json`` against its batch and record its verdicts.

    Args:
        out_dir: The batch folder (``manifest.json``).
        review_file: The file the review page exported.
        tracking_uri: MLflow store of the prediction run (default: the one the manifest names).

    Returns:
        The :class:`ImportSummary`.

    Raises:
        InputError: A file of another batch or model, unknown cases, an unreadable file.
        ConfigError: A malformed file (naming the field).
        MedsegError: The batch's MLflow run cannot be reached (nothing is written then).
    """
    from medseg.batch.manifest import Manifest, record_reviews
    from medseg.export.facts import CASE_FILE, case_json_with_review

    out = Path(out_dir)
    manifest = Manifest.require(out)
    review = read_review(review_file)
    check_review(review, review_file, manifest, out)
    records = {v.case_id: v.record() for v in review.cases}
    merged = {cid: e.get("review", {}).get("verdict") for cid, e in manifest.entries.items()}
    merged.update({cid: r["verdict"] for cid, r in records.items()})
    counts: dict[str, int] = {}
    for verdict in merged.values():
        if verdict:
            counts[verdict] = counts.get(verdict, 0) + 1
    case_texts = {
        cid: text
        for cid, rec in records.items()
        if (text := case_json_with_review(out / cid, rec)) is not None
    }
    uri = tracking_uri or manifest.tracking_uri
    if manifest.run_id and uri:
        try:
            _log_to_mlflow(uri, manifest.run_id, review.cases, counts)
        except Exception as exc:  # nothing is written to the batch folder then
            msg = f"{review_file}: verdicts must reach MLflow run {manifest.run_id} ({uri}), got {exc}"
            raise MedsegError(msg) from exc
    for cid, text in case_texts.items():
        atomic_write_text(out / cid / CASE_FILE, text)
    record_reviews(out, records)
    return ImportSummary(cases=len(records), counts=counts, run_id=manifest.run_id if uri else "")


def review_summary(summary: ImportSummary) -> str:
    """One line for the command line.

    Examples:
        >>> review_summary(ImportSummary(2, {"accept": 1, "reject": 1}, "abc"))
        '2 verdict(s) imported; reviewed so far: accept 1, reject 1; logged to MLflow run abc'
    """
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
    where = f"; logged to MLflow run {summary.run_id}" if summary.run_id else "; no MLflow run recorded"
    return f"{summary.cases} verdict(s) imported; reviewed so far: {counts}{where}"


def as_dict(summary: ImportSummary) -> dict[str, Any]:
    """A JSON-ready dict of the summary."""
    return {"cases": summary.cases, "counts": summary.counts, "run_id": summary.run_id}
