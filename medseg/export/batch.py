"""Exports over a whole prediction folder, without the model.

* :func:`finish_batch` runs after ``medseg predict``'s last scan: it brings cases kept from an
  earlier run up to the exports asked for now, then writes the batch table ``OUT/stats.csv`` and
  the review page ``OUT/report/``.
* :func:`export_folder` (``medseg export OUT_DIR``) remakes the exports of every segmented case
  from its folder (label map, ``case.json``, source scan) and then the batch outputs.
* :func:`convert_label_map` (``medseg export --image SERIES --labels LABELMAP``) turns a label
  map made elsewhere into exports (DICOM SEG first of all) for a DICOM series.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medseg.errors import InputError
from medseg.export.case import (
    LABEL_FILE,
    AlgorithmInfo,
    CaseExport,
    case_from_folder,
    first_channel,
    read_case_facts,
)
from medseg.export.labels import LabelEntry, label_table
from medseg.export.registry import CASE_EXPORTS, export_case, parse_exports
from medseg.export.review_page import ReviewSettings, write_review
from medseg.export.stats import write_batch_stats
from medseg.io.atomic import atomic_write_text

MANIFEST = "manifest.json"
RESULT = "result.json"


def _manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _ok_cases(out_dir: Path) -> list[tuple[str, list[Path] | None]]:
    """``(case_id, inputs or None)`` of every segmented case of a batch folder."""
    manifest = _manifest(out_dir)
    if manifest is not None:
        return [
            (str(e["case_id"]), [Path(p) for p in e.get("inputs", [])] or None)
            for e in manifest.get("scans", [])
            if e.get("status") == "ok" and (out_dir / str(e["case_id"]) / LABEL_FILE).is_file()
        ]
    return [(p.parent.name, None) for p in sorted(out_dir.glob(f"*/{LABEL_FILE}"))]


def _record_outputs(out_dir: Path, case_id: str, written: list[Path]) -> None:
    """Add written files to the case's ``result.json`` and manifest entry (so resuming checks them)."""
    rel = [str(Path(case_id) / p.relative_to(out_dir / case_id)) for p in written]
    result_path = out_dir / case_id / RESULT
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        result = None
    if result is not None:
        result["outputs"] = list(dict.fromkeys([*result.get("outputs", []), *rel]))
        atomic_write_text(result_path, json.dumps(result, indent=1))
    manifest = _manifest(out_dir)
    if manifest is None:
        return
    from medseg.batch.manifest import Manifest

    m = Manifest(
        model_sha256=manifest.get("model_sha256", ""),
        entries={e["case_id"]: e for e in manifest.get("scans", [])},
        skipped=manifest.get("skipped", []),
        started=manifest.get("started", ""),
    )
    entry = m.entries.get(case_id)
    if entry is not None:
        entry["outputs"] = list(dict.fromkeys([*entry.get("outputs", []), *rel]))
        m.save(out_dir)


def _missing(case_dir: Path, names: Sequence[str]) -> list[str]:
    facts = read_case_facts(case_dir)
    have = set(facts.get("exports", [])) | set(facts.get("not_applicable", []))
    return [n for n in names if n not in have]


def _regenerate(
    out_dir: Path,
    case_id: str,
    inputs: list[Path] | None,
    names: Sequence[str],
    table: tuple[LabelEntry, ...] | None,
    algorithm: AlgorithmInfo | None,
) -> list[Path]:
    case = case_from_folder(out_dir / case_id, inputs=inputs, label_table=table)
    if algorithm is not None and case.algorithm.name == "unknown":
        from dataclasses import replace

        case = replace(case, algorithm=algorithm)
    written = export_case(case, out_dir / case_id, names, keep_going=True)
    _record_outputs(out_dir, case_id, written)
    return written


