"""RT Structure Set export via rt-utils: contours land on the right instances, read back into the masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from export_helpers import dciodvfy_errors, expected_frame, rotation

from medseg.errors import InputError
from medseg.export import CaseExport, export_case, label_table
from medseg.synth import write_dicom_series

pytest.importorskip("rt_utils", reason="RTSTRUCT export needs rt-utils (medseg[rtstruct])")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_rtstruct_contours_match_the_labels(tmp_path: Path) -> None:
    from rt_utils import RTStructBuilder

    # square pixels and images (rt-utils reads contours back into (columns, rows) masks), in-plane
    # rotation, slices reversed
    affine = np.eye(4)
    affine[:3, :3] = rotation(25.0, 0.0) @ np.diag([1.0, 1.0, 3.0])
    affine[:3, 0] *= -1
    affine[:3, 3] = [40.0, -20.0, 100.0]
    labels = np.zeros((40, 40, 6), np.uint8)
    labels[5:25, 8:28, 1:5] = 1
    labels[28:36, 10:20, 2:4] = 2
    files = write_dicom_series(labels.astype(np.float32) * 100, affine, tmp_path / "s", modality="CT")
    table = label_table({"background": 0, "organ": 1, "vessel": 2, "absent": 3})
    case = CaseExport("c", labels, affine, table, modality="CT", dicom_files=tuple(files))
    (tmp_path / "out").mkdir()
    written = export_case(case, tmp_path / "out", ["rtstruct"])
    path = tmp_path / "out" / "rtstruct.dcm"
    assert path in written
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT"
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["organ", "vessel"]  # absent labels: no ROI
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == list(table[0].color)
    back = RTStructBuilder.create_from(dicom_series_path=str(tmp_path / "s"), rt_struct_path=str(path))
    for entry in table[:2]:
        mask = back.get_roi_mask_by_name(entry.name)  # (rows, columns, slices) in rt-utils' slice order
        for i, src in enumerate(back.series_data):
            want = expected_frame(src, labels, affine) == entry.value
            got = mask[:, :, i]
            if want.any():
                assert _dice(got, want) > 0.8, (entry.name, i, _dice(got, want))
            else:
                assert not got.any(), (entry.name, i)
    assert dciodvfy_errors(path) == []
    odd = np.diag([0.8, 1.0, 3.0, 1.0])
    files = write_dicom_series(labels.astype(np.float32), odd, tmp_path / "odd", modality="CT")
    case = CaseExport("odd", labels, odd, table, modality="CT", dicom_files=tuple(files))
    with pytest.raises(InputError, match="square pixels"):
        export_case(case, tmp_path / "out", ["rtstruct"])
