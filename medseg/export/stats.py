"""Statistics per label: voxel count, volume, connected components, intensity inside.

Per case, ``stats.json`` and ``stats.csv``; per batch, ``OUT/stats.csv`` with one row per case
and label. Volumes use the exact voxel volume of the affine (``|det|``, oblique grids included);
components are counted with 26-connectivity (voxels touching by a face, edge or corner belong
together); intensities are those of the first channel as loaded (HU for CT).

Examples:
    >>> import numpy as np
    >>> from medseg.export.labels import label_table
    >>> labels = np.zeros((4, 4, 4), np.uint8); labels[0, 0, 0] = labels[3, 3, 3] = 1
    >>> rows = label_stats(labels, np.diag([2.0, 2.0, 2.0, 1.0]), label_table({"a": 1, "b": 2}))
    >>> [(r["name"], r["voxels"], r["volume_ml"], r["components"]) for r in rows]
    [('a', 2, 0.016, 2), ('b', 0, 0.0, 0)]
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg.export.case import CaseExport
from medseg.export.labels import LabelEntry
from medseg.geometry import voxel_volume_ml
from medseg.io.atomic import atomic_write_text

STATS_JSON = "stats.json"
STATS_CSV = "stats.csv"
FIELDS = ("value", "name", "voxels", "volume_ml", "components", "mean", "std")
BATCH_FIELDS = ("case_id", *FIELDS)


def label_stats(
    labels: np.ndarray,
    affine: np.ndarray,
    table: tuple[LabelEntry, ...],
    image: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Statistics of every label of a table (labels absent from the map get zeros).

    Args:
        labels: ``(X, Y, Z)`` label map.
        affine: Its 4x4 affine (voxel volume from its determinant).
        table: The labels to report.
        image: Intensities on the same grid, or ``None`` (mean/std are then ``None``).

    Returns:
        One dict per label with the keys of :data:`FIELDS`.
    """
    from scipy import ndimage

    voxel_ml = voxel_volume_ml(affine)
    labels = np.asarray(labels)
    structure = np.ones((3, 3, 3), dtype=bool)
    boxes = ndimage.find_objects(labels) if labels.size else []  # bounding box per value, one pass
    rows = []
    for e in table:
        box = boxes[e.value - 1] if 0 < e.value <= len(boxes) else None
        n = components = 0
        mean = std = None
        if box is not None:
            inside = labels[box] == e.value
            n = int(inside.sum())
            components = int(ndimage.label(inside, structure=structure)[1])
            if image is not None:
                values = np.asarray(image)[box][inside].astype(np.float64)
                mean, std = round(float(values.mean()), 4), round(float(values.std()), 4)
        rows.append(
            {
                "value": e.value,
                "name": e.name,
                "voxels": n,
                "volume_ml": round(n * voxel_ml, 4),
                "components": components,
                "mean": mean,
                "std": std,
            }
        )
    return rows


def _csv(rows: list[dict[str, Any]], fields: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})
    return buf.getvalue()


def write_stats(case: CaseExport, out_dir: Path) -> list[Path]:
    """Write ``stats.json`` and ``stats.csv`` of a case (atomically).

    Args:
        case: The case.
        out_dir: Its output folder.

    Returns:
        The written paths.
    """
    rows = label_stats(case.labels, case.affine, case.label_table, case.image)
    data = {
        "case_id": case.case_id,
        "voxel_ml": case.voxel_ml,
        "spacing_mm": list(case.spacing),
        "intensity": "first channel as loaded" if case.image is not None else None,
        "connectivity": 26,
        "labels": rows,
    }
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / STATS_JSON, json.dumps(data, indent=1))
    atomic_write_text(out_dir / STATS_CSV, _csv(rows, FIELDS))
    return [out_dir / STATS_JSON, out_dir / STATS_CSV]


def read_stats(case_dir: Path) -> dict[str, Any] | None:
    """A case's ``stats.json``, or ``None`` where there is none."""
    try:
        return json.loads((Path(case_dir) / STATS_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_batch_stats(out_dir: Path, case_ids: list[str]) -> Path | None:
    """Write ``OUT/stats.csv``: every case's label statistics, one row per case and label.

    Args:
        out_dir: The batch's output folder.
        case_ids: The cases to include (those without ``stats.json`` are left out).

    Returns:
        The written path, or ``None`` when no case has statistics.
    """
    rows = []
    for case_id in case_ids:
        stats = read_stats(Path(out_dir) / case_id)
        if stats is None:
            continue
        rows += [{"case_id": case_id, **r} for r in stats.get("labels", [])]
    if not rows:
        return None
    path = Path(out_dir) / STATS_CSV
    atomic_write_text(path, _csv(rows, BATCH_FIELDS))
    return path
