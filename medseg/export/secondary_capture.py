"""The overlay montages as DICOM Secondary Capture images, for PACS viewers that cannot show SEG.

One RGB Secondary Capture instance per montage page, in one new series of the source study
(patient and study attributes copied from the source series). The pixels show the case id, the
series description and label names, never patient identifiers.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from medseg.errors import InputError, optional_import
from medseg.export.case import CaseExport
from medseg.export.dicom_grid import read_headers
from medseg.export.overlays import OverlaySettings, montage_pages
from medseg.io.atomic import atomic_path

SC_DIR = "secondary_capture"
SERIES_NUMBER_OFFSET = 2000


def write_secondary_capture(
    case: CaseExport, out_dir: Path, settings: OverlaySettings | None = None
) -> list[Path]:
    """Write the montages of a DICOM case as Secondary Capture files ``secondary_capture/montage-N.dcm``.

    Args:
        case: A case whose source is a DICOM series.
        out_dir: Its output folder.
        settings: How the montages look.

    Returns:
        The written paths.

    Raises:
        InputError: If the source is not a DICOM series.
        MedsegError: If highdicom is not installed.
    """
    hd = optional_import("highdicom", "DICOM Secondary Capture export", "dicom")
    from pydicom.uid import generate_uid

    if not case.is_dicom:
        msg = f"{case.case_id}: Secondary Capture needs a DICOM series as source, got {list(case.inputs)[:1]}"
        raise InputError(msg)
    ref = read_headers(case.dicom_files[:1])[0]
    pages = montage_pages(case, settings)
    digest = hashlib.sha256(b"".join(p.tobytes() for p in pages)).hexdigest()
    seeds = [str(ref.get("SeriesInstanceUID", "")), case.algorithm.sha256, digest]
    series_uid = generate_uid(entropy_srcs=[*seeds, "sc-series"])
    number = min(int(ref.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET, 2**31 - 1)
    folder = Path(out_dir) / SC_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, page in enumerate(pages):
        with warnings.catch_warnings():  # real files hold single-component patient names
            warnings.filterwarnings("ignore", message=".*intended person name.*")
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=ref,
                pixel_array=page,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=series_uid,
                series_number=number,
                sop_instance_uid=generate_uid(entropy_srcs=[*seeds, "sc", str(i)]),
                instance_number=i + 1,
                manufacturer="medseg",
                patient_orientation=("L", "P"),
            )
        sc.PatientOrientation = ""  # a montage of several planes has no single orientation
        sc.SeriesDescription = f"medseg overlays ({case.algorithm.name})"[:64]
        sc.BurnedInAnnotation = "NO"
        sc.Laterality = str(ref.get("Laterality", ""))  # Type 2C: present, empty unless the source says
        dest = folder / f"montage-{i + 1}.dcm"
        with atomic_path(dest) as tmp:
            sc.save_as(tmp, enforce_file_format=True)
        paths.append(dest)
    return paths
