"""DICOM RT Structure Set for radiotherapy users, via rt-utils (optional: ``medseg[rtstruct]``).

One ROI per label present in the label map, named and coloured as in the label table, contoured
slice by slice on the source series (rt-utils traces the masks with OpenCV; on a headless machine
OpenCV needs Debian's ``libgl1``). Each slice's mask is taken for the instance rt-utils loaded,
matched by SOP Instance UID to the label map's slice found from the instance's own position, so
the contours do not depend on how either side orders the slices. Contours are polygons around
pixel centres: a structure a pixel wide has no area, and reading contours back into a mask
(rasterising) loses or gains about a pixel at every edge. rt-utils maps contour points with the
two pixel spacings swapped, so series with non-square pixels are refused rather than misplaced.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.valuerep import format_number_as_ds

from medseg.errors import InputError, optional_import
from medseg.export.case import CaseExport
from medseg.export.dicom_grid import instance_slices, place_series
from medseg.io.atomic import atomic_path

RTSTRUCT_FILE = "rtstruct.dcm"


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence the deprecation notices pydicom 3 gives for rt-utils' old-style dataset setup."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def write_rtstruct(case: CaseExport, out_dir: Path, name: str = RTSTRUCT_FILE) -> list[Path]:
    """Write the RT Structure Set of a DICOM case into ``out_dir`` (atomically).

    Args:
        case: A case whose source is a DICOM series.
        out_dir: The case's output folder.
        name: The file name.

    Returns:
        The written path, in a list (empty when no label is present: an RTSTRUCT needs an ROI).

    Raises:
        InputError: If the source is not a DICOM series.
        MedsegError: If rt-utils is not installed.
        GeometryError: If the label map is not on the series' grid.
    """
    rt_utils = optional_import("rt_utils", "RT Structure Set export", "rtstruct")
    if not case.is_dicom:
        msg = f"{case.case_id}: RTSTRUCT needs a DICOM series as source, got {list(case.inputs)[:1]}"
        raise InputError(msg)
    grid = place_series(case.dicom_files, case.affine, case.labels.shape)
    spacing = [float(v) for v in grid.headers[0].PixelSpacing]
    if abs(spacing[0] - spacing[1]) > 1e-4 * max(spacing):
        msg = f"{case.case_id}: RTSTRUCT export (rt-utils) needs square pixels, got PixelSpacing {spacing}"
        raise InputError(msg)
    labels = case.labels
    slice_of = {str(ds.SOPInstanceUID): k for ds, k in zip(grid.headers, instance_slices(grid), strict=True)}
    present = [e for e in case.label_table if (labels == e.value).any()]
    if not present:
        return []
    with tempfile.TemporaryDirectory(prefix="medseg-rtstruct-") as tmp:
        # rt-utils reads every file of a folder: give it this series only
        for i, f in enumerate(case.dicom_files):
            os.symlink(Path(f).resolve(), Path(tmp) / f"{i:05d}.dcm")
        with contextlib.redirect_stdout(io.StringIO()), _quiet_pydicom():  # rt-utils chatters
            rtstruct = rt_utils.RTStructBuilder.create_new(dicom_series_path=tmp)
            order = [slice_of[str(ds.SOPInstanceUID)] for ds in rtstruct.series_data]
            for entry in present:
                mask = np.stack([entry.value == labels[:, :, k].T for k in order], axis=-1)
                if not mask.any():
                    continue
                rtstruct.add_roi(
                    mask=mask,
                    color=list(entry.color),
                    name=entry.name[:64],
                    description=f"medseg {case.algorithm.name}"[:64],
                    roi_generation_algorithm="AUTOMATIC",
                )
        ds = rtstruct.ds
        for roi in ds.get("ROIContourSequence", []):  # DS values hold at most 16 characters
            for contour in roi.get("ContourSequence", []):
                contour.ContourData = [format_number_as_ds(float(v)) for v in contour.ContourData]
        source = grid.headers[0]  # attributes rt-utils leaves out (dciodvfy: Type 1 and 2)
        for keyword in (
            "FrameOfReferenceUID",
            "AccessionNumber",
            "ReferringPhysicianName",
            "PositionReferenceIndicator",
        ):
            if keyword not in ds:
                setattr(ds, keyword, source.get(keyword, ""))
        if "OperatorsName" not in ds:
            ds.OperatorsName = ""
        ds.SeriesDescription = f"medseg structures ({case.algorithm.name})"[:64]
        ds.Manufacturer = "medseg"
        ds.ManufacturerModelName = f"medseg {case.algorithm.name}"[:64]
        ds.SoftwareVersions = case.algorithm.version or "unknown"
        dest = Path(out_dir) / name
        with atomic_path(dest) as tmp_path:
            ds.save_as(tmp_path, enforce_file_format=True)
    return [dest]
