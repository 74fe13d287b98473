"""The review order: failed, export errors and empty cases first, then the QC risk score."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from medseg.export.qc import CaseOutcome
from medseg.export.risk import review_order, risk_scores


@dataclass(frozen=True)
class _Row:
    case_id: str
    outcome: CaseOutcome


def _row(
    case_id: str, *, status: str = "ok", volume: float = 10.0, entropy=None, crf=None, errors=None
) -> _Row:
    return _Row(
        case_id,
        CaseOutcome(
            status=status,
            volumes=None if status != "ok" else {"organ": volume},
            quality={} if entropy is None else {"foreground_entropy": entropy},
            refine=None if crf is None else {"crf_changed_fraction": crf},
            errors=errors or {},
        ),
    )


def test_failed_errors_and_empty_cases_come_first() -> None:
    rows = [
        _row("fine", entropy=0.1),
        _row("empty", volume=0.0, entropy=0.1),
        _row("broken", status="failed"),
        _row("export", entropy=0.1, errors={"dicom-seg": "boom"}),
        _row("unsure", entropy=0.9),
    ]
    assert [r.case_id for r in review_order(rows)] == ["broken", "export", "empty", "unsure", "fine"]


def test_measures_combine_as_ranks_and_missing_ones_drop_out() -> None:
    rows = [
        _row("a", volume=10.0, entropy=0.10, crf=0.01),
        _row("b", volume=10.5, entropy=0.12, crf=0.02),
        _row("c", volume=30.0, entropy=0.11, crf=0.01),  # volume far from the median
        _row("d", volume=9.5, entropy=0.50, crf=0.30),  # unsure and changed by the CRF
    ]
    scores = dict(zip("abcd", risk_scores([r.outcome for r in rows]), strict=True))
    assert scores["d"] > scores["c"] > scores["b"] > scores["a"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    # no entropy anywhere: volume and CRF decide alone, on the same [0, 1] scale
    no_entropy = [replace(r.outcome, quality={}) for r in rows]
    alone = dict(zip("abcd", risk_scores(no_entropy), strict=True))
    assert max(alone, key=alone.get) == "d"
    assert alone["c"] == pytest.approx((0.3 * 1.0 + 0.2 * (0.5 / 3)) / 0.5)  # volume rank 1, crf tied lowest


def test_one_case_has_no_ranking_to_do() -> None:
    assert risk_scores([_row("only", entropy=0.3).outcome]) == [0.5]
