"""``case.json``: the facts of one exported case that its label map cannot tell, kept beside it.

It holds no patient data and no voxels: the label table, the model, the series description, the
grid's shape and spacing, the quality measures, and which exports were made, did not apply or
failed. ``medseg export`` reads it back (:func:`read_case_facts`) to remake exports without the
model; the review page reads it for each case.

Examples:
    >>> facts = CaseFacts.from_dict({"case_id": "a", "shape": [4, 4, 2], "exports": ["stats"]})
    >>> facts.shape, facts.exports, facts.algorithm.name
    ((4, 4, 2), ('stats',), 'unknown')
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.export.labels import LabelEntry, entries_from_dicts
from medseg.io.atomic import atomic_write_text
from medseg.labelmap import LABEL_FILE

CASE_FILE = "case.json"


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm that made a segmentation (DICOM SEG's algorithm identification).

    Attributes:
        name: Model name(s) from the pipeline config (``+`` between ensemble members).
        version: medseg's version.
        sha256: The model bundle hash(es) (``+`` between ensemble members).
        pipeline: The pipeline config's name.
    """

    name: str = "unknown"
    version: str = ""
    sha256: str = ""
    pipeline: str = ""

    def as_dict(self) -> dict[str, str]:
        """A JSON-ready dict."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "pipeline": self.pipeline}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlgorithmInfo:
        """Read :meth:`as_dict` back (unknown keys are ignored)."""
        return cls(**{k: str(v) for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CaseFacts:
    """The contents of a case's ``case.json``.

    Attributes:
        case_id: The case id.
        modality: ``CT``, ``MR``, ...
        series_description: DICOM SeriesDescription (or empty).
        input_kind: ``dicom`` or ``file``.
        inputs: The input paths as given.
        shape: The label map's shape.
        spacing_mm: Its voxel size in mm.
        labels: The label table.
        algorithm: The model that made the labels.
        quality: Quality measures of the prediction.
        refine: What refinement changed, or ``None``.
        exports: The exports made.
        not_applicable: Exports asked for that do not apply to this input.
        errors: Exports that failed, with the error.
        review: A clinician's verdict (``verdict``, ``note``, ``reviewer``, ``reviewed_at``), from
            ``medseg review import``; kept through later exports.
    """

    case_id: str = ""
    modality: str = ""
    series_description: str = ""
    input_kind: str = ""
    inputs: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    spacing_mm: tuple[float, ...] = ()
    labels: tuple[LabelEntry, ...] = ()
    algorithm: AlgorithmInfo = field(default_factory=AlgorithmInfo)
    quality: Mapping[str, Any] = field(default_factory=dict)
    refine: Mapping[str, Any] | None = None
    exports: tuple[str, ...] = ()
    not_applicable: tuple[str, ...] = ()
    errors: Mapping[str, str] = field(default_factory=dict)
    review: Mapping[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``case.json``."""
        return {
            "case_id": self.case_id,
            "modality": self.modality,
            "series_description": self.series_description,
            "input_kind": self.input_kind,
            "inputs": list(self.inputs),
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "labels": [e.as_dict() for e in self.labels],
            "algorithm": self.algorithm.as_dict(),
            "quality": jsonable(dict(self.quality)),
            "refine": jsonable(dict(self.refine)) if self.refine is not None else None,
            "exports": list(self.exports),
            "not_applicable": list(self.not_applicable),
            "errors": dict(self.errors),
            **({"review": dict(self.review)} if self.review is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseFacts:
        """Read :meth:`as_dict` back; missing keys take their defaults."""
        refine = data.get("refine")
        return cls(
            case_id=str(data.get("case_id", "")),
            modality=str(data.get("modality", "")),
            series_description=str(data.get("series_description", "")),
            input_kind=str(data.get("input_kind", "")),
            inputs=tuple(str(p) for p in data.get("inputs", [])),
            shape=tuple(int(s) for s in data.get("shape", [])),
            spacing_mm=tuple(float(s) for s in data.get("spacing_mm", [])),
            labels=entries_from_dicts(list(data.get("labels", []))),
            algorithm=AlgorithmInfo.from_dict(data.get("algorithm", {})),
            quality=dict(data.get("quality") or {}),
            refine=dict(refine) if isinstance(refine, Mapping) else None,
            exports=tuple(str(n) for n in data.get("exports", [])),
            not_applicable=tuple(str(n) for n in data.get("not_applicable", [])),
            errors={str(k): str(v) for k, v in (data.get("errors") or {}).items()},
            review={str(k): str(v) for k, v in data["review"].items()}
            if isinstance(data.get("review"), Mapping)
            else None,
        )


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars made Python numbers and other objects made strings."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def read_case_facts(case_dir: Path) -> CaseFacts | None:
    """The ``case.json`` of a case folder, or ``None`` where there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(case_dir) / CASE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return CaseFacts.from_dict(data) if isinstance(data, Mapping) else None


def write_case_facts(
    facts: CaseFacts,
    case_dir: Path,
    *,
    exports: Sequence[str],
    not_applicable: Sequence[str] = (),
    errors: Mapping[str, str] | None = None,
) -> Path:
    """Write ``case.json`` once for a run of exports, merged with the exports of earlier runs.

    Args:
        facts: The case's facts (their export lists are replaced).
        case_dir: Its folder.
        exports: Export names just made.
        not_applicable: Export names asked for that do not apply to this input.
        errors: Export names that failed just now, with the error.

    Returns:
        The path of ``case.json``.
    """
    from dataclasses import replace

    earlier = read_case_facts(case_dir) or CaseFacts()
    made = sorted(set(earlier.exports) | set(exports))
    skipped = (set(earlier.not_applicable) | set(not_applicable)) - set(made)
    failed = {**earlier.errors, **(errors or {})}
    merged = replace(
        facts,
        exports=tuple(made),
        not_applicable=tuple(sorted(skipped)),
        errors={k: v for k, v in sorted(failed.items()) if k not in exports},
        review=facts.review if facts.review is not None else earlier.review,
    )
    path = Path(case_dir) / CASE_FILE
    atomic_write_text(path, json.dumps(merged.as_dict(), indent=1))
    return path


@dataclass(frozen=True)
class BatchCase:
    """One scan of a batch, as its manifest records it.

    Attributes:
        case_id: The case id (its folder's name).
        status: ``ok`` when segmented, else ``failed``, ``pending``, ...
        inputs: The source files, where known.
        outputs: The files written for it, relative to the batch folder.
        error: Why it failed.
        quality: Quality measures of the prediction.
        refine: What refinement changed.
    """

    case_id: str
    status: str
    inputs: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()
    error: str | None = None
    quality: Mapping[str, Any] = field(default_factory=dict)
    refine: Mapping[str, Any] | None = None

    def segmented(self, out_dir: Path) -> bool:
        """Whether it was segmented and its label map is in ``out_dir``."""
        return self.status == "ok" and (Path(out_dir) / self.case_id / LABEL_FILE).is_file()


def case_json_with_review(case_dir: Path, review: Mapping[str, str]) -> str | None:
    """The text of a case's ``case.json`` with a clinician's verdict set, or ``None`` without one.

    Nothing is written: ``medseg review import`` checks every case first, then writes each text
    with :func:`~medseg.io.atomic.atomic_write_text`.
    """
    from dataclasses import replace

    facts = read_case_facts(case_dir)
    if facts is None:
        return None
    return json.dumps(replace(facts, review=dict(review)).as_dict(), indent=1)
