"""A batch folder's exports after its scans are segmented: bring cases up to date, then batch outputs.

* :func:`finish_batch` runs after ``medseg predict``'s last scan: it makes, for cases kept from an
  earlier run, the exports asked for now, then writes the batch table ``OUT/stats.csv`` and the
  review page ``OUT/report/``.
* :func:`export_folder` (``medseg export OUT_DIR``) remakes the exports of every segmented case
  from its folder (label map, ``case.json``, source scan) and then the batch outputs.

The exports come from :mod:`medseg.export`; what they write is recorded in the manifest by its
owner (:func:`medseg.batch.manifest.record_outputs`) before the review page lists it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medseg.batch.manifest import batch_cases, batch_identity, record_outputs
from medseg.errors import InputError
from medseg.export.batch import batch_outputs, missing_exports, remake_exports
from medseg.export.facts import read_case_facts
from medseg.export.labels import LabelEntry
from medseg.export.registry import CASE_EXPORTS, parse_exports
from medseg.export.review_page import ReviewSettings
from medseg.labelmap import LABEL_FILE


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
    for case in batch_cases(out):
        missing = missing_exports(out / case.case_id, names) if case.segmented(out) else []
        if not missing:
            continue
        try:
            written = remake_exports(out, case, missing, table=table, algorithm=algorithm)
        except Exception as exc:  # the label maps are written; an export problem must not fail the run
            if echo is not None:
                echo(f"{case.case_id}: exports {missing} failed: {exc}")
            continue
        record_outputs(out, case.case_id, written)
    settings = ReviewSettings(show_patient_info=show_patient_info, batch=batch_identity(out))
    return batch_outputs(out, batch_cases(out), names, settings)


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
    cases = [c for c in batch_cases(out) if c.segmented(out)]
    if not cases:
        msg = f"prediction folder must hold segmented cases (<case>/{LABEL_FILE}), got none in {out}"
        raise InputError(msg)
    say = echo or (lambda _msg: None)
    done = failed = 0
    for case in cases:
        try:
            written = remake_exports(out, case, names, table=table)
        except Exception as exc:  # one bad case must not stop the others
            failed += 1
            say(f"{case.case_id}: failed: {exc}")
            continue
        record_outputs(out, case.case_id, written)
        facts = read_case_facts(out / case.case_id)
        errors = facts.errors if facts is not None else {}
        if errors:
            failed += 1
            say(f"{case.case_id}: failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        else:
            done += 1
            say(f"{case.case_id}: {len(written)} file(s)")
    settings = ReviewSettings(show_patient_info=show_patient_info, batch=batch_identity(out))
    batch_outputs(out, batch_cases(out), names, settings)
    return done, failed
