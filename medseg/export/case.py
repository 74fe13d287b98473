"""What every export of one case needs, in one value: label map, grid, image, labels, source, model.

A :class:`CaseExport` is built from a fresh prediction (:func:`case_from_prediction`, inside
``medseg predict``) or from a finished case folder (:func:`case_from_folder`, for ``medseg export``,
which needs no model). The facts that cannot be read back from the label map (label table, model,
series description, quality measures) are kept beside the outputs in ``case.json``; it holds no
patient data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.export.labels import LabelEntry, entries_from_dicts, spec_label_table
from medseg.io.atomic import atomic_write_text

CASE_FILE = "case.json"
LABEL_FILE = "labels.nii.gz"


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


@dataclass(frozen=True, eq=False)
class CaseExport:
    """One case, ready to export.

    Attributes:
        case_id: The case id (folder name).
        labels: ``(X, Y, Z)`` integer label map on the source grid.
        affine: Its 4x4 RAS+ affine (the source image's).
        label_table: The foreground labels (names, colours, codes).
        algorithm: The model that made the labels.
        image: ``(X, Y, Z)`` intensities of the first channel, or ``None`` where unavailable.
        modality: ``CT``, ``MR``, ... (chooses the display window).
        dicom_files: The source DICOM series' files (empty for other inputs).
        inputs: The input paths as given (a file, or the series' files).
        series_description: DICOM SeriesDescription (or empty).
        quality: Quality measures of the prediction (e.g. ``foreground_entropy``).
        refine: What refinement changed (e.g. ``crf_changed_fraction``), or ``None``.
    """

    case_id: str
    labels: np.ndarray
    affine: np.ndarray
    label_table: tuple[LabelEntry, ...]
    algorithm: AlgorithmInfo = field(default_factory=AlgorithmInfo)
    image: np.ndarray | None = None
    modality: str = "OTHER"
    dicom_files: tuple[Path, ...] = ()
    inputs: tuple[Path, ...] = ()
    series_description: str = ""
    quality: Mapping[str, Any] = field(default_factory=dict)
    refine: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.labels.ndim != 3:
            msg = f"{self.case_id}: label map must be 3D (X, Y, Z), got shape {self.labels.shape}"
            raise InputError(msg)
        if self.image is not None and self.image.shape != self.labels.shape:
            msg = (
                f"{self.case_id}: image must be on the label map's grid {self.labels.shape}, "
                f"got shape {self.image.shape}"
            )
            raise InputError(msg)

    @property
    def is_dicom(self) -> bool:
        """Whether the source is a DICOM series (DICOM SEG, RTSTRUCT and Secondary Capture apply)."""
        return bool(self.dicom_files)

    @property
    def voxel_ml(self) -> float:
        """The volume of one voxel in millilitres."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along ``i``, ``j``, ``k`` in mm."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])

    def facts(self) -> dict[str, Any]:
        """The facts kept in ``case.json`` (no patient data, no voxels)."""
        return {
            "case_id": self.case_id,
            "modality": self.modality,
            "series_description": self.series_description,
            "input_kind": "dicom" if self.is_dicom else "file",
            "inputs": [str(p) for p in self.inputs],
            "shape": list(self.labels.shape),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "labels": [e.as_dict() for e in self.label_table],
            "algorithm": self.algorithm.as_dict(),
            "quality": _jsonable(dict(self.quality)),
            "refine": _jsonable(dict(self.refine)) if self.refine is not None else None,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _refine_dict(refine: Any) -> dict[str, Any] | None:
    if refine is None:
        return None
    if isinstance(refine, Mapping):
        return dict(refine)
    if hasattr(refine, "as_dict"):
        return dict(refine.as_dict())
    return {k: getattr(refine, k) for k in ("crf_changed_fraction", "changed_fraction") if hasattr(refine, k)}


def algorithm_of(predictor: Any) -> AlgorithmInfo:
    """The :class:`AlgorithmInfo` of a :class:`~medseg.pipeline.Predictor` (one or more bundles)."""
    from medseg import __version__

    bundles = list(getattr(predictor, "bundles", []))
    return AlgorithmInfo(
        name="+".join(b.pipeline.model.name for b in bundles) or "unknown",
        version=__version__,
        sha256="+".join(b.sha256 for b in bundles),
        pipeline="+".join(b.pipeline.name for b in bundles),
    )


def first_channel(image: Any) -> np.ndarray | None:
    """The first channel of a loaded ``(C, X, Y, Z)`` image as numpy, without a copy where possible.

    ``None`` stays ``None``; the dtype is kept (int16 CT stays int16).
    """
    if image is None:
        return None
    if hasattr(image, "as_tensor"):  # a MetaTensor
        image = image.as_tensor()
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    return arr[0] if arr.ndim == 4 else arr


def case_from_prediction(image: Any, prediction: Any, job: Any, predictor: Any) -> CaseExport:
    """Build the export value of a scan just segmented by ``medseg predict``.

    Args:
        image: The loaded ``(C, X, Y, Z)`` MetaTensor.
        prediction: The :class:`~medseg.pipeline.Prediction` (``refine`` and ``quality`` are read
            where present).
        job: The :class:`~medseg.batch.job.ScanJob`.
        predictor: The :class:`~medseg.pipeline.Predictor`.

    Returns:
        The :class:`CaseExport`.
    """
    spec = predictor.spec
    scan = job.scan
    modality = scan.modality or spec.channels[0].modality.value
    return CaseExport(
        case_id=scan.case_id,
        labels=np.asarray(prediction.labels),
        affine=np.asarray(prediction.affine, dtype=np.float64),
        label_table=spec_label_table(spec),
        algorithm=algorithm_of(predictor),
        image=first_channel(image),
        modality=str(modality).upper(),
        dicom_files=tuple(scan.files),
        inputs=tuple(scan.inputs),
        series_description=scan.description,
        quality=dict(getattr(prediction, "quality", None) or {}),
        refine=_refine_dict(getattr(prediction, "refine", None)),
    )


def read_case_facts(case_dir: Path) -> dict[str, Any]:
    """The ``case.json`` of a case folder, or an empty dict where there is none."""
    try:
        return json.loads((case_dir / CASE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_case_facts(
    case: CaseExport,
    case_dir: Path,
    exports: list[str],
    not_applicable: list[str] | None = None,
    errors: dict[str, str] | None = None,
) -> Path:
    """Write ``case.json``: the case's facts and the exports made so far (merged with earlier ones).

    Args:
        case: The case.
        case_dir: Its folder.
        exports: Export names just made.
        not_applicable: Export names asked for that do not apply to this input.
        errors: Export names that failed just now, with the error.

    Returns:
        The path of ``case.json``.
    """
    earlier = read_case_facts(case_dir)
    facts = case.facts()
    facts["exports"] = sorted(set(earlier.get("exports", [])) | set(exports))
    skipped = set(earlier.get("not_applicable", [])) | set(not_applicable or [])
    facts["not_applicable"] = sorted(skipped - set(facts["exports"]))
    failed = {**earlier.get("errors", {}), **(errors or {})}
    facts["errors"] = {k: v for k, v in sorted(failed.items()) if k not in exports}
    path = case_dir / CASE_FILE
    atomic_write_text(path, json.dumps(facts, indent=1))
    return path


def case_from_folder(
    case_dir: Path,
    *,
    inputs: list[Path] | None = None,
    label_table: tuple[LabelEntry, ...] | None = None,
    load_source: bool = True,
) -> CaseExport:
    """Rebuild the export value of a finished case from its folder (no model needed).

    Args:
        case_dir: The case folder, holding ``labels.nii.gz`` (and ``case.json`` where exports ran).
        inputs: The source files (default: those in ``case.json``).
        label_table: Labels to use instead of those in ``case.json`` (e.g. from a spec).
        load_source: Load the source image (for intensities, overlays and DICOM references).

    Returns:
        The :class:`CaseExport`.

    Raises:
        InputError: If the folder has no label map, or labels have no names anywhere.
    """
    import nibabel as nib

    facts = read_case_facts(case_dir)
    label_path = case_dir / LABEL_FILE
    if not label_path.is_file():
        msg = f"case folder must hold {LABEL_FILE}, got none in {case_dir}"
        raise InputError(msg)
    img = nib.load(label_path)
    labels = np.asarray(img.dataobj)
    affine = np.asarray(img.affine, dtype=np.float64)
    if label_table is None:
        label_table = entries_from_dicts(facts.get("labels", []))
    if not label_table:
        from medseg.export.labels import label_table as make_table

        values = sorted(int(v) for v in np.unique(labels) if v)
        label_table = make_table({f"label {v}": v for v in values})
    src = [Path(p) for p in (inputs if inputs is not None else facts.get("inputs", []))]
    image = None
    dicom_files: tuple[Path, ...] = ()
    description = str(facts.get("series_description", ""))
    modality = str(facts.get("modality", "OTHER"))
    was_dicom = facts.get("input_kind") == "dicom"
    if was_dicom and not (src and all(p.exists() for p in src)):
        missing = next((p for p in src if not p.exists()), None)
        msg = f"{case_dir.name}: source DICOM series must still exist for its exports, got missing {missing}"
        raise InputError(msg)
    if src and all(p.exists() for p in src):
        is_dicom = was_dicom or len(src) > 1 or src[0].is_dir()
        if is_dicom:
            from medseg.io.dicom_series import find_series

            dicom_files = tuple(find_series(src[0] if src[0].is_dir() else src).files)
        if load_source:
            from medseg.io import load_image

            loaded = load_image(list(dicom_files) if dicom_files else src[0])
            meta = getattr(loaded, "meta", {})
            description = description or str(meta.get("dicom_series_description", ""))
            modality = str(meta.get("dicom_modality", "")) or modality
            image = first_channel(loaded)
            if image is not None and image.shape != labels.shape:
                image = None
    algo = facts.get("algorithm", {})
    return CaseExport(
        case_id=case_dir.name,
        labels=labels,
        affine=affine,
        label_table=label_table,
        algorithm=AlgorithmInfo(**{k: str(v) for k, v in algo.items() if k in AlgorithmInfo.__annotations__}),
        image=image,
        modality=modality.upper(),
        dicom_files=dicom_files,
        inputs=tuple(src),
        series_description=description,
        quality=facts.get("quality") or {},
        refine=facts.get("refine"),
    )
