"""DICOM Segmentation (SEG) objects for DICOM inputs, written with highdicom.

One BINARY segment per foreground label of the data spec (name, colour and coded concepts from the
spec; the generic SNOMED CT "Tissue" where it gives none), with the algorithm identified by model
name, medseg version and the model bundle's SHA-256. Patient and study attributes come from the
source series; every frame references the source SOP instance it was drawn on, found from the
instances' own positions (:mod:`medseg.export.dicom_grid`); empty frames are left out. UIDs are
derived from the source series, the model and the pixel content, so exporting the same result twice
gives the same object.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, optional_import
from medseg.export.case import CaseExport
from medseg.export.dicom_grid import instance_slices, place_series
from medseg.export.labels import Concept
from medseg.io.atomic import atomic_path

SEG_FILE = "segmentation.dcm"
SERIES_NUMBER_OFFSET = 1000
_LO = 64  # longest DICOM LO value


def _coded(hd: Any, concept: Concept) -> Any:
    return hd.sr.CodedConcept(value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning)


def segment_frames(case: CaseExport) -> tuple[Any, np.ndarray]:
    """The source series' grid and the SEG's label-map frames, one per source instance.

    Args:
        case: A case whose source is a DICOM series.

    Returns:
        ``(grid, frames)``: the :class:`~medseg.export.dicom_grid.SeriesGrid` (headers in frame
        order) and an ``(instances, rows, columns)`` array of segment numbers (1..N, 0 for none).

    Raises:
        InputError: Not a DICOM source, or label values missing from the label table.
        GeometryError: The label map is not on the series' grid.
    """
    if not case.is_dicom:
        msg = f"{case.case_id}: DICOM export needs a DICOM series as source, got {list(case.inputs)[:1]}"
        raise InputError(msg)
    grid = place_series(case.dicom_files, case.affine, case.labels.shape)
    labels = case.labels
    values = [e.value for e in case.label_table]
    top = int(labels.max()) if labels.size else 0
    consecutive = values == list(range(1, len(values) + 1))
    if not consecutive or top > len(values):  # the fast check failed: look at every value present
        present = {int(v) for v in np.unique(labels) if v}
        unknown = sorted(present - set(values))
        if unknown:
            msg = f"{case.case_id}: label map values must be named labels {values}, got unnamed {unknown}"
            raise InputError(msg)
    dtype = np.uint16 if len(values) > 255 else np.uint8
    lut = np.zeros(max([*values, top, 0]) + 1, dtype=dtype)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    nx, ny, nz = labels.shape
    filled = np.asarray(labels.reshape(-1, nz).any(axis=0))  # slices holding a label; others stay zeros
    frames = np.zeros((nz, ny, nx), dtype=dtype)
    for j, k in enumerate(instance_slices(grid)):
        if filled[k]:
            frame = grid.frame(labels, k)
            frames[j] = frame if consecutive else lut[frame]
    return grid, frames


def build_dicom_seg(case: CaseExport) -> Any:
    """Build (without writing) the DICOM SEG of a case.

    Args:
        case: A case whose source is a DICOM series.

    Returns:
        A ``highdicom.seg.Segmentation``.

    Raises:
        MedsegError: highdicom is not installed.
        InputError: See :func:`segment_frames`.
        GeometryError: See :func:`segment_frames`.
    """
    hd = optional_import("highdicom", "DICOM SEG export", "dicom")
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    grid, frames = segment_frames(case)
    algo = case.algorithm
    identification = hd.AlgorithmIdentificationSequence(
        name=f"medseg {algo.name}"[:_LO],
        family=codes.cid7162.ArtificialIntelligence,
        version=(algo.version or "unknown")[:_LO],
        source="medseg",
        parameters={"bundle_sha256": algo.sha256 or "unknown", "pipeline": algo.pipeline or "unknown"},
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=entry.name[:_LO],
            segmented_property_category=_coded(hd, entry.category),
            segmented_property_type=_coded(hd, entry.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_id=entry.name[:_LO],
            tracking_uid=generate_uid(entropy_srcs=[case.case_id, entry.name, "tracking"]),
            display_color=hd.color.CIELabColor.from_rgb(*entry.color),
        )
        for number, entry in enumerate(case.label_table, start=1)
    ]
    source = grid.headers[0]
    content = hashlib.sha256(frames.tobytes()).hexdigest()
    seeds = [str(source.get("SeriesInstanceUID", "")), algo.sha256, content]
    number = int(source.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
    with warnings.catch_warnings():  # real files hold single-component patient names
        warnings.filterwarnings("ignore", message=".*intended person name.*")
        seg = hd.seg.Segmentation(
            source_images=list(grid.headers),
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(entropy_srcs=[*seeds, "series"]),
            series_number=min(number, 2**31 - 1),
            sop_instance_uid=generate_uid(entropy_srcs=[*seeds, "instance"]),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name=f"medseg {algo.name}"[:_LO],
            software_versions=algo.version or "unknown",
            device_serial_number=(algo.sha256 or "0")[:16],
            content_description=f"medseg {algo.pipeline or algo.name}"[:_LO],
            content_label="MEDSEG",
            omit_empty_frames=True,
        )
    seg.SeriesDescription = f"medseg segmentation ({algo.name})"[:_LO]
    return seg


def write_dicom_seg(case: CaseExport, out_dir: Path, name: str = SEG_FILE) -> list[Path]:
    """Write the DICOM SEG of a case into ``out_dir`` (atomically).

    Args:
        case: A case whose source is a DICOM series.
        out_dir: The case's output folder.
        name: The file name.

    Returns:
        The written path, in a list.
    """
    seg = build_dicom_seg(case)
    dest = Path(out_dir) / name
    with atomic_path(dest) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return [dest]
