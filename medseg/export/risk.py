"""The review order: which case most likely needs a reviewer, as one QC risk score per case.

The score combines what the prediction measured about itself with how the case compares with its
batch, each turned into a rank within the batch (0 the least suspicious case, 1 the most), so
measures on different scales mix without tuning:

* ``entropy``: the mean softmax entropy inside the predicted foreground (``quality.foreground_entropy``;
  with mirroring at prediction it is the entropy of the averaged passes, so disagreement between
  mirrored passes raises it too), weight 0.5;
* ``volume``: how far each label's volume lies from the batch median, ``|log(volume / median)|``,
  the largest over labels, weight 0.3;
* ``crf``: the share of voxels refinement changed (``refine.crf_changed_fraction``), weight 0.2.

A measure missing for every case of the batch drops out and the others are re-weighted. Cases that
failed come first (score 3), then cases with an export error (2), then empty segmentations (1.5);
every other case scores in [0, 1].

Examples:
    >>> from medseg.export.qc import CaseOutcome
    >>> cases = [CaseOutcome("ok", volumes={"x": v}, quality={"foreground_entropy": e})
    ...          for v, e in ((10.0, 0.1), (11.0, 0.2), (2.0, 0.4))]
    >>> [round(s, 3) for s in risk_scores(cases)]
    [0.0, 0.5, 1.0]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from medseg.export.qc import CaseOutcome

WEIGHTS: Mapping[str, float] = {"entropy": 0.5, "volume": 0.3, "crf": 0.2}
"""Weight of each measure in the score."""


def _ranks(values: Sequence[float | None]) -> list[float | None]:
    """Each value's rank among the present ones, scaled to [0, 1] (ties share their mean rank)."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return [None] * len(values)
    if len(present) == 1:
        return [None if v is None else 0.5 for v in values]
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        below = sum(p < v for p in present)
        equal = sum(p == v for p in present)
        out.append((below + (equal - 1) / 2) / (len(present) - 1))
    return out


def _volume_distance(cases: Sequence[CaseOutcome]) -> list[float | None]:
    names = {n for c in cases for n in (c.volumes or {})}
    medians = {}
    for n in names:
        vals = [float((c.volumes or {}).get(n, 0.0)) for c in cases if c.volumes is not None]
        medians[n] = statistics.median(vals) if vals else 0.0
    out: list[float | None] = []
    for c in cases:
        vols = c.volumes
        if vols is None or not medians:
            out.append(None)
            continue
        far = [
            abs(math.log((float(vols.get(n, 0.0)) + 1e-3) / (med + 1e-3)))
            for n, med in medians.items()
            if med > 0
        ]
        out.append(max(far) if far else None)
    return out


def _number(mapping: Mapping[str, Any] | None, *keys: str) -> float | None:
    for key in keys:
        value = (mapping or {}).get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def risk_scores(cases: Sequence[CaseOutcome], *, weights: Mapping[str, float] = WEIGHTS) -> list[float]:
    """The QC risk score of each case of a batch (see the module's docstring).

    Args:
        cases: What the QC flags look at in each case (status, volumes, quality, refine, errors).
        weights: Weight per measure (``entropy``, ``volume``, ``crf``).

    Returns:
        One score per case, higher first.
    """
    ok = [c for c in cases if c.status == "ok"]
    measures = {
        "entropy": _ranks([_number(c.quality, "foreground_entropy") for c in ok]),
        "volume": _ranks(_volume_distance(ok)),
        "crf": _ranks([_number(c.refine, "crf_changed_fraction", "changed_fraction") for c in ok]),
    }
    combined: dict[int, float] = {}
    for i, row in enumerate(ok):
        parts = [(weights.get(k, 0.0), float(x)) for k, v in measures.items() if (x := v[i]) is not None]
        weight = sum(w for w, _ in parts)
        combined[id(row)] = sum(w * x for w, x in parts) / weight if weight else 0.0
    scores = []
    for case in cases:
        if case.status != "ok":
            scores.append(3.0)
        elif case.errors:
            scores.append(2.0)
        elif case.volumes is not None and not any(v > 0 for v in case.volumes.values()):
            scores.append(1.5)
        else:
            scores.append(combined[id(case)])
    return scores


class _HasOutcome(Protocol):
    @property
    def outcome(self) -> CaseOutcome: ...


R = TypeVar("R", bound=_HasOutcome)


def review_order(rows: Sequence[R]) -> list[R]:
    """Review-page rows (anything with an ``outcome``), most likely to need a reviewer first.

    Ties keep their order.
    """
    scores = risk_scores([r.outcome for r in rows])
    order = sorted(range(len(rows)), key=lambda i: -scores[i])
    return [rows[i] for i in order]
