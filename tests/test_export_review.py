"""End to end: medseg predict with exports, the HTML review page (in headless Chromium too), medseg export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from export_helpers import expected_frame, oblique_affine, tool
from typer.testing import CliRunner

from medseg.bundle import build_network, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.synth import write_dicom_series, write_nifti

PATIENT_NAME = "Privatperson^Erika"
PATIENT_ID = "PID-EXPORT-4242"
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _bundle(path: Path) -> Path:
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": LABELS,
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    return save_bundle(path, cfg, spec, build_network(cfg, spec))


def _blocks(size: int, lesion: bool = True, shape=(20, 18, 8)) -> np.ndarray:
    v = np.zeros(shape, np.int16)
    v[2 : 2 + size, 2:12, 1:6] = 1
    if lesion:
        v[4:6, 4:6, 2:4] = 2
    return v


def _inputs(root: Path) -> Path:
    """Four NIfTI cases (one much larger, one empty), a DICOM series with a patient name, a bad file."""
    for name, vol in (
        ("a", _blocks(8)),
        ("b", _blocks(9)),
        ("c", _blocks(7)),
        ("big", _blocks(50, shape=(60, 18, 8))),
    ):
        write_nifti(vol, np.diag([1.0, 1.0, 2.0, 1.0]), root / f"{name}.nii.gz")
    write_nifti(np.zeros((20, 18, 8), np.int16), np.eye(4), root / "empty.nii.gz")
    write_dicom_series(
        _blocks(8).astype(np.float32),
        oblique_affine(flip=True),
        root / "dicom",
        modality="MR",
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        series_description="T1 review me",
        shuffle_instance_numbers=True,
    )
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    return root


def _flags(index_html: str) -> dict[str, set[str]]:
    """Case id -> the QC flag codes in its row of the review index."""
    rows = re.findall(r'<tr class="[^"]*" data-case="([^"]+)">(.*?)</tr>', index_html, flags=re.S)
    return {
        case: set(re.findall(r'<span class="flag [^"]*"[^>]*>([^<]+)</span>', cells)) for case, cells in rows
    }


@pytest.mark.slow
def test_predict_exports_review_page_and_export_again(tmp_path: Path) -> None:
    src = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    bundle = _bundle(tmp_path / "bundle")
    result = CliRunner().invoke(app, ["predict", str(src), str(out), "--model", str(bundle)])
    assert result.exit_code == 1, result.output  # the broken file fails, the rest succeed
    manifest = json.loads((out / "manifest.json").read_text())
    by_id = {e["case_id"]: e for e in manifest["scans"]}
    dicom_id = next(c for c in by_id if c.startswith("dicom-"))
    for case_id in ("a", "b", "c", "big", "empty", dicom_id):
        files = {str(Path(p).relative_to(case_id)) for p in by_id[case_id]["outputs"]}
        assert {
            "labels.nii.gz",
            "labels.itksnap.txt",
            "labels.ctbl",
            "stats.json",
            "stats.csv",
            "overlays/montage.png",
            "case.json",
        } <= files, case_id
        assert ("segmentation.dcm" in files) == (case_id == dicom_id)
        assert all((out / p).is_file() for p in by_id[case_id]["outputs"])
    facts = json.loads((out / "a" / "case.json").read_text())
    assert facts["not_applicable"] == ["dicom-seg"]
    assert facts["algorithm"]["name"] == "passthrough"

    # the DICOM SEG of the predicted series references the right instances (oblique, flipped, shuffled)
    seg = pydicom.dcmread(out / dicom_id / "segmentation.dcm")
    sources = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((src / "dicom").iterdir()))
    }
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    for frame, fg in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        ds = sources[fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        group = fg if "SegmentIdentificationSequence" in fg else seg.SharedFunctionalGroupsSequence[0]
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        under = expected_frame(ds, _blocks(8), oblique_affine(flip=True))
        np.testing.assert_array_equal(frame, (under == number).astype(np.uint8))

    # batch table and review page
    table = (out / "stats.csv").read_text().splitlines()
    assert table[0].startswith("case_id,value,name,voxels,volume_ml")
    assert len(table) == 1 + 6 * 2
    index = (out / "report" / "index.html").read_text()
    flags = _flags(index)  # (the identity model is unsure by softmax: low-confidence may show anywhere)
    assert set(flags) == {"a", "b", "c", "big", "empty", "broken", dicom_id}
    assert flags["a"] - {"low-confidence"} == set()
    assert flags[dicom_id] - {"low-confidence"} == set()
    assert "volume" in flags["big"]
    assert flags["empty"] >= {"empty"}
    assert flags["broken"] == {"failed"}
    assert re.search(r'<tr class="failed" data-case="broken">', index)
    assert 'title="organ: ' in index  # the volume flag says which label and by how much
    assert "T1 review me" in index
    assert "http://" not in index
    assert "https://" not in index
    case_page = (out / "report" / "cases" / "a.html").read_text()
    assert 'src="../../a/overlays/montage.png"' in case_page
    assert (
        (out / "report" / "cases" / "a.html")
        .parent.joinpath("../../a/overlays/montage.png")
        .resolve()
        .is_file()
    )
    for page in [out / "report" / "index.html", *(out / "report" / "cases").iterdir()]:
        text = page.read_text()
        assert PATIENT_ID not in text, page
        assert "Privatperson" not in text, page

    # medseg export OUT_DIR: remakes what was deleted, without the model; patient info only when asked
    shutil.rmtree(out / "a" / "overlays")
    (out / "a" / "stats.json").unlink()
    again = CliRunner().invoke(app, ["export", str(out), "--show-patient-info"])
    assert again.exit_code == 0, again.output
    assert (out / "a" / "overlays" / "montage.png").is_file()
    assert (out / "a" / "stats.json").is_file()
    index = (out / "report" / "index.html").read_text()
    assert PATIENT_ID in index
    assert "Privatperson" in index
    result_a = json.loads((out / "a" / "result.json").read_text())
    assert "a/overlays/montage.png" in result_a["outputs"]

    # rerunning predict with other exports brings kept cases up to date, without segmenting again
    rerun = CliRunner().invoke(
        app, ["predict", str(src), str(out), "--model", str(bundle), "--export", "nifti,secondary-capture"]
    )
    assert rerun.exit_code == 1, rerun.output
    assert (out / dicom_id / "secondary_capture" / "montage-1.dcm").is_file()
    assert not (out / "a" / "secondary_capture").exists()
    bad = CliRunner().invoke(
        app, ["predict", str(src), str(out), "--model", str(bundle), "--export", "dicom_sag"]
    )
    assert bad.exit_code == 2
    assert "did you mean 'dicom-seg'" in bad.output


def test_export_converts_a_label_map_for_a_series(tmp_path: Path) -> None:
    labels = _blocks(8)
    files = write_dicom_series(
        labels.astype(np.float32), oblique_affine(flip=True), tmp_path / "s", modality="MR"
    )
    write_nifti(labels, oblique_affine(flip=True), tmp_path / "lab.nii.gz")
    (tmp_path / "names.txt").write_text("organ\nlesion\n")
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--image",
            str(tmp_path / "s"),
            "--labels",
            str(tmp_path / "lab.nii.gz"),
            "--out",
            str(tmp_path / "o"),
            "--label-names",
            str(tmp_path / "names.txt"),
        ],
    )
    assert result.exit_code == 0, result.output
    seg = pydicom.dcmread(tmp_path / "o" / "segmentation.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "lesion"]
    refs = {
        fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for fg in seg.PerFrameFunctionalGroupsSequence
    }
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert refs <= uids
    assert (tmp_path / "o" / "labels.itksnap.txt").is_file()
    spec = {
        "name": "t",
        "channels": [{"name": "mr", "modality": "MR"}],
        "labels": LABELS,
        "label_codes": {
            "organ": {
                "category": {"value": "123037004", "meaning": "Anatomical Structure"},
                "property_type": {"value": "10200004", "meaning": "Liver"},
            }
        },
        "cases": [],
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))  # JSON is YAML
    args = ["--labels", str(tmp_path / "lab.nii.gz"), "--out", str(tmp_path / "sp"), "--export", "dicom-seg"]
    with_spec = CliRunner().invoke(
        app, ["export", "--image", str(tmp_path / "s"), *args, "--spec", str(tmp_path / "spec.yaml")]
    )
    assert with_spec.exit_code == 0, with_spec.output
    seg = pydicom.dcmread(tmp_path / "sp" / "segmentation.dcm")
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    nifti = CliRunner().invoke(
        app,
        [
            "export",
            "--image",
            str(tmp_path / "lab.nii.gz"),
            "--labels",
            str(tmp_path / "lab.nii.gz"),
            "--out",
            str(tmp_path / "n"),
        ],
    )
    assert nifti.exit_code == 2
    assert "need a DICOM series folder" in nifti.output
    usage = CliRunner().invoke(app, ["export", "--image", str(tmp_path / "s")])
    assert usage.exit_code == 2
    assert "--image, --labels and --out" in usage.output


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        tool("chromium", "apt-get install chromium")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [
        str(exe),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_review_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    src = tmp_path / "in"
    for name, size in (("a", 8), ("b", 9), ("c", 7), ("d", 16)):
        write_nifti(_blocks(size, shape=(24, 18, 8)), np.diag([1.0, 1.0, 2.0, 1.0]), src / f"{name}.nii.gz")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(src), str(out), "--model", str(_bundle(tmp_path / "b"))])
    assert result.exit_code == 0, result.output
    index = out / "report" / "index.html"
    dom = _chromium(["--dump-dom", index.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert set(re.findall(r'data-case="([^"]+)"', dom.stdout)) == {"a", "b", "c", "d"}
    n_columns = len(re.findall(r"<th[ >]", dom.stdout))
    assert n_columns == 4 + 2 + 1  # case, series, modality, status, 2 labels, flags
    # the sorting script runs: #sort=-4 opens the page sorted by the organ's volume, largest first
    by_organ = _chromium(["--dump-dom", index.as_uri() + "#sort=-4"], tmp_path)
    order = re.findall(r'data-case="([^"]+)"', by_organ.stdout)
    assert order == ["d", "b", "a", "c"], order
    assert "sorted-desc" in by_organ.stdout
    from PIL import Image

    # the index shows the organ's colour in its column's swatch (10 x 10 px inside the border), the
    # case page in the overlay montage
    for page, min_colour in ((index, 60), (out / "report" / "cases" / "d.html", 500)):
        shot = tmp_path / f"{page.stem}.png"
        run = _chromium([f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()], tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        assert shot.is_file(), run.stderr[-2000:]
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        assert (pixels.min(axis=-1) < 200).sum() > 2000, f"{page.name} renders blank"
        # pixels in the organ's colour (230, 25, 75): the swatch, or the overlay filled or outlined
        organ = (np.abs(pixels - [230, 25, 75]).max(axis=-1) < 40).sum()
        assert organ >= min_colour, (page.name, organ)


def test_library_exports_keep_the_volumes_name(tmp_path: Path) -> None:
    from medseg.batch.runner import PredictionSettings, run_prediction

    write_nifti(_blocks(8), np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "in" / "a.nii.gz")
    summary = run_prediction(
        tmp_path / "in",
        tmp_path / "out",
        models=[_bundle(tmp_path / "b")],
        settings=PredictionSettings(exports=["volumes", "stats"]),
    )
    assert summary.ok == 1
    volumes = json.loads((tmp_path / "out" / "a" / "volumes.json").read_text())
    stats = json.loads((tmp_path / "out" / "a" / "stats.json").read_text())
    assert volumes["1"]["voxels"] == stats["labels"][0]["voxels"] == 392
    assert (tmp_path / "out" / "stats.csv").is_file()
    assert not (tmp_path / "out" / "report").exists()  # no review page unless asked for
