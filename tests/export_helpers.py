"""Helpers of the export tests: independent geometry checks and external tools (skipped when absent)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    """A rotation about z then x (3x3)."""
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def oblique_affine(flip: bool = True) -> np.ndarray:
    """An oblique RAS+ affine with anisotropic spacing; ``flip`` makes it left-handed (slices reversed)."""
    aff = np.eye(4)
    aff[:3, :3] = rotation(20.0, 12.0) @ np.diag([0.9, 1.1, 2.5])
    if flip:
        aff[:3, 0] *= -1
    aff[:3, 3] = [12.0, -30.0, 55.0]
    return aff


def expected_frame(ds: pydicom.Dataset, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The label values under each pixel of a source instance, from its own IPP/IOP (no medseg code).

    Pixel ``(row m, column n)`` of an instance sits at ``IPP + n * dc * row_cos + m * dr * col_cos``
    (LPS); that point is looked up in ``labels`` through the inverse of its RAS affine.
    """
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    m, n = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
    lps = ipp[:, None, None] + iop[:3, None, None] * (n * dc) + iop[3:, None, None] * (m * dr)
    ras = LPS @ lps.reshape(3, -1)
    ijk = np.linalg.inv(affine) @ np.vstack([ras, np.ones(ras.shape[1])])
    idx = np.round(ijk[:3]).astype(int)
    assert np.allclose(ijk[:3], idx, atol=1e-3), "source pixels are not on the label map's voxels"
    assert all((idx[d] >= 0).all() and (idx[d] < labels.shape[d]).all() for d in range(3))
    return labels[tuple(idx)].reshape(int(ds.Rows), int(ds.Columns))


def onto_grid(array: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray, ref_shape: tuple[int, ...]):
    """Put a volume holding a subset of a reference grid's voxels onto that grid (zeros elsewhere)."""
    index_map = np.linalg.inv(ref_affine) @ affine
    idx = np.indices(array.shape).reshape(3, -1)
    ref = index_map[:3, :3] @ idx + index_map[:3, 3:4]
    ref_idx = np.round(ref).astype(int)
    assert np.allclose(ref, ref_idx, atol=1e-2), f"grids are not the same lattice:\n{index_map}"
    out = np.zeros(ref_shape, dtype=array.dtype)
    inside = np.all((ref_idx >= 0) & (ref_idx < np.asarray(ref_shape)[:, None]), axis=0)
    assert not array.reshape(-1)[~inside].any(), "labelled voxels outside the reference grid"
    out[tuple(ref_idx[:, inside])] = array.reshape(-1)[inside]
    return out


def tool(name: str, why: str) -> str:
    """The path of an external program, or skip the test saying how to get it."""
    beside = Path(sys.executable).parent / name  # console scripts of this virtual environment (dcmqi)
    path = shutil.which(name) or (str(beside) if beside.is_file() else None)
    if path is None:
        pytest.skip(f"needs {name} ({why}); absent on this machine")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy (Debian's dicom3tools) reports for a DICOM file."""
    exe = tool("dciodvfy", "apt-get install dicom3tools")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


def dcmqi_labels(seg: Path, out: Path) -> list[Path]:
    """Convert a DICOM SEG back to images with dcmqi's segimage2itkimage (one file per segment)."""
    exe = tool("segimage2itkimage", "pip install dcmqi")
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            exe,
            "--inputDICOM",
            str(seg),
            "--outputDirectory",
            str(out),
            "--outputType",
            "nrrd",
            "--prefix",
            "seg",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(p for p in out.iterdir() if p.suffix == ".nrrd")
