"""``review.json``: clinicians' verdicts on the cases of one batch, as the review page exports them.

.. code-block:: json

    {"format": "medseg-review/1", "batch_id": "3f2a…", "model_sha256": "9c1e…",
     "reviewer": "Dr. A", "exported": "2026-12-08T09:00:00Z",
     "cases": [{"case_id": "a", "verdict": "accept", "note": "", "reviewer": "Dr. A",
                "reviewed_at": "2026-12-08T08:58:00Z"}]}

:func:`read_review` checks the file's shape; :func:`check_review` checks it against its batch (the
batch id and model hash of ``manifest.json``, and that every case is one of the batch's segmented
scans). Every error names the file.

Examples:
    >>> Verdict("needs correction")
    <Verdict.NEEDS_CORRECTION: 'needs-correction'>
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import field_validator

from medseg.config.base import FrozenModel, validate
from medseg.errors import InputError, choice_error

REVIEW_FORMAT = "medseg-review/1"


class Verdict(str, Enum):
    """A clinician's decision on a case (a space or underscore counts as a dash)."""

    ACCEPT = "accept"
    NEEDS_CORRECTION = "needs-correction"
    REJECT = "reject"

    @classmethod
    def _missing_(cls, value: object) -> Verdict | None:
        text = str(value).strip().lower().replace(" ", "-").replace("_", "-")
        for member in cls:
            if member.value == text:
                return member
        return None


class CaseVerdict(FrozenModel):
    """One case's verdict.

    Attributes:
        case_id: The case (a scan of the batch).
        verdict: accept, needs-correction or reject.
        note: Free text.
        reviewer: Who decided.
        reviewed_at: When (ISO time, as the browser wrote it).
    """

    case_id: str
    verdict: Verdict
    note: str = ""
    reviewer: str = ""
    reviewed_at: str = ""

    @field_validator("verdict", mode="before")
    @classmethod
    def _known_verdict(cls, value: Any) -> Any:
        if isinstance(value, Verdict):
            return value
        try:
            return Verdict(value)
        except ValueError:
            raise ValueError(choice_error("verdict", value, [v.value for v in Verdict])) from None

    def record(self) -> dict[str, str]:
        """The verdict as kept in the manifest and ``case.json``."""
        return {
            "verdict": self.verdict.value,
            "note": self.note,
            "reviewer": self.reviewer,
            "reviewed_at": self.reviewed_at,
        }


class ReviewFile(FrozenModel):
    """The content of a ``review.json``.

    Attributes:
        format: ``medseg-review/1``.
        batch_id: The batch reviewed (``manifest.json``'s ``batch_id``).
        model_sha256: The model whose segmentations were reviewed.
        reviewer: Who exported the file.
        exported: When.
        cases: The verdicts, one per case.
    """

    format: str
    batch_id: str
    model_sha256: str
    reviewer: str = ""
    exported: str = ""
    cases: tuple[CaseVerdict, ...]

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != REVIEW_FORMAT:
            msg = f"format must be '{REVIEW_FORMAT}', got '{value}'"
            raise ValueError(msg)
        return value

    @field_validator("cases")
    @classmethod
    def _one_per_case(cls, value: tuple[CaseVerdict, ...]) -> tuple[CaseVerdict, ...]:
        ids = [c.case_id for c in value]
        repeated = sorted({c for c in ids if ids.count(c) > 1})
        if repeated:
            msg = f"cases must hold one verdict per case, got several for {repeated}"
            raise ValueError(msg)
        return value


def read_review(path: str | Path) -> ReviewFile:
    """Read and check the shape of a ``review.json``.

    Raises:
        InputError: An unreadable file or not JSON.
        ConfigError: A field missing or wrong (the message names the file and the field).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path}: review file must be readable JSON, got {exc}"
        raise InputError(msg) from exc
    if not isinstance(data, dict):
        msg = f"{path}: review file must hold a JSON object, got {type(data).__name__}"
        raise InputError(msg)
    return validate(ReviewFile, data, str(path))


def check_review(review: ReviewFile, path: str | Path, manifest: Any, out: Path) -> None:
    """Check that a review belongs to the batch in ``out``.

    Args:
        review: The read file.
        path: Where it came from (for messages).
        manifest: The batch's :class:`~medseg.batch.manifest.Manifest`.
        out: The batch folder.

    Raises:
        InputError: Another batch, another model, a case the batch does not hold or did not segment.
    """
    if review.model_sha256 != manifest.model_sha256:
        msg = (
            f"{path}: review must be of model {manifest.model_sha256[:16]}… (the batch in {out}), "
            f"got model {review.model_sha256[:16]}…"
        )
        raise InputError(msg)
    if review.batch_id != manifest.batch_id:
        msg = (
            f"{path}: review must be of batch {manifest.batch_id} ({out / 'manifest.json'}), "
            f"got batch {review.batch_id!r}: a review of another batch"
        )
        raise InputError(msg)
    unknown = sorted(c.case_id for c in review.cases if c.case_id not in manifest.entries)
    if unknown:
        msg = f"{path}: reviewed cases must be scans of the batch in {out}, got unknown {unknown}"
        raise InputError(msg)
    failed = sorted(c.case_id for c in review.cases if manifest.entries[c.case_id].get("status") != "ok")
    if failed:
        msg = f"{path}: reviewed cases must have been segmented, got {failed} without a segmentation"
        raise InputError(msg)
