"""DICOM SEG export: real CT against dcmqi's reference SEG, oblique/flipped synthetic series, validators."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from export_helpers import dciodvfy_errors, dcmqi_labels, expected_frame, oblique_affine, onto_grid
from geometry_helpers import shared

from medseg.config.spec import DatasetSpec
from medseg.errors import GeometryError, InputError
from medseg.export import convert_label_map, spec_label_table
from medseg.io.readers import sitk_affine
from medseg.synth import LABELS, make_phantom, write_dicom_series, write_nifti

hd = pytest.importorskip("highdicom", reason="DICOM SEG export needs highdicom (medseg[dicom])")

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _frames_by_instance(seg: pydicom.Dataset) -> dict[tuple[str, int], np.ndarray]:
    """``(referenced SOP instance UID, segment number) -> frame`` of a SEG, read with pydicom only."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out = {}
    for frame, fg in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        group = fg if "SegmentIdentificationSequence" in fg else seg.SharedFunctionalGroupsSequence[0]
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert (uid, number) not in out, "two frames for one instance and segment"
        out[(uid, number)] = frame
    return out


def _positions(seg: pydicom.Dataset) -> dict[str, list[float]]:
    return {
        fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: [
            round(float(v), 3) for v in fg.PlanePositionSequence[0].ImagePositionPatient
        ]
        for fg in seg.PerFrameFunctionalGroupsSequence
    }


def _check_against(
    seg_path: Path, sources: list[Path], labels: np.ndarray, affine: np.ndarray, values: list[int]
):
    """Every frame equals the label map under its source instance; empty ones are left out."""
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == SEG_CLASS
    assert seg.SegmentationType == "BINARY"
    frames = _frames_by_instance(seg)
    headers = {
        str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sources)
    }
    expected = {}
    for uid, ds in headers.items():
        under = expected_frame(ds, labels, affine)
        for number, value in enumerate(values, start=1):
            if (under == value).any():
                expected[(uid, number)] = (under == value).astype(np.uint8)
    assert set(frames) == set(expected), "frames must be exactly the non-empty (instance, segment) pairs"
    for key, frame in frames.items():
        np.testing.assert_array_equal(frame, expected[key], err_msg=str(key))
    for fg in seg.PerFrameFunctionalGroupsSequence:  # each frame sits where its source instance is
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in headers[uid].ImagePositionPatient],
            atol=1e-3,
        )
    first = next(iter(headers.values()))
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert str(seg.get(keyword)) == str(first.get(keyword)), keyword
    return seg


SPEC = DatasetSpec.model_validate(
    {
        "name": "phantom",
        "channels": [{"name": "ct", "modality": "CT"}],
        "labels": LABELS,
        "label_codes": {
            "organ": {
                "category": {"value": "123037004", "meaning": "Anatomical Structure"},
                "property_type": {"value": "10200004", "meaning": "Liver"},
            }
        },
        "label_colors": {"vessel": [0, 0, 255]},
        "cases": [],
    }
)


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, list[Path]]:
    """The real 3-slice CT, its liver label map and our exports of it: (series, label map, out, written)."""
    series = shared("ct_seg_reference", "ct-3slice")
    nrrd = shared("ct_seg_reference", "liver_seg.nrrd")
    out = tmp_path_factory.mktemp("real-ct") / "out"
    return series, nrrd, out, convert_label_map(series, nrrd, out, names={"Liver": 1})


