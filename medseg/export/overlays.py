"""Overlay montages: axial, coronal and sagittal slices through each structure, labels drawn over.

Each row of a montage shows one label through the slices where it is largest (axial, coronal,
sagittal), with every label drawn (filled at ``alpha``, outlined at full colour) in its fixed
colour, and a legend with names at the bottom. Views are in the radiological convention (patient
right on the viewer's left, anterior up in axial views, superior up otherwise), reoriented from
the label map's grid to the nearest RAS axes, with the physical aspect ratio kept. CT is shown
with a soft-tissue window (level 40, width 400 HU), other modalities between the 1st and 99th
intensity percentiles. Montages hold up to :attr:`OverlaySettings.rows_per_page` labels each:
``overlays/montage.png``, then ``overlays/montage-2.png``, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import optional_import
from medseg.export.case import CaseExport
from medseg.export.labels import LabelEntry
from medseg.geometry import spacing_from_affine
from medseg.io.atomic import atomic_path

OVERLAY_DIR = "overlays"
VIEWS = ("axial", "coronal", "sagittal")
_BG = (255, 255, 255)
_FG = (20, 20, 20)
PAD = 8
HEAD = 22
_LEGEND_LINE = 20
_LEGEND_ITEM = 170


@dataclass(frozen=True)
class OverlaySettings:
    """How montages look.

    Attributes:
        tile: Size of one view in pixels (square; the image is fitted inside, aspect kept).
        alpha: Opacity of the label fill (outlines are opaque).
        ct_window: CT ``(level, width)`` in HU.
        percentiles: Display range of other modalities, as intensity percentiles.
        rows_per_page: Labels (rows) per montage image.
    """

    tile: int = 220
    alpha: float = 0.4
    ct_window: tuple[float, float] = (40.0, 400.0)
    percentiles: tuple[float, float] = (1.0, 99.0)
    rows_per_page: int = 6

    def __post_init__(self) -> None:
        if self.tile < 32:
            msg = f"tile must be >= 32 pixels, got {self.tile}"
            raise ValueError(msg)
        if not 0.0 <= self.alpha <= 1.0:
            msg = f"alpha must be in [0, 1], got {self.alpha}"
            raise ValueError(msg)
        if self.rows_per_page < 1:
            msg = f"rows_per_page must be >= 1, got {self.rows_per_page}"
            raise ValueError(msg)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a volume to the nearest RAS axes (axis permutations and flips only).

    Returns:
        ``(array, spacing)``: the reoriented view and its voxel size along x, y, z in mm.
    """
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    spacing = np.asarray(spacing_from_affine(affine))
    out_spacing = np.empty(3)
    out_spacing[ornt[:, 0].astype(int)] = spacing
    return apply_orientation(array, ornt), out_spacing


def display_window(image: np.ndarray, modality: str, settings: OverlaySettings) -> tuple[float, float]:
    """The intensity range ``(low, high)`` shown from black to white."""
    if modality.upper() == "CT":
        level, width = settings.ct_window
        return level - width / 2, level + width / 2
    flat = np.asarray(image).ravel()
    step = max(1, flat.size // 2_000_000)  # a subsample is plenty for percentiles
    sample = flat[::step]
    nonzero = sample[sample != 0]
    if nonzero.size > sample.size // 10:
        sample = nonzero
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, settings.percentiles)
    return float(lo), float(max(hi, lo + 1e-6))


def _view(vol: np.ndarray, view: str, index: int) -> np.ndarray:
    """A 2D slice of a RAS volume as displayed (rows top to bottom, columns left to right)."""
    if view == "axial":  # rows: anterior → posterior; columns: patient right → left
        return vol[::-1, ::-1, index].T
    if view == "coronal":  # rows: superior → inferior; columns: right → left
        return vol[::-1, index, ::-1].T
    return vol[index, ::-1, ::-1].T  # sagittal: rows superior → inferior; columns anterior → posterior


_VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_VIEW_SPACING = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}  # (row axis, column axis)
_VIEW_SIDES = {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}


