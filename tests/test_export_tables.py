"""Label tables, label-name files, label codes in specs, statistics and QC flags (hand-built blocks)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medseg.config.spec import DatasetSpec, load_spec, save_spec
from medseg.errors import ConfigError
from medseg.export import CaseExport, export_case, label_table, read_label_names, spec_label_table
from medseg.export.label_tables import itksnap_table, slicer_table
from medseg.export.qc import CaseOutcome, QcSettings, batch_medians, case_flags
from medseg.export.stats import label_stats, write_batch_stats

SPEC = {
    "name": "t",
    "channels": [{"name": "ct", "modality": "CT"}],
    "labels": {"background": 0, "liver": 1, "left kidney": 2, "tumour": 5},
    "label_codes": {
        "liver": {
            "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
            "property_type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"},
        }
    },
    "label_colors": {"tumour": [10, 20, 30]},
    "cases": [{"id": "c", "images": ["c.nii.gz"]}],
}


def test_spec_label_codes_round_trip_and_old_specs_stay_valid(tmp_path: Path) -> None:
    spec = DatasetSpec.model_validate(SPEC)
    (tmp_path / "c.nii.gz").write_bytes(b"x")
    save_spec(spec, tmp_path / "spec.yaml")
    assert load_spec(tmp_path / "spec.yaml").spec == spec
    old = {k: v for k, v in SPEC.items() if k not in ("label_codes", "label_colors")}
    assert DatasetSpec.model_validate(old).label_codes == {}
    with pytest.raises(ValueError, match="label_codes must name foreground labels"):
        DatasetSpec.model_validate({**SPEC, "label_codes": {"spleen": SPEC["label_codes"]["liver"]}})
    with pytest.raises(ValueError, match=r"label_colors\.liver must be three values 0-255"):
        DatasetSpec.model_validate({**SPEC, "label_colors": {"liver": [0, 0, 300]}})
    table = spec_label_table(spec)
    assert [(e.value, e.name) for e in table] == [(1, "liver"), (2, "left kidney"), (5, "tumour")]
    assert table[0].property_type.meaning == "Liver"
    assert table[1].property_type.meaning == "Tissue"
    assert table[2].color == (10, 20, 30)


def test_label_tables_read_back(tmp_path: Path) -> None:
    table = spec_label_table(DatasetSpec.model_validate(SPEC))
    (tmp_path / "a.txt").write_text(itksnap_table(table))
    assert read_label_names(tmp_path / "a.txt") == {
        "Clear Label": 0,
        "liver": 1,
        "left kidney": 2,
        "tumour": 5,
    }
    (tmp_path / "a.ctbl").write_text(slicer_table(table))
    assert read_label_names(tmp_path / "a.ctbl") == {
        "background": 0,
        "liver": 1,
        "left_kidney": 2,
        "tumour": 5,
    }
    lines = (tmp_path / "a.ctbl").read_text().splitlines()
    assert lines[-1] == "5 tumour 10 20 30 255"
    case = CaseExport("c", np.zeros((2, 2, 2), np.uint8), np.eye(4), table)
    (tmp_path / "case").mkdir()
    written = export_case(case, tmp_path / "case", ["nifti"])
    assert sorted(p.name for p in written) == [
        "case.json",
        "labels.ctbl",
        "labels.itksnap.txt",
        "labels.nii.gz",
    ]


def test_label_name_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"liver": 1, "spleen": 2}))
    (tmp_path / "b.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    (tmp_path / "c.json").write_text(json.dumps(["liver", "spleen"]))
    (tmp_path / "d.txt").write_text("# names\nliver\nspleen\n")
    (tmp_path / "e.txt").write_text("1 liver\n2 spleen\n")
    for name in ("a.json", "b.json", "c.json", "d.txt", "e.txt"):
        assert read_label_names(tmp_path / name) == {"background": 0, "liver": 1, "spleen": 2}, name
    (tmp_path / "bad.txt").write_text("1 liver\n1 spleen\n")
    with pytest.raises(ConfigError, match="distinct"):
        read_label_names(tmp_path / "bad.txt")
    with pytest.raises(ConfigError, match="must exist"):
        read_label_names(tmp_path / "missing.json")


def test_stats_on_hand_built_blocks(tmp_path: Path) -> None:
    labels = np.zeros((10, 10, 6), np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # 8 voxels
    labels[5:7, 5:7, 3:5] = 1  # 8 voxels, a second component
    labels[2, 2, 2] = 1  # touches the first block at a corner only: same component (26-connectivity)
    labels[9, 9, 5] = 2
    image = np.zeros(labels.shape, np.float32)
    image[labels == 1] = 10.0
    image[5:7, 5:7, 3:5] = 20.0
    affine = np.diag([0.5, 0.5, 2.0, 1.0])  # 0.5 mm3 per voxel
    table = label_table({"background": 0, "a": 1, "b": 2, "c": 3})
    rows = {r["name"]: r for r in label_stats(labels, affine, table, image)}
    assert rows["a"]["voxels"] == 17
    assert rows["a"]["volume_ml"] == pytest.approx(17 * 0.5 / 1000)
    assert rows["a"]["components"] == 2
    assert rows["a"]["mean"] == pytest.approx((9 * 10 + 8 * 20) / 17, abs=1e-4)
    assert rows["a"]["std"] == pytest.approx(np.std(image[labels == 1]), abs=1e-4)
    assert (rows["b"]["voxels"], rows["b"]["components"]) == (1, 1)
    assert (rows["c"]["voxels"], rows["c"]["components"], rows["c"]["mean"]) == (0, 0, None)
    rotated = np.eye(4)
    rotated[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(
        [0.5, 0.5, 2.0]
    )
    assert (
        label_stats(labels, rotated, table)[0]["volume_ml"] == rows["a"]["volume_ml"]
    )  # oblique: same volume

    for case_id in ("x", "y"):
        (tmp_path / case_id).mkdir()
        export_case(CaseExport(case_id, labels, affine, table, image=image), tmp_path / case_id, ["stats"])
    with (tmp_path / "x" / "stats.csv").open() as f:
        per_case = list(csv.DictReader(f))
    assert [r["name"] for r in per_case] == ["a", "b", "c"]
    assert per_case[2]["mean"] == ""
    batch = write_batch_stats(tmp_path, ["x", "y", "missing"])
    assert batch is not None
    with batch.open() as f:
        rows_b = list(csv.DictReader(f))
    assert [(r["case_id"], r["name"]) for r in rows_b][:4] == [("x", "a"), ("x", "b"), ("x", "c"), ("y", "a")]
    assert len(rows_b) == 6


def test_qc_flags() -> None:
    cases = {
        "a": CaseOutcome("ok", volumes={"liver": 1500.0, "tumour": 10.0}),
        "b": CaseOutcome("ok", volumes={"liver": 1400.0, "tumour": 12.0}),
        "c": CaseOutcome("ok", volumes={"liver": 1450.0, "tumour": 0.0}),
        "d": CaseOutcome("ok", volumes={"liver": 5000.0, "tumour": 11.0}),
        "e": CaseOutcome("ok", volumes={"liver": 0.0, "tumour": 0.0}),
        "f": CaseOutcome("failed", error="bad file"),
        "g": CaseOutcome(
            "ok",
            volumes={"liver": 1500.0, "tumour": 10.0},
            quality={"foreground_entropy": 0.6},
            refine={"crf_changed_fraction": 0.2},
        ),
    }
    rows = list(cases.values())
    medians = batch_medians(rows)
    assert medians == {"liver": 1475.0, "tumour": 10.0}
    codes = {case_id: [f.code for f in case_flags(c, medians)] for case_id, c in cases.items()}
    assert codes == {
        "a": [],
        "b": [],
        "c": ["volume"],  # tumour missing where the batch median is 10 mL
        "d": ["volume"],
        "e": ["empty"],
        "f": ["failed"],
        "g": ["low-confidence", "crf-change"],
    }
    assert batch_medians(rows[:2]) == {}  # too few cases for a median
    with pytest.raises(ValueError, match="volume_ratio"):
        QcSettings(volume_ratio=1.0)


@pytest.mark.parametrize("module", ["labels", "label_tables", "stats", "qc", "registry"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"medseg.export.{module}"))
    assert result.attempted > 0
    assert result.failed == 0