@pytest.fixture(scope="module")
def oblique(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[Path], np.ndarray, np.ndarray, Path]:
    """An oblique, left-handed (slices reversed), shuffled CT series and its exports.

    Returns ``(series, files, labels, affine, out)``; the label map is stored in the writer's
    orientation, which a DICOM reader sees with ``k`` reversed; label 2 is absent.
    """
    root = tmp_path_factory.mktemp("oblique")
    image, labels, _ = make_phantom(shape=(24, 20, 10), seed=3)
    affine = oblique_affine(flip=True)
    labels[labels == 2] = 0
    files = write_dicom_series(
        image, affine, root / "series", modality="CT", shuffle_instance_numbers=True, patient_id="OBL-1"
    )
    write_nifti(labels, affine, root / "labels.nii.gz")
    convert_label_map(root / "series", root / "labels.nii.gz", root / "out", table=spec_label_table(SPEC))
    return root / "series", files, labels, affine, root / "out"


def test_real_ct_seg_matches_label_map_and_dcmqi_reference(real_ct) -> None:
    series, nrrd, out, written = real_ct
    reference = pydicom.dcmread(shared("ct_seg_reference", "liver.dcm"))
    seg_path = out / "segmentation.dcm"
    assert seg_path in written
    names = ["case.json", "labels.ctbl", "labels.itksnap.txt", "labels.nii.gz", "segmentation.dcm"]
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary file left behind

    image = sitk.ReadImage(str(nrrd))  # the label map as an independent reader sees it
    labels = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    sources = sorted(series.iterdir())
    seg = _check_against(seg_path, sources, labels, sitk_affine(image), [1])
    assert seg.SegmentSequence[0].SegmentLabel == "Liver"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert "medseg" in seg.SegmentSequence[0].SegmentAlgorithmName

    # same segment geometry as dcmqi's reference SEG of the same series and label map
    assert _positions(seg) == _positions(reference)
    ours, theirs = _frames_by_instance(seg), _frames_by_instance(reference)
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])
    shared_ours = seg.SharedFunctionalGroupsSequence[0]
    shared_ref = reference.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared_ours.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in shared_ref.PlaneOrientationSequence[0].ImageOrientationPatient],
    )
    np.testing.assert_allclose(
        [float(v) for v in shared_ours.PixelMeasuresSequence[0].PixelSpacing],
        [float(v) for v in shared_ref.PixelMeasuresSequence[0].PixelSpacing],
    )

    # highdicom reads it back: pixels by source instance equal the label map's slices
    seg_hd = hd.seg.segread(seg_path)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources]
    pixels = seg_hd.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    for uid, plane in zip(uids, pixels[..., 0]):
        np.testing.assert_array_equal(plane, ours[(uid, 1)])


def test_oblique_flipped_shuffled_series(oblique, tmp_path: Path) -> None:
    series, files, labels, affine, out = oblique
    seg = _check_against(out / "segmentation.dcm", files, labels, affine, [1, 2, 3])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "lesion", "vessel"]
    organ = seg.SegmentSequence[0]
    assert organ.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert organ.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"  # generic
    blue = hd.color.CIELabColor.from_rgb(0, 0, 255).value
    assert list(seg.SegmentSequence[2].RecommendedDisplayCIELabValue) == list(blue)
    n_pairs = sum(
        int((expected_frame(pydicom.dcmread(f, stop_before_pixels=True), labels, affine) == v).any())
        for f in files
        for v in (1, 2, 3)
    )
    assert int(seg.NumberOfFrames) == n_pairs < 3 * len(files)  # empty frames are left out
    facts = json.loads((out / "case.json").read_text())
    assert facts["exports"] == ["dicom-seg", "nifti"]
    # exporting again gives the same object (UIDs derived from source, model and content)
    again = convert_label_map(series, out / "labels.nii.gz", tmp_path / "again", table=spec_label_table(SPEC))
    assert pydicom.dcmread(again[0]).SOPInstanceUID == seg.SOPInstanceUID


