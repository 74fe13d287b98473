"""Behaviour unchanged: run ``medseg predict`` with an old and a new tree on the same inputs and model,
and compare every output file after masking the fields that differ from run to run.

The old code is a git ref checked out with ``git worktree add`` into a temporary folder; each side runs
as ``python -m medseg.cli predict`` with ``PYTHONPATH`` set to its tree (and its own MLflow store). The
inputs are the demo's synthetic phantoms (``medseg synth``, NIfTI and DICOM) and, where
``--data`` (default ``../shared/data``) holds them, real scans: hippocampus MR crops (NIfTI),
the ``mr_study`` DICOM series and ``nrrd_mr``'s NRRD image. The model is a seeded, untrained U-Net
bundle written by the old tree's own code (so both trees can read it), or ``--model``.

Runs compared (each into its own output folder): ``plain`` (every export), ``crf`` (the dense CRF on),
``probabilities`` (kept probabilities) and ``ensemble`` (two members).

Masked before comparing (:data:`VOLATILE_KEYS`, :data:`VOLATILE_DICOM`, :data:`VOLATILE_TEXT`):
timings, run ids, timestamps and dates, the MLflow store, the tree's paths, DICOM UIDs made at
export time and content/instance dates and times, and the fields a tree adds that the other does not
write at all (:data:`ADDED_KEYS`, reported, not compared). NIfTI/NRRD files are compared as arrays
plus affine; gzip files by their decompressed bytes; DICOM by every element but the masked ones
(pixel data included); JSON recursively; other files byte for byte.

Usage::

    python benchmarks/compare_outputs.py --old main --work /tmp/compare [--scans 2] [--runs plain,crf]

Exit status 0 when every output is identical after masking, 1 otherwise (the differences are listed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

VOLATILE_KEYS = frozenset(
    {
        "seconds",
        "timings",
        "run_id",
        "created",
        "created_at",
        "started",
        "finished",
        "timestamp",
        "date",
        "time",
        "tracking_uri",
        "mlflow_run_id",
        "experiment_id",
        "start_seconds",
        "total_s",
    }
)
"""JSON keys whose values change from run to run (masked at any depth)."""

ADDED_KEYS = frozenset({"provenance"})
"""JSON keys the new code writes and the old did not: listed in the report, not compared."""

VOLATILE_DICOM = (
    "ContentDate",
    "ContentTime",
    "SeriesDate",
    "SeriesTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "AcquisitionDateTime",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "MediaStorageSOPInstanceUID",
    "FrameOfReferenceUID",
    "StructureSetDate",
    "StructureSetTime",
    "DimensionOrganizationUID",
    "ContributionDateTime",
)
"""DICOM keywords made at export time (UIDs from the clock, dates, times); masked at any depth,
including in referencing sequences."""

VOLATILE_TEXT = (
    re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?"),
    re.compile(r"\b\d+(\.\d+)?\s?(s|ms|seconds)\b"),
    re.compile(r"\b[0-9a-f]{32}\b"),  # MLflow run ids
    re.compile(r"(\d+\.)+\d{10,}"),  # UIDs with a time part
)
"""Patterns masked in text files (HTML review pages, CSV tables, logs)."""

MEDSEG = [sys.executable, "-c", "from medseg.cli import app; app()"]
"""The ``medseg`` command of whichever tree ``PYTHONPATH`` names."""


def _run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    # never the current folder: `python -c` puts it first on sys.path, ahead of PYTHONPATH's tree
    proc = subprocess.run(
        cmd, env=env, cwd=cwd or tempfile.gettempdir(), capture_output=True, text=True, check=False
    )
    if proc.returncode not in (0, 1):
        msg = f"command must succeed, got exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return proc.stdout


def checkout(ref: str, where: Path, name: str) -> Path:
    """Check out ``ref`` (detached) into ``where/name`` with ``git worktree add``."""
    path = where / name
    _run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT)
    return path


def _env(tree: Path, store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    env["PYTHONHASHSEED"] = "0"
    return env


MAKE_BUNDLE = """
import sys, torch
from medseg.bundle import build_network, save_bundle
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
torch.manual_seed(int(sys.argv[3]))
spec = DatasetSpec.model_validate({"name": "compare", "cases": [],
    "channels": [{"name": "img", "modality": "MR", "intensity": {"scheme": "zscore"}}],
    "labels": {"background": 0, "a": 1, "b": 2}, "target_spacing": [1.5, 1.5, 1.5]})
cfg = PipelineConfig.model_validate({"name": "compare",
    "model": {"name": "unet3d", "params": {"channels": [4, 8], "num_res_units": 0}},
    "train": {"patch_size": [16, 16, 16]},
    "refine": {"crf": {"enabled": sys.argv[2] == "crf"},
               "postprocess": {"choose": False, "labels": {"1": {"keep_largest": True}}}}})
