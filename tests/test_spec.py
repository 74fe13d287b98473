"""Dataset specs: validation (good and each kind of bad), MSD import, file checks, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from geometry_helpers import shared
from pydantic import ValidationError

from medseg.config.check import check_spec_data
from medseg.config.msd import spec_from_dataset_json
from medseg.config.spec import DATA_ROOT_ENV, DatasetSpec, Modality, load_spec, save_spec
from medseg.errors import ConfigError
from medseg.io import write_label_map, write_volume

REPO = Path(__file__).resolve().parents[1]
AFF = np.diag([0.8, 0.8, 2.0, 1.0])


def _write_case(root: Path, cid: str, labels: tuple[int, ...] = (0, 1, 2), affine=AFF, channels: int = 1):
    rng = np.random.default_rng(len(cid))
    for c in range(channels):
        write_volume(
            rng.random((6, 5, 4)).astype(np.float32), affine, root / "images" / f"{cid}_{c:04d}.nii.gz"
        )
    lab = np.zeros((6, 5, 4), dtype=np.uint8)
    for i, v in enumerate(labels):
        lab[i] = v
    write_label_map(lab, AFF, root / "labels" / f"{cid}.nii.gz")


def _spec_dict(**over) -> dict:
    base = {
        "name": "toy",
        "channels": [{"name": "ct", "modality": "CT"}],
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "case_patterns": {"images": ["images/{case}_0000.nii.gz"], "label": "labels/{case}.nii.gz"},
    }
    base.update(over)
    return base


def _write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_good_spec_resolves_cases_by_pattern(tmp_path: Path) -> None:
    for cid in ("b", "a"):
        _write_case(tmp_path, cid)
    loaded = load_spec(_write_spec(tmp_path / "spec.yaml", _spec_dict()))
    cases = loaded.resolve_cases(require_labels=True)
    assert [c.id for c in cases] == ["a", "b"]
    assert cases[0].images == (tmp_path / "images" / "a_0000.nii.gz",)
    assert check_spec_data(loaded) == 2
    assert loaded.spec.channels[0].effective_intensity().scheme == "ct"
    assert loaded.spec.num_classes == 3


def test_explicit_case_list_and_data_root_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_case(tmp_path / "data", "c1")
    spec = _spec_dict(case_patterns=None, data_root="elsewhere")
    spec["cases"] = [{"id": "c1", "images": ["images/c1_0000.nii.gz"], "label": "labels/c1.nii.gz"}]
    path = _write_spec(tmp_path / "spec.yaml", spec)
    with pytest.raises(ConfigError, match="data root must be an existing folder"):
        load_spec(path)
    assert load_spec(path, data_root=tmp_path / "data").resolve_cases()[0].id == "c1"
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    assert load_spec(path).root == (tmp_path / "data").resolve()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labls": {"background": 0}}, "unknown key 'labls'"),
        ({"labels": {"background": 0, "a": 1, "b": 1}}, "distinct values"),
        ({"labels": {"liver": 1}}, "background value 0"),
        ({"channels": []}, "channels"),
        ({"channels": [{"name": "x", "modality": "XRAY"}]}, r"channels\.0\.modality"),
        (
            {"channels": [{"name": "x", "modality": "CT", "intensity": {"scheme": "ct"}}]},
            "clip must be given",
        ),
        (
            {"channels": [{"name": "x", "modality": "CT", "intensity": {"scheme": "ct", "clip": [5, 1]}}]},
            "low < high",
        ),
        ({"target_spacing": [1.0, -1.0, 1.0]}, r"target_spacing\.1"),
        ({"mirror_axes": [0, 0]}, r"mirror_axes must be distinct spatial axes, got \[0, 0\]"),
        ({"mirror_axes": [3]}, r"mirror_axes\.0"),
        ({"case_patterns": {"images": ["images/*.nii.gz"]}}, r"\{case\}"),
        ({"cases": [{"id": "a", "images": ["x"]}]}, "exactly one of 'cases' and 'case_patterns'"),
    ],
)
def test_bad_specs_name_the_file_and_field(tmp_path: Path, change: dict, message: str) -> None:
    data = _spec_dict()
    data.update(change)
    if "labls" in change:
        del data["labels"]
    path = _write_spec(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=message) as info:
        load_spec(path)
    assert "bad.yaml" in str(info.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    spec = _spec_dict(case_patterns=None)
    spec["cases"] = [{"id": "c1", "images": ["images/c1_0000.nii.gz"], "label": "labels/c1.nii.gz"}]
    loaded = load_spec(_write_spec(tmp_path / "spec.yaml", spec))
    with pytest.raises(ConfigError, match=r"cases\.0\.images\.0.*c1_0000"):
        loaded.resolve_cases()
    empty = load_spec(_write_spec(tmp_path / "empty.yaml", _spec_dict()))
    with pytest.raises(ConfigError, match="at least one case"):
        empty.resolve_cases()


def test_undeclared_label_value_is_reported(tmp_path: Path) -> None:
    _write_case(tmp_path, "a", labels=(0, 1, 3))
    loaded = load_spec(_write_spec(tmp_path / "spec.yaml", _spec_dict()))
    with pytest.raises(ConfigError, match=r"undeclared \[3\].*a\.nii\.gz"):
        check_spec_data(loaded)


def test_channels_on_different_grids_are_reported(tmp_path: Path) -> None:
    _write_case(tmp_path, "a", channels=1)
    write_volume(
        np.zeros((6, 5, 4), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]), tmp_path / "images" / "a_0001.nii.gz"
    )
    data = _spec_dict(channels=[{"name": "t1", "modality": "MR"}, {"name": "t2", "modality": "MR"}])
    data["case_patterns"]["images"] = ["images/{case}_0000.nii.gz", "images/{case}_0001.nii.gz"]
    loaded = load_spec(_write_spec(tmp_path / "spec.yaml", data))
    with pytest.raises(ConfigError, match=r"case 'a'.*share one voxel grid"):
        check_spec_data(loaded)


def test_label_map_on_another_grid_is_reported(tmp_path: Path) -> None:
    _write_case(tmp_path, "a", affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    loaded = load_spec(_write_spec(tmp_path / "spec.yaml", _spec_dict()))
    with pytest.raises(ConfigError, match="label map of case 'a' must share the image's voxel grid"):
        check_spec_data(loaded)


def test_yaml_round_trip(tmp_path: Path) -> None:
    spec = DatasetSpec.model_validate(
        _spec_dict(
            channels=[
                {
                    "name": "ct",
                    "modality": "CT",
                    "intensity": {"scheme": "ct", "clip": [-200, 300], "mean": 50, "std": 80},
                }
            ],
            target_spacing=[0.8, 0.8, 2.5],
        )
    )
    save_spec(spec, tmp_path / "out.yaml")
    again = load_spec(tmp_path / "out.yaml", data_root=tmp_path).spec
    assert again == spec
    with pytest.raises(ValidationError, match="Instance is frozen"):
        spec.name = "changed"  # type: ignore[misc]


def test_msd_dataset_json_import() -> None:
    path = shared("hippocampus", "dataset.json")
    loaded = load_spec(path)
    spec = loaded.spec
    assert spec.channels[0].modality is Modality.MR
    assert spec.labels == {"background": 0, "Anterior": 1, "Posterior": 2}
    cases = loaded.resolve_cases(require_labels=True)
    assert len(cases) == 205
    assert check_spec_data(loaded, max_cases=3) == 3


def test_shipped_hippocampus_spec_matches_dataset_json() -> None:
    shared("hippocampus")
    loaded = load_spec(REPO / "data_specs" / "hippocampus.yaml")
    assert len(loaded.resolve_cases(require_labels=True)) == 205
    assert check_spec_data(loaded, max_cases=2) == 2


def test_nnunet_v1_and_v2_layouts(tmp_path: Path) -> None:
    for cid in ("p1", "p2"):
        _write_case(tmp_path, cid, channels=2)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for f in (tmp_path / "images").iterdir():
        f.rename(tmp_path / "imagesTr" / f.name)
    for f in (tmp_path / "labels").iterdir():
        f.rename(tmp_path / "labelsTr" / f.name)
    v1 = {
        "name": "two",
        "modality": {"0": "T1", "1": "FLAIR"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("p1", "p2")
        ],
    }
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    spec1 = spec_from_dataset_json(tmp_path / "v1.json")
    assert spec1.cases is not None
    assert spec1.cases[0].images == ["imagesTr/p1_0000.nii.gz", "imagesTr/p1_0001.nii.gz"]
    v2 = {
        "channel_names": {"0": "CT", "1": "CT"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ".nii.gz",
    }
    (tmp_path / "v2.json").write_text(json.dumps(v2))
    loaded = load_spec(tmp_path / "v2.json")
    assert [c.name for c in loaded.spec.channels] == ["CT_0", "CT_1"]
    assert [c.id for c in loaded.resolve_cases(require_labels=True)] == ["p1", "p2"]
    assert check_spec_data(loaded) == 2
    (tmp_path / "broken.json").write_text('{"name": "x"}')
    with pytest.raises(ConfigError, match="field 'modality' is required"):
        spec_from_dataset_json(tmp_path / "broken.json")