def test_seg_refuses_labels_off_grid_or_unnamed(oblique, tmp_path: Path) -> None:
    series, _, labels, affine, _ = oblique
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5  # half a voxel off
    write_nifti(labels, shifted, tmp_path / "off.nii.gz")
    names = {"a": 1, "b": 2, "c": 3}
    with pytest.raises(GeometryError, match="voxel grid of the DICOM series"):
        convert_label_map(series, tmp_path / "off.nii.gz", tmp_path / "o1", names=names)
    write_nifti(labels[:, :, :-1], affine, tmp_path / "short.nii.gz")
    with pytest.raises(GeometryError, match="cover"):
        convert_label_map(series, tmp_path / "short.nii.gz", tmp_path / "o2", names=names)
    write_nifti(labels, affine, tmp_path / "ok.nii.gz")
    with pytest.raises(InputError, match="unnamed"):
        convert_label_map(series, tmp_path / "ok.nii.gz", tmp_path / "o3", names={"a": 1})


def test_seg_passes_dciodvfy(oblique, real_ct) -> None:
    assert dciodvfy_errors(oblique[-1] / "segmentation.dcm") == []
    assert dciodvfy_errors(real_ct[2] / "segmentation.dcm") == []


def _dcmqi_volume(seg_path: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """dcmqi's label map of a SEG (segments merged by their number) with its RAS affine."""
    merged, merged_aff = None, None
    for path in dcmqi_labels(seg_path, out):
        number = int(path.stem.rsplit("-", 1)[-1])
        image = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
        aff = sitk_affine(image)
        if merged is None:
            merged, merged_aff = np.zeros(arr.shape, np.uint8), aff
        else:
            assert arr.shape == merged.shape
            np.testing.assert_allclose(aff, merged_aff, atol=1e-3)
        merged[arr > 0] = number
    assert merged is not None
    return merged, merged_aff


@pytest.mark.parametrize("which", ["oblique", "real_ct"])
def test_dcmqi_reads_our_seg_back_on_the_source_grid(which: str, request, tmp_path: Path) -> None:
    out = request.getfixturevalue(which)[-1 if which == "oblique" else 2]
    merged, merged_aff = _dcmqi_volume(out / "segmentation.dcm", tmp_path / "dcmqi")
    exported = sitk.ReadImage(str(out / "labels.nii.gz"))  # what we exported, on the source grid
    ours = sitk.GetArrayFromImage(exported).transpose(2, 1, 0)
    # segment numbers equal label values here (all labels named, in value order)
    np.testing.assert_array_equal(onto_grid(merged, merged_aff, sitk_affine(exported), ours.shape), ours)


def test_real_oblique_mr_frames_equal_each_instances_own_pixels(tmp_path: Path) -> None:
    """A real, oblique MR series: each SEG frame equals a threshold of its own instance's pixels."""
    from pydicom.pixels import apply_modality_lut

    from medseg.export import CaseExport, export_case, label_table
    from medseg.io import load_image

    series = shared("mr_study", "12-T1post-05670")
    files = sorted(series.iterdir())
    image = load_image(series)
    values = image[0].numpy()
    low, high = np.percentile(values, [90.0, 99.0])
    labels = ((values > low).astype(np.uint8) + (values > high)).astype(np.uint8)
    table = label_table({"bright": 1, "brightest": 2})
    case = CaseExport("mr", labels, np.asarray(image.affine), table, modality="MR", dicom_files=tuple(files))
    (tmp_path / "out").mkdir()
    export_case(case, tmp_path / "out", ["dicom-seg"])
    seg = pydicom.dcmread(tmp_path / "out" / "segmentation.dcm")
    frames = _frames_by_instance(seg)
    checked = 0
    for path in files:
        ds = pydicom.dcmread(path)
        px = apply_modality_lut(ds.pixel_array, ds)
        for number, mask in ((1, (px > low) & ~(px > high)), (2, px > high)):
            got = frames.get((str(ds.SOPInstanceUID), number))
            if got is None:
                assert not mask.any()
                continue
            np.testing.assert_array_equal(got, mask.astype(np.uint8))
            checked += 1
    assert checked > len(files)
    assert dciodvfy_errors(tmp_path / "out" / "segmentation.dcm") == []
