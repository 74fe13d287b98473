"""Clinician exports by name, and running them on one case.

=================== ===================================================== ==============
name                what it writes (in the case folder)                   applies to
=================== ===================================================== ==============
nifti               ``labels.nii.gz`` + ITK-SNAP and Slicer label tables  every input
dicom-seg           ``segmentation.dcm`` (DICOM SEG)                      DICOM series
rtstruct            ``rtstruct.dcm`` (RT Structure Set, needs rt-utils)   DICOM series
stats               ``stats.json``, ``stats.csv``                         every input
overlays            ``overlays/montage*.png``                             every input
secondary-capture   ``secondary_capture/montage-N.dcm``                   DICOM series
report              ``case.json``, ``viewer/`` (+ stats); ``report/``     every input
volumes             ``volumes.json`` (voxels and mL per label value)      every input
=================== ===================================================== ==============

This is the one registry of exports: ``medseg predict --export``, ``medseg export`` and the
library's :func:`~medseg.batch.runner.run_prediction` all run them through :func:`export_case`,
once per case, which also writes ``case.json`` once (the facts a later ``medseg export`` needs).
An export that does not apply to an input (DICOM SEG for a NIfTI file) is skipped for that case
and recorded as such in ``case.json``.

Examples:
    >>> parse_exports("default")
    ('nifti', 'dicom-seg', 'stats', 'overlays', 'report')
    >>> parse_exports("stats,dicom_seg")
    ('stats', 'dicom-seg')
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ConfigError, MedsegError, did_you_mean
from medseg.export.case import CaseExport
from medseg.export.facts import write_case_facts

CaseWriter = Callable[[CaseExport, Path], list[Path]]


@dataclass(frozen=True)
class ExportKind:
    """One export.

    Attributes:
        name: Its name on the command line.
        write: ``write(case, case_dir) -> written paths``.
        dicom_only: Applies only to DICOM inputs.
        summary: One line for help texts.
        needs: Optional modules it imports, with the medseg extra that installs each.
    """

    name: str
    write: CaseWriter
    dicom_only: bool = False
    summary: str = ""
    needs: tuple[tuple[str, str], ...] = ()


CASE_EXPORTS: dict[str, ExportKind] = {}
DEFAULT_EXPORTS: tuple[str, ...] = ("nifti", "dicom-seg", "stats", "overlays", "report")
"""What ``medseg predict`` exports unless told otherwise (each where it applies)."""


def register_case_export(
    name: str, *, dicom_only: bool = False, summary: str = "", needs: tuple[tuple[str, str], ...] = ()
) -> Callable[[CaseWriter], CaseWriter]:
    """Register a case export under ``name`` (a decorator)."""

    def decorate(fn: CaseWriter) -> CaseWriter:
        CASE_EXPORTS[name] = ExportKind(name, fn, dicom_only, summary, needs)
        return fn

    return decorate


def missing_dependency(name: str) -> str | None:
    """Why export ``name`` cannot run here (a sentence naming the extra to install), or ``None``."""
    import importlib.util

    kind = CASE_EXPORTS.get(name)
    for module, extra in kind.needs if kind else ():
        if importlib.util.find_spec(module) is None:
            return f"export '{name}' needs {module}; install medseg[{extra}]"
    return None


def check_dependencies(names: Sequence[str]) -> None:
    """Fail before any work when an export's optional dependency is missing.

    Raises:
        MedsegError: Naming the export, the module and the extra that installs it.
    """
    for name in names:
        why = missing_dependency(name)
        if why is not None:
            raise MedsegError(why)


def parse_exports(text: str | Sequence[str], known: Collection[str] | None = None) -> tuple[str, ...]:
    """Export names from a comma-separated list (``default`` and ``none`` are allowed).

    Underscores count as dashes; order is kept and repeats dropped.

    Args:
        text: ``"nifti,stats"``, or a list of names.
        known: The valid names (default: :data:`CASE_EXPORTS`).

    Returns:
        The names.

    Raises:
        ConfigError: For an unknown name (the nearest valid one is suggested).
    """
    valid = list(CASE_EXPORTS if known is None else known)
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        name = item.strip().lower().replace("_", "-")
        if not name or name == "none":
            continue
        names = DEFAULT_EXPORTS if name == "default" else (name,)
        for n in names:
            if n not in valid:
                hint = did_you_mean(n, valid)
                msg = f"export must be one of {sorted(valid)} (or default, none), got '{n}'{hint}"
                raise ConfigError(msg)
            if n not in out:
                out.append(n)
    return tuple(out)


def export_case(
    case: CaseExport, case_dir: Path, names: Sequence[str], *, keep_going: bool = False
) -> list[Path]:
    """Run exports on one case and record them in ``case.json`` (written once, at the end).

    Args:
        case: The case.
        case_dir: Its output folder (exists).
        names: Export names (see :data:`CASE_EXPORTS`).
        keep_going: Record a failing export's error in ``case.json`` (``errors``) and go on with
            the others, instead of raising: a label map is never lost to an export problem, and the
            review page flags the case.

    Returns:
        Every file written, ``case.json`` included.

    Raises:
        ConfigError: For an unknown name.
        Exception: Whatever a failing export raised, unless ``keep_going``.
    """
    names = parse_exports(list(names))
    written: list[Path] = []
    done: list[str] = []
    skipped: list[str] = []
    errors: dict[str, str] = {}
    for name in names:
        kind = CASE_EXPORTS[name]
        if kind.dicom_only and not case.is_dicom:
            skipped.append(name)
            continue
        try:
            written += kind.write(case, Path(case_dir))
        except Exception as exc:
            if not keep_going:
                raise
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors[name] = text if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {text}"
            continue
        done.append(name)
    facts = case.facts()
    written.append(
        write_case_facts(facts, Path(case_dir), exports=done, not_applicable=skipped, errors=errors)
    )
    return written


def _nifti(case: CaseExport, case_dir: Path) -> list[Path]:
    from medseg.export.label_tables import write_label_tables
    from medseg.io import write_label_map
    from medseg.labelmap import LABEL_FILE

    out = []
    if not (case_dir / LABEL_FILE).is_file():
        out.append(write_label_map(case.labels, case.affine, case_dir / LABEL_FILE))
    return out + write_label_tables(case, case_dir)


def _dicom_seg(case: CaseExport, case_dir: Path) -> list[Path]:
    from medseg.export.dicom_seg import write_dicom_seg

    return write_dicom_seg(case, case_dir)


def _rtstruct(case: CaseExport, case_dir: Path) -> list[Path]:
    from medseg.export.rtstruct import write_rtstruct

    return write_rtstruct(case, case_dir)


def _stats(case: CaseExport, case_dir: Path) -> list[Path]:
    from medseg.export.stats import write_stats

    return write_stats(case, case_dir)


def _overlays(case: CaseExport, case_dir: Path) -> list[Path]:
    from medseg.export.overlays import write_overlays

    return write_overlays(case, case_dir)


def _secondary_capture(case: CaseExport, case_dir: Path) -> list[Path]:
    from medseg.export.secondary_capture import write_secondary_capture

    return write_secondary_capture(case, case_dir)


def _report(case: CaseExport, case_dir: Path) -> list[Path]:
    from medseg.export.stats import STATS_JSON, write_stats
    from medseg.export.viewer import write_viewer_data

    stats = [] if (case_dir / STATS_JSON).is_file() else write_stats(case, case_dir)
    return stats + write_viewer_data(case, case_dir)


def _volumes(case: CaseExport, case_dir: Path) -> list[Path]:
    import json

    import numpy as np

    from medseg.io.atomic import atomic_write_text

    voxel_ml = case.voxel_ml
    counts = np.bincount(np.asarray(case.labels).ravel())
    stats = {
        int(v): {"voxels": int(n), "volume_ml": round(int(n) * voxel_ml, 4)}
        for v, n in enumerate(counts)
        if v
    }
    path = case_dir / "volumes.json"
    atomic_write_text(path, json.dumps(stats, indent=1))
    return [path]


_NEEDS = {
    "dicom-seg": (("highdicom", "dicom"),),
    "rtstruct": (("rt_utils", "rtstruct"),),
    "overlays": (("PIL", "plots"),),
    "secondary-capture": (("highdicom", "dicom"), ("PIL", "plots")),
}

for _name, _fn, _dicom, _summary in (
    ("nifti", _nifti, False, "labels.nii.gz with ITK-SNAP and 3D Slicer label tables"),
    ("dicom-seg", _dicom_seg, True, "DICOM SEG referencing the source series"),
    ("rtstruct", _rtstruct, True, "DICOM RT Structure Set (needs medseg[rtstruct])"),
    ("stats", _stats, False, "voxels, mL, components, intensity per label (JSON, CSV)"),
    ("overlays", _overlays, False, "PNG montages: axial/coronal/sagittal through each label"),
    ("secondary-capture", _secondary_capture, True, "the montages as DICOM Secondary Capture"),
    ("report", _report, False, "the batch's static HTML review page (OUT/report/)"),
    ("volumes", _volumes, False, "voxel count and volume (mL) per label value, as JSON"),
):
    register_case_export(_name, dicom_only=_dicom, summary=_summary, needs=_NEEDS.get(_name, ()))(_fn)
