"""Tracking that survives its server: records that cannot be sent are journalled and replayed later.

A batch runs for hours; the shared MLflow server may restart meanwhile. :func:`journaled_run` opens
the batch's run like :func:`~medseg.tracking.runs.tracked_run`, but a call that fails to reach the
store (metrics, params, the manifest artifact, the run's end) is appended to a journal file beside
the manifest (``OUT/tracking.journal.jsonl``, one JSON record a line, fsynced) and segmentation goes
on. Every later call first replays the journal (at most every ``RETRY_S`` seconds while the server
is away), so when the server comes back the run catches up in order and ends complete;
``medseg track sync OUT`` replays what is left after the batch ended.

At start, an unreachable server is an error (:class:`TrackingUnavailableError`, exit status 2)
unless tracking is optional (``--tracking-optional``, ``MEDSEG_TRACKING_OPTIONAL=1``): then the
run's creation itself is journalled, and the run is created when the journal is replayed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, MedsegError

JOURNAL_FILE = "tracking.journal.jsonl"
OPTIONAL_ENV = "MEDSEG_TRACKING_OPTIONAL"
RETRY_S = 2.0
_log = logging.getLogger(__name__)


class TrackingUnavailableError(MedsegError):
    """The tracking store cannot be reached when a run starts."""


def _fail_fast() -> None:
    """Let MLflow's HTTP client give up on a dead server in seconds, not after minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def pending_records(out_dir: str | Path) -> int:
    """How many records wait in a batch folder's tracking journal (0 when there is none)."""
    path = Path(out_dir) / JOURNAL_FILE
    with contextlib.suppress(FileNotFoundError):
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return 0


