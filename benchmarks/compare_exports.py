"""Check that every export of a small batch is unchanged between two medseg versions.

``python benchmarks/compare_exports.py make OUT`` segments a fixed small batch (NIfTI cases, an
oblique DICOM series, a broken file) with an identity model and every export; run it once with
each version, then ``python benchmarks/compare_exports.py diff OUT_A OUT_B`` compares the two
folders file by file after masking what changes from run to run: timestamps, UIDs, timings, run
ids, absolute paths and the HTML's markup whitespace. It prints each difference and exits 1 when
there is one.
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import numpy as np

EXPORTS = "nifti,dicom-seg,rtstruct,stats,overlays,secondary-capture,report,volumes"
VOLATILE_KEYS = {
    "seconds",
    "started",
    "updated",
    "traceback",
    "model_sha256",
    "sha256",
    "inputs",
    "version",
    "fingerprint",
}
GENERATED_UID_ROOTS = ("2.25.", "1.2.826.0.1.3680043.8.498.")  # UIDs made afresh by each run
ORDERLESS_KEYS = {"outputs"}  # the same files, listed in the order they were written
VOLATILE_DICOM = {
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "SeriesDate",
    "SeriesTime",
    "StructureSetDate",
    "StructureSetTime",
    "MediaStorageSOPInstanceUID",
    "ImplementationVersionName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "ReferencedSOPInstanceUID",
    "ImplementationClassUID",
    "AcquisitionDateTime",
    "ReferencedFrameOfReferenceUID",
    "DimensionOrganizationUID",
    "TimeOfSecondaryCapture",
    "DateOfSecondaryCapture",
    "ContributionDateTime",
}


def make(out: Path) -> None:
    """Segment the fixed batch into ``out`` with every export."""
    from typer.testing import CliRunner

    from medseg.bundle import build_network, save_bundle
    from medseg.cli import app
    from medseg.config.pipeline import PipelineConfig
    from medseg.config.spec import DatasetSpec
    from medseg.synth import write_dicom_series, write_nifti

    root = out.parent / f"{out.name}-work"
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": {"background": 0, "organ": 1, "lesion": 2},
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    bundle = save_bundle(root / "bundle", cfg, spec, build_network(cfg, spec))

    def blocks(size: int, shape: tuple[int, int, int] = (20, 18, 8)) -> np.ndarray:
        v = np.zeros(shape, np.int16)
        v[2 : 2 + size, 2:12, 1:6] = 1
        v[4:6, 4:6, 2:4] = 2
        return v

    src = root / "in"
    for name, vol in (("a", blocks(8)), ("big", blocks(50, (60, 18, 8)))):
        write_nifti(vol, np.diag([1.0, 1.0, 2.0, 1.0]), src / f"{name}.nii.gz")
    write_nifti(np.zeros((20, 18, 8), np.int16), np.eye(4), src / "empty.nii.gz")
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-0.9, 0.9, 2.5])  # square pixels: RTSTRUCT applies
    aff[:3, 3] = [12.0, -30.0, 55.0]
    write_dicom_series(
        blocks(8).astype(np.float32), aff, src / "dicom", modality="MR", series_description="T1"
    )
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    result = CliRunner().invoke(
        app, ["predict", str(src), str(out), "--model", str(bundle), "--export", EXPORTS]
    )
    print(result.output[-2000:])


def _mask_json(value: object) -> object:
    if isinstance(value, dict):
        return {
            k: "<masked>"
            if k in VOLATILE_KEYS
            else sorted(_mask_json(v))
            if k in ORDERLESS_KEYS
            else _mask_json(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask_json(v) for v in value]
    return _mask_text(value) if isinstance(value, str) else value


def _mask_text(text: str) -> str:
    text = re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?([+-]\d{4})?", "<time>", text)
    text = re.sub(r"(/[\w.+-]+)+/(in|out)[\w-]*", "<path>", text)
    text = re.sub(r"-\d+(?=/|$)", "", text)
    text = re.sub(r"dicom-[0-9a-f]{12}", "dicom-<id>", text)  # the case id hashes a random series UID
    text = re.sub(r"\b[0-9a-f]{24}\b", "<fingerprint>", text)
    text = re.sub(r"bundle_sha256=[0-9a-f]{64}", "bundle_sha256=<sha>", text)
    return re.sub(r"bundle [0-9a-f]{16}", "bundle <sha>", text)


def _norm_html(text: str) -> str:
    text = _mask_text(html.unescape(text))  # &quot; and &#34; are one character
    text = re.sub(r">\s+<", "><", text)
    return re.sub(r"\s+", " ", text).strip()


def _dicom(path: Path) -> list[str]:
    import pydicom

    ds = pydicom.dcmread(path)
    lines = []
    for elem in ds.iterall():
        if elem.keyword in VOLATILE_DICOM or elem.VR == "SQ":
            continue
        value = elem.value
        if elem.VR == "UI" and str(value).startswith(GENERATED_UID_ROOTS):
            value = "<uid>"
        lines.append(_mask_text(f"{elem.keyword or elem.tag}: {value!r}")[:400])
    return lines


def _content(path: Path) -> object:
    name = path.name
    if name.endswith(".json"):
        return _mask_json(json.loads(path.read_text()))
    if name.endswith(".dcm"):
        return _dicom(path)
    if name.endswith(".html"):
        return _norm_html(path.read_text())
    if name.endswith(".nii.gz"):
        import nibabel as nib

        img = nib.load(path)
        data = np.asarray(img.dataobj)
        return (str(data.dtype), data.shape, data.tobytes(), np.round(img.affine, 6).tolist())
    if name == "manifest.csv":  # its outputs column lists the files in the order they were written
        import csv

        rows = list(csv.DictReader(_mask_text(path.read_text()).splitlines()))
        for row in rows:
            row["outputs"] = ";".join(sorted(row["outputs"].split(";")))
            row["seconds_total"] = "<masked>"
        return rows
    if name.endswith(".png"):
        from PIL import Image

        pixels = np.asarray(Image.open(path))
        if "dicom-" in str(path):  # the title names the case: a hash of the series' random UID
            pixels = pixels[24:]
        return (pixels.shape, pixels.tobytes())
    if name.endswith((".csv", ".txt", ".ctbl")):
        return _mask_text(path.read_text())
    return path.read_bytes()


def _rel(path: Path, root: Path) -> str:
    return re.sub(r"dicom-[0-9a-f]{12}", "dicom-<id>", str(path.relative_to(root)))


def diff(a: Path, b: Path) -> int:
    """Print the differences between two batch folders; the number of differing files."""
    files_a = {_rel(p, a): p for p in a.rglob("*") if p.is_file()}
    files_b = {_rel(p, b): p for p in b.rglob("*") if p.is_file()}
    bad = 0
    for only, where in ((files_a.keys() - files_b.keys(), a), (files_b.keys() - files_a.keys(), b)):
        for p in sorted(only):
            print(f"only in {where}: {p}")
            bad += 1
    for p in sorted(files_a.keys() & files_b.keys()):
        ca, cb = _content(files_a[p]), _content(files_b[p])
        if ca != cb:
            bad += 1
            print(f"differs: {p}")
            if isinstance(ca, dict) and isinstance(cb, dict):
                for k in sorted(ca.keys() | cb.keys()):
                    if ca.get(k) != cb.get(k):
                        print(f"  {k}: {ca.get(k)!r}\n  {k}: {cb.get(k)!r}")
            elif isinstance(ca, list) and isinstance(cb, list):
                for x, y in zip(ca, cb):
                    if x != y:
                        print(f"  {x}\n  {y}")
                        break
            elif isinstance(ca, str):
                i = next((i for i, (x, y) in enumerate(zip(ca, cb)) if x != y), min(len(ca), len(cb)))
                print(f"  {ca[max(0, i - 80) : i + 120]!r}\n  {cb[max(0, i - 80) : i + 120]!r}")
            else:
                print(f"  {str(ca)[:300]}\n  {str(cb)[:300]}")
    print(f"{len(files_a.keys() & files_b.keys())} common files, {bad} difference(s)")
    return bad


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "diff":
        sys.exit(1 if diff(Path(sys.argv[2]), Path(sys.argv[3])) else 0)
    else:
        print(__doc__)
        sys.exit(2)
