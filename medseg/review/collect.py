"""``medseg review collect OUT --corrected DIR --out DATASET``: corrections become training data.

Each file in ``DIR`` is a case's corrected segmentation, named for the case (``<case>.nii.gz``,
``<case>.nrrd``, ``<case>.seg.nrrd``, ``<case>.dcm`` for a DICOM SEG, or any file in ``DIR/<case>/``).
Every file is read onto its case's grid and label values and checked first
(:mod:`medseg.review.corrected`); a single bad file stops the collection before anything is written,
with a sentence naming it. Then ``DATASET`` is written in one step (built beside it, renamed into
place): ``imagesTr/<case>_0000.nii.gz`` (the scan, copied from the batch's input on the same grid),
``labelsTr/<case>.nii.gz`` and ``dataset.yaml``, a data spec (:class:`~medseg.config.spec.DatasetSpec`)
whose channels come from ``--spec`` (the model's training spec) or else from the cases' modality.

How much each reviewer changed (Dice between prediction and correction, overall and per label, and
the volume change in mL) goes to ``DATASET/corrections.json`` and to the batch's MLflow prediction run
(``correction/<case>/dice``, ``correction/<case>/volume_change_ml``, ``correction/mean_dice``).
Nothing in the batch folder changes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import atomic_write_text

DATASET_SPEC = "dataset.yaml"


@dataclass(frozen=True)
class CorrectionMeasure:
    """How much a reviewer changed one case.

    Attributes:
        case_id: The case.
        source: The corrected file.
        dice: Dice of the foreground (all labels together) between prediction and correction.
        dice_per_label: Per label name (1.0 where both are empty).
        volume_change_ml: Corrected minus predicted foreground volume.
        changed_fraction: Share of voxels whose label changed.
    """

    case_id: str
    source: str
    dice: float
    dice_per_label: dict[str, float]
    volume_change_ml: float
    changed_fraction: float


def measure(
    case_id: str,
    source: Path,
    predicted: np.ndarray,
    corrected: np.ndarray,
    voxel_ml: float,
    table: dict[str, int],
) -> CorrectionMeasure:
    """The :class:`CorrectionMeasure` of one case (Dice 1.0 where both are empty).

    Examples:
        >>> pred, corr = np.array([0, 1, 1, 2]), np.array([0, 1, 0, 2])
        >>> m = measure("a", Path("a.nii.gz"), pred, corr, 1.0, {"x": 1, "y": 2})
        >>> round(m.dice, 3), m.dice_per_label, m.volume_change_ml, m.changed_fraction
        (0.8, {'x': 0.6666666666666666, 'y': 1.0}, -1.0, 0.25)
    """
    from medseg.labelmap import dice

    fg_pred, fg_corr = (predicted > 0).astype(np.uint8), (corrected > 0).astype(np.uint8)
    return CorrectionMeasure(
        case_id=case_id,
        source=str(source),
        dice=dice(fg_pred, fg_corr, 1),
        dice_per_label={name: dice(predicted, corrected, v) for name, v in table.items()},
        volume_change_ml=float(int(fg_corr.sum()) - int(fg_pred.sum())) * voxel_ml,
        changed_fraction=float((predicted != corrected).mean()) if predicted.size else 0.0,
    )


def find_corrections(corrected_dir: Path, case_ids: set[str]) -> dict[str, Path]:
    """Case id → corrected file, from file names (``<case>.<ext>``) or folders (``<case>/<file>``).

    Raises:
        InputError: An empty folder, a file of no case of the batch, or two files for one case.
    """
    found: dict[str, Path] = {}
    for path in sorted(
        p for p in Path(corrected_dir).rglob("*") if p.is_file() and not p.name.startswith(".")
    ):
        rel = path.relative_to(corrected_dir)
        case_id = rel.parts[0] if len(rel.parts) > 1 else path.name.split(".")[0]
        if case_id not in case_ids:
            msg = f"{path}: corrected file must be named for a case of the batch {sorted(case_ids)}"
            msg += f", got '{case_id}'"
            raise InputError(msg)
        if case_id in found:
            msg = f"{path}: each case must have one corrected file, got also {found[case_id]}"
            raise InputError(msg)
        found[case_id] = path
    if not found:
        msg = f"corrected folder must hold corrected label maps, got none in {corrected_dir}"
        raise InputError(msg)
    return found


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


def _channels(spec: Path | None, modality: str) -> list[dict[str, Any]]:
    if spec is None:
        return [
            {
                "name": modality.lower() or "image",
                "modality": modality if modality in ("CT", "MR") else "OTHER",
            }
        ]
    from medseg.config.base import read_yaml, validate
    from medseg.config.spec import DatasetSpec

    parsed = validate(DatasetSpec, read_yaml(spec), str(spec))
    return [c.model_dump(mode="json", exclude_none=True) for c in parsed.channels]


@dataclass(frozen=True)
class _Case:
    case_id: str
    source: Path
    labels: np.ndarray
    affine: np.ndarray
    inputs: tuple[Path, ...]
    measure: CorrectionMeasure


def _read_case(out: Path, case_id: str, source: Path, entry: dict[str, Any]) -> _Case:
    import nibabel as nib

    from medseg.export.facts import read_case_facts
    from medseg.geometry import voxel_volume_ml
    from medseg.labelmap import LABEL_FILE
    from medseg.review.corrected import read_dicom_seg, read_label_file

    img: Any = nib.load(out / case_id / LABEL_FILE)
    predicted = np.asarray(img.dataobj).astype(np.int64)
    affine = np.asarray(img.affine, dtype=np.float64)
    facts = read_case_facts(out / case_id)
    table = {e.name: e.value for e in facts.labels} if facts is not None else {}
    if not table:
        msg = f"{out / case_id}: case must have a label table (case.json), got none; run medseg export first"
        raise InputError(msg)
    inputs = tuple(Path(p) for p in entry.get("inputs", []))
    grid = {"grid_affine": affine, "grid_shape": tuple(int(s) for s in predicted.shape), "table": table}
    if _is_dicom(source):
        corrected = read_dicom_seg(source, source_files=inputs, **grid)  # type: ignore[arg-type]
    else:
        corrected = read_label_file(source, **grid)  # type: ignore[arg-type]
    voxel_ml = voxel_volume_ml(affine)
    return _Case(
        case_id,
        source,
        corrected,
        affine,
        inputs,
        measure(case_id, source, predicted, corrected, voxel_ml, table),
    )


def _write_dataset(
    dest: Path, cases: list[_Case], labels: dict[str, int], channels: list[dict[str, Any]], name: str
) -> None:
    import nibabel as nib

    from medseg.config.base import dump_yaml
    from medseg.config.spec import DatasetSpec
    from medseg.io import load_image
    from medseg.labelmap import label_dtype

    spec_cases = []
    for case in cases:
        image = load_image(list(case.inputs) if len(case.inputs) > 1 else case.inputs[0])
        arr = np.asarray(image.as_tensor() if hasattr(image, "as_tensor") else image)
        if tuple(arr.shape[1:]) != case.labels.shape:
            got = tuple(arr.shape[1:])
            msg = f"{case.inputs[0]}: scan must be on its labels' grid {case.labels.shape}, got {got}"
            raise InputError(msg)
        images = []
        for c in range(arr.shape[0]):
            rel = f"imagesTr/{case.case_id}_{c:04d}.nii.gz"
            nib.save(nib.Nifti1Image(arr[c], case.affine), dest / rel)
            images.append(rel)
        nib.save(
            nib.Nifti1Image(case.labels.astype(label_dtype(int(case.labels.max()) + 1)), case.affine),
            dest / "labelsTr" / f"{case.case_id}.nii.gz",
        )
        spec_cases.append({"id": case.case_id, "images": images, "label": f"labelsTr/{case.case_id}.nii.gz"})
    spec = DatasetSpec.model_validate(
        {
            "name": name,
            "description": "cases corrected by reviewers (medseg review collect)",
            "channels": channels,
            "labels": {"background": 0, **labels},
            "cases": spec_cases,
        }
    )
    dump_yaml(spec, dest / DATASET_SPEC)


def collect_corrections(
    out_dir: str | Path,
    corrected_dir: str | Path,
    dataset_dir: str | Path,
    *,
    spec: str | Path | None = None,
    tracking_uri: str | None = None,
) -> list[CorrectionMeasure]:
    """Check corrected label maps against their batch and write them as a data set with a data spec.

    Args:
        out_dir: The batch folder.
        corrected_dir: The corrected files (see the module's docstring for names).
        dataset_dir: Where the data set goes (must not exist, or be empty).
        spec: The model's training data spec (channels and normalisation), optional.
        tracking_uri: MLflow store of the prediction run (default: the manifest's).

    Returns:
        One :class:`CorrectionMeasure` per case.

    Raises:
        InputError: Unknown cases, unreadable files, another series, labels not in the table.
        GeometryError: A corrected map on another grid.
    """
    from medseg.batch.manifest import Manifest

    out, dest = Path(out_dir), Path(dataset_dir)
    if dest.exists() and any(dest.iterdir()):
        msg = f"data set folder must be new or empty, got {dest} with files in it"
        raise InputError(msg)
    manifest = Manifest.require(out)
    ok = {cid for cid, e in manifest.entries.items() if e.get("status") == "ok"}
    files = find_corrections(Path(corrected_dir), ok)
    cases = [_read_case(out, cid, path, manifest.entries[cid]) for cid, path in sorted(files.items())]
    from medseg.export.facts import read_case_facts

    facts = read_case_facts(out / cases[0].case_id)
    labels = {e.name: e.value for e in facts.labels} if facts is not None else {}
    modality = (facts.modality if facts is not None else "") or "OTHER"
    channels = _channels(Path(spec) if spec else None, modality.upper())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        _write_dataset(tmp, cases, labels, channels, f"{dest.name}")
        atomic_write_text(tmp / "corrections.json", json.dumps([asdict(c.measure) for c in cases], indent=1))
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    measures = [c.measure for c in cases]
    uri = tracking_uri or manifest.tracking_uri
    if manifest.run_id and uri:
        _log(uri, manifest.run_id, measures)
    return measures


def _log(uri: str, run_id: str, measures: list[CorrectionMeasure]) -> None:
    import time

    from mlflow.entities import Metric

    from medseg.review.apply import case_key
    from medseg.tracking.store import client

    now = int(time.time() * 1000)
    metrics = []
    for m in measures:
        key = case_key("correction", m.case_id)
        metrics += [
            Metric(f"{key}/dice", m.dice, now, 0),
            Metric(f"{key}/volume_change_ml", m.volume_change_ml, now, 0),
        ]
    metrics.append(Metric("correction/mean_dice", float(np.mean([m.dice for m in measures])), now, 0))
    metrics.append(Metric("correction/cases", float(len(measures)), now, 0))
    client(uri).log_batch(run_id, metrics=metrics)