def best_slices(mask: np.ndarray, offset: tuple[int, int, int] = (0, 0, 0)) -> dict[str, int]:
    """Per view, the slice index where ``mask`` (a RAS volume) has the most voxels (centre if empty).

    Args:
        mask: The structure, or the part of the volume around it.
        offset: Where ``mask`` starts in the volume (indices are returned in the volume).

    Returns:
        ``{"axial": z, "coronal": y, "sagittal": x}``.
    """
    out = {}
    for view, axis in _VIEW_AXIS.items():
        other = tuple(a for a in range(3) if a != axis)
        area = mask.sum(axis=other)
        out[view] = offset[axis] + (int(np.argmax(area)) if area.any() else mask.shape[axis] // 2)
    return out


def _outline(lab: np.ndarray) -> np.ndarray:
    edge = np.zeros(lab.shape, dtype=bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, 1:] != lab[:, :-1]
    return edge & (lab > 0)


def render_view(
    gray: np.ndarray,
    labels: np.ndarray,
    colors: np.ndarray,
    spacing: tuple[float, float],
    settings: OverlaySettings,
) -> np.ndarray:
    """Draw labels over a grey slice, resized to a square tile with the physical aspect kept.

    Args:
        gray: ``(rows, cols)`` uint8 display values.
        labels: ``(rows, cols)`` label values.
        colors: ``(max_value + 1, 3)`` uint8 colour per label value.
        spacing: Pixel size ``(row, column)`` in mm.
        settings: Tile size and opacity.

    Returns:
        ``(tile, tile, 3)`` uint8 RGB.
    """
    image_mod = optional_import("PIL.Image", "overlay images", "plots")
    rows, cols = gray.shape
    h_mm, w_mm = rows * spacing[0], cols * spacing[1]
    scale = settings.tile / max(h_mm, w_mm)
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))  # PIL: (width, height)
    g = np.asarray(image_mod.fromarray(gray).resize(size, image_mod.Resampling.BILINEAR))
    lab = np.asarray(image_mod.fromarray(labels.astype(np.int32)).resize(size, image_mod.Resampling.NEAREST))
    rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float32)
    inside = lab > 0
    col = colors[np.clip(lab, 0, len(colors) - 1)].astype(np.float32)
    rgb[inside] = (1 - settings.alpha) * rgb[inside] + settings.alpha * col[inside]
    edge = _outline(lab)
    rgb[edge] = col[edge]
    tile = np.zeros((settings.tile, settings.tile, 3), dtype=np.uint8)
    top, left = (settings.tile - size[1]) // 2, (settings.tile - size[0]) // 2
    tile[top : top + size[1], left : left + size[0]] = np.clip(rgb, 0, 255).astype(np.uint8)
    return tile


def _font(size: int) -> Any:
    font_mod = optional_import("PIL.ImageFont", "overlay images", "plots")
    try:
        return font_mod.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the bitmap font
        return font_mod.load_default()


def tile_origin(row: int, view: int, settings: OverlaySettings) -> tuple[int, int]:
    """The top-left pixel ``(x, y)`` of view ``view`` (0 axial, 1 coronal, 2 sagittal) in row ``row``."""
    return PAD + view * (settings.tile + PAD), HEAD + row * (settings.tile + HEAD + PAD) + HEAD


