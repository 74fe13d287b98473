"""The review page's rows: one typed record per case, from the batch's cases and each case's files.

A row joins what the batch recorded (:class:`~medseg.export.batch.BatchCase`: status, error,
outputs), the case's ``case.json`` (:class:`~medseg.export.facts.CaseFacts`) and ``stats.json``,
and the QC flags (:mod:`medseg.export.qc`). :mod:`medseg.export.review_page` renders them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.export.facts import AlgorithmInfo, CaseFacts, read_case_facts
from medseg.export.qc import CaseOutcome, Flag, QcSettings, batch_medians, case_flags
from medseg.export.review_panel import BatchIdentity
from medseg.export.stats import read_stats

if TYPE_CHECKING:
    from medseg.export.facts import BatchCase

GREY = (128, 128, 128)
_PATIENT_TAGS = (
    ("PatientName", "patient name"),
    ("PatientID", "patient id"),
    ("PatientBirthDate", "birth date"),
    ("StudyDate", "study date"),
    ("AccessionNumber", "accession"),
)


@dataclass(frozen=True)
class ReviewSettings:
    """What the review page shows.

    Attributes:
        show_patient_info: Show patient name, id, birth date, study date and accession number.
        qc: QC thresholds.
        title: Page title.
        batch: The batch's identity, stamped on verdicts and ``review.json`` (from its manifest).
    """

    show_patient_info: bool = False
    qc: QcSettings = field(default_factory=QcSettings)
    title: str = "medseg review"
    batch: BatchIdentity = field(default_factory=BatchIdentity)


@dataclass(frozen=True)
class StatRow:
    """One label's statistics on a case page (a row of ``stats.json``)."""

    value: int
    name: str
    voxels: int
    volume_ml: float
    components: int | None
    mean: float | None
    std: float | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StatRow:
        """Read a row of ``stats.json``."""
        return cls(
            int(data["value"]),
            str(data["name"]),
            int(data["voxels"]),
            float(data["volume_ml"]),
            data.get("components"),
            data.get("mean"),
            data.get("std"),
        )

    @property
    def numbers(self) -> tuple[Any, ...]:
        """The numeric cells, in column order."""
        return (self.value, self.voxels, self.volume_ml, self.components, self.mean, self.std)


@dataclass(frozen=True)
class ReviewRow:
    """One case on the review page.

    Attributes:
        case_id: The case id.
        outcome: Status, error, volumes, quality and refinement (what the QC flags look at).
        facts: Its ``case.json``, or ``None`` (not segmented, or no exports yet).
        stats: Its label statistics, or ``None`` where there are none.
        files: Its files, relative to its folder.
        patient: Patient identifiers (label → value), only when asked for.
        flags: Its QC flags, most serious first.
    """

    case_id: str
    outcome: CaseOutcome
    facts: CaseFacts | None = None
    stats: tuple[StatRow, ...] | None = None
    files: tuple[str, ...] = ()
    patient: Mapping[str, str] = field(default_factory=dict)
    flags: tuple[Flag, ...] = ()

    @property
    def status(self) -> str:
        """``ok`` when segmented."""
        return self.outcome.status

    @property
    def colors(self) -> dict[str, tuple[int, int, int]]:
        """Display colour per label name (from ``case.json``)."""
        return {e.name: e.color for e in self.facts.labels} if self.facts else {}

    @property
    def montages(self) -> tuple[str, ...]:
        """The overlay montages among its files."""
        return tuple(f for f in self.files if f.startswith("overlays/") and f.endswith(".png"))

    def info(self) -> list[tuple[str, str]]:
        """The case page's fact table: ``(name, value)`` pairs, empty values left out."""
        facts = self.facts or CaseFacts(algorithm=AlgorithmInfo(name=""))
        algo = facts.algorithm
        error = self.outcome.error
        pairs = [
            ("status", self.status + (f" ({error})" if error else "")),
            ("series", facts.series_description),
            ("modality", facts.modality),
            ("grid", " x ".join(str(s) for s in facts.shape)),
            ("spacing (mm)", " x ".join(f"{s:g}" for s in facts.spacing_mm)),
            ("model", f"{algo.name} ({algo.pipeline}), bundle {algo.sha256[:16]}"),
        ]
        pairs += [(k.replace("_", " "), _fmt(v)) for k, v in self.outcome.quality.items()]
        pairs += [(f"refine: {k.replace('_', ' ')}", _fmt(v)) for k, v in (self.outcome.refine or {}).items()]
        pairs += list(self.patient.items())
        return [(k, v) for k, v in pairs if v]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _patient_info(inputs: Sequence[Path]) -> dict[str, str]:
    import pydicom

    for path in inputs[:1]:
        p = Path(path)
        if p.is_dir():
            p = next((f for f in sorted(p.rglob("*")) if f.is_file()), p)
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # not DICOM, or unreadable: nothing to show
            return {}
        return {label: str(ds.get(tag, "")) for tag, label in _PATIENT_TAGS if str(ds.get(tag, ""))}
    return {}


def _row(out_dir: Path, case: BatchCase, settings: ReviewSettings) -> ReviewRow:
    case_dir = out_dir / case.case_id
    ok = case.status == "ok"
    facts = read_case_facts(case_dir) if ok else None
    stats_json = read_stats(case_dir) if ok else None
    stats = tuple(StatRow.from_dict(r) for r in stats_json["labels"]) if stats_json else None
    files = sorted(
        str(Path(p).relative_to(case.case_id)) for p in case.outputs if Path(p).parts[:1] == (case.case_id,)
    )
    if not files and case_dir.is_dir():
        files = sorted(str(p.relative_to(case_dir)) for p in case_dir.rglob("*") if p.is_file())
    outcome = CaseOutcome(
        status=case.status,
        error=case.error,
        volumes={r.name: r.volume_ml for r in stats} if stats else None,
        quality=(facts.quality if facts else None) or case.quality or {},
        refine=(facts.refine if facts else None) or case.refine,
        errors=facts.errors if facts else {},
    )
    patient = _patient_info(case.inputs) if settings.show_patient_info else {}
    return ReviewRow(case.case_id, outcome, facts, stats, tuple(files), patient)


def collect_rows(
    out_dir: Path, cases: Sequence[BatchCase], settings: ReviewSettings | None = None
) -> list[ReviewRow]:
    """One row per case for the review page: status, facts, volumes, statistics, files, flags.

    Args:
        out_dir: The batch's output folder.
        cases: Its cases, in manifest order.
        settings: What to show.

    Returns:
        The rows, in the order of ``cases``.
    """
    from dataclasses import replace

    settings = settings or ReviewSettings()
    rows = [_row(Path(out_dir), c, settings) for c in cases]
    medians = batch_medians([r.outcome for r in rows], settings.qc)
    return [replace(r, flags=tuple(case_flags(r.outcome, medians, settings.qc))) for r in rows]


def label_colors(rows: Sequence[ReviewRow]) -> list[tuple[str, tuple[int, int, int]]]:
    """Every label name of the batch with its colour, in order of first appearance (the index's columns)."""
    seen: dict[str, tuple[int, int, int]] = {}
    for row in rows:
        for name, color in row.colors.items():
            seen.setdefault(name, color)
        for name in row.outcome.volumes or {}:
            seen.setdefault(name, GREY)
    return list(seen.items())
