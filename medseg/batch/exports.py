"""Per-scan exports, by name. Each writes files into the case's (temporary) output folder.

An exporter is called as ``fn(case_dir, image=..., prediction=..., job=..., predictor=...)`` and
returns the paths it wrote. The job owns atomicity and the manifest entry; exporters only write files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Exporter = Callable[..., list[Path]]
EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    """Register an exporter under ``name`` (a decorator)."""

    def decorate(fn: Exporter) -> Exporter:
        EXPORTERS[name] = fn
        return fn

    return decorate


@register_exporter("volumes")
def export_volumes(case_dir: Path, *, prediction: Any, **_: Any) -> list[Path]:
    """Voxel count and volume (mL) per label, as JSON."""
    import json

    import numpy as np

    from medseg.io.atomic import atomic_write_text

    voxel_ml = abs(float(np.linalg.det(prediction.affine[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(prediction.labels).ravel())
    stats = {
        int(v): {"voxels": int(n), "volume_ml": round(int(n) * voxel_ml, 4)}
        for v, n in enumerate(counts)
        if v
    }
    path = case_dir / "volumes.json"
    atomic_write_text(path, json.dumps(stats, indent=1))
    return [path]


def _clinician_export(name: str) -> Exporter:
    """An exporter running the clinician export ``name`` of :mod:`medseg.export` on a fresh prediction."""

    def export(
        case_dir: Path, *, image: Any, prediction: Any, job: Any, predictor: Any, **_: Any
    ) -> list[Path]:
        from medseg.export import case_from_prediction, export_case
        from medseg.export.case import CASE_FILE

        had_facts = (case_dir / CASE_FILE).is_file()
        case = case_from_prediction(image, prediction, job, predictor)
        written = export_case(case, case_dir, [name], keep_going=True)
        return [p for p in written if not (had_facts and p == case_dir / CASE_FILE)]

    export.__name__ = f"export_{name.replace('-', '_')}"
    export.__doc__ = f"The clinician export '{name}' (see :mod:`medseg.export.registry`)."
    return export


def _register_clinician_exports() -> None:
    from medseg.export.registry import CASE_EXPORTS

    for name in CASE_EXPORTS:
        register_exporter(name)(_clinician_export(name))


_register_clinician_exports()