def batch_outputs(out_dir: Path, names: Sequence[str], settings: ReviewSettings | None = None) -> list[Path]:
    """Write the batch-level outputs the export names ask for: ``stats.csv`` and ``report/``."""
    written: list[Path] = []
    case_ids = [c for c, _ in _ok_cases(out_dir)]
    if "stats" in names or "report" in names:
        table = write_batch_stats(out_dir, case_ids)
        written += [table] if table else []
    if "report" in names:
        written += write_review(out_dir, settings)
    return written


def finish_batch(
    out_dir: str | Path,
    exports: Sequence[str],
    *,
    predictor: Any = None,
    show_patient_info: bool = False,
    echo: Callable[[str], Any] | None = None,
) -> list[Path]:
    """After a prediction run: complete the exports of cases kept from earlier runs, then batch outputs.

    A case kept from an earlier run that lacks some of the exports asked for now gets them from its
    folder (a failure there is reported, never raised: the predictions are already safe).

    Args:
        out_dir: The batch's output folder.
        exports: The export names of this run.
        predictor: The run's predictor (label table and model identity for cases without ``case.json``).
        show_patient_info: Show patient identifiers on the review page.
        echo: Where to print problems.

    Returns:
        The batch-level files written.
    """
    out = Path(out_dir)
    names = [n for n in exports if n in CASE_EXPORTS]
    if not names:
        return []
    table = algorithm = None
    if predictor is not None:
        from medseg.export.case import algorithm_of
        from medseg.export.labels import spec_label_table

        table, algorithm = spec_label_table(predictor.spec), algorithm_of(predictor)
    for case_id, inputs in _ok_cases(out):
        missing = _missing(out / case_id, names)
        if not missing:
            continue
        try:
            _regenerate(out, case_id, inputs, missing, table, algorithm)
        except Exception as exc:  # the label maps are written; an export problem must not fail the run
            if echo is not None:
                echo(f"{case_id}: exports {missing} failed: {exc}")
    return batch_outputs(out, names, ReviewSettings(show_patient_info=show_patient_info))


def export_folder(
    out_dir: str | Path,
    exports: Sequence[str],
    *,
    table: tuple[LabelEntry, ...] | None = None,
    show_patient_info: bool = False,
    echo: Callable[[str], Any] | None = None,
) -> tuple[int, int]:
    """Remake exports of every segmented case of a prediction folder, then the batch outputs.

    Args:
        out_dir: A folder written by ``medseg predict``.
        exports: Export names.
        table: Labels to use instead of each case's ``case.json`` (e.g. from a data spec).
        show_patient_info: Show patient identifiers on the review page.
        echo: Where to print one line per case.

    Returns:
        ``(cases exported, cases failed)``.

    Raises:
        InputError: If the folder holds no segmented case.
        ConfigError: For an unknown export name.
    """
    out = Path(out_dir)
    names = parse_exports(list(exports))
    cases = _ok_cases(out)
    if not cases:
        msg = f"prediction folder must hold segmented cases (<case>/{LABEL_FILE}), got none in {out}"
        raise InputError(msg)
    done = failed = 0
    for case_id, inputs in cases:
        say = echo or (lambda _msg: None)
        try:
            written = _regenerate(out, case_id, inputs, names, table, None)
        except Exception as exc:  # one bad case must not stop the others
            failed += 1
            say(f"{case_id}: failed: {exc}")
            continue
        errors = read_case_facts(out / case_id).get("errors", {})
        if errors:
            failed += 1
            say(f"{case_id}: failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        else:
            done += 1
            say(f"{case_id}: {len(written)} file(s)")
    batch_outputs(out, names, ReviewSettings(show_patient_info=show_patient_info))
    return done, failed


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
        tuple(source.shape[1:]),
        what=str(labels),
    )
    if table is None:
        if names is None:
            names = {f"label {v}": int(v) for v in np.unique(on_grid) if v}
        table = label_table(names)
    top = int(on_grid.max()) if on_grid.size else 0
    dtype = np.uint8 if top < 256 else np.uint16
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
