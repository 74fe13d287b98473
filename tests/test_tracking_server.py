"""The shared tracking server recipe: MLflow on PostgreSQL, with medseg train, predict and compare.

As README's "Shared tracking server" says: a PostgreSQL database as the backend store, ``mlflow server``
with a file artifact root it serves itself, and every medseg command pointed at it through
``MLFLOW_TRACKING_URI``. Here both servers are throw-away ones on loopback.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml
from server_helpers import mlflow_server, postgres_cluster
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config.pipeline import PipelineConfig


def _pipeline(path: Path) -> Path:
    cfg = PipelineConfig.model_validate(
        {
            "name": "served-tiny",
            "model": {"name": "unet3d", "params": {"channels": [4, 8], "num_res_units": 0}},
            "train": {"epochs": 1, "patch_size": [16, 16, 16], "batch_size": 1, "val_every": 1},
            "inference": {"batch_size": 2},
        }
    )
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@pytest.mark.slow  # starts PostgreSQL and an MLflow server, trains and predicts (about 40 s)
def test_train_and_predict_log_to_a_postgres_backed_server(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    psycopg = pytest.importorskip("psycopg", reason="MLflow on PostgreSQL needs psycopg (medseg[server])")
    artifacts = tmp_path / "artifacts"
    with postgres_cluster() as database:  # postgresql://user@host:port/db; SQLAlchemy names the driver
        store = database.replace("postgresql://", "postgresql+psycopg://")
        with mlflow_server(store, artifacts, tmp_path / "mlflow.log") as url:
            _train_predict_compare(url, synthetic_dataset, tmp_path, monkeypatch)
        # the runs are rows in PostgreSQL; the bundle files sit under the server's artifact folder
        with psycopg.connect(database) as con, con.cursor() as cur:
            cur.execute("select count(*), min(status), max(status) from runs")
            assert cur.fetchone() == (2, "FINISHED", "FINISHED")
    assert list(artifacts.rglob("bundle/*"))


def _train_predict_compare(
    url: str, synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for name in ("NO_PROXY", "no_proxy"):  # loopback traffic must not go through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    runner = CliRunner()
    spec = tmp_path / "spec.yaml"
    nifti = synthetic_dataset.parent / "nifti"
    spec.write_text(synthetic_dataset.read_text().replace("data_root: nifti", f"data_root: {nifti}"))
    done = runner.invoke(
        app,
        ["train", str(_pipeline(tmp_path / "p.yaml")), "--data", str(spec), "--out", str(tmp_path / "m")],
    )
    assert done.exit_code == 0, done.output
    train_id = re.search(r"MLflow run ([0-9a-f]{32})", done.output).group(1)  # type: ignore[union-attr]

    scans = nifti / "imagesTr"
    bundle_uri = f"runs:/{train_id}/bundle"  # downloaded through the server
    args = ["predict", str(scans), str(tmp_path / "pred"), "--model", bundle_uri, "--export", "volumes"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output

    done = runner.invoke(app, ["compare", "--experiment", "medseg", "--out", str(tmp_path / "cmp")])
    assert done.exit_code == 0, done.output
    with (tmp_path / "cmp" / "runs.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    kinds = {row["run_id"]: row["kind"] for row in rows}
    assert list(kinds.values()).count("train") == 1
    assert list(kinds.values()).count("predict") == 1
    assert kinds[train_id] == "train"
