"""Evaluate segmentations against a data spec's reference label maps, in each case's source geometry.

Two ways in:

* :func:`evaluate_folder` scores an existing prediction folder, as ``medseg predict`` writes it
  (``PRED/<case_id>/labels.nii.gz``) or flat (``PRED/<case_id>.nii.gz``).
* :func:`evaluate_model` runs a model (bundle folders or MLflow URIs; several are an ensemble) on the
  spec's cases and scores its label maps on the scans' own grids.

Every case of the selection is accounted for: scored, ``missing`` (no prediction), ``failed`` (with
the reason, e.g. a prediction on another voxel grid) or ``unlabelled`` (no reference in the spec).
The metrics and their empty-mask policy are in :mod:`medseg.evaluation.metrics`.

Examples:
    >>> import shutil, tempfile
    >>> from pathlib import Path
    >>> from medseg.config.spec import load_spec
    >>> from medseg.synth import generate_dataset
    >>> tmp = tempfile.TemporaryDirectory()
    >>> loaded = load_spec(generate_dataset(Path(tmp.name, "data"), 2, shape=(32, 32, 12), dicom=False))
    >>> preds = Path(tmp.name, "preds")
    >>> preds.mkdir()
    >>> for case in loaded.resolve_cases():  # the references themselves as predictions
    ...     _ = shutil.copy(case.label, preds / f"{case.id}.nii.gz")
    >>> ev = evaluate_folder(loaded, preds)
    >>> [(s.label, s.n, round(s.mean, 3)) for s in ev.summary() if s.metric == "dice"]
    [('organ', 2, 1.0), ('lesion', 2, 1.0), ('vessel', 2, 1.0), ('all', 2, 1.0)]
    >>> tmp.cleanup()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.config.spec import DatasetSpec, LoadedSpec
from medseg.errors import ConfigError, GeometryError, InputError, MedsegError
from medseg.evaluation.cases import PREDICTION_FILE, find_prediction, prediction_ids, select_cases
from medseg.evaluation.metrics import (
    DEFAULT_TOLERANCE_MM,
    HD_PERCENTILE,
    LabelScores,
    score_labels,
)
from medseg.evaluation.summary import Stat, rows_from_scores, summarise
from medseg.geometry import spacing_from_affine, voxel_volume_ml
from medseg.io.load import GRID_ATOL_MM

if TYPE_CHECKING:
    from medseg.sources import SegmentationModel


@dataclass
class Evaluation:
    """The outcome of an evaluation.

    Attributes:
        spec_name: The data spec's name.
        labels: The scored (foreground) labels, name to value.
        tolerance_mm: Surface Dice tolerance.
        scores: Per case id, the scores of every label, in case order.
        missing: Cases without a prediction.
        failed: Cases that could not be scored, with the reason.
        unlabelled: Cases without a reference label map in the spec.
        extra: Predictions in the folder for no selected case.
        params: What was evaluated (mode, models, fold, ...), as logged to MLflow.
    """

    spec_name: str
    labels: dict[str, int]
    tolerance_mm: float
    scores: dict[str, list[LabelScores]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The per-case table: one row per case and label."""
        return rows_from_scores(self.scores)

    def summary(self) -> list[Stat]:
        """Mean, median, sd and n per label (and ``all``) and metric."""
        return summarise(self.rows(), list(self.labels))

    @property
    def complete(self) -> bool:
        """Whether every selected case with a reference was scored."""
        return not self.missing and not self.failed


def foreground_labels(spec: DatasetSpec) -> dict[str, int]:
    """The spec's labels without background (value 0), in value order."""
    return {name: value for name, value in sorted(spec.labels.items(), key=lambda kv: kv[1]) if value != 0}


