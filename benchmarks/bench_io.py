"""Benchmark medseg's image loading against MONAI's stock readers and SimpleITK.

A synthetic int16 CT (body ellipse, smooth organs, bone, lungs, air outside, Gaussian noise) is
written once as a gzip-compressed NIfTI (level 6) and as a single-frame DICOM series, then loaded
with:

* ``ours``: :func:`medseg.io.load_image` (keeps the file's dtype);
* ``monai``: ``monai.transforms.LoadImage(image_only=True)`` with ``NibabelReader`` or
  ``PydicomReader`` (MONAI's defaults, float32 output);
* ``sitk``: ``SimpleITK.ReadImage`` / ``ImageSeriesReader`` plus a NumPy view of the voxels.

Each loader runs once untimed (warm-up: imports, reader construction and the page cache), then
``--repeats`` timed rounds, the loaders taking turns within a round; the median is reported.
Every loader's voxels are compared with the volume that was written and its affine with the one
written (to ``1e-4``). MONAI's ``PydicomReader`` may put the grid the other way round; then its
voxels are compared in world coordinates and ``monai_dicom_same_geometry`` says so.

One JSON line is printed; the exit status is 1 when a correctness check fails.

Examples:
    Full size (512 x 512 x 300), files kept for later runs::

        python benchmarks/bench_io.py --workdir /tmp/bench_io --repeats 3

    Smoke run::

        python benchmarks/bench_io.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from machine import machine_facts  # benchmarks/ is on sys.path when a benchmark runs as a script

FULL_SHAPE = (512, 512, 300)
QUICK_SHAPE = (256, 256, 60)
SPACING = (0.78125, 0.78125, 1.25)
GZIP_LEVEL = 6
AFFINE_TOL = 1e-4
NIFTI_TARGET = 0.5
DICOM_TARGET = 0.15
SEED = 1234
SERIES_UID = "1.2.826.0.1.3680043.8.498.1"

Loaded = tuple[np.ndarray, np.ndarray, Any]  # array (i, j, k), RAS affine, keep-alive


def ct_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """A typical axial CT affine in RAS+: ``i`` to patient left, ``j`` to posterior, ``k`` up.

    Args:
        shape: Volume shape ``(X, Y, Z)``, used to centre the field of view.

    Returns:
        The 4x4 affine (right-handed, so a DICOM reader keeps the slice order).
    """
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [SPACING[0] * (shape[0] - 1) / 2, SPACING[1] * (shape[1] - 1) / 2, -300.0]
    return affine


def _add_ellipsoid(
    vol: np.ndarray, centre: tuple[float, float, float], radii: tuple[float, float, float], value: float
) -> None:
    """Blend ``value`` into ``vol`` inside an ellipsoid with a soft (about two voxel) edge."""
    lo = [max(0, int(c - r - 3)) for c, r in zip(centre, radii)]
    hi = [min(n, int(c + r + 4)) for c, r, n in zip(centre, radii, vol.shape)]
    if any(h <= low for low, h in zip(lo, hi)):
        return
    axes = [
        ((np.arange(low, h, dtype=np.float32) - c) / r) ** 2 for low, h, c, r in zip(lo, hi, centre, radii)
    ]
    r2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    # Distance to the surface in voxels (approximately), squashed into a soft 0..1 weight.
    edge = (1.0 - np.sqrt(r2)) * np.float32(min(radii))
    weight = 1.0 / (1.0 + np.exp(-np.clip(edge, -20, 20) * np.float32(1.5)))
    box = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    box += weight * (np.float32(value) - box)


def make_ct(shape: tuple[int, int, int], seed: int = SEED) -> np.ndarray:
    """A CT-like int16 volume in HU: air, a body ellipse with a fat rim, organs, spine, lungs, noise.

    Args:
        shape: ``(X, Y, Z)``.
        seed: Seed of the noise and of the organ placement.

    Returns:
        The volume, indexed ``(i, j, k)``, C-contiguous int16.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) / (nx / 2)
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) / (ny / 2)
    z = np.linspace(0.0, 1.0, nz, dtype=np.float32)
    # Body outline: radii that change slowly along z.
    inv_a2 = (1.0 / (0.80 + 0.06 * np.sin(2 * np.pi * z)) ** 2).astype(np.float32)
    inv_b2 = (1.0 / (0.58 + 0.04 * np.cos(3 * np.pi * z)) ** 2).astype(np.float32)
    r2 = (x**2)[:, None, None] * inv_a2[None, None, :] + (y**2)[None, :, None] * inv_b2[None, None, :]
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[r2 < 1.0] = -100.0  # subcutaneous fat
    vol[r2 < 0.82] = 40.0  # soft tissue
    del r2
    sx, sy = nx / 2, ny / 2
    # Lungs in the upper third, liver, kidneys, spleen, spine, aorta, a few random lesions.
    lungs_z = nz * 0.82
    for side in (-1, 1):
        _add_ellipsoid(
            vol, (sx + side * 0.35 * sx, sy * 0.95, lungs_z), (0.28 * sx, 0.36 * sy, 0.2 * nz), -850.0
        )
        _add_ellipsoid(
            vol, (sx + side * 0.33 * sx, sy * 1.3, nz * 0.4), (0.1 * sx, 0.13 * sy, 0.08 * nz), 30.0
        )
    _add_ellipsoid(vol, (sx * 0.6, sy * 0.85, nz * 0.58), (0.38 * sx, 0.33 * sy, 0.14 * nz), 60.0)
    _add_ellipsoid(vol, (sx * 1.45, sy * 1.05, nz * 0.6), (0.12 * sx, 0.2 * sy, 0.07 * nz), 50.0)
    _add_ellipsoid(vol, (sx, sy * 1.42, nz / 2), (0.09 * sx, 0.09 * sy, 0.7 * nz), 700.0)
    _add_ellipsoid(vol, (sx * 0.97, sy * 1.15, nz / 2), (0.05 * sx, 0.05 * sy, 0.7 * nz), 180.0)
    for _ in range(6):
        centre = (sx * rng.uniform(0.6, 1.4), sy * rng.uniform(0.7, 1.3), nz * rng.uniform(0.2, 0.8))
        radius = float(rng.uniform(0.03, 0.08))
        _add_ellipsoid(vol, centre, (radius * sx, radius * sy, radius * nz * 2), float(rng.uniform(-20, 120)))
    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(20.0)
    np.clip(vol, -1024, 3071, out=vol)
    return np.rint(vol).astype(np.int16)


