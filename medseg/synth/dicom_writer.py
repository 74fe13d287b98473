"""Write volumes as real DICOM series (CT or MR Image Storage) and as NIfTI, with exact geometry.

The geometry follows the conventions of :mod:`medseg.io`: an array is indexed ``(i, j, k)``,
and a 4x4 affine in RAS+ millimetres maps ``(i, j, k, 1)`` to world. In DICOM (LPS world,
``affine_lps = diag(-1, -1, 1, 1) @ affine_ras``):

* ``i`` runs along a row: the first ImageOrientationPatient cosine, spacing ``PixelSpacing[1]``;
* ``j`` runs down a column: the second cosine, spacing ``PixelSpacing[0]``;
* slice ``k`` holds ``array[:, :, k].T`` (rows x columns) and its ImagePositionPatient is the
  LPS world position of voxel ``(0, 0, k)``.

A reader orders slices by their position along the normal ``cross(row, col)``. When the
affine is left-handed (``det < 0``, e.g. one flipped axis) the slices of the written series
therefore come back in the reverse order; :func:`dicom_reader_view` says what a reader returns.

Examples:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> vol = np.zeros((4, 3, 2), dtype=np.int16)
    >>> paths = write_dicom_series(vol, np.diag([0.5, 0.5, 2.0, 1.0]), out / "series")
    >>> [p.name for p in paths]
    ['IM0001.dcm', 'IM0002.dcm']
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import DTypeLike
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
_ORTHO_TOL = 1e-6
_ALL_PAIRS = ((0, 1), (0, 2), (1, 2))
_STUDY_DATE = "20250101"
_STUDY_TIME = "120000"


def _modality_name(modality: str) -> str:
    name = str(getattr(modality, "value", modality)).upper()
    if name not in _SOP_CLASSES:
        msg = f"modality must be one of {sorted(_SOP_CLASSES)}, got {modality!r}"
        raise ValueError(msg)
    return name


def _check_affine(affine: np.ndarray, *, orthogonal: tuple[tuple[int, int], ...] = ()) -> np.ndarray:
    """Validate a 4x4 affine (and that the given pairs of columns are orthogonal); return float64."""
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        msg = f"affine must have shape (4, 4), got {aff.shape}"
        raise ValueError(msg)
    if not np.all(np.isfinite(aff)) or not np.allclose(aff[3], [0.0, 0.0, 0.0, 1.0]):
        msg = f"affine must be finite with last row [0, 0, 0, 1], got\n{aff}"
        raise ValueError(msg)
    norms = np.linalg.norm(aff[:3, :3], axis=0)
    if np.any(norms <= 0):
        msg = f"affine columns must be non-zero, got column norms {norms}"
        raise ValueError(msg)
    unit = aff[:3, :3] / norms
    worst = max((abs(float(unit[:, a] @ unit[:, b])) for a, b in orthogonal), default=0.0)
    if worst > _ORTHO_TOL:
        msg = f"affine columns must be orthogonal, got largest cosine {worst:.3g} between columns of\n{aff}"
        raise ValueError(msg)
    return aff


def dicom_reader_view(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a position-sorting DICOM reader returns for a series written from ``(array, affine)``.

    The row and column directions are fixed by the first two affine columns; the slices are
    ordered along ``cross(row, col)``. For a right-handed affine this is the input itself; for a
    left-handed one (``det(affine[:3, :3]) < 0``) the slice axis is reversed. Both describe the
    same voxels at the same world positions.

    Args:
        array: The volume, indexed ``(i, j, k)``.
        affine: Its 4x4 RAS+ affine.

    Returns:
        ``(array, affine)`` as read back: unchanged, or with ``k`` reversed and the affine's
        origin moved to the last slice and its third column negated.

    Examples:
        >>> vol = np.arange(8).reshape(2, 2, 2)
        >>> arr, aff = dicom_reader_view(vol, np.diag([-1.0, 1.0, 1.0, 1.0]))
        >>> arr[0, 0].tolist(), aff[:3, 2].tolist(), aff[:3, 3].tolist()
        ([1, 0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0])
    """
    aff = np.asarray(affine, dtype=np.float64)
    if np.linalg.det(aff[:3, :3]) > 0:
        return array, aff.copy()
    n = array.shape[2]
    flip = np.eye(4)
    flip[2, 2] = -1.0
    flip[2, 3] = n - 1
    return array[:, :, ::-1], aff @ flip


