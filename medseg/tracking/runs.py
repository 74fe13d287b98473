"""MLflow runs for every medseg command: one context manager opens, tags, logs and closes a run.

Every medseg run (train, predict, evaluate, plan) goes through :func:`tracked_run`::

    with tracked_run("train", params=config, run_name="fold0") as run:
        for epoch in range(epochs):
            run.log_metrics({"loss": loss, "dice": dice}, step=epoch)
        run.log_artifact("model.pt")

A run talks to its store through its own :class:`mlflow.MlflowClient`, never through MLflow's
process-global active-run stack, so worker threads may log to it and no global tracking URI is left
behind. Where runs are stored is :mod:`medseg.tracking.store`'s business.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import ConfigError
from medseg.tracking.params import MAX_TAG_LENGTH, flatten_params, sanitize_key, to_jsonable, truncate
from medseg.tracking.store import (
    TAG_KIND,
    TAG_PARENT,
    RunKind,
    client,
    experiment_id,
    mlflow_module,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from pydantic import BaseModel

_log = logging.getLogger(__name__)

TAG_VERSION = "medseg.version"
TAG_GIT_COMMIT = "medseg.git_commit"
TAG_ERROR = "medseg.error"
_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
_MLFLOW_USER = "mlflow.user"
_BATCH = 100  # MLflow's limit on params or tags per log_batch call


@functools.cache
def _git_commit(folder: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def git_commit() -> str | None:
    """The commit of the git checkout holding the medseg package, else of the cwd, else None."""
    for folder in (Path(__file__).resolve().parent, Path.cwd()):
        commit = _git_commit(str(folder))
        if commit:
            return commit
    return None


def _system_tags(kind: RunKind, parent_run_id: str | None) -> dict[str, str]:
    from medseg import __version__

    tags = {TAG_KIND: kind.value, TAG_VERSION: __version__}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = tags[_MLFLOW_GIT_COMMIT] = commit
    with contextlib.suppress(Exception):  # getpass may fail in containers without a passwd entry
        import getpass

        tags[_MLFLOW_USER] = getpass.getuser()
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    return tags


def _tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {sanitize_key(k): truncate(str(v), MAX_TAG_LENGTH) for k, v in tags.items()}


class Stopwatch:
    """Seconds elapsed since it was started; frozen once stopped."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._stop: float | None = None

    @property
    def seconds(self) -> float:
        """Elapsed seconds, so far or in total."""
        return (self._stop if self._stop is not None else time.perf_counter()) - self._start

    def stop(self) -> float:
        """Stop the watch and return the elapsed seconds."""
        self._stop = time.perf_counter()
        return self.seconds