@contextlib.contextmanager
def _gzip_level(level: int) -> Iterator[None]:
    """Make nibabel write ``.gz`` files at ``level`` (its default is 1)."""
    opener = nib.openers.Opener
    old = opener.default_compresslevel
    opener.default_compresslevel = level
    try:
        yield
    finally:
        opener.default_compresslevel = old


def prepare(workdir: Path, volume: np.ndarray, affine: np.ndarray) -> tuple[Path, Path]:
    """Write the NIfTI file and the DICOM series into ``workdir``, unless a matching set is there.

    Args:
        workdir: Folder for the files.
        volume: The volume to write.
        affine: Its RAS+ affine.

    Returns:
        The NIfTI path and the DICOM folder.
    """
    from medseg.synth.dicom_writer import write_dicom_series, write_nifti

    stamp = {
        "shape": list(volume.shape),
        "sha1": hashlib.sha1(np.ascontiguousarray(volume).data).hexdigest(),
        "gzip_level": GZIP_LEVEL,
        "affine": affine.round(6).tolist(),
    }
    stamp_path = workdir / "params.json"
    nifti = workdir / "ct.nii.gz"
    dicom = workdir / "ct_dicom"
    if (
        stamp_path.exists()
        and json.loads(stamp_path.read_text()) == stamp
        and nifti.exists()
        and dicom.is_dir()
    ):
        return nifti, dicom
    workdir.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    with _gzip_level(GZIP_LEVEL):
        write_nifti(volume, affine, nifti)
    if dicom.exists():
        for f in dicom.iterdir():
            f.unlink()
    write_dicom_series(volume, affine, dicom, modality="CT", rescale_intercept=-1024.0, series_uid=SERIES_UID)
    stamp_path.write_text(json.dumps(stamp))
    return nifti, dicom


def load_ours(path: Path) -> Loaded:
    """medseg's loader: ``(array indexed (i, j, k), RAS affine, None)``."""
    from medseg.io import load_image

    img = load_image(path)
    return img.as_tensor().numpy()[0], np.asarray(img.affine, dtype=np.float64), None


