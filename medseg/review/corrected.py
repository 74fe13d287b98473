"""A reviewer's corrected label map, put back onto its case's grid and label values.

Three kinds of file come back from ITK-SNAP, 3D Slicer or a PACS:

* a label map (NIfTI, NRRD, MHA) on the scan's grid: the same voxels, values from the case's label table;
* a 3D Slicer segmentation (``.seg.nrrd``), which Slicer crops to the segments' extent: a sub-box
  with the same spacing and direction at an integer voxel offset; its values are mapped to the
  case's by segment name (``SegmentN_Name`` / ``SegmentN_LabelValue``);
* a DICOM SEG: each frame is placed through the source instance it references (its position and
  orientation, not its order), and segments are mapped by their label; it must reference the
  case's own series.

Each check fails with a sentence naming the file: another grid, another series, a name or value
that is not in the label table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.errors import GeometryError, InputError

GRID_TOL = 1e-3
"""Largest difference, in voxels, between two grids that count as the same."""


def _index_map(affine: np.ndarray, grid_affine: np.ndarray) -> np.ndarray:
    """The 4x4 map from a file's voxel indices to the case grid's."""
    return np.linalg.inv(grid_affine) @ np.asarray(affine, dtype=np.float64)


def place_on_grid(
    array: np.ndarray,
    affine: np.ndarray,
    *,
    grid_affine: np.ndarray,
    grid_shape: tuple[int, int, int],
    crop_allowed: bool,
    what: str,
) -> np.ndarray:
    """A label array on the case grid: the same grid, or (``crop_allowed``) a sub-box of it.

    Args:
        array: ``(X, Y, Z)`` labels of the file.
        affine: Its RAS affine.
        grid_affine: The case grid's affine (``labels.nii.gz``).
        grid_shape: The case grid's shape.
        crop_allowed: Accept a sub-box at an integer offset with the same spacing and direction.
        what: The file, for messages.

    Returns:
        The labels on the case grid (zeros outside a sub-box).

    Raises:
        GeometryError: Another spacing or direction, a non-integer offset, a box outside the grid, or
            (without ``crop_allowed``) another shape or origin.

    Examples:
        >>> grid = np.diag([2.0, 2.0, 3.0, 1.0])
        >>> box = np.ones((2, 2, 1), np.uint8)
        >>> aff = grid.copy(); aff[:3, 3] = [4.0, 2.0, 3.0]  # offset (2, 1, 1) voxels
        >>> out = place_on_grid(box, aff, grid_affine=grid, grid_shape=(5, 5, 3), crop_allowed=True, what="x")
        >>> np.argwhere(out).tolist()
        [[2, 1, 1], [2, 2, 1], [3, 1, 1], [3, 2, 1]]
    """
    m = _index_map(affine, grid_affine)
    offset = m[:3, 3]
    same_axes = np.allclose(m[:3, :3], np.eye(3), atol=GRID_TOL)
    integral = np.allclose(offset, np.round(offset), atol=GRID_TOL)
    start = np.round(offset).astype(int)
    shape = np.asarray(array.shape[:3])
    if not same_axes or not integral:
        msg = (
            f"{what}: corrected label map must be on the scan's grid (spacing and direction of "
            f"labels.nii.gz, whole-voxel offset), got voxel map {np.round(m[:3], 4).tolist()}"
        )
        raise GeometryError(msg)
    if not crop_allowed and (start.any() or tuple(shape) != tuple(grid_shape)):
        msg = (
            f"{what}: corrected label map must be on the scan's grid {tuple(grid_shape)} at offset 0, "
            f"got shape {tuple(int(s) for s in shape)} at offset {start.tolist()}"
        )
        raise GeometryError(msg)
    if (start < 0).any() or (start + shape > np.asarray(grid_shape)).any():
        msg = (
            f"{what}: segmentation box must lie inside the scan's grid {tuple(grid_shape)}, "
            f"got voxels {start.tolist()} to {(start + shape - 1).tolist()}"
        )
        raise GeometryError(msg)
    out = np.zeros(grid_shape, dtype=np.int64)
    out[start[0] : start[0] + shape[0], start[1] : start[1] + shape[1], start[2] : start[2] + shape[2]] = (
        array
    )
    return out


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Array ``(X, Y, Z)``, RAS affine and header fields of a NIfTI/NRRD/MHA file."""
    import SimpleITK as sitk

    from medseg.io.readers import sitk_affine

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        msg = f"{path}: corrected label map must be a readable image, got {str(exc).strip().splitlines()[-1]}"
        raise InputError(msg) from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        msg = (
            f"{path}: corrected label map must be one 3D layer, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) (overlapping Slicer segments?)"
        )
        raise InputError(msg)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    header = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    return array, sitk_affine(image), header


def _integers(array: np.ndarray, what: Path) -> np.ndarray:
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        msg = f"{what}: corrected label map must hold whole label values, got fractions"
        raise InputError(msg)
    return np.asarray(array).astype(np.int64)