class JournaledRun:
    """The batch's run: sends each record to the store, or journals it when the store is away.

    Offers the calls the batch runner makes on a :class:`~medseg.tracking.runs.RunLog`.
    """

    def __init__(self, journal: Path, uri: str, experiment: str) -> None:
        self.journal, self.uri, self.experiment = Path(journal), uri, experiment
        self.run_id = ""
        self._log: Any = None
        self._lock = threading.Lock()
        self._next_try = 0.0

    # -- the store ---------------------------------------------------------------------------
    def create(self, kind: str, params: Any, tags: Mapping[str, Any] | None = None) -> None:
        """Create the run in the store (raises when the store is away)."""
        from medseg.tracking.runs import RunLog, _system_tags, _tag_values
        from medseg.tracking.store import RunKind, client, experiment_id

        mlflow_client = client(self.uri)
        exp_id = experiment_id(mlflow_client, self.experiment, self.uri)
        all_tags = {**_tag_values(tags or {}), **_system_tags(RunKind.parse(kind), None)}
        run = mlflow_client.create_run(exp_id, tags=all_tags)
        self._log = RunLog(mlflow_client, run.info.run_id, self.experiment, self.uri)
        self.run_id = run.info.run_id
        if params is not None:
            self._log.log_params(params)

    def _attach(self, run_id: str) -> None:
        from medseg.tracking.runs import RunLog
        from medseg.tracking.store import client

        self._log = RunLog(client(self.uri), run_id, self.experiment, self.uri)
        self.run_id = run_id

    def _apply(self, record: dict[str, Any]) -> None:
        op = record["op"]
        if op == "create":
            if self._log is None:
                self.create(record["kind"], record.get("params"))
            return
        if record.get("run_id") and record["run_id"] != self.run_id:  # journalled after the run began
            self._attach(record["run_id"])
        if self._log is None:
            msg = "tracking journal must start with the run's creation, got none"
            raise MedsegError(msg)
        if op == "metrics":
            from medseg.tracking.store import mlflow_module

            metric = mlflow_module().entities.Metric
            batch = [metric(k, float(v), record["ts"], record["step"]) for k, v in record["metrics"].items()]
            self._log.client.log_batch(self.run_id, metrics=batch)
        elif op == "params":
            self._log.log_params(record["params"])
        elif op == "dict":
            self._log.log_dict(record["obj"], record["name"])
        elif op == "end":
            if record.get("error"):
                self._log.set_tags({"medseg.error": record["error"]})
            self._log.client.set_terminated(self.run_id, status=record["status"])
        else:
            msg = f"tracking journal record must be one of create, metrics, params, dict, end, got {op!r}"
            raise ConfigError(msg)

    # -- the journal -------------------------------------------------------------------------
    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps({**record, "uri": self.uri, "experiment": self.experiment, "run_id": self.run_id})
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _records(self) -> list[dict[str, Any]]:
        try:
            text = self.journal.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        from medseg.io.atomic import atomic_write_text

        if records:
            atomic_write_text(self.journal, "".join(json.dumps(r) + "\n" for r in records))
        else:
            self.journal.unlink(missing_ok=True)

    def replay(self) -> int:
        """Send the journalled records in order; returns how many are left (0: all sent).

        A record that fails stops the replay; it and the later ones stay in the journal.
        """
        records = self._records()
        sent = 0
        try:
            for record in records:
                self._apply(record)
                sent += 1
        except Exception:
            _log.debug("tracking store still away", exc_info=True)
        if sent:
            self._rewrite(records[sent:])
        return len(records) - sent

    def _send(self, record: dict[str, Any]) -> None:
        """Send one record, replaying the journal first; journal it if the store is away."""
        with self._lock:
            now = time.monotonic()
            if self.journal.exists():
                if now < self._next_try:  # the store was away a moment ago: do not wait on it again
                    self._append(record)
                    return
                if self.replay():  # records left: still away
                    self._next_try = now + RETRY_S
                    self._append(record)
                    return
            try:
                self._apply(record)
            except Exception as exc:
                _log.warning("tracking store unreachable (%s); journalling to %s", exc, self.journal)
                self._next_try = now + RETRY_S
                self._append(record)

    # -- what the runner calls ---------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at ``step`` (now, or later from the journal with today's timestamp)."""
        values = {k: float(v) for k, v in metrics.items()}
        if values:
            self._send({"op": "metrics", "metrics": values, "step": step or 0, "ts": int(time.time() * 1000)})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params."""
        from medseg.tracking.params import to_jsonable

        self._send({"op": "params", "params": to_jsonable(dict(params))})

    def log_dict(self, obj: Any, name: str) -> None:
        """Store ``obj`` as a JSON artifact ``name``."""
        from medseg.tracking.params import to_jsonable

        self._send({"op": "dict", "obj": to_jsonable(obj), "name": name})

    def end(self, status: str, error: str | None = None) -> None:
        """End the run (FINISHED, FAILED, KILLED), now or when the journal is replayed."""
        self._next_try = 0.0  # try the store once more at the end
        self._send({"op": "end", "status": status, "error": error})


@contextlib.contextmanager
def journaled_run(
    kind: str,
    *,
    experiment: str = "medseg",
    params: Any = None,
    uri: str | None = None,
    journal: str | Path,
) -> Iterator[JournaledRun]:
    """Open the batch's run; records the store cannot take are journalled in ``journal``.

    Args:
        kind: What the run does (``predict``).
        experiment: The experiment's name.
        params: Parameters to log.
        uri: The tracking URI (default: :func:`~medseg.tracking.store.tracking_uri`).
        journal: The journal file (beside the batch's manifest).

    Yields:
        The :class:`JournaledRun`.

    Raises:
        TrackingUnavailableError: The store is unreachable at start and tracking is not optional.
    """
    from medseg.tracking.store import tracking_uri

    _fail_fast()
    uri = uri or tracking_uri()
    run = JournaledRun(Path(journal), uri, experiment)
    left = run.replay()  # an earlier batch's records first
    try:
        if left:
            raise ConnectionError(f"{left} journalled record(s) of an earlier run could not be sent")
        run.create(kind, params)
    except ConfigError:
        raise
    except Exception as exc:
        if os.environ.get(OPTIONAL_ENV) != "1":
            msg = (
                f"tracking store must be reachable when a batch starts, got {type(exc).__name__} from {uri}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''} (pass --tracking-optional to segment anyway "
                "and keep the records in a journal beside the manifest)"
            )
            raise TrackingUnavailableError(msg) from exc
        _log.warning("tracking store unreachable at start (%s); journalling to %s", exc, run.journal)
        run._append({"op": "create", "kind": kind, "params": _jsonable(params)})
        run._next_try = time.monotonic() + RETRY_S
    try:
        yield run
    except BaseException as exc:
        run.end("FAILED" if isinstance(exc, Exception) else "KILLED", f"{type(exc).__name__}: {exc}")
        raise
    run.end("FINISHED")


def _jsonable(params: Any) -> Any:
    from medseg.tracking.params import to_jsonable

    return to_jsonable(params) if params is not None else None


def sync(out_dir: str | Path) -> int:
    """Replay a batch folder's tracking journal (``medseg track sync OUT``); returns records left.

    Raises:
        TrackingUnavailableError: If records are left because the store is still unreachable.
    """
    path = Path(out_dir) / JOURNAL_FILE
    if not path.is_file():
        return 0
    _fail_fast()
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    run = JournaledRun(path, first["uri"], first["experiment"])
    left = run.replay()
    if left:
        msg = f"tracking store {run.uri} must be reachable to sync, got {left} record(s) waiting in {path}"
        raise TrackingUnavailableError(msg)
    return 0