def load_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a label map as ``(integer array (X, Y, Z), RAS+ affine)``.

    Args:
        path: A NIfTI/NRRD/MHA file or a DICOM series folder holding integer labels.

    Returns:
        The label array (file dtype, or int32 for integral floats) and its 4x4 affine.

    Raises:
        InputError: If the file is unreadable, has several channels or non-integer values.
    """
    from medseg.io import load_image

    image = load_image(path)
    if image.shape[0] != 1:
        msg = f"{path}: label map must have one channel, got {image.shape[0]}"
        raise InputError(msg)
    array = image[0].numpy()
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            msg = f"{path}: label map must hold integer values, got fractions (probabilities?)"
            raise InputError(msg)
        array = array.astype(np.int32)
    return array, np.asarray(image.affine, dtype=np.float64)


def score_case(
    pred: np.ndarray,
    pred_affine: np.ndarray,
    ref_path: Path,
    labels: dict[str, int],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> list[LabelScores]:
    """Score one predicted label map against a reference file, on the reference's voxel grid.

    Args:
        pred: Predicted label map ``(X, Y, Z)``.
        pred_affine: Its RAS+ affine; it must match the reference's within 1e-3 mm.
        ref_path: The reference label map file.
        labels: Label name to value, the labels to score.
        tolerance_mm: Surface Dice tolerance in mm.

    Returns:
        One :class:`LabelScores` per label, with distances in mm from the reference's spacing.

    Raises:
        GeometryError: If the prediction is not on the reference's grid (shape and affine).
    """
    ref, ref_affine = load_label_map(ref_path)
    if pred.shape != ref.shape or not np.allclose(pred_affine, ref_affine, atol=GRID_ATOL_MM):
        msg = (
            f"prediction must be on the reference's voxel grid ({ref_path.name}: shape {ref.shape}), "
            f"got shape {pred.shape}" + ("" if pred.shape != ref.shape else " with another affine")
        )
        raise GeometryError(msg)
    return score_labels(
        pred,
        ref,
        labels,
        spacing_from_affine(ref_affine),
        voxel_volume_ml(ref_affine),
        tolerance_mm,
        HD_PERCENTILE,
    )


def _check_tolerance(tolerance_mm: float) -> None:
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        msg = f"surface Dice tolerance must be a finite number of mm >= 0, got {tolerance_mm}"
        raise ConfigError(msg)


def _say_scores(echo: Callable[[str], Any], i: int, n: int, case_id: str, scores: list[LabelScores]) -> None:
    shown = ", ".join(f"{s.label} {s.dice:.3f}" for s in scores)
    echo(f"[{i}/{n}] {case_id}: Dice {shown}")


def evaluate_folder(
    loaded: LoadedSpec,
    pred_dir: str | Path,
    *,
    cases: Sequence[str] | None = None,
    fold: int | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    echo: Callable[[str], Any] | None = None,
) -> Evaluation:
    """Score a folder of predictions against the spec's reference label maps.

    Args:
        loaded: The data spec.
        pred_dir: ``PRED/<case_id>/labels.nii.gz`` or ``PRED/<case_id>.nii.gz`` per case.
        cases: Only these case ids.
        fold: Only the validation cases of this fold (splits stored beside the spec).
        tolerance_mm: Surface Dice tolerance in mm.
        echo: Where to print a line per case.

    Returns:
        The :class:`Evaluation`; cases without a prediction are listed in ``missing``.

    Raises:
        InputError: If ``pred_dir`` is not a folder.
        ConfigError: Bad case selection or a negative tolerance.
    """
    say = echo or (lambda _msg: None)
    _check_tolerance(tolerance_mm)
    folder = Path(pred_dir)
    if not folder.is_dir():
        msg = f"prediction folder must be an existing folder, got {folder}"
        raise InputError(msg)
    selected = select_cases(loaded, cases, fold)
    labels = foreground_labels(loaded.spec)
    ev = Evaluation(loaded.spec.name, labels, tolerance_mm)
    ev.params = {"mode": "folder", "fold": fold, "n_selected": len(selected)}
    selected_ids = {c.id for c in selected}
    ev.extra = sorted(prediction_ids(folder) - selected_ids) if not cases and fold is None else []
    for i, case in enumerate(selected, 1):
        if case.label is None:
            ev.unlabelled.append(case.id)
            say(f"[{i}/{len(selected)}] {case.id}: no reference label map in the spec")
            continue
        found = find_prediction(folder, case.id)
        if found is None:
            ev.missing.append(case.id)
            say(f"[{i}/{len(selected)}] {case.id}: no prediction")
            continue
        try:
            pred, affine = load_label_map(found)
            ev.scores[case.id] = score_case(pred, affine, case.label, labels, tolerance_mm)
        except MedsegError as exc:
            ev.failed[case.id] = str(exc)
            say(f"[{i}/{len(selected)}] {case.id}: failed ({exc})")
            continue
        _say_scores(say, i, len(selected), case.id, ev.scores[case.id])
    return ev


@dataclass(frozen=True)
class _TrainedOn:
    """What a model says about its training, for case selection and the evaluation's parameters."""

    folds: list[str]
    split_dirs: list[Path]
    n_folds: int = 5
    seed: int = 0
    model_name: str = ""
    pipeline: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