def check_values(labels: np.ndarray, table: Mapping[str, int], what: Path) -> None:
    """Fail unless every value of ``labels`` is background or a value of ``table``.

    Raises:
        InputError: Naming the file, the unknown values and the table.
    """
    allowed = {0, *table.values()}
    unknown = sorted(int(v) for v in np.unique(labels) if int(v) not in allowed)
    if unknown:
        msg = f"{what}: label values must be in the case's label table {dict(table)}, got {unknown}"
        raise InputError(msg)


def _by_name(names: Mapping[int, str], table: Mapping[str, int], what: Path, kind: str) -> dict[int, int]:
    """File value → case value, matching names (case-insensitively)."""
    lookup = {n.lower(): v for n, v in table.items()}
    mapping = {}
    for value, name in names.items():
        if name.lower() not in lookup:
            msg = f"{what}: {kind} '{name}' must be a label of the case {sorted(table)}, got no such label"
            raise InputError(msg)
        mapping[value] = lookup[name.lower()]
    return mapping


def _relabel(array: np.ndarray, mapping: Mapping[int, int], what: Path) -> np.ndarray:
    unknown = sorted(int(v) for v in np.unique(array) if v and int(v) not in mapping)
    if unknown:
        msg = f"{what}: label values must belong to a named segment, got unnamed values {unknown}"
        raise InputError(msg)
    lut = np.zeros(int(array.max()) + 1 if array.size else 1, dtype=np.int64)
    for src, dst in mapping.items():
        if src < lut.size:
            lut[src] = dst
    return lut[array]


def read_label_file(
    path: Path, *, grid_affine: np.ndarray, grid_shape: tuple[int, int, int], table: Mapping[str, int]
) -> np.ndarray:
    """A corrected NIfTI/NRRD/MHA label map or Slicer ``.seg.nrrd`` on the case grid, case values."""
    array, affine, header = _read_itk(path)
    array = _integers(array, path)
    segments = {
        int(header.get(f"Segment{i}_LabelValue", i + 1)): header[f"Segment{i}_Name"]
        for i in range(256)
        if f"Segment{i}_Name" in header
    }
    is_seg = bool(segments) or path.name.lower().endswith(".seg.nrrd")
    placed = place_on_grid(
        array, affine, grid_affine=grid_affine, grid_shape=grid_shape, crop_allowed=is_seg, what=str(path)
    )
    if segments:
        placed = _relabel(placed, _by_name(segments, table, path, "segment"), path)
    check_values(placed, table, path)
    return placed


def read_dicom_seg(
    path: Path,
    *,
    source_files: Sequence[Path],
    grid_affine: np.ndarray,
    grid_shape: tuple[int, int, int],
    table: Mapping[str, int],
) -> np.ndarray:
    """A corrected DICOM SEG on the case grid: frames placed through the source instances they reference.

    Raises:
        InputError: Not a SEG, a SEG of another series, a segment not in the table.
        GeometryError: A source pixel that is not a voxel of the case grid.
    """
    import highdicom as hd
    import pydicom

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        msg = f"{path}: corrected segmentation must be a DICOM SEG, got {type(exc).__name__}: {exc}"
        raise InputError(msg) from exc
    sources = {}
    for f in source_files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = ds
    series = {str(ds.SeriesInstanceUID) for ds in sources.values()}
    referenced = seg.get_source_image_uids()
    ref_series = sorted({str(s) for _, s, _ in referenced})
    if not ref_series or not set(ref_series) <= series:
        msg = f"{path}: DICOM SEG must reference the case's series {sorted(series)}, got series {ref_series}"
        raise InputError(msg)
    uids = [str(sop) for _, _, sop in referenced if str(sop) in sources]
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    mapping = _by_name(names, table, path, "segment")
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    out = np.zeros(grid_shape, dtype=np.int64)
    inverse = np.linalg.inv(np.asarray(grid_affine, dtype=np.float64))
    for frame, uid in zip(pixels, uids, strict=True):
        ds = sources[uid]
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        rows, cols = np.nonzero(frame)
        lps = ipp[:, None] + iop[:3, None] * (cols * dc) + iop[3:, None] * (rows * dr)
        ras = np.diag([-1.0, -1.0, 1.0]) @ lps
        ijk = inverse[:3, :3] @ ras + inverse[:3, 3:4]
        idx = np.round(ijk).astype(int)
        inside = ((idx >= 0) & (idx < np.asarray(grid_shape)[:, None])).all(axis=0)
        if not np.allclose(ijk, idx, atol=1e-2) or not inside.all():
            msg = (
                f"{path}: DICOM SEG frames must lie on the scan's voxels, got a frame of {uid} that does not"
            )
            raise GeometryError(msg)
        out[tuple(idx)] = _relabel(frame[rows, cols].astype(np.int64), mapping, path)
    check_values(out, table, path)
    return out
