"""Per-scan exports, by name. Each writes files into the case's (temporary) output folder.

An exporter is called as ``fn(case_dir, image=..., prediction=..., job=..., predictor=...)`` and returns the paths
it wrote. The job owns atomicity and the manifest entry; exporters only write files.
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

    voxel_ml = abs(float(np.linalg.det(prediction.affine[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(prediction.labels).ravel())
    stats = {
        int(v): {"voxels": int(n), "volume_ml": round(int(n) * voxel_ml, 4)}
        for v, n in enumerate(counts)
        if v
    }
    path = case_dir / "volumes.json"
    path.write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return [path]