save_bundle(sys.argv[1], cfg, spec, build_network(cfg, spec))
"""


def make_bundle(tree: Path, out: Path, *, seed: int, crf: bool = False) -> Path:
    """A seeded, untrained 2-level U-Net bundle written by ``tree``'s code."""
    env = _env(tree, out.parent / "bundle-mlflow.db")
    _run([sys.executable, "-c", MAKE_BUNDLE, str(out), "crf" if crf else "plain", str(seed)], env=env)
    return out


def make_inputs(tree: Path, where: Path, *, data: Path, scans: int) -> Path:
    """The input folder: synthetic phantoms (NIfTI and DICOM) and, where present, real scans."""
    inputs = where / "inputs"
    synth = where / "synth"
    env = _env(tree, where / "synth-mlflow.db")
    _run(
        [
            sys.executable,
            "-m",
            "medseg.cli",
            "synth",
            str(synth),
            "--cases",
            str(scans),
            "--size",
            "32,28,16",
        ],
        env=env,
    )
    shutil.copytree(synth / "nifti" / "imagesTr", inputs / "phantoms")
    shutil.copytree(synth / "dicom", inputs / "phantom_dicom")
    hippo = sorted((data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:scans]
    for path in hippo:
        (inputs / "hippocampus").mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, inputs / "hippocampus" / path.name)
    crop = data / "mr_study" / "13_HCropVolume"
    if crop.is_dir():
        shutil.copytree(crop, inputs / "mr_study")
    nrrd = data / "nrrd_mr" / "brain1_image.nrrd"
    if nrrd.is_file():
        (inputs / "nrrd").mkdir()
        shutil.copy2(nrrd, inputs / "nrrd" / nrrd.name)
    return inputs


RUNS: dict[str, list[str]] = {
    "plain": ["--export", "default"],
    "crf": ["--crf", "--export", "stats"],
    "probabilities": ["--probabilities"],
    "ensemble": [],
}


def predict(tree: Path, inputs: Path, out: Path, models: list[Path], extra: list[str]) -> None:
    """``medseg predict`` with ``tree``'s code (its own MLflow store next to ``out``)."""
    cmd = [*MEDSEG, "predict", str(inputs), str(out), "--threads", "1"]
    for m in models:
        cmd += ["--model", str(m)]
    _run([*cmd, "--parallel-scans", "1", *extra], env=_env(tree, out.with_suffix(".mlflow.db")))


# --- comparison ---------------------------------------------------------------------------------


def _volatile(key: str) -> bool:
    """A timing, clock or run-id key (also ``crf_seconds``, ``post_seconds``, ``total_s``, ...)."""
    return key in VOLATILE_KEYS or key.endswith(("_seconds", "_s", "_time", "_date"))


def _mask_json(value: Any, added: set[str], path: str = "") -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if _volatile(k):
                out[k] = "<masked>"
            elif k in ADDED_KEYS:
                added.add(f"{path}/{k}")
            else:
                out[k] = _mask_json(v, added, f"{path}/{k}")
        return out
    if isinstance(value, list):
        return [_mask_json(v, added, path) for v in value]
    if isinstance(value, str):
        return _mask_text(value)
    return value


def _mask_text(text: str) -> str:
    for pattern in VOLATILE_TEXT:
        text = pattern.sub("<masked>", text)
    return text


def _dicom_elements(ds: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for elem in ds:
        key = f"{prefix}{elem.keyword or elem.tag}"
        if elem.keyword in VOLATILE_DICOM:
            continue
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from _dicom_elements(item, f"{key}[{i}].")
        else:
            value = elem.value
            yield key, bytes(value) if isinstance(value, (bytes, bytearray)) else str(value)


def _image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        return np.asarray(img.dataobj), np.asarray(img.affine)
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), np.asarray([*img.GetOrigin(), *img.GetSpacing(), *img.GetDirection()])


def compare_file(old: Path, new: Path, added: set[str]) -> str | None:
    """``None`` when the files agree after masking, else what differs."""
    name = old.name.lower()
    if name.endswith((".nii", ".nii.gz", ".nrrd", ".mha")):
        (a, aa), (b, ba) = _image(old), _image(new)
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
            return f"array differs ({a.dtype}{a.shape} vs {b.dtype}{b.shape})"
        return None if np.array_equal(aa, ba) else "affine differs"
    if name.endswith(".json"):
        a = _mask_json(json.loads(old.read_text()), set())
        b = _mask_json(json.loads(new.read_text()), added)
        return None if a == b else "JSON differs after masking"
    if name.endswith(".dcm") or _is_dicom(old):
        import pydicom

        a = dict(_dicom_elements(pydicom.dcmread(old)))
        b = dict(_dicom_elements(pydicom.dcmread(new)))
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        return None if not diff else f"DICOM elements differ: {diff[:8]}"
    raw_a, raw_b = old.read_bytes(), new.read_bytes()
    if name.endswith(".gz"):
        raw_a, raw_b = gzip.decompress(raw_a), gzip.decompress(raw_b)
    if raw_a == raw_b:
        return None
    if name.endswith(".csv"):
        return None if _mask_csv(raw_a.decode()) == _mask_csv(raw_b.decode()) else "CSV differs after masking"
    if name.endswith(".html"):
        return (
            None if _mask_html(raw_a.decode()) == _mask_html(raw_b.decode()) else "HTML differs after masking"
        )
    if name.endswith((".txt", ".tsv", ".md", ".svg")):
        return (
            None if _mask_text(raw_a.decode()) == _mask_text(raw_b.decode()) else "text differs after masking"
        )
    return "bytes differ"


