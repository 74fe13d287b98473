"""Where medseg's runs live: the tracking URI, the MLflow client, experiments and run look-up.

Without ``MLFLOW_TRACKING_URI`` the store is an embedded SQLite file ``./mlflow.db`` with artifacts
beside it in ``./mlartifacts``; browse it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
The first use of a new SQLite file creates its tables (MLflow runs its migrations), which takes a few
seconds.

MLflow (a core dependency) is imported on first use, so ``medseg --help`` stays quick, with its INFO logs
silenced unless ``MLFLOW_LOGGING_LEVEL`` is set, and its usage telemetry off unless
``MLFLOW_DISABLE_TELEMETRY`` is set.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from medseg.errors import ConfigError, choice_error

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_KIND = "medseg.kind"
TAG_PARENT = "mlflow.parentRunId"


class RunKind(str, Enum):
    """What a run did; recorded as the ``medseg.kind`` tag."""

    TRAIN = "train"
    PREDICT = "predict"
    EVALUATE = "evaluate"
    PLAN = "plan"
    IMPORT = "import"

    @classmethod
    def parse(cls, kind: RunKind | str) -> RunKind:
        """Accept a kind or its name.

        Raises:
            ConfigError: For an unknown name, suggesting the nearest and listing the choices.
        """
        try:
            return cls(kind)
        except ValueError:
            raise ConfigError(choice_error("run kind", kind, [k.value for k in cls])) from None


def tracking_uri() -> str:
    """The tracking store medseg uses: ``MLFLOW_TRACKING_URI`` if set, else ``./mlflow.db``.

    Returns:
        The URI; the default is ``sqlite:///<absolute cwd>/mlflow.db``.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(Path.cwd().resolve() / 'mlflow.db').as_posix()}"


def sqlite_path(uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:`` URI, or None for other stores and in-memory ones.

    Examples:
        >>> sqlite_path("sqlite:////data/mlflow.db?timeout=30").as_posix()
        '/data/mlflow.db'
        >>> sqlite_path("http://localhost:5000") is None
        True
    """
    match = re.fullmatch(r"sqlite(\+\w+)?:///([^?]*)(\?.*)?", uri)
    if match is None or match.group(2) in ("", ":memory:"):
        return None
    return Path(match.group(2)).resolve()


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: a ``file:`` URI beside a SQLite database, else None.

    For a SQLite store this is ``<db dir>/mlartifacts/<experiment>``; other stores (a server, a
    ``file:`` store) choose for themselves.
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment).strip(".") or "_"
    return (db.parent / "mlartifacts" / folder).as_uri()


@functools.cache
def mlflow_module() -> ModuleType:
    """MLflow, imported once, quietly and without telemetry unless the user chose otherwise."""
    import importlib

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow = importlib.import_module("mlflow")
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def client(uri: str | None = None) -> MlflowClient:
    """An MLflow client for ``uri`` (default :func:`tracking_uri`); global MLflow state is untouched."""
    made: MlflowClient = mlflow_module().MlflowClient(tracking_uri=uri or tracking_uri())
    return made


def experiment_id(mlflow_client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing (with artifacts beside a SQLite database).

    Raises:
        ConfigError: If ``name`` is empty or the experiment is deleted.
    """
    if not name.strip():
        msg = f"experiment must be a non-empty name, got {name!r}"
        raise ConfigError(msg)
    exists = mlflow_module().exceptions.MlflowException
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=artifact_root(uri, name))
        except exists:  # created meanwhile by another process
            found = mlflow_client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        msg = (
            f"experiment '{name}' is deleted in {uri}; restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or choose another name"
        )
        raise ConfigError(msg)
    return found.experiment_id


def find_runs(
    experiment: str = "medseg",
    kind: RunKind | str | None = None,
    uri: str | None = None,
    max_results: int | None = None,
) -> list[dict[str, Any]]:
    """Runs of an experiment, newest first, optionally of one kind.

    Args:
        experiment: The experiment's name; a missing one has no runs.
        kind: Only runs of this kind, e.g. ``"train"``.
        uri: The tracking URI; default :func:`tracking_uri`.
        max_results: At most this many runs; all if None.

    Returns:
        One dict per run with keys ``run_id``, ``name``, ``status``, ``kind``, ``parent_run_id``,
        ``start_time`` and ``end_time`` (timezone-aware UTC datetimes, ``end_time`` None while
        running), ``params`` (flat strings), ``metrics`` (latest value per key) and ``tags``.

    Raises:
        ConfigError: For an unknown ``kind``.
    """
    filter_string = f"tags.`{TAG_KIND}` = '{RunKind.parse(kind).value}'" if kind is not None else ""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs: list[Any] = []
    token = None
    while max_results is None or len(runs) < max_results:
        page = mlflow_client.search_runs(
            [found.experiment_id],
            filter_string=filter_string,
            max_results=min(1000, max_results - len(runs)) if max_results else 1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [_run_record(run) for run in runs]


def _run_record(run: Any) -> dict[str, Any]:
    info, data = run.info, run.data

    def when(ms: int | None) -> datetime | None:
        return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None

    return {
        "run_id": info.run_id,
        "name": info.run_name,
        "status": info.status,
        "kind": data.tags.get(TAG_KIND),
        "parent_run_id": data.tags.get(TAG_PARENT),
        "start_time": when(info.start_time),
        "end_time": when(info.end_time),
        "params": dict(data.params),
        "metrics": dict(data.metrics),
        "tags": dict(data.tags),
    }
