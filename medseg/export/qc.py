"""Quality-control flags that tell a reviewer which cases to look at first.

A case is flagged when:

* ``failed``: it could not be segmented;
* ``export-error``: an export failed (the label map is there; ``medseg export`` tries again);
* ``empty``: no foreground label at all;
* ``volume``: a label's volume is more than ``volume_ratio`` times above or below the batch
  median of that label (only with at least ``min_cases`` segmented cases; a label missing where
  the median is not zero counts as far below);
* ``low-confidence``: the mean softmax entropy inside the predicted foreground exceeds
  ``max_foreground_entropy`` (where the prediction measured it);
* ``crf-change``: refinement (dense CRF) changed more than ``max_crf_change`` of the voxels it
  looked at (where refinement ran).

Examples:
    >>> cases = [CaseOutcome("ok", volumes={"liver": v}) for v in (1500.0, 1400.0, 1600.0, 200.0)]
    >>> [f.code for f in case_flags(cases[3], batch_medians(cases))]
    ['volume']
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QcSettings:
    """Thresholds of the QC flags.

    Attributes:
        volume_ratio: Flag a label volume above ``median * ratio`` or below ``median / ratio``.
        min_cases: Fewest segmented cases for a batch median to mean anything.
        max_foreground_entropy: Highest acceptable mean entropy (nats) inside the foreground.
        max_crf_change: Highest acceptable fraction of voxels changed by the CRF.
    """

    volume_ratio: float = 3.0
    min_cases: int = 3
    max_foreground_entropy: float = 0.3
    max_crf_change: float = 0.05

    def __post_init__(self) -> None:
        if self.volume_ratio <= 1:
            msg = f"volume_ratio must be > 1, got {self.volume_ratio}"
            raise ValueError(msg)
        if self.min_cases < 2:
            msg = f"min_cases must be >= 2, got {self.min_cases}"
            raise ValueError(msg)


@dataclass(frozen=True)
class Flag:
    """One reason to look at a case: a short code and a sentence."""

    code: str
    text: str


@dataclass(frozen=True)
class CaseOutcome:
    """What the flags look at in one case.

    Attributes:
        status: ``ok`` when segmented, else ``failed``, ``pending``, ...
        error: Why it failed.
        volumes: Label name to volume (mL), where statistics were made.
        quality: Quality measures of the prediction (``foreground_entropy``).
        refine: What refinement changed (``crf_changed_fraction``), where it ran.
        errors: Export name to the error of a failed export.
    """

    status: str
    error: str | None = None
    volumes: Mapping[str, float] | None = None
    quality: Mapping[str, Any] = field(default_factory=dict)
    refine: Mapping[str, Any] | None = None
    errors: Mapping[str, str] = field(default_factory=dict)


def batch_medians(cases: Sequence[CaseOutcome], settings: QcSettings | None = None) -> dict[str, float]:
    """The median volume (mL) of each label over the segmented cases (empty without enough cases)."""
    settings = settings or QcSettings()
    ok = [c.volumes for c in cases if c.status == "ok" and c.volumes is not None]
    if len(ok) < settings.min_cases:
        return {}
    names = {n for v in ok for n in v}
    return {n: statistics.median(float(v.get(n, 0.0)) for v in ok) for n in sorted(names)}


def _crf_change(refine: Mapping[str, Any] | None) -> float | None:
    if not isinstance(refine, Mapping):
        return None
    for key in ("crf_changed_fraction", "changed_fraction"):
        value = refine.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def case_flags(
    case: CaseOutcome, medians: Mapping[str, float], settings: QcSettings | None = None
) -> list[Flag]:
    """The flags of one case.

    Args:
        case: Its outcome.
        medians: Batch median volume per label name (see :func:`batch_medians`).
        settings: Thresholds.

    Returns:
        The flags, most serious first.
    """
    settings = settings or QcSettings()
    if case.status != "ok":
        return [Flag("failed", str(case.error or case.status or "not segmented"))]
    flags = [Flag("export-error", f"{name}: {text}") for name, text in case.errors.items()]
    volumes = case.volumes or {}
    if volumes and not any(v > 0 for v in volumes.values()):
        flags.append(Flag("empty", "no label found (empty prediction)"))
    else:
        for name, median in medians.items():
            v = float(volumes.get(name, 0.0))
            if median <= 0:
                continue
            if v > median * settings.volume_ratio or v < median / settings.volume_ratio:
                flags.append(Flag("volume", f"{name}: {v:.1f} mL, batch median {median:.1f} mL"))
    entropy = case.quality.get("foreground_entropy")
    if isinstance(entropy, (int, float)) and entropy > settings.max_foreground_entropy:
        flags.append(
            Flag(
                "low-confidence", f"mean foreground entropy {entropy:.3f} > {settings.max_foreground_entropy}"
            )
        )
    change = _crf_change(case.refine)
    if change is not None and change > settings.max_crf_change:
        flags.append(
            Flag("crf-change", f"CRF changed {change:.1%} of voxels (> {settings.max_crf_change:.0%})")
        )
    return flags
