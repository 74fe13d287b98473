"""MLflow tracking against a real SQLite store in a temporary folder (creating one takes a few seconds)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medseg.errors import ConfigError
from medseg.tracking import RunKind, find_runs, flatten_params, tracked_run, tracking_uri
from medseg.tracking.store import mlflow_module

mlflow = mlflow_module()  # imported as medseg imports it: quiet, telemetry off

# MLflow 3.17's SQLAlchemy store uses a loader strategy SQLAlchemy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URI of one SQLite store shared by this module's tests (each test uses its own experiment)."""
    return f"sqlite:///{(tmp_path_factory.mktemp('mlflow') / 'mlflow.db').as_posix()}"


def test_flatten_params_and_kind_parsing() -> None:
    flat = flatten_params(
        {"model": {"name": "unet3d", "params": {"channels": [8, 16]}}, "bad key:x": 1, "long": "y" * 7000}
    )
    assert flat["model.name"] == "unet3d"
    assert flat["model.params.channels"] == "[8, 16]"
    assert flat["bad key_x"] == "1"
    assert len(flat["long"]) == 6000
    assert flat["long"].endswith("...")
    assert RunKind.parse("plan") is RunKind.PLAN
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        RunKind.parse("trian")


def test_run_logs_params_metrics_artifacts_and_tags(store: str, tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"\x00weights")
    params = {"model": {"name": "unet3d", "params": {"channels": [8, 16, 32]}}, "lr": 1e-3}
    with tracked_run("train", experiment="logs", run_name="r1", params=params, uri=store) as run:
        for epoch in range(3):
            run.log_metrics({"loss": 1 / (epoch + 1), "dice": epoch / 3}, step=epoch)
        with run.timer("epoch"):
            pass
        run.log_artifact(weights)
        run.log_dict({"out": tmp_path, "spacing": (1.0, 1.0, 2.0)}, "config/pipeline.yaml")
        run.log_text("notes", "notes.txt")
        with ThreadPoolExecutor(4) as pool:  # worker threads log without MLflow's active-run stack
            list(pool.map(lambda i: run.log_metric("case_dice", 0.1 * i, step=i), range(4)))

    client = mlflow.MlflowClient(tracking_uri=store)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "r1"
    assert got.data.tags["medseg.kind"] == "train"
    assert "medseg.version" in got.data.tags
    assert got.data.params == {"model.name": "unet3d", "model.params.channels": "[8, 16, 32]", "lr": "0.001"}
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert len(client.get_metric_history(run.run_id, "case_dice")) == 4
    assert "time_epoch_s" in got.data.metrics
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert names == {"model.pt", "config", "notes.txt"}
    assert [a.path for a in client.list_artifacts(run.run_id, "config")] == ["config/pipeline.yaml"]
    # Artifacts lie beside the database, not in ./mlruns.
    db_file = Path(store.removeprefix("sqlite:///"))
    assert got.info.artifact_uri.startswith((db_file.parent / "mlartifacts" / "logs").as_uri())
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, tracking_uri=store))
    assert (local / "config" / "pipeline.yaml").read_text().startswith(f"out: {tmp_path.as_posix()}\n")


def test_exception_marks_run_failed_and_propagates(store: str) -> None:
    opened: list[str] = []

    def predict() -> None:
        with tracked_run("predict", experiment="failures", uri=store) as run:
            opened.append(run.run_id)
            run.log_metric("cases", 1)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        predict()
    got = mlflow.MlflowClient(tracking_uri=store).get_run(opened[0])
    assert got.info.status == "FAILED"
    assert got.info.end_time is not None
    assert got.data.tags["medseg.error"] == "RuntimeError: boom"


def test_env_uri_overrides_default(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking_uri() == store
    with tracked_run("plan", experiment="env") as run:
        pass
    assert mlflow.MlflowClient(tracking_uri=store).get_run(run.run_id).info.status == "FINISHED"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # creates a second store: MLflow's migrations take a few seconds
def test_default_uri_is_sqlite_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow.db"
    with tracked_run("evaluate") as run:  # a fresh database: MLflow creates its tables, quietly
        run.log_text("ok", "report.txt")
    assert (tmp_path / "mlflow.db").is_file()
    assert list((tmp_path / "mlartifacts" / "medseg").glob("*/artifacts/report.txt"))
    assert not (tmp_path / "mlruns").exists()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "INFO" not in captured.err
    assert [r["run_id"] for r in find_runs(uri=uri)] == [run.run_id]


def test_parent_child_runs_and_find_runs_by_kind(store: str) -> None:
    with tracked_run("train", experiment="cv", run_name="cv", uri=store, params={"folds": 2}) as parent:
        for fold in range(2):
            with parent.child_run("evaluate", run_name=f"fold{fold}") as child:
                child.log_metric("dice", 0.5 + fold / 10)
    with tracked_run("evaluate", experiment="cv", uri=store, parent_run_id=parent.run_id):
        pass

    evaluations = find_runs("cv", kind="evaluate", uri=store)
    assert len(evaluations) == 3
    assert {r["parent_run_id"] for r in evaluations} == {parent.run_id}
    assert all(r["kind"] == "evaluate" and r["status"] == "FINISHED" for r in evaluations)
    assert {r["metrics"].get("dice") for r in evaluations} == {0.5, 0.6, None}
    (train,) = find_runs("cv", kind=RunKind.TRAIN, uri=store)
    assert train["run_id"] == parent.run_id
    assert train["params"] == {"folds": "2"}
    assert train["start_time"].tzinfo is not None
    assert len(find_runs("cv", uri=store)) == 4
    assert find_runs("no-such-experiment", uri=store) == []
    with (
        pytest.raises(ConfigError, match="parent_run_id"),
        tracked_run("evaluate", experiment="cv", uri=store, parent_run_id="0" * 32),
    ):
        pass
