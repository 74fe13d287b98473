"""The installed ``medseg`` command: a run that cannot start exits 2 with one line on stderr, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.bundle import build_network, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.synth import generate_dataset, write_nifti


def _medseg(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the ``medseg`` console script installed beside this Python, as a user would."""
    script = Path(sys.executable).with_name("medseg")
    if not script.exists():
        pytest.skip(f"needs the medseg console script beside {sys.executable} (pip install -e .)")
    return subprocess.run(
        [str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ
    )


def _scans_and_bundle(root: Path) -> tuple[Path, Path]:
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": {"background": 0, "a": 1},
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    bundle = save_bundle(root / "bundle", cfg, spec, build_network(cfg, spec))
    scans = root / "scans"
    write_nifti(np.random.default_rng(0).random((12, 10, 6), dtype=np.float32), np.eye(4), scans / "a.nii.gz")
    return scans, bundle


def _assert_cannot_start(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("medseg: error: "), lines
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow  # starts the real console script (imports torch and MONAI)
def test_unwritable_output_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    scans, bundle = _scans_and_bundle(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a folder below a regular file cannot be made, even by root
    proc = _medseg("predict", scans, blocker / "out", "--model", bundle, cwd=tmp_path)
    _assert_cannot_start(proc, str(blocker / "out"), "Not a directory")
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_invalid_tiling_argument_exits_2_with_one_line(tmp_path: Path) -> None:
    scans, bundle = _scans_and_bundle(tmp_path)
    record = json.loads((bundle / "bundle.json").read_text())
    record["pipeline"]["inference"]["overlap"] = 1.5  # windows cannot overlap by more than themselves
    (bundle / "bundle.json").write_text(json.dumps(record))
    proc = _medseg("predict", scans, tmp_path / "out", "--model", bundle, cwd=tmp_path)
    _assert_cannot_start(proc, "inference.overlap", "1.5")
    assert not (tmp_path / "out" / "a").exists()


@pytest.mark.slow
def test_bad_size_argument_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = _medseg("synth", tmp_path / "data", "--size", "64,64", cwd=tmp_path)
    _assert_cannot_start(proc, "--size must be three integers")
    assert not (tmp_path / "data").exists()


def test_every_command_turns_medseg_and_os_errors_into_status_2(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["check", str(tmp_path / "missing.yaml")])
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [
        f"medseg: error: config file must exist, got missing path {tmp_path / 'missing.yaml'}"
    ]
    (tmp_path / "spec.yaml").mkdir()  # a folder where a file should be: the OS refuses to read it
    folder = CliRunner().invoke(app, ["check", str(tmp_path / "spec.yaml")])
    assert folder.exit_code == 2, folder.output
    assert len(folder.stderr.strip().splitlines()) == 1
    assert folder.stderr.startswith("medseg: error: ")


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import medseg.config.check

    def broken(*args: object, **kwargs: object) -> int:
        raise ZeroDivisionError("a bug, not a bad input")

    monkeypatch.setattr(medseg.config.check, "check_spec_data", broken)
    spec = generate_dataset(tmp_path / "data", 1, shape=(16, 16, 6), dicom=False)
    result = CliRunner().invoke(app, ["check", str(spec)])
    assert isinstance(result.exception, ZeroDivisionError)
    assert result.exit_code == 1
