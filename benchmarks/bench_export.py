"""Benchmark the clinician exports of one DICOM CT case, DICOM SEG against dcmqi's writer.

A synthetic CT series (body ellipse, three labelled organs, slices in reverse order) is written
once; then each export of :mod:`medseg.export` is timed on it, and the DICOM SEG writer is compared
with dcmqi's ``itkimage2segimage`` (the reference implementation, run on the same label map as a
NRRD file, one segment per label). Both SEGs are checked to hold the same frames: same referenced
source instances and segment numbers, equal pixels.

Each writer runs once untimed (imports, page cache), then ``--repeats`` timed rounds; medians are
reported. One JSON line is printed; the exit status is 1 when the SEGs differ.

Examples:
    Full size (512 x 512 x 200)::

        python benchmarks/bench_export.py --repeats 3

    Smoke run::

        python benchmarks/bench_export.py --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from machine import machine_facts  # benchmarks/ is on sys.path when a benchmark runs as a script

from medseg.export import CaseExport, export_case, label_table
from medseg.io import load_image, write_volume
from medseg.synth import dicom_reader_view, write_dicom_series

FULL_SHAPE = (512, 512, 200)
QUICK_SHAPE = (128, 128, 40)
SPACING = (0.8, 0.8, 2.0)
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}


def _phantom(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    image = np.where(x**2 / 0.8 + y**2 / 0.5 < 1, 40.0, -1000.0).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[((x + 0.3) ** 2 + y**2 / 0.6 + z**2 / 1.5) < 0.12] = 1
    labels[((x - 0.45) ** 2 / 0.4 + (y - 0.1) ** 2 + z**2) < 0.03] = 2
    labels[((x - 0.2) ** 2 + (y + 0.35) ** 2 + (z - 0.3) ** 2) < 0.01] = 3
    image[labels > 0] += 20.0 * labels[labels > 0]
    return image, labels


def _dcmqi_meta(path: Path) -> None:
    tissue = {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Tissue"}
    segments = [
        {
            "labelID": value,
            "SegmentDescription": name,
            "SegmentLabel": name,
            "SegmentAlgorithmType": "AUTOMATIC",
            "SegmentAlgorithmName": "bench",
            "SegmentedPropertyCategoryCodeSequence": tissue,
            "SegmentedPropertyTypeCodeSequence": tissue,
        }
        for name, value in LABELS.items()
        if value
    ]
    meta = {
        "ContentCreatorName": "bench",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "bench",
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "BodyPartExamined": "",
        "segmentAttributes": [segments],
        "ContentLabel": "SEG",
        "ContentDescription": "bench",
        "ClinicalTrialCoordinatingCenterName": "bench",
    }
    path.write_text(json.dumps(meta))


def _frames(path: Path) -> dict[tuple[str, int], np.ndarray]:
    seg = pydicom.dcmread(path)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out = {}
    for frame, fg in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        group = fg if "SegmentIdentificationSequence" in fg else seg.SharedFunctionalGroupsSequence[0]
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[(uid, number)] = frame
    return out


def _median(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    """Run the benchmark; print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volume, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    repeats = 1 if args.quick else args.repeats
    work = Path(tempfile.mkdtemp(prefix="bench_export-"))
    try:
        image, labels = _phantom(shape)
        affine = np.diag([*SPACING, 1.0])
        affine[2, 2] = -SPACING[2]  # slices stored top to bottom: readers see them reversed
        files = write_dicom_series(image, affine, work / "series", modality="CT")
        loaded = load_image(work / "series")
        grid_labels, grid_affine = dicom_reader_view(labels, affine)  # what a reader sees
        case = CaseExport(
            "bench",
            np.ascontiguousarray(grid_labels),
            grid_affine,
            label_table(LABELS),
            image=loaded[0].numpy(),
            modality="CT",
            dicom_files=tuple(files),
        )
        out = work / "out"
        out.mkdir()
        seconds = {
            name: round(_median(lambda name=name: export_case(case, out, [name]), repeats), 3)
            for name in ("dicom-seg", "nifti", "stats", "overlays", "secondary-capture")
        }
        result: dict[str, object] = {"shape": list(shape), "seconds": seconds}
        exe = shutil.which("itkimage2segimage") or str(Path(sys.executable).parent / "itkimage2segimage")
        if Path(exe).is_file():
            write_volume(case.labels, case.affine, work / "labels.nrrd", dtype=np.dtype(np.uint8))
            _dcmqi_meta(work / "meta.json")
            cmd = [
                exe,
                "--inputImageList",
                str(work / "labels.nrrd"),
                "--inputDICOMDirectory",
                str(work / "series"),
                "--outputDICOM",
                str(work / "dcmqi.dcm"),
                "--inputMetadata",
                str(work / "meta.json"),
            ]
            dcmqi_s = _median(lambda: subprocess.run(cmd, check=True, capture_output=True), repeats)
            ours, theirs = _frames(out / "segmentation.dcm"), _frames(work / "dcmqi.dcm")
            same = set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
            result.update(
                {
                    "dcmqi_seg_seconds": round(dcmqi_s, 3),
                    "seg_speed_vs_dcmqi": round(dcmqi_s / seconds["dicom-seg"], 2),
                    "seg_frames": len(ours),
                    "same_frames_as_dcmqi": same,
                }
            )
        print(json.dumps({**result, **machine_facts()}))
        return 0 if result.get("same_frames_as_dcmqi", True) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
