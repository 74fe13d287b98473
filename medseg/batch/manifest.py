"""The batch manifest: ``OUT/manifest.json`` and ``OUT/manifest.csv``, rewritten as scans finish.

This module is the manifest's only writer: the runner records each scan's outcome; exports made
later (:mod:`medseg.batch.outputs`) are added to a case's entry and ``result.json`` by
:func:`record_outputs`. :func:`batch_cases` gives the cases of a batch folder to the exports.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.batch.storage import stop_on_storage_error
from medseg.errors import InputError
from medseg.export.facts import BatchCase
from medseg.export.review_panel import BatchIdentity
from medseg.io.atomic import atomic_write_text
from medseg.labelmap import LABEL_FILE

MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
RESULT_JSON = "result.json"
CSV_FIELDS = (
    "case_id",
    "status",
    "inputs",
    "fingerprint",
    "error",
    "outputs",
    "seconds_total",
    "changed_fraction",
    "foreground_entropy",
)


@dataclass
class Manifest:
    """Every scan of a batch with its outcome.

    Attributes:
        model_sha256: The model bundle hash(es) the outputs were made with.
        entries: Per case id: inputs, fingerprint, status (ok/failed/skipped/pending), error,
            outputs, seconds per stage.
        skipped: Files that are not scans, with the reason.
        started: When the run began (ISO time).
        batch_id: The batch's identity: made at the first save, kept by every later run into the
            folder with the same model (a review names it, so it cannot be applied to another batch).
        run_id: The MLflow run of the latest prediction run (see :meth:`link_run`).
        tracking_uri: Its MLflow store.

    Fields left empty keep the values of the ``manifest.json`` on disk made with the same model, and
    a scan with the same input fingerprint keeps its clinician's verdict (``review``).
    """

    model_sha256: str
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    batch_id: str = ""
    run_id: str = ""
    tracking_uri: str = ""
    _earlier_reviews: dict[str, dict[str, Any]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def link_run(self, out: Path, run_id: str, tracking_uri: str) -> None:
        """Record the MLflow run of this prediction run (where reviews are logged) and save."""
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self.save(out)

    def counts(self) -> dict[str, int]:
        """Number of scans per status."""
        out = {"ok": 0, "failed": 0, "skipped": len(self.skipped), "pending": 0}
        for e in self.entries.values():
            out[e["status"]] = out.get(e["status"], 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data."""
        return {
            "model_sha256": self.model_sha256,
            "batch_id": self.batch_id,
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counts": self.counts(),
            "scans": list(self.entries.values()),
            "skipped": self.skipped,
        }

    def save(self, out: Path) -> None:
        """Write ``manifest.json`` and ``manifest.csv`` atomically (a full disk stops the batch)."""
        with stop_on_storage_error("the manifest"):
            self._save(out)

    def _save(self, out: Path) -> None:
        self._keep_identity(out)
        atomic_write_text(out / MANIFEST_JSON, json.dumps(self.to_dict(), indent=1))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for e in self.entries.values():
            writer.writerow(
                {
                    "case_id": e["case_id"],
                    "status": e["status"],
                    "inputs": ";".join(e.get("inputs", [])[:1])
                    + (f";+{len(e['inputs']) - 1}" if len(e.get("inputs", [])) > 1 else ""),
                    "fingerprint": e.get("fingerprint", ""),
                    "error": e.get("error") or "",
                    "outputs": ";".join(e.get("outputs", [])),
                    "seconds_total": f"{e.get('seconds', {}).get('total', 0.0):.2f}",
                    "changed_fraction": _number(e.get("refine", {}).get("changed_fraction")),
                    "foreground_entropy": _number(e.get("quality", {}).get("foreground_entropy")),
                }
            )
        for s in self.skipped:
            writer.writerow({"case_id": "", "status": "skipped", "inputs": s["path"], "error": s["reason"]})
        atomic_write_text(out / MANIFEST_CSV, buf.getvalue())

    @classmethod
    def load(cls, out: Path) -> Manifest | None:
        """The manifest of a batch folder, or ``None`` where there is none (or it is unreadable)."""
        try:
            data = json.loads((Path(out) / MANIFEST_JSON).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return cls(
            model_sha256=data.get("model_sha256", ""),
            entries={e["case_id"]: e for e in data.get("scans", [])},
            skipped=data.get("skipped", []),
            started=data.get("started", ""),
            batch_id=str(data.get("batch_id", "")),
            run_id=str(data.get("run_id", "")),
            tracking_uri=str(data.get("tracking_uri", "")),
        )

    @classmethod
    def require(cls, out: Path) -> Manifest:
        """The manifest of a batch folder.

        Raises:
            InputError: Where ``out`` holds no readable ``manifest.json``.
        """
        manifest = cls.load(out)
        if manifest is None:
            msg = f"batch folder must hold a readable {MANIFEST_JSON}, got none in {out}"
            raise InputError(msg)
        return manifest

    def _keep_identity(self, out: Path) -> None:
        """Keep what the manifest on disk knew: batch id, run, and verdicts on unchanged scans."""
        if self._earlier_reviews is None:  # the first save reads the file once
            try:
                earlier = json.loads((out / MANIFEST_JSON).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                earlier = {}
            same = earlier.get("model_sha256") == self.model_sha256
            if not self.batch_id:
                self.batch_id = str(earlier.get("batch_id") or "") if same else ""
                self.batch_id = self.batch_id or uuid.uuid4().hex[:16]
            if same:
                self.run_id = self.run_id or str(earlier.get("run_id", ""))
                self.tracking_uri = self.tracking_uri or str(earlier.get("tracking_uri", ""))
            scans = earlier.get("scans", []) if same else []
            self._earlier_reviews = {str(e["case_id"]): e for e in scans if e.get("review")}
        for case_id, old in self._earlier_reviews.items():
            entry = self.entries.get(case_id)
            if (
                entry is not None
                and "review" not in entry
                and entry.get("fingerprint") == old.get("fingerprint")
            ):
                entry["review"] = old["review"]


def _batch_case(entry: dict[str, Any]) -> BatchCase:
    return BatchCase(
        case_id=str(entry["case_id"]),
        status=str(entry.get("status", "?")),
        inputs=tuple(Path(p) for p in entry.get("inputs", [])),
        outputs=tuple(str(p) for p in entry.get("outputs", [])),
        error=entry.get("error"),
        quality=dict(entry.get("quality") or {}),
        refine=entry.get("refine"),
    )


def batch_cases(out: Path) -> list[BatchCase]:
    """The scans of a batch folder: from ``manifest.json``; without one, from the case folders.

    Without a manifest, each ``<case>/result.json`` gives a case, and a folder holding only a
    label map counts as segmented.
    """
    out = Path(out)
    manifest = Manifest.load(out)
    if manifest is not None:
        return [_batch_case(e) for e in manifest.entries.values()]
    cases: dict[str, BatchCase] = {}
    for result in sorted(out.glob(f"*/{RESULT_JSON}")):
        try:
            data = json.loads(result.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        cases[result.parent.name] = _batch_case({**data, "case_id": result.parent.name})
    for labels in sorted(out.glob(f"*/{LABEL_FILE}")):
        cases.setdefault(labels.parent.name, BatchCase(labels.parent.name, "ok"))
    return [cases[k] for k in sorted(cases)]


def record_outputs(out: Path, case_id: str, written: Sequence[Path]) -> None:
    """Add files written into a case folder to its ``result.json`` and manifest entry.

    So that resuming checks them and the review page lists them.
    """
    out = Path(out)
    rel = [str(Path(case_id) / Path(p).relative_to(out / case_id)) for p in written]
    result_path = out / case_id / RESULT_JSON
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        result = None
    if result is not None:
        result["outputs"] = list(dict.fromkeys([*result.get("outputs", []), *rel]))
        atomic_write_text(result_path, json.dumps(result, indent=1))
    manifest = Manifest.load(out)
    entry = manifest.entries.get(case_id) if manifest is not None else None
    if manifest is not None and entry is not None:
        entry["outputs"] = list(dict.fromkeys([*entry.get("outputs", []), *rel]))
        manifest.save(out)


def batch_identity(out: Path) -> BatchIdentity:
    """The identity a review of the batch in ``out`` must name (empty where it has no manifest).

    A manifest written before batches had ids gets one now, saved.
    """
    manifest = Manifest.load(out)
    if manifest is None:
        return BatchIdentity()
    if not manifest.batch_id:
        manifest.save(Path(out))
    return BatchIdentity(batch_id=manifest.batch_id, model_sha256=manifest.model_sha256)


def record_reviews(out: Path, reviews: Mapping[str, Mapping[str, Any]]) -> Manifest:
    """Merge clinicians' verdicts into the manifest (each under its scan's ``review``) and save it.

    Args:
        out: The batch folder.
        reviews: Per case id: the verdict record (``verdict``, ``note``, ``reviewer``, ...).

    Returns:
        The saved manifest.

    Raises:
        InputError: No manifest, or a case id it does not hold (nothing is written then).
    """
    manifest = Manifest.require(out)
    unknown = sorted(set(reviews) - set(manifest.entries))
    if unknown:
        msg = f"reviewed cases must be scans of {out / MANIFEST_JSON}, got unknown {unknown}"
        raise InputError(msg)
    for case_id, record in reviews.items():
        manifest.entries[case_id]["review"] = dict(record)
    manifest.save(out)
    return manifest


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def check_existing(out: Path, model_sha256: str, overwrite: bool) -> None:
    """Refuse to mix outputs of two models in one folder unless asked to.

    Raises:
        InputError: If ``out`` holds a manifest made with another model and ``overwrite`` is off.
    """
    path = out / MANIFEST_JSON
    if not path.is_file() or overwrite:
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8")).get("model_sha256")
    except json.JSONDecodeError:
        return
    if previous and previous != model_sha256:
        msg = (
            f"output folder must hold outputs of this model or none, got {out} made with model "
            f"{previous[:12]}…; choose another folder or pass --overwrite"
        )
        raise InputError(msg)
