"""Exports over a batch's case folders, without the model; the label maps made elsewhere.

The batch (:mod:`medseg.batch`) owns its folder's manifest: it tells these functions which cases
there are (:class:`BatchCase`) and records what they return. Nothing here reads or writes the
manifest.

* :func:`remake_exports` makes the exports a segmented case lacks, from its folder (label map,
  ``case.json``, source scan).
* :func:`batch_outputs` writes the batch table ``OUT/stats.csv`` and the review page ``OUT/report/``.
* :func:`convert_label_map` (``medseg export --image SERIES --labels LABELMAP``) turns a label
  map made elsewhere into exports (DICOM SEG first of all) for a DICOM series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from medseg.errors import InputError
from medseg.export.case import CaseExport, case_from_folder, first_channel
from medseg.export.facts import AlgorithmInfo, BatchCase, read_case_facts
from medseg.export.labels import LabelEntry, label_table
from medseg.export.registry import CASE_EXPORTS, export_case, parse_exports
from medseg.export.review_page import ReviewSettings, write_review
from medseg.export.stats import write_batch_stats
from medseg.labelmap import label_dtype


def missing_exports(case_dir: Path, names: Sequence[str]) -> list[str]:
    """The export names that a case folder's ``case.json`` records neither as made nor as not applicable."""
    facts = read_case_facts(case_dir)
    have = set(facts.exports) | set(facts.not_applicable) if facts else set()
    return [n for n in names if n not in have]


def remake_exports(
    out_dir: Path,
    case: BatchCase,
    names: Sequence[str],
    *,
    table: tuple[LabelEntry, ...] | None = None,
    algorithm: AlgorithmInfo | None = None,
) -> list[Path]:
    """Make exports of a segmented case from its folder (a failing export is recorded in ``case.json``).

    Args:
        out_dir: The batch folder.
        case: The case.
        names: Export names.
        table: Labels to use instead of the case's ``case.json`` (e.g. from a data spec).
        algorithm: The model, for a case whose ``case.json`` does not name it.

    Returns:
        The files written, ``case.json`` included.

    Raises:
        InputError: The folder has no label map, or the source DICOM series is gone.
    """
    inputs = list(case.inputs) or None
    export = case_from_folder(Path(out_dir) / case.case_id, inputs=inputs, label_table=table)
    if algorithm is not None and export.algorithm.name == "unknown":
        export = replace(export, algorithm=algorithm)
    return export_case(export, Path(out_dir) / case.case_id, names, keep_going=True)


def batch_outputs(
    out_dir: Path, cases: Sequence[BatchCase], names: Sequence[str], settings: ReviewSettings | None = None
) -> list[Path]:
    """Write the batch-level outputs the export names ask for: ``stats.csv`` and ``report/``."""
    written: list[Path] = []
    case_ids = [c.case_id for c in cases if c.segmented(out_dir)]
    if "stats" in names or "report" in names:
        table = write_batch_stats(out_dir, case_ids)
        written += [table] if table else []
    if "report" in names:
        written += write_review(out_dir, cases, settings)
    return written


def convert_label_map(
    image: str | Path,
    labels: str | Path,
    out_dir: str | Path,
    *,
    names: dict[str, int] | None = None,
    table: tuple[LabelEntry, ...] | None = None,
    exports: Sequence[str] = ("dicom-seg", "nifti"),
    case_id: str | None = None,
) -> list[Path]:
    """Export a label map made elsewhere for the DICOM series (or image) it was drawn on.

    The label map (NIfTI, NRRD, MHA, ...) must hold the series' voxels, in any axis order or
    orientation; it is re-indexed onto the series' grid without interpolation.

    Args:
        image: The DICOM series folder (or an image file).
        labels: The label map.
        out_dir: Where the exports go (created).
        names: Label name to value (alternative to ``table``).
        table: The label table (names, colours, codes), e.g. from a data spec.
        exports: Export names (default: DICOM SEG and the NIfTI label map with tables).
        case_id: Name of the case (default: the label map's file stem).

    Returns:
        The written files.

    Raises:
        InputError: Unreadable inputs, label values without a name.
        GeometryError: A label map that is not on the series' grid.
    """
    import numpy as np

    from medseg.export.dicom_grid import to_grid
    from medseg.io import load_image
    from medseg.io.dicom_series import find_series

    image, labels, out = Path(image), Path(labels), Path(out_dir)
    dicom_files: tuple[Path, ...] = ()
    if image.is_dir():
        dicom_files = tuple(find_series(image).files)
    source = load_image(list(dicom_files) if dicom_files else image)
    lab_img = load_image(labels)
    raw = lab_img[0].numpy()
    if not np.all(np.isfinite(raw)) or not np.array_equal(raw, np.round(raw)) or raw.min() < 0:
        msg = f"{labels}: label map must hold non-negative integers, got other values"
        raise InputError(msg)
    target = np.asarray(source.affine, dtype=np.float64)
    on_grid = to_grid(
        raw.astype(np.int64),
        np.asarray(lab_img.affine, dtype=np.float64),
        target,
        (int(source.shape[1]), int(source.shape[2]), int(source.shape[3])),
        what=str(labels),
    )
    if table is None:
        if names is None:
            names = {f"label {v}": int(v) for v in np.unique(on_grid) if v}
        table = label_table(names)
    top = int(on_grid.max()) if on_grid.size else 0
    dtype = label_dtype(top + 1)
    meta = getattr(source, "meta", {})
    stem = labels.name.split(".")[0] or "labels"
    case = CaseExport(
        case_id=case_id or stem,
        labels=on_grid.astype(dtype),
        affine=target,
        label_table=table,
        algorithm=AlgorithmInfo(name="imported label map", version=_version(), pipeline=labels.name),
        image=first_channel(source),
        modality=str(meta.get("dicom_modality", "") or "OTHER").upper(),
        dicom_files=dicom_files,
        inputs=dicom_files or (image,),
        series_description=str(meta.get("dicom_series_description", "")),
    )
    wanted = parse_exports(list(exports))
    dicom_only = [n for n in wanted if CASE_EXPORTS[n].dicom_only]
    if dicom_only and not dicom_files:
        msg = f"exports {dicom_only} need a DICOM series folder as --image, got {image}"
        raise InputError(msg)
    out.mkdir(parents=True, exist_ok=True)
    return export_case(case, out, wanted)


def _version() -> str:
    from medseg import __version__

    return __version__
