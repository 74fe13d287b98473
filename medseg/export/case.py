"""What every export of one case needs, in one value: label map, grid, image, labels, source, model.

A :class:`CaseExport` is built once per scan: from a fresh prediction (:func:`case_from_prediction`,
inside ``medseg predict``, from what is in memory: the loaded image and its grid) or from a
finished case folder (:func:`case_from_folder`, for ``medseg export``, which needs no model). Its
label map is always on the source image's grid (the loader's affine and shape). The facts that
cannot be read back from the label map (label table, model, series description, quality measures)
are kept beside the outputs in ``case.json`` (:mod:`medseg.export.facts`); it holds no patient data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medseg.errors import InputError
from medseg.export.facts import AlgorithmInfo, CaseFacts, read_case_facts
from medseg.export.labels import LabelEntry, spec_label_table
from medseg.geometry import spacing_from_affine, voxel_volume_ml
from medseg.labelmap import LABEL_FILE
from medseg.sources.folder import Scan


class PredictionLike(Protocol):
    """What an export reads of a :class:`~medseg.pipeline.Prediction`."""

    labels: Any
    affine: Any


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
        return voxel_volume_ml(self.affine)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size along ``i``, ``j``, ``k`` in mm."""
        return spacing_from_affine(self.affine)

    def facts(self) -> CaseFacts:
        """The facts kept in ``case.json`` (no patient data, no voxels)."""
        return CaseFacts(
            case_id=self.case_id,
            modality=self.modality,
            series_description=self.series_description,
            input_kind="dicom" if self.is_dicom else "file",
            inputs=tuple(str(p) for p in self.inputs),
            shape=tuple(int(n) for n in self.labels.shape),
            spacing_mm=tuple(round(s, 6) for s in self.spacing),
            labels=self.label_table,
            algorithm=self.algorithm,
            quality=dict(self.quality),
            refine=dict(self.refine) if self.refine is not None else None,
        )


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


def case_from_prediction(image: Any, prediction: PredictionLike, scan: Scan, predictor: Any) -> CaseExport:
    """Build the export value of a scan just segmented by ``medseg predict`` (once per scan).

    Everything comes from memory: the label map and its grid (the loaded image's affine) from the
    prediction, intensities from the loaded image, DICOM files and description from the scan.

    Args:
        image: The loaded ``(C, X, Y, Z)`` MetaTensor.
        prediction: The :class:`~medseg.pipeline.Prediction` (``refine`` and ``quality`` are read
            where present).
        scan: The scan (case id, inputs, DICOM series files).
        predictor: The :class:`~medseg.pipeline.Predictor` (label table and model identity).

    Returns:
        The :class:`CaseExport`.
    """
    spec = predictor.spec
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

    facts = read_case_facts(case_dir) or CaseFacts()
    label_path = case_dir / LABEL_FILE
    if not label_path.is_file():
        msg = f"case folder must hold {LABEL_FILE}, got none in {case_dir}"
        raise InputError(msg)
    img = nib.load(label_path)
    if not isinstance(img, nib.spatialimages.SpatialImage):
        msg = f"{label_path}: must be a label map with a voxel grid, got a {type(img).__name__}"
        raise InputError(msg)
    labels = np.asarray(img.dataobj)
    affine = np.asarray(img.affine, dtype=np.float64)
    if label_table is None:
        label_table = facts.labels
    if not label_table:
        from medseg.export.labels import label_table as make_table

        values = sorted(int(v) for v in np.unique(labels) if v)
        label_table = make_table({f"label {v}": v for v in values})
    src = [Path(p) for p in (inputs if inputs is not None else facts.inputs)]
    image = None
    dicom_files: tuple[Path, ...] = ()
    description = facts.series_description
    modality = facts.modality or "OTHER"
    was_dicom = facts.input_kind == "dicom"
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
            if dicom_files:  # DICOM exports place the series on the label map's grid: the loader's
                labels, affine = _onto_source_grid(labels, affine, loaded, case_dir.name)
            if image is not None and image.shape != labels.shape:
                image = None
    return CaseExport(
        case_id=case_dir.name,
        labels=labels,
        affine=affine,
        label_table=label_table,
        algorithm=facts.algorithm,
        image=image,
        modality=modality.upper(),
        dicom_files=dicom_files,
        inputs=tuple(src),
        series_description=description,
        quality=facts.quality,
        refine=facts.refine,
    )


def _onto_source_grid(
    labels: np.ndarray, affine: np.ndarray, loaded: Any, case_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """The label map re-indexed onto the loaded source's grid where its own differs (no interpolation)."""
    target = np.asarray(loaded.affine, dtype=np.float64)
    shape = tuple(int(n) for n in loaded.shape[1:])
    if labels.shape == shape and np.allclose(affine, target, atol=1e-4):
        return labels, affine
    from medseg.export.dicom_grid import to_grid

    return to_grid(labels, affine, target, shape, what=f"{case_id}: label map"), target  # type: ignore[arg-type]
