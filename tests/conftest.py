"""Shared fixtures: tiny synthetic cases and data sets, and a reference DICOM reader (SimpleITK)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

TINY_SHAPE = (24, 20, 10)


@pytest.fixture
def tiny_phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 24x20x10 CT phantom ``(image, label, affine)`` with labels 0-3 and an oblique affine."""
    from medseg.synth import make_phantom

    return make_phantom(shape=TINY_SHAPE, seed=0)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-case tiny CT data set (NIfTI + DICOM); returns its ``spec.yaml``. Do not modify it."""
    from medseg.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", 2, shape=TINY_SHAPE, seed=0)


@pytest.fixture(scope="session")
def sitk_read_series() -> Callable[[Path], tuple[np.ndarray, np.ndarray]]:
    """A reference reader: a DICOM series folder -> ``(array (i, j, k), RAS+ affine)`` via SimpleITK."""
    import SimpleITK as sitk

    def read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        image = reader.Execute()
        array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = direction @ np.diag(image.GetSpacing())
        affine[:3, 3] = image.GetOrigin()
        return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine

    return read


@pytest.fixture(scope="session")
def _session_mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _isolated_mlflow(_session_mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test logs to a throw-away store, never to ./mlflow.db of the working tree."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _session_mlflow_uri)