class RunLog:
    """Logs to one MLflow run through its own client; safe to share with worker threads.

    Made by :func:`tracked_run`; see there.
    """

    def __init__(self, mlflow_client: MlflowClient, run_id: str, experiment: str, uri: str) -> None:
        self._client = mlflow_client
        self._run_id = run_id
        self._experiment = experiment
        self._uri = uri

    def __repr__(self) -> str:
        return f"RunLog(run_id={self._run_id!r}, experiment={self._experiment!r}, uri={self._uri!r})"

    @property
    def run_id(self) -> str:
        """The MLflow run id."""
        return self._run_id

    @property
    def experiment(self) -> str:
        """The experiment's name."""
        return self._experiment

    @property
    def uri(self) -> str:
        """The tracking URI."""
        return self._uri

    @property
    def client(self) -> MlflowClient:
        """The run's MLflow client, for what this class does not cover."""
        return self._client

    @property
    def artifact_uri(self) -> str:
        """Where the run's artifacts are stored."""
        return self._client.get_run(self._run_id).info.artifact_uri

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """Log one metric value, at ``step`` (e.g. the epoch) if given.

        Raises:
            TypeError: If ``value`` is not a number.
        """
        self._client.log_metric(self._run_id, sanitize_key(key), _number(key, value), step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metrics at once, all at ``step`` if given.

        Raises:
            TypeError: If a value is not a number.
        """
        metric_type = mlflow_module().entities.Metric
        now = int(time.time() * 1000)
        batch = [metric_type(sanitize_key(k), _number(k, v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self._client.log_batch(self._run_id, metrics=batch[start : start + 1000])

    def log_params(self, params: Mapping[str, Any] | BaseModel) -> None:
        """Log parameters, flattened by :func:`~medseg.tracking.params.flatten_params`.

        MLflow params are write-once: logging a key again with a different value raises
        ``mlflow.exceptions.MlflowException``.
        """
        param_type = mlflow_module().entities.Param
        batch = [param_type(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(batch), _BATCH):
            self._client.log_batch(self._run_id, params=batch[start : start + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as strings, cut to 8000 characters)."""
        tag_type = mlflow_module().entities.RunTag
        batch = [tag_type(k, v) for k, v in _tag_values(tags).items()]
        for start in range(0, len(batch), _BATCH):
            self._client.log_batch(self._run_id, tags=batch[start : start + _BATCH])

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a file (or folder) into the run's artifacts, under ``artifact_path`` if given."""
        self._client.log_artifact(self._run_id, os.fspath(path), artifact_path)

    def log_artifacts(self, folder: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a folder's contents into the run's artifacts, under ``artifact_path`` if given."""
        self._client.log_artifacts(self._run_id, os.fspath(folder), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """Store ``obj`` as a JSON artifact, or YAML if ``name`` ends in ``.yaml``/``.yml``.

        Pydantic models, dataclasses, paths, enums and numpy values are converted; ``name`` may hold
        folders, e.g. ``"config/pipeline.yaml"``.
        """
        data = to_jsonable(obj)
        if name.lower().endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        self.log_text(text, name)

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` as an artifact file ``name`` (which may hold folders)."""
        folder, _, filename = name.replace("\\", "/").rpartition("/")
        if not filename or filename in (".", ".."):
            msg = f"name must end in a file name, got {name!r}"
            raise ValueError(msg)
        with tempfile.TemporaryDirectory(prefix="medseg-artifact-") as tmp:
            path = Path(tmp) / filename
            path.write_text(text, encoding="utf-8")
            self.log_artifact(path, folder or None)

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[Stopwatch]:
        """Time a block and log its seconds as metric ``time_<name>_s`` when it ends without error.

        Yields:
            A :class:`Stopwatch`, whose ``seconds`` the block may read.
        """
        watch = Stopwatch()
        yield watch
        self.log_metric(f"time_{name}_s", watch.stop())

    def child_run(
        self,
        kind: RunKind | str,
        *,
        run_name: str | None = None,
        params: Mapping[str, Any] | BaseModel | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[RunLog]:
        """A nested run (e.g. one fold) in the same experiment and store; see :func:`tracked_run`."""
        return tracked_run(
            kind,
            experiment=self._experiment,
            run_name=run_name,
            params=params,
            tags=tags,
            uri=self._uri,
            parent_run_id=self._run_id,
        )


def _number(key: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        msg = f"metric '{key}' must be a number, got {type(value).__name__} {value!r:.80}"
        raise TypeError(msg) from None


@contextlib.contextmanager
def tracked_run(
    kind: RunKind | str,
    *,
    experiment: str = "medseg",
    run_name: str | None = None,
    params: Mapping[str, Any] | BaseModel | None = None,
    tags: Mapping[str, Any] | None = None,
    uri: str | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[RunLog]:
    """Open an MLflow run for one medseg command, and close it whatever happens.

    The experiment is created if missing (with artifacts beside a SQLite database). The run is tagged
    ``medseg.kind``, ``medseg.version``, the git commit of the code (``medseg.git_commit`` and
    ``mlflow.source.git.commit``) when there is one, and ``mlflow.parentRunId`` for a nested run; its
    params are logged flattened. It ends FINISHED, FAILED if the block raises (the exception is tagged
    ``medseg.error`` and propagates) or KILLED on ``KeyboardInterrupt``/``SystemExit``.

    Args:
        kind: What the run does: ``train``, ``predict``, ``evaluate`` or ``plan``.
        experiment: The experiment's name.
        run_name: The run's name; MLflow makes one up if None.
        params: Parameters, nested mappings allowed (see :func:`~medseg.tracking.params.flatten_params`).
        tags: Extra tags; they cannot override the ``medseg.*`` tags set here.
        uri: The tracking URI; default :func:`tracking_uri`.
        parent_run_id: The run this one is nested under, e.g. a cross-validation run over folds.
        resume_run_id: Reopen this existing run (``train --resume``) instead of creating one;
            params already logged are not logged again.

    Yields:
        The :class:`RunLog` to log metrics, params, tags and artifacts with.

    Raises:
        ConfigError: For an unknown ``kind``, an empty or deleted experiment or an unknown parent run.

    Examples:
        >>> import tempfile
        >>> from medseg.tracking import find_runs
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     uri = f"sqlite:///{tmp}/mlflow.db"
        ...     with tracked_run("plan", uri=uri, params={"a": {"b": 1}}) as run:
        ...         run.log_metric("patches", 27)
        ...     [(r["kind"], r["params"], r["metrics"]) for r in find_runs(uri=uri)]
        [('plan', {'a.b': '1'}, {'patches': 27.0})]
    """
    kind = RunKind.parse(kind)
    uri = uri or tracking_uri()
    mlflow_client = client(uri)
    exp_id = experiment_id(mlflow_client, experiment, uri)
    if parent_run_id:
        try:
            mlflow_client.get_run(parent_run_id)
        except mlflow_module().exceptions.MlflowException as exc:
            msg = f"parent_run_id must name a run in {uri}, got {parent_run_id!r}"
            raise ConfigError(msg) from exc
    if resume_run_id:
        try:
            mlflow_client.get_run(resume_run_id)
        except mlflow_module().exceptions.MlflowException as exc:
            msg = f"resume_run_id must name a run in {uri}, got {resume_run_id!r}"
            raise ConfigError(msg) from exc
        mlflow_client.update_run(resume_run_id, status="RUNNING")
        log = RunLog(mlflow_client, resume_run_id, experiment, uri)
    else:
        all_tags = {**_tag_values(tags or {}), **_system_tags(kind, parent_run_id)}
        run = mlflow_client.create_run(exp_id, tags=all_tags, run_name=run_name)
        log = RunLog(mlflow_client, run.info.run_id, experiment, uri)
    try:
        if params is not None and not resume_run_id:
            log.log_params(params)
        yield log
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        try:  # tracking trouble must not hide the error that ended the run
            log.set_tags({TAG_ERROR: f"{type(exc).__name__}: {exc}"})
            mlflow_client.set_terminated(log.run_id, status=status)
        except Exception:
            _log.warning("could not mark MLflow run %s %s", log.run_id, status, exc_info=True)
        raise
    mlflow_client.set_terminated(log.run_id, status="FINISHED")
