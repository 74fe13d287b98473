"""The viewer's data: a case's scan and label map as one script file beside its outputs.

A page opened from ``file://`` may not ``fetch`` the files around it (Chromium forbids it), but
it may load a ``<script src>``. So the scan and the label map travel as one small script,
``<case>/viewer/volume.js``, that hands the viewer a JSON object: the grid's shape, the voxel size,
the orientation (which voxel axis runs along patient x, y, z, and which way), the label table, the
display windows, and the voxels themselves, zlib-compressed and base64-encoded: the scan as int16
(``value = stored * scale + offset``, exact for integer scans such as CT in HU) and the labels as
uint8 (uint16 above 255 labels).

The voxels are those of ``labels.nii.gz``, in its own index order; nothing is resampled. A scan
larger than :attr:`ViewerSettings.max_in_plane` along ``i`` or ``j`` is shown on every ``f``-th voxel
along those two axes (``f`` the smallest integer that brings both within the limit); the page states
``f`` and reports voxel indices on the full grid.

Examples:
    >>> import numpy as np
    >>> labels = np.zeros((600, 20, 4), np.uint8)
    >>> vol = viewer_volume(labels=labels, image=None, affine=np.eye(4), label_table=(), modality="CT")
    >>> vol.factor, vol.shape
    (3, (200, 7, 4))
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.export.labels import LabelEntry
from medseg.geometry import spacing_from_affine
from medseg.io.atomic import atomic_write_text
from medseg.labelmap import label_dtype

VIEWER_DIR = "viewer"
VOLUME_FILE = "volume.js"
VOLUME_PATH = f"{VIEWER_DIR}/{VOLUME_FILE}"
"""Where a case's viewer data lies, relative to its case folder."""
CALLBACK = "medsegVolume"
"""The function the data script calls with its object (defined by the viewer script)."""

CT_PRESETS: tuple[tuple[str, float, float], ...] = (
    ("soft tissue", 40.0, 400.0),
    ("lung", -600.0, 1500.0),
    ("bone", 400.0, 1800.0),
)
"""CT window presets: ``(name, level, width)`` in HU."""


@dataclass(frozen=True)
class ViewerSettings:
    """How a case is packed for the viewer.

    Attributes:
        max_in_plane: Largest number of voxels shown along ``i`` and ``j``; larger grids are shown
            on every ``f``-th voxel along both.
        percentiles: The "percentile" window of non-CT scans (intensity percentiles).
        compression: zlib level of the packed voxels (1 is fast and already shrinks labels a lot).
    """

    max_in_plane: int = 256
    percentiles: tuple[float, float] = (1.0, 99.0)
    compression: int = 1

    def __post_init__(self) -> None:
        if self.max_in_plane < 16:
            msg = f"max_in_plane must be at least 16, got {self.max_in_plane}"
            raise ValueError(msg)
        if not 0 <= self.compression <= 9:
            msg = f"compression must be a zlib level 0..9, got {self.compression}"
            raise ValueError(msg)