def _stored_values(array: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    """Map real-world values to stored integers; pick int16 or uint16."""
    stored = np.rint((array.astype(np.float64) - intercept) / slope)
    lo, hi = float(stored.min()), float(stored.max())
    if lo >= -32768 and hi <= 32767:
        return stored.astype("<i2"), 1
    if lo >= 0 and hi <= 65535:
        return stored.astype("<u2"), 0
    msg = (
        "stored values (value - intercept) / slope must fit int16 or uint16, "
        f"got range [{lo:.0f}, {hi:.0f}] with slope {slope} and intercept {intercept}"
    )
    raise ValueError(msg)


def _ds(values: np.ndarray | list[float]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in np.ravel(values)]


def _instance_numbers(n: int, shuffle: bool, seed: int) -> np.ndarray:
    """1-based instance numbers per slice; shuffled ones never follow the position order."""
    numbers = np.arange(1, n + 1)
    if not shuffle or n < 2:
        return numbers
    if n == 2:
        return numbers[::-1].copy()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(numbers)
    diffs = np.diff(perm)
    if np.all(diffs > 0) or np.all(diffs < 0):
        perm[[0, 1]] = perm[[1, 0]]
    return perm


def write_dicom_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    modality: str = "CT",
    patient_name: str = "Synthetic^Phantom",
    patient_id: str = "SYNTH0001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_description: str = "medseg synthetic",
    series_number: int = 1,
    rescale_slope: float = 1.0,
    rescale_intercept: float | None = None,
    shuffle_instance_numbers: bool = False,
    seed: int = 0,
    file_names: str = "IM{:04d}.dcm",
    slice_positions: np.ndarray | None = None,
) -> list[Path]:
    """Write a 3D volume as a single-frame DICOM series, one file per slice.

    Stored values are ``round((value - intercept) / slope)`` as int16 (uint16 when only that
    fits), so integer-valued volumes with the default slope round-trip exactly.

    Args:
        array: The volume ``(X, Y, Z)`` in real-world units (HU for CT).
        affine: 4x4 RAS+ affine with orthogonal columns (any rotation, flips, slice direction).
        out_dir: Folder for the files (created if missing).
        modality: ``"CT"`` (CT Image Storage) or ``"MR"`` (MR Image Storage).
        patient_name: PatientName, ``Family^Given``.
        patient_id: PatientID.
        study_uid: StudyInstanceUID; a new one when omitted.
        series_uid: SeriesInstanceUID; a new one when omitted. SOP instance UIDs are derived
            from it, so a given series UID makes the whole series reproducible.
        frame_of_reference_uid: FrameOfReferenceUID; derived from the study UID when omitted.
        series_description: SeriesDescription.
        series_number: SeriesNumber.
        rescale_slope: RescaleSlope (must be > 0).
        rescale_intercept: RescaleIntercept; defaults to -1024 for CT and 0 for MR.
        shuffle_instance_numbers: Give InstanceNumbers (and file names) in an order that does
            not follow the slice positions, to check that readers sort by position.
        seed: Seed of the shuffle.
        file_names: Format of the file names, given the InstanceNumber.
        slice_positions: Optional ``(Z, 3)`` LPS ImagePositionPatient per slice, replacing the
            ones the affine implies (to write uneven spacing, gantry tilt or missing slices on
            purpose). Then only the first two affine columns must be orthogonal; the third
            gives SliceThickness.

    Returns:
        The written files, in slice order ``k = 0 .. Z-1``.

    Raises:
        ValueError: If the array is not 3D and finite, the affine is not a valid orthogonal
            affine, the modality is unknown, or the values do not fit 16 bits.
    """
    mod = _modality_name(modality)
    arr = np.asarray(array)
    if arr.ndim != 3 or min(arr.shape) < 1:
        msg = f"array must be a non-empty 3D volume, got shape {arr.shape}"
        raise ValueError(msg)
    if not np.all(np.isfinite(arr)):
        msg = "array must hold finite values only, got NaN or inf"
        raise ValueError(msg)
    if not rescale_slope > 0:
        msg = f"rescale_slope must be > 0, got {rescale_slope}"
        raise ValueError(msg)
    intercept = (-1024.0 if mod == "CT" else 0.0) if rescale_intercept is None else float(rescale_intercept)
    pairs = _ALL_PAIRS if slice_positions is None else _ALL_PAIRS[:1]
    aff_lps = RAS_TO_LPS @ _check_affine(affine, orthogonal=pairs)
    nx, ny, nz = arr.shape
    spacing = np.linalg.norm(aff_lps[:3, :3], axis=0)
    row, col = aff_lps[:3, 0] / spacing[0], aff_lps[:3, 1] / spacing[1]
    normal = np.cross(row, col)
    if slice_positions is None:
        positions = aff_lps[:3, 3] + np.outer(np.arange(nz), aff_lps[:3, 2])
    else:
        positions = np.asarray(slice_positions, dtype=np.float64)
        if positions.shape != (nz, 3) or not np.all(np.isfinite(positions)):
            msg = f"slice_positions must be finite with shape ({nz}, 3), got shape {positions.shape}"
            raise ValueError(msg)
    stored, pixel_rep = _stored_values(arr, rescale_slope, intercept)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    template = _series_template(mod, arr)
    series_values = {
        "PatientName": patient_name,
        "PatientID": patient_id,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": frame_of_reference_uid
        or generate_uid(entropy_srcs=[study_uid, "frame-of-reference"]),
        "SeriesDescription": series_description,
        "SeriesNumber": series_number,
        "ImageOrientationPatient": _ds(np.concatenate([row, col])),
        "PixelSpacing": _ds([spacing[1], spacing[0]]),
        "SliceThickness": format_number_as_ds(float(spacing[2])),
        "RescaleSlope": format_number_as_ds(float(rescale_slope)),
        "RescaleIntercept": format_number_as_ds(intercept),
        "Rows": ny,
        "Columns": nx,
        "PixelRepresentation": pixel_rep,
    }
    for keyword, value in series_values.items():
        setattr(template, keyword, value)
    gaps = np.abs(np.diff(positions @ normal))
    if nz > 1 and np.allclose(gaps, gaps[0], rtol=1e-6, atol=1e-6):
        template.SpacingBetweenSlices = format_number_as_ds(float(gaps[0]))
    numbers = _instance_numbers(nz, shuffle_instance_numbers, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    for k in range(nz):
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_CLASSES[mod]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update(copy.deepcopy(template))
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = _ds(positions[k])
        ds.SliceLocation = format_number_as_ds(float(positions[k] @ normal))
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        dest = out_dir / file_names.format(int(numbers[k]))
        _atomic_save(dest, functools.partial(_save_as, ds))
        paths.append(dest)
    return paths


def _series_template(mod: str, arr: np.ndarray) -> Dataset:
    """The tags shared by every slice that do not depend on the caller's arguments."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if mod == "CT" else "OTHER"]
    ds.SOPClassUID = _SOP_CLASSES[mod]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = _STUDY_TIME
    ds.AccessionNumber = ""
    ds.Modality = mod
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = "synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "medseg synthetic study"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "ABDOMEN"
    ds.StudyID = "1"
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    if mod == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.RescaleType = "HU"
        window = (40.0, 400.0)
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "1.5"
        lo, hi = np.percentile(arr, [1.0, 99.0])
        window = (float(lo + hi) / 2.0, max(float(hi - lo), 1.0))
    ds.WindowCenter = format_number_as_ds(window[0])
    ds.WindowWidth = format_number_as_ds(window[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    return ds


def _save_as(ds: FileDataset, path: str) -> None:
    ds.save_as(path, enforce_file_format=True)


def _atomic_save(dest: Path, save: Callable[[str], object]) -> None:
    """Save through ``save(tmp_name)`` to a hidden temporary file beside ``dest``, then rename it."""
    suffix = ".nii.gz" if dest.name.endswith(".nii.gz") else dest.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent)
    os.close(fd)
    try:
        save(tmp_name)
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: DTypeLike | None = None) -> Path:
    """Write a volume as NIfTI-1 with sform and qform (code 1, scanner) both set to ``affine``.

    Args:
        array: The volume ``(X, Y, Z)`` (or with trailing channel axes).
        affine: 4x4 RAS+ affine.
        path: Destination, ``.nii`` or ``.nii.gz`` (parent folders are created).
        dtype: On-disk data type; the array's own when omitted.

    Returns:
        The written path.

    Raises:
        ValueError: If the affine is not a finite 4x4 affine.

    Examples:
        >>> import tempfile
        >>> p = write_nifti(np.zeros((2, 2, 2)), np.eye(4), Path(tempfile.mkdtemp()) / "a.nii.gz")
        >>> int(nib.load(p).header["sform_code"])
        1
    """
    aff = _check_affine(affine)
    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units(xyz="mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(path, lambda tmp: nib.save(img, tmp))
    return path
