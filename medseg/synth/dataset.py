"""Generate a small synthetic data set: NIfTI images and labels, DICOM series, and a data spec.

Layout under ``out_dir``::

    spec.yaml                              # validated by medseg.config.spec.load_spec
    nifti/imagesTr/case_000_0000.nii.gz    # image (int16 HU for CT, float32 for MR)
    nifti/labelsTr/case_000.nii.gz         # label map (uint8)
    dicom/case_000/IM0001.dcm ...          # the same image as a DICOM series (when dicom=True)

Every file is a deterministic function of ``seed`` (UIDs included). The DICOM series describes
the same voxels at the same world positions as the NIfTI image; when a case's affine is
left-handed a DICOM reader returns its slices in reverse order (see
:func:`medseg.synth.dicom_writer.dicom_reader_view`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml
from pydicom.uid import generate_uid

from medseg.config.spec import spec_from_mapping
from medseg.synth.dicom_writer import write_dicom_series, write_nifti
from medseg.synth.phantom import LABELS, make_phantom

MARKER = ".medseg-synth"
"""File that marks a folder as written by :func:`generate_dataset` (so it may be regenerated)."""


def case_id(index: int) -> str:
    """The id of case ``index``, e.g. ``case_003``.

    Args:
        index: Zero-based case number.

    Returns:
        The case id.
    """
    return f"case_{index:03d}"


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _prepare(out_dir: Path) -> None:
    """Make ``out_dir`` ready: create it, or clear a previous synthetic data set in it."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).is_file():
            msg = (
                f"out_dir must be empty or hold a data set written by generate_dataset, "
                f"got a non-empty folder without {MARKER}: {out_dir}"
            )
            raise ValueError(msg)
        for sub in ("nifti", "dicom"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / "spec.yaml").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("synthetic data set written by medseg.synth.generate_dataset\n")


# Foreground statistics of the phantoms (body about 40 HU / 300 units, noise about 25 / 40), as
# `medseg plan` would find them; CT is clipped to the soft-tissue range.
_INTENSITY: dict[str, dict[str, object]] = {
    "CT": {"scheme": "ct", "clip": [-160.0, 240.0], "mean": 40.0, "std": 60.0},
    "MR": {"scheme": "zscore", "nonzero": False},
}


def dataset_spec(name: str, modality: str) -> dict[str, object]:
    """The data spec mapping of a synthetic data set (the content of its ``spec.yaml``).

    Args:
        name: Data set name.
        modality: ``"CT"`` or ``"MR"``.

    Returns:
        A mapping that :func:`medseg.config.spec.spec_from_mapping` accepts.
    """
    return {
        "name": name,
        "description": f"Synthetic {modality} phantoms (medseg.synth): organ, lesion, vessel.",
        "data_root": "nifti",
        "channels": [{"name": modality.lower(), "modality": modality, "intensity": _INTENSITY[modality]}],
        "labels": dict(LABELS),
        "case_patterns": {"images": ["imagesTr/{case}_0000.nii.gz"], "label": "labelsTr/{case}.nii.gz"},
    }


def generate_dataset(
    out_dir: Path,
    cases: int = 8,
    *,
    shape: tuple[int, int, int] = (64, 64, 32),
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
    seed: int = 0,
    modality: str = "CT",
    dicom: bool = True,
) -> Path:
    """Write ``cases`` synthetic phantoms as NIfTI (and DICOM) with a data spec.

    Odd-numbered cases get DICOM InstanceNumbers that do not follow slice position. Each case is
    its own patient (``Phantom^Case003``, ``SYNTH003``) with its own study.

    Args:
        out_dir: Destination folder; must be empty, absent, or a previous synthetic data set
            (which is replaced).
        cases: Number of cases (>= 1).
        shape: Grid shape of every case.
        spacing: Voxel size in mm.
        seed: Seed of the whole data set.
        modality: ``"CT"`` or ``"MR"``.
        dicom: Also write each image as a DICOM series under ``dicom/``.

    Returns:
        The path of ``spec.yaml``.

    Raises:
        ValueError: If ``cases`` < 1, the modality is unknown, or ``out_dir`` holds other files.

    Examples:
        >>> import tempfile
        >>> from medseg.config.spec import load_spec
        >>> spec = generate_dataset(Path(tempfile.mkdtemp()) / "ds", 2, shape=(16, 16, 4), dicom=False)
        >>> [c.id for c in load_spec(spec).resolve_cases(require_labels=True)]
        ['case_000', 'case_001']
    """
    if cases < 1:
        msg = f"cases must be >= 1, got {cases}"
        raise ValueError(msg)
    mod = str(getattr(modality, "value", modality)).upper()
    if mod not in ("CT", "MR"):
        msg = f"modality must be one of ['CT', 'MR'], got {modality!r}"
        raise ValueError(msg)
    out_dir = Path(out_dir)
    _prepare(out_dir)
    nifti = out_dir / "nifti"
    for index in range(cases):
        cid = case_id(index)
        case_seed = _case_seed(seed, index)
        image, label, affine = make_phantom(shape=shape, spacing=spacing, seed=case_seed, modality=mod)
        image_dtype = np.int16 if mod == "CT" else np.float32
        write_nifti(image, affine, nifti / "imagesTr" / f"{cid}_0000.nii.gz", dtype=image_dtype)
        write_nifti(label, affine, nifti / "labelsTr" / f"{cid}.nii.gz", dtype=np.uint8)
        if dicom:
            entropy = ["medseg.synth", str(seed), cid, mod]
            write_dicom_series(
                image,
                affine,
                out_dir / "dicom" / cid,
                modality=mod,
                patient_name=f"Phantom^Case{index:03d}",
                patient_id=f"SYNTH{index:03d}",
                study_uid=generate_uid(entropy_srcs=[*entropy, "study"]),
                series_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
                series_description=f"synthetic {mod} phantom {cid}",
                shuffle_instance_numbers=index % 2 == 1,
                seed=case_seed,
            )
    spec_path = out_dir / "spec.yaml"
    mapping = dataset_spec(f"synthetic-{mod.lower()}", mod)
    spec_from_mapping(mapping, source=str(spec_path))  # fail here, not in the reader
    text = yaml.safe_dump(mapping, sort_keys=False)
    fd, tmp = tempfile.mkstemp(prefix=".spec.", suffix=".yaml.tmp", dir=out_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, spec_path)
    return spec_path