def montage_pages(case: CaseExport, settings: OverlaySettings | None = None) -> list[np.ndarray]:
    """Render a case's montages as RGB arrays (one per page of labels).

    Args:
        case: The case (without an image, labels are drawn over black).
        settings: How they look.

    Returns:
        One ``(height, width, 3)`` uint8 array per page; an empty prediction gives one page through
        the centre of the volume.
    """
    settings = settings or OverlaySettings()
    image_mod = optional_import("PIL.Image", "overlay images", "plots")
    draw_mod = optional_import("PIL.ImageDraw", "overlay images", "plots")
    labels, spacing = to_ras(case.labels, case.affine)
    if case.image is not None:
        lo, hi = display_window(case.image, case.modality, settings)
        image, _ = to_ras(case.image, case.affine)
    else:
        lo, hi, image = 0.0, 1.0, None
    top = max([e.value for e in case.label_table] + [int(labels.max()) if labels.size else 0])
    colors = np.zeros((top + 1, 3), dtype=np.uint8)
    for e in case.label_table:
        colors[e.value] = e.color
    from scipy import ndimage

    boxes = ndimage.find_objects(labels) if labels.size else []
    present = {v + 1 for v, box in enumerate(boxes) if box is not None}
    rows: list[LabelEntry | None] = [e for e in case.label_table if e.value in present]
    if not rows:
        rows = [None]
    font, small = _font(15), _font(12)
    width = 3 * settings.tile + 4 * PAD
    pages = []
    for start in range(0, len(rows), settings.rows_per_page):
        page_rows = rows[start : start + settings.rows_per_page]
        legend = list(case.label_table)
        per_line = max(1, width // _LEGEND_ITEM)
        legend_h = _LEGEND_LINE * (-(-len(legend) // per_line)) + PAD
        height = HEAD + len(page_rows) * (settings.tile + HEAD + PAD) + legend_h + PAD
        canvas = image_mod.new("RGB", (width, height), _BG)
        draw = draw_mod.Draw(canvas)
        title = f"{case.case_id}  {case.series_description}".strip()
        draw.text((PAD, 4), title[:90], fill=_FG, font=font)
        for r, entry in enumerate(page_rows):
            if entry is not None:  # look only inside the label's bounding box
                box = boxes[entry.value - 1]
                where = best_slices(labels[box] == entry.value, tuple(b.start for b in box))
            else:
                where = best_slices(labels > 0)
            name = entry.name if entry is not None else "no label found"
            y = tile_origin(r, 0, settings)[1] - HEAD
            if entry is not None:
                draw.rectangle((PAD, y + 5, PAD + 12, y + 17), fill=tuple(entry.color), outline=_FG)
            draw.text((PAD + 18, y + 3), name, fill=_FG, font=font)
            for v, view in enumerate(VIEWS):
                idx = where[view]
                lab2d = _view(labels, view, idx)
                if image is not None:
                    raw = _view(image, view, idx).astype(np.float32)
                    gray = np.clip((raw - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
                else:
                    gray = np.zeros(lab2d.shape, dtype=np.uint8)
                ra, ca = _VIEW_SPACING[view]
                tile = render_view(gray, lab2d, colors, (spacing[ra], spacing[ca]), settings)
                x, y = tile_origin(r, v, settings)
                canvas.paste(image_mod.fromarray(tile), (x, y))
                left, right = _VIEW_SIDES[view]
                draw.text(
                    (x + 3, y + 3),
                    f"{view} {idx + 1}/{labels.shape[_VIEW_AXIS[view]]}",
                    fill=(255, 255, 0),
                    font=small,
                )
                draw.text((x + 3, y + settings.tile // 2), left, fill=(255, 255, 0), font=small)
                draw.text(
                    (x + settings.tile - 12, y + settings.tile // 2), right, fill=(255, 255, 0), font=small
                )
        for i, e in enumerate(legend):
            lx = PAD + (i % per_line) * _LEGEND_ITEM
            ly = tile_origin(len(page_rows), 0, settings)[1] - HEAD + (i // per_line) * _LEGEND_LINE
            draw.rectangle((lx, ly + 3, lx + 12, ly + 15), fill=tuple(e.color), outline=_FG)
            draw.text((lx + 18, ly + 1), f"{e.value} {e.name}"[:22], fill=_FG, font=small)
        pages.append(np.asarray(canvas))
    return pages


def page_name(index: int) -> str:
    """The file name of montage page ``index`` (0-based)."""
    return "montage.png" if index == 0 else f"montage-{index + 1}.png"


def write_overlays(case: CaseExport, out_dir: Path, settings: OverlaySettings | None = None) -> list[Path]:
    """Write a case's overlay montages as PNG into ``out_dir/overlays/`` (each atomically).

    Args:
        case: The case.
        out_dir: Its output folder.
        settings: How they look.

    Returns:
        The written paths.
    """
    image_mod = optional_import("PIL.Image", "overlay images", "plots")
    folder = Path(out_dir) / OVERLAY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, page in enumerate(montage_pages(case, settings)):
        dest = folder / page_name(i)
        with atomic_path(dest) as tmp:
            image_mod.fromarray(page).save(tmp, format="PNG", optimize=False)
        paths.append(dest)
    return paths