def _trained_on(model: SegmentationModel) -> _TrainedOn:
    """Folds, splits and seed of a medseg model's bundles; for other models, what they describe."""
    from medseg.pipeline import Predictor

    if not isinstance(model, Predictor):
        described = model.describe()
        facts = {"model_kind": described.kind, "model_location": described.location, **described.params}
        return _TrainedOn([], [], model_name=described.params.get("model", described.kind), params=facts)
    first = model.bundles[0]
    return _TrainedOn(
        folds=sorted({str(b.info["fold"]) for b in model.bundles if b.info.get("fold") is not None}),
        split_dirs=[Path(str(b.info.get("path", "."))).parent for b in model.bundles],
        n_folds=first.pipeline.train.folds,
        seed=first.pipeline.train.seed,
        model_name=first.pipeline.model.name,
        pipeline=first.pipeline.name,
        params={"refine": model.refine.model_dump(mode="json")},
    )


def evaluate_model(
    loaded: LoadedSpec,
    models: Sequence[str | Path],
    *,
    cases: Sequence[str] | None = None,
    fold: int | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    device: str = "cpu",
    save_dir: str | Path | None = None,
    echo: Callable[[str], Any] | None = None,
    crf: bool | None = None,
    postprocess: bool | None = None,
    options: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Run a model on the spec's cases and score its label maps on each scan's own grid.

    Args:
        loaded: The data spec.
        models: Bundle folder(s) or MLflow ``runs:/``/``models:/`` URIs; several are an ensemble.
        cases: Only these case ids.
        fold: Only the validation cases of this fold: the splits stored beside the spec or the
            bundle's training folder, else remade from the bundle's ``train.folds`` and ``seed``.
        tolerance_mm: Surface Dice tolerance in mm.
        device: Where the network runs.
        save_dir: Also write each label map to ``save_dir/<case_id>/labels.nii.gz``.
        echo: Where to print a line per case.
        crf: Switch the dense CRF on or off (``None``: as the model's pipeline says).
        postprocess: Switch the post-processing chosen at training on or off (``None``: as stored).
        options: Further model-source options (``precision``, ``batch_size``, ``memory_format``:
            see :class:`~medseg.tiling.runtime.InferenceOptions`;
            ``trust_model_code`` for sources whose configs hold code).

    Returns:
        The :class:`Evaluation`.

    Raises:
        ConfigError: A model that cannot be loaded, whose labels differ from the spec's, trained on
            another fold than ``fold``, or a bad case selection.
    """
    from medseg.io import load_case, write_label_map
    from medseg.sources import load_model

    say = echo or (lambda _msg: None)
    _check_tolerance(tolerance_mm)
    switches = {k: v for k, v in {"crf": crf, "postprocess": postprocess}.items() if v is not None}
    predictor = load_model(list(models), device=device, options={**(options or {}), **switches})
    if predictor.spec.labels != loaded.spec.labels:
        msg = f"model labels must match the spec's {loaded.spec.labels}, got {predictor.spec.labels}"
        raise ConfigError(msg)
    trained = _trained_on(predictor)
    if fold is not None and trained.folds and trained.folds != [str(fold)]:
        msg = f"fold must be the fold the model was trained on ({', '.join(trained.folds)}), got {fold}"
        raise ConfigError(msg)
    selected = select_cases(
        loaded,
        cases,
        fold,
        folds=trained.n_folds,
        seed=trained.seed,
        split_dirs=trained.split_dirs,
    )
    labels = foreground_labels(loaded.spec)
    ev = Evaluation(loaded.spec.name, labels, tolerance_mm)
    ev.params = {
        "mode": "model",
        "models": [str(m) for m in models],
        "model_sha256": predictor.sha256.split("+"),
        "model_name": trained.model_name,
        "pipeline": trained.pipeline,
        "fold": fold,
        "n_selected": len(selected),
        "device": device,
        **trained.params,
    }
    for i, case in enumerate(selected, 1):
        if case.label is None:
            ev.unlabelled.append(case.id)
            say(f"[{i}/{len(selected)}] {case.id}: no reference label map in the spec")
            continue
        try:
            result = predictor.predict(load_case(case.images))
            if save_dir is not None:
                write_label_map(result.labels, result.affine, Path(save_dir) / case.id / PREDICTION_FILE)
            ev.scores[case.id] = score_case(result.labels, result.affine, case.label, labels, tolerance_mm)
        except MedsegError as exc:
            ev.failed[case.id] = str(exc)
            say(f"[{i}/{len(selected)}] {case.id}: failed ({exc})")
            continue
        _say_scores(say, i, len(selected), case.id, ev.scores[case.id])
    return ev