def make_monai(reader: str) -> Callable[[Path], Loaded]:
    """MONAI's stock ``LoadImage`` with one of its readers, built once (outside the timing)."""
    from monai.transforms import LoadImage

    loader = LoadImage(image_only=True, reader=reader)

    def load(path: Path) -> Loaded:
        img = loader(str(path))
        return img.as_tensor().numpy(), np.asarray(img.affine, dtype=np.float64), None

    return load


def _from_sitk(image: Any) -> Loaded:
    import SimpleITK as sitk

    from medseg.io.readers import sitk_affine

    view = sitk.GetArrayViewFromImage(image)  # (k, j, i), zero-copy: valid while `image` lives
    return view.transpose(2, 1, 0), sitk_affine(image), image


def load_sitk_file(path: Path) -> Loaded:
    """SimpleITK ``ReadImage`` and a zero-copy NumPy view, in ``(i, j, k)`` order."""
    import SimpleITK as sitk

    return _from_sitk(sitk.ReadImage(str(path)))


def load_sitk_series(folder: Path) -> Loaded:
    """SimpleITK ``ImageSeriesReader`` (GDCM finds and sorts the files) and a zero-copy NumPy view."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return _from_sitk(reader.Execute())


def time_loaders(
    loaders: dict[str, tuple[Callable[[Path], Loaded], Path]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, Loaded]]:
    """Run each loader once untimed (keeping its result), then time ``repeats`` rounds.

    Args:
        loaders: Name to ``(load function, path)``.
        repeats: Timed rounds; the loaders take turns within each round, so that a busy spell of
            the machine hits them alike.

    Returns:
        The wall-clock seconds of each round per loader, and each loader's warm-up result.
    """
    results = {name: fn(path) for name, (fn, path) in loaders.items()}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, (fn, path) in loaders.items():
            gc.collect()
            start = time.perf_counter()
            out = fn(path)
            times[name].append(time.perf_counter() - start)
            del out
    return times, results


def on_reference_grid(
    array: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray, ref_shape: tuple[int, ...]
) -> np.ndarray | None:
    """Re-index ``array`` onto the reference grid when both grids hold the same voxel centres.

    The grids match when ``inv(ref_affine) @ affine`` is a signed permutation whose offsets map
    the array's extent onto the reference's (axes swapped or reversed, nothing resampled).

    Args:
        array: Voxels on the grid of ``affine``.
        affine: Their RAS affine.
        ref_affine: The reference affine.
        ref_shape: The reference shape.

    Returns:
        The voxels indexed like the reference, or ``None`` if the grids differ.
    """
    if array.ndim != 3 or len(ref_shape) != 3:
        return None
    m = np.linalg.solve(ref_affine, affine)  # other index -> reference index
    rot = np.round(m[:3, :3])
    if not np.allclose(m[:3, :3], rot, atol=AFFINE_TOL) or not np.allclose(np.abs(rot).sum(axis=0), 1):
        return None
    perm = [int(np.flatnonzero(rot[a])[0]) for a in range(3)]
    out = array.transpose(perm)
    if out.shape != tuple(ref_shape):
        return None
    for a in range(3):
        sign = rot[a, perm[a]]
        offset = 0.0 if sign > 0 else ref_shape[a] - 1.0
        if abs(m[a, 3] - offset) > AFFINE_TOL * max(1.0, ref_shape[a]):
            return None
        if sign < 0:
            out = np.flip(out, axis=a)
    return out


def check(loaded: Loaded, truth: np.ndarray, truth_affine: np.ndarray) -> dict[str, Any]:
    """Compare a loader's result with the written volume: affine, grid and voxel values.

    Args:
        loaded: The loader's ``(array, affine, keep-alive)``.
        truth: The volume written.
        truth_affine: Its affine.

    Returns:
        ``same_geometry`` (same shape and affine to ``1e-4``), ``same_world`` (voxels on the same
        world positions, perhaps indexed differently), ``values_equal`` (compared on the written
        grid, in the loader's dtype) and the loader's ``dtype``.
    """
    array, affine = loaded[0], loaded[1]
    same_geometry = array.shape == truth.shape and np.allclose(affine, truth_affine, atol=AFFINE_TOL)
    aligned = on_reference_grid(array, affine, truth_affine, truth.shape)
    values_equal = aligned is not None and np.array_equal(aligned, truth.astype(aligned.dtype, copy=False))
    return {
        "same_geometry": bool(same_geometry),
        "same_world": aligned is not None,
        "values_equal": bool(values_equal),
        "dtype": str(array.dtype),
    }


def _ratio(ours: float, theirs: float) -> float:
    return round(ours / theirs, 4) if theirs > 0 else float("nan")


def run(shape: tuple[int, int, int], workdir: Path, repeats: int) -> dict[str, Any]:
    """Write the files (once), time every loader on them and check every result.

    Args:
        shape: Volume shape ``(X, Y, Z)``.
        workdir: Where the files are (or will be) written.
        repeats: Timed rounds per loader.

    Returns:
        The report (times in seconds, ratios ours / MONAI stock, checks).
    """
    import medseg.io  # noqa: F401  (quiets MONAI's notice about the missing GPU codec)

    truth = make_ct(shape)
    affine = ct_affine(shape)
    t0 = time.perf_counter()
    nifti, dicom = prepare(workdir, truth, affine)
    prepare_s = time.perf_counter() - t0

    report: dict[str, Any] = {"shape": list(shape), "repeats": repeats}
    checks: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[float]] = {}
    load_before = os.getloadavg()[0]
    for kind, path, monai_reader, sitk_loader in (
        ("nifti", nifti, "NibabelReader", load_sitk_file),
        ("dicom", dicom, "PydicomReader", load_sitk_series),
    ):
        loaders = {
            "ours": (load_ours, path),
            "monai": (make_monai(monai_reader), path),
            "sitk": (sitk_loader, path),
        }
        times, results = time_loaders(loaders, repeats)
        for name, seconds in times.items():
            report[f"{name}_{kind}_s"] = round(statistics.median(seconds), 4)
            samples[f"{name}_{kind}"] = [round(t, 4) for t in seconds]
        for name, loaded in results.items():
            checks[f"{name}_{kind}"] = check(loaded, truth, affine)
        del results
        gc.collect()
    report["nifti_ratio"] = _ratio(report["ours_nifti_s"], report["monai_nifti_s"])
    report["dicom_ratio"] = _ratio(report["ours_dicom_s"], report["monai_dicom_s"])
    report["nifti_target_met"] = bool(report["nifti_ratio"] <= NIFTI_TARGET)
    report["dicom_target_met"] = bool(report["dicom_ratio"] <= DICOM_TARGET)
    report["arrays_identical"] = all(c["values_equal"] for c in checks.values())
    report["affines_identical"] = all(c["same_geometry"] for c in checks.values())
    report["monai_dicom_same_geometry"] = checks["monai_dicom"]["same_geometry"]
    report["checks"] = checks
    report["samples_s"] = samples
    report["nifti_mb"] = round(nifti.stat().st_size / 2**20, 1)
    report["dicom_files"] = sum(1 for _ in dicom.iterdir())
    report["gzip_level"] = GZIP_LEVEL
    report["prepare_s"] = round(prepare_s, 2)
    report["environment"] = environment(load_before)
    return report


def environment(load_before: float) -> dict[str, Any]:
    """What the numbers depend on: CPUs, machine load, the gzip inflater and library versions."""
    import monai
    import pydicom
    import SimpleITK as sitk
    import torch

    from medseg.io import readers

    return {
        "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "ours_gzip_inflater": readers._inflate_lib.__name__,
        "versions": {
            "numpy": np.__version__,
            "torch": torch.__version__,
            "monai": monai.__version__,
            "nibabel": nib.__version__,
            "pydicom": pydicom.__version__,
            "SimpleITK": sitk.Version_VersionString(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark and print one JSON line.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when omitted).

    Returns:
        0 when every check passes, 1 when a loader's voxels differ from those written or medseg's
        geometry is wrong.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small volume {QUICK_SHAPE} for a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per loader (median reported)")
    parser.add_argument(
        "--workdir", type=Path, help="keep the files here, reuse them later (default: temp dir)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_io_")))
        report = run(shape, workdir, args.repeats)
    print(json.dumps({**report, **machine_facts()}))
    checks = report["checks"]
    ours_geometry = checks["ours_nifti"]["same_geometry"] and checks["ours_dicom"]["same_geometry"]
    ok = report["arrays_identical"] and ours_geometry
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