@dataclass(frozen=True, eq=False)
class ViewerVolume:
    """A case as the viewer gets it.

    Attributes:
        image: ``(X', Y', Z)`` int16 stored scan values (zeros where the case has no scan).
        labels: ``(X', Y', Z)`` label values (uint8, or uint16 above 255).
        full_shape: The grid of ``labels.nii.gz``.
        factor: In-plane step: voxel ``(a, b, c)`` here is ``(a * factor, b * factor, c)`` there.
        spacing: Voxel size in mm along the shown ``i``, ``j``, ``k`` (the step included).
        ras_axes: For patient x, y, z (RAS): the voxel axis nearest to it.
        ras_flips: For patient x, y, z: +1 where the voxel index grows towards R, A, S, else -1.
        scale: Displayed value = stored * scale + offset.
        offset: See ``scale``.
        windows: Named display windows ``(name, level, width)`` in displayed units.
        label_table: The foreground labels.
        modality: CT, MR, ...
        has_image: Whether a scan is shown (else only labels).
    """

    image: np.ndarray
    labels: np.ndarray
    full_shape: tuple[int, int, int]
    factor: int
    spacing: tuple[float, float, float]
    ras_axes: tuple[int, int, int]
    ras_flips: tuple[int, int, int]
    scale: float
    offset: float
    windows: tuple[tuple[str, float, float], ...]
    label_table: tuple[LabelEntry, ...] = field(default=())
    modality: str = "OTHER"
    has_image: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shown grid."""
        return tuple(int(s) for s in self.labels.shape)  # type: ignore[return-value]


def in_plane_factor(shape: Sequence[int], max_in_plane: int) -> int:
    """The in-plane step that brings ``i`` and ``j`` within ``max_in_plane`` voxels.

    Examples:
        >>> in_plane_factor((512, 512, 300), 256), in_plane_factor((256, 200, 9), 256)
        (2, 1)
    """
    return max(1, math.ceil(max(int(shape[0]), int(shape[1])) / max_in_plane))


def _to_int16(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(stored, scale, offset)``: ``image ≈ stored * scale + offset``, exact for int16 integers."""
    arr = np.asarray(image)
    finite = np.isfinite(arr) if arr.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        arr = np.where(finite, arr, 0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    integral = arr.dtype.kind in "iub" or bool(np.array_equal(arr, np.round(arr)))
    if integral and lo >= -32768 and hi <= 32767:
        return arr.astype(np.int16), 1.0, 0.0
    scale = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.round((arr.astype(np.float64) - lo) / scale - 32768.0)
    return np.clip(stored, -32768, 32767).astype(np.int16), scale, lo + 32768.0 * scale


def _windows(
    image: np.ndarray | None, modality: str, percentiles: tuple[float, float]
) -> tuple[tuple[str, float, float], ...]:
    windows: list[tuple[str, float, float]] = list(CT_PRESETS) if modality == "CT" else []
    if image is not None and image.size:
        flat = image.ravel()[:: max(1, image.size // 2_000_000)]
        nonzero = flat[flat != 0]
        sample = nonzero if nonzero.size > flat.size // 10 else flat
        lo, hi = (float(v) for v in np.percentile(sample, percentiles))
        hi = max(hi, lo + 1e-6)
        windows.append(("percentile", (lo + hi) / 2, hi - lo))
    return tuple(windows) or (("percentile", 0.5, 1.0),)


def viewer_volume(
    *,
    labels: np.ndarray,
    image: np.ndarray | None,
    affine: np.ndarray,
    label_table: tuple[LabelEntry, ...],
    modality: str,
    settings: ViewerSettings | None = None,
) -> ViewerVolume:
    """Pack a case for the viewer (in-plane step, int16 scan, orientation, windows).

    Args:
        labels: ``(X, Y, Z)`` label map (the grid of ``labels.nii.gz``).
        image: ``(X, Y, Z)`` scan on the same grid, or ``None``.
        affine: The grid's 4x4 RAS+ affine.
        label_table: The foreground labels.
        modality: CT, MR, ... (CT gets the HU presets).
        settings: Packing settings.

    Returns:
        The :class:`ViewerVolume`.

    Raises:
        InputError: A label map that is not 3D, or a scan on another grid.
    """
    from nibabel.orientations import io_orientation

    settings = settings or ViewerSettings()
    labels = np.asarray(labels)
    if labels.ndim != 3:
        msg = f"label map must be 3D (X, Y, Z), got shape {labels.shape}"
        raise InputError(msg)
    if image is not None and np.asarray(image).shape != labels.shape:
        msg = f"scan must be on the label map's grid {labels.shape}, got shape {np.asarray(image).shape}"
        raise InputError(msg)
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        msg = f"label values must be 0..65535, got {labels.min()}..{labels.max()}"
        raise InputError(msg)
    f = in_plane_factor(labels.shape, settings.max_in_plane)
    shown_labels = labels[::f, ::f, :]
    shown_labels = shown_labels.astype(label_dtype(int(labels.max()) + 1 if labels.size else 1))
    shown_image = None if image is None else np.asarray(image)[::f, ::f, :]
    stored, scale, offset = (
        _to_int16(shown_image) if shown_image is not None else (np.zeros(shown_labels.shape, np.int16), 1, 0)
    )
    aff = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(aff)
    axes, flips = [0, 0, 0], [1, 1, 1]
    for data_axis, (ras_axis, flip) in enumerate(ornt):
        axes[int(ras_axis)], flips[int(ras_axis)] = data_axis, int(flip)
    spacing = np.asarray(spacing_from_affine(aff)) * np.array([f, f, 1])
    modality = modality.upper()
    return ViewerVolume(
        image=stored,
        labels=np.ascontiguousarray(shown_labels),
        full_shape=tuple(int(s) for s in labels.shape),  # type: ignore[arg-type]
        factor=f,
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        ras_axes=tuple(axes),  # type: ignore[arg-type]
        ras_flips=tuple(flips),  # type: ignore[arg-type]
        scale=float(scale),
        offset=float(offset),
        windows=_windows(shown_image, modality, settings.percentiles),
        label_table=tuple(label_table),
        modality=modality,
        has_image=image is not None,
    )


def _pack(array: np.ndarray, level: int) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(array).tobytes(), level)).decode("ascii")


def volume_script(volume: ViewerVolume, *, compression: int = 1) -> str:
    """The text of ``volume.js``: one call of the viewer's callback with the packed case.

    Voxels are little-endian and in C order of ``(X', Y', Z)`` (the last index fastest).
    """
    big_labels = volume.labels.dtype == np.uint16
    data: dict[str, Any] = {
        "format": "medseg-viewer/1",
        "shape": list(volume.shape),
        "full_shape": list(volume.full_shape),
        "factor": volume.factor,
        "spacing": [round(s, 6) for s in volume.spacing],
        "ras_axes": list(volume.ras_axes),
        "ras_flips": list(volume.ras_flips),
        "scale": volume.scale,
        "offset": volume.offset,
        "windows": [{"name": n, "level": lv, "width": w} for n, lv, w in volume.windows],
        "labels": [{"value": e.value, "name": e.name, "color": list(e.color)} for e in volume.label_table],
        "modality": volume.modality,
        "has_image": volume.has_image,
        "label_dtype": "uint8" if volume.labels.dtype == np.uint8 else "uint16",
        "image_data": _pack(volume.image.astype("<i2"), compression),
        "label_data": _pack(volume.labels.astype("<u2" if big_labels else "u1"), compression),
    }
    return f"{CALLBACK}({json.dumps(data, separators=(',', ':'))});\n"


def write_viewer_data(case: Any, case_dir: Path, settings: ViewerSettings | None = None) -> list[Path]:
    """Write ``<case_dir>/viewer/volume.js`` for a :class:`~medseg.export.case.CaseExport` (atomically).

    Returns:
        The written path.
    """
    settings = settings or ViewerSettings()
    volume = viewer_volume(
        labels=case.labels,
        image=case.image,
        affine=case.affine,
        label_table=case.label_table,
        modality=case.modality,
        settings=settings,
    )
    dest = Path(case_dir) / VOLUME_PATH
    atomic_write_text(dest, volume_script(volume, compression=settings.compression))
    return [dest]