def _mask_csv(text: str) -> list[list[str]]:
    """The table with the values of volatile columns (timings) masked."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return rows
    volatile = [i for i, name in enumerate(rows[0]) if _volatile(name) or name.startswith("seconds")]
    return [
        [("<masked>" if i in volatile and r is not rows[0] else v) for i, v in enumerate(r)] for r in rows
    ]


_HTML_TIMING_ROW = re.compile(r"(<tr><t[dh]>[^<]*(?:seconds|_s|\(s\))</t[dh]><td>)[^<]*(</td>)")


def _mask_html(text: str) -> str:
    """The page with timing rows' values and the text patterns masked."""
    return _mask_text(_HTML_TIMING_ROW.sub(r"\1<masked>\2", text))


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def compare_trees(old: Path, new: Path) -> tuple[list[str], int, set[str]]:
    """Every file of both output folders: the differences, the files compared, the added keys."""
    skip = re.compile(r"\.mlflow\.db$|^mlruns/|^mlartifacts/")
    files_a = {
        str(p.relative_to(old))
        for p in old.rglob("*")
        if p.is_file() and not skip.search(str(p.relative_to(old)))
    }
    files_b = {
        str(p.relative_to(new))
        for p in new.rglob("*")
        if p.is_file() and not skip.search(str(p.relative_to(new)))
    }
    problems = [f"only in old: {f}" for f in sorted(files_a - files_b)]
    problems += [f"only in new: {f}" for f in sorted(files_b - files_a)]
    added: set[str] = set()
    for rel in sorted(files_a & files_b):
        why = compare_file(old / rel, new / rel, added)
        if why is not None:
            problems.append(f"{rel}: {why}")
    return problems, len(files_a & files_b), added


def main(argv: list[str] | None = None) -> int:
    """Run both trees, compare, print a report; 0 when identical after masking."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main", help="git ref of the old code")
    parser.add_argument("--new", type=Path, default=ROOT, help="tree of the new code (default: this one)")
    parser.add_argument("--new-ref", default=None, help="git ref of the new code (instead of --new's tree)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--scans", type=int, default=2, help="synthetic and hippocampus scans each")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
    parser.add_argument("--model", type=Path, default=None, help="a bundle instead of the seeded U-Net")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="medseg-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    old = checkout(args.old, work, "old")
    new = checkout(args.new_ref, work, "new") if args.new_ref else args.new
    failures = 0
    try:
        inputs = make_inputs(old, work, data=args.data, scans=args.scans)
        models = {"plain": [args.model or make_bundle(old, work / "bundle-a", seed=0)]}
        models["crf"] = [args.model or make_bundle(old, work / "bundle-crf", seed=0, crf=True)]
        models["probabilities"] = models["plain"]
        models["ensemble"] = [models["plain"][0], args.model or make_bundle(old, work / "bundle-b", seed=1)]
        n_inputs = sum(1 for p in inputs.rglob("*") if p.is_file())
        print(f"inputs: {n_inputs} files under {inputs}; old: {args.old}; new: {args.new_ref or new}")
        for run in args.runs.split(","):
            outs = {side: work / f"{run}-{side}" for side in ("old", "new")}
            for side, tree in (("old", old), ("new", new)):
                predict(tree, inputs, outs[side], models[run], RUNS[run])
            problems, compared, added = compare_trees(outs["old"], outs["new"])
            if not compared:
                problems.append("no output file to compare: did medseg predict run?")
            verdict = "identical" if not problems else f"{len(problems)} difference(s)"
            extra = f"; added in new (not compared): {sorted(added)}" if added else ""
            print(f"{run}: {compared} file(s) compared, {verdict}{extra}")
            for p in problems[:40]:
                print(f"  {p}")
            failures += bool(problems)
    finally:
        for tree in (old, new) if args.new_ref else (old,):
            _run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    print("masked: JSON keys", sorted(VOLATILE_KEYS), "; DICOM", list(VOLATILE_DICOM))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
