"""The Ray engine of the batch runner: the same per-scan jobs, run by a pool of Ray actors.

The driver's loaded :class:`~medseg.pipeline.Predictor` (model bundles, preprocessing and every
switch the runner set on it) goes into Ray's object store once; each actor (a :class:`ScanWorker`)
takes it from there once, moves it to its device and runs :func:`~medseg.batch.job.run_job` on the
jobs it is sent. The driver (:class:`RayEngine`) keeps every actor busy, hands the results to the
runner in the order they finish, and the runner writes the manifest and the MLflow run exactly as for
the local engine. Outputs are the same byte for byte: the job writes them, not the engine.

A worker that dies (killed, out of memory, its node lost) loses nothing: its jobs go back to the
front of the queue and a new actor takes its place. A job writes into a temporary folder that is
renamed into place only when complete, so a job cut short leaves no output that looks finished and a
retry is safe. A scan that kills ``max_attempts`` workers in a row is recorded as failed.

On a cluster (``address``), the scans and the output folder must be on a filesystem every node sees
at the same path; the model travels through Ray's object store.

Examples:
    >>> RaySettings(workers=4).workers
    4
    >>> RaySettings(workers=0)
    Traceback (most recent call last):
    ...
    ValueError: workers must be >= 1, got 0
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from medseg.batch.job import TMP_PREFIX, JobResult, ScanJob, describe_error, run_job
from medseg.errors import ConfigError, optional_import
from medseg.sources.scans import FolderSource

if TYPE_CHECKING:
    from medseg.sources import ScanSource, SegmentationModel


@runtime_checkable
class Movable(Protocol):
    """A model that can move its networks to a worker's device."""

    def to(self, device: str) -> Movable:
        """The model on ``device``."""
        ...


WORKER_PREFIX = "medseg-scan-worker"
_IN_FLIGHT = 1  # jobs per actor: an actor runs one at a time, and a second would wait there idle at the end


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide the Ray engine runs.

    Attributes:
        address: A running Ray cluster (``"auto"``, ``"ray://host:10001"``, ...); ``None`` joins the
            Ray instance this process already started, else starts a local one.
        workers: Actors in the pool; default: as many as the cluster's CPUs (or GPUs, for
            ``device="cuda"``) hold, and no more than there are scans.
        cpus_per_worker: CPUs each actor reserves (and torch threads it uses).
        gpus_per_worker: GPUs each actor reserves; default 1 for ``device="cuda"``, else 0.
        max_attempts: Workers a scan may take down before it is recorded as failed; also the starts a
            worker may fail before its place in the pool is given up.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            msg = f"workers must be >= 1, got {self.workers}"
            raise ValueError(msg)
        if self.cpus_per_worker <= 0:
            msg = f"cpus_per_worker must be > 0, got {self.cpus_per_worker}"
            raise ValueError(msg)
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            msg = f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}"
            raise ValueError(msg)
        if self.max_attempts < 1:
            msg = f"max_attempts must be >= 1, got {self.max_attempts}"
            raise ValueError(msg)


class ScanWorker:
    """A Ray actor: takes the driver's predictor once, then segments one scan per call.

    Args:
        predictor: The driver's loaded :class:`~medseg.pipeline.Predictor` (networks on the CPU).
        device: Where this worker runs the network.
        threads: torch CPU threads.
    """

    def __init__(self, predictor: SegmentationModel, device: str, threads: int) -> None:
        import torch

        from medseg.sources import SegmentationModel

        if not isinstance(predictor, SegmentationModel):
            msg = (
                "predictor must be a segmentation model (spec, sha256, predict, describe), "
                f"got {type(predictor).__name__}"
            )
            raise TypeError(msg)
        torch.set_num_threads(max(1, threads))
        if isinstance(predictor, Movable):
            predictor.to(device)  # the networks move in place
        self.predictor = predictor

    def ready(self) -> int:
        """The worker's process id, once the model is loaded."""
        return os.getpid()

    def run(self, job: ScanJob, out_root: str) -> JobResult:
        """Run one job (see :func:`~medseg.batch.job.run_job`)."""
        return run_job(job, self.predictor, out_root=Path(out_root))


def _absolute(job: ScanJob) -> ScanJob:
    """The job with absolute input paths (a worker's working folder is not the driver's)."""
    scan = job.scan
    files = tuple(p.resolve() for p in scan.files)
    return replace(job, scan=replace(scan, path=scan.path.resolve(), files=files))


@dataclass
class _Slot:
    """One place in the pool: its current actor (replaced when it dies) and the jobs it holds."""

    index: int
    actor: Any = None
    generation: int = 0
    ready: Any = None  # the actor's ready() reference until it has loaded the model
    in_flight: int = 0
    failed_starts: int = 0


class RayEngine:
    """Runs scan jobs on a pool of :class:`ScanWorker` actors; see the module docstring.

    Args:
        predictor: The loaded :class:`~medseg.pipeline.Predictor`, as the local engine would run it.
        device: Where the workers run the network (``cpu`` or ``cuda``).
        settings: Cluster address and pool size.
        source: Where the scans come from; each is held fetched (by this process, so its files must
            be readable by the workers: this machine, or a shared file system) while a worker runs
            its job.

    Attributes:
        workers: Actors in the pool (known once :meth:`results` has started).
        retried: Jobs sent again because their worker died.
        replaced: Workers replaced after dying.
        start_seconds: Seconds from the start of :meth:`results` until every first worker had loaded
            the model (the pool's start-up cost).
    """

    def __init__(
        self,
        predictor: SegmentationModel,
        *,
        device: str = "cpu",
        settings: RaySettings | None = None,
        source: ScanSource | None = None,
    ) -> None:
        self.ray = optional_import("ray", "the Ray batch engine", "distributed")
        self.predictor = predictor
        self.source: ScanSource = source or FolderSource(".")
        self.device = device
        self.settings = settings or RaySettings()
        self.workers = 0
        self.retried = 0
        self.replaced = 0
        self.start_seconds = 0.0
        self._started_ray = False
        self._predictor_ref: Any = None
        self._run_tag = uuid.uuid4().hex[:8]

    # --- the pool ------------------------------------------------------------------------------------

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        ray.init(address=self.settings.address, include_dashboard=False, logging_level="warning")
        self._started_ray = True

    def _gpus(self) -> float:
        if self.settings.gpus_per_worker is not None:
            return self.settings.gpus_per_worker
        return 1.0 if self.device.startswith("cuda") else 0.0

    def _pool_size(self, n_jobs: int) -> int:
        if self.settings.workers is not None:
            return min(self.settings.workers, max(1, n_jobs))
        total = self.ray.cluster_resources()
        gpus = self._gpus()
        by_cpu = int(total.get("CPU", 1) // self.settings.cpus_per_worker)
        size = int(total.get("GPU", 0) // gpus) if gpus else by_cpu
        if size < 1:
            what = f"{gpus} GPU" if gpus else f"{self.settings.cpus_per_worker} CPU"
            msg = f"the Ray cluster must have room for one worker ({what}), got resources {total}"
            raise ConfigError(msg)
        return min(size, max(1, n_jobs))

    def _start(self, slot: _Slot) -> None:
        actor_cls = self.ray.remote(ScanWorker)
        slot.generation += 1
        slot.actor = actor_cls.options(
            name=f"{WORKER_PREFIX}-{self._run_tag}-{slot.index}-{slot.generation}",
            num_cpus=self.settings.cpus_per_worker,
            num_gpus=self._gpus(),
            max_restarts=0,
        ).remote(self._predictor_ref, self.device, max(1, int(self.settings.cpus_per_worker)))
        slot.ready = slot.actor.ready.remote()
        slot.in_flight = 0

    def _stop(self, slot: _Slot) -> None:
        if slot.actor is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(slot.actor, no_restart=True)
        slot.actor = None
        slot.ready = None

    # --- the run -------------------------------------------------------------------------------------

    def results(
        self, jobs: Sequence[ScanJob], out_root: Path
    ) -> Generator[tuple[ScanJob, JobResult], None, None]:
        """Run every job; yield ``(job, result)`` as each finishes (exactly once per job).

        Args:
            jobs: The jobs, in the order they should start.
            out_root: The batch's output folder.

        Yields:
            Each job with its :class:`~medseg.batch.job.JobResult`.

        Raises:
            ConfigError: If no worker can start, or the cluster has no room for one.
        """
        if not jobs:
            return
        ray = self.ray
        t0 = time.perf_counter()
        self._connect()
        self._predictor_ref = ray.put(self.predictor)
        out = str(Path(out_root).resolve())
        queue: collections.deque[tuple[ScanJob, int]] = collections.deque((j, 1) for j in jobs)
        slots = [_Slot(i) for i in range(self._pool_size(len(jobs)))]
        self.workers = len(slots)
        in_flight: dict[Any, tuple[_Slot, int, ScanJob, int, contextlib.ExitStack]] = {}
        starting: dict[Any, _Slot] = {}
        start_error: Exception | None = None
        finished = False
        try:
            for slot in slots:
                self._start(slot)
                starting[slot.ready] = slot
            while in_flight or starting:
                ready, _ = ray.wait([*starting, *in_flight], num_returns=1)
                ref = ready[0]
                if ref in starting:
                    slot = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        start_error = exc
                        self._worker_failed_to_start(slot, exc, starting)
                        continue
                    slot.ready, slot.failed_starts = None, 0
                    if not self.replaced and all(s.ready is None for s in slots):
                        self.start_seconds = time.perf_counter() - t0
                    self._fill(slot, queue, in_flight, out)
                    continue
                slot, generation, job, attempt, held = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # raised inside run(): not the scan's fault
                    result = JobResult(job.scan.case_id, "failed", job.fingerprint, job.model_sha256)
                    result.error = describe_error(getattr(exc, "cause", None) or exc, job.scan)
                except ray.exceptions.RayError as exc:  # the worker died
                    if slot.generation == generation:
                        self._stop(slot)
                        self.replaced += 1
                        self._start(slot)
                        starting[slot.ready] = slot
                    if attempt < self.settings.max_attempts:
                        queue.appendleft((job, attempt + 1))
                        self.retried += 1
                        self._refill(slots, queue, in_flight, out)
                        continue
                    result = JobResult(job.scan.case_id, "failed", job.fingerprint, job.model_sha256)
                    result.error = f"the worker died {attempt} times segmenting this scan ({_last_line(exc)})"
                finally:
                    held.close()
                if slot.generation == generation:  # (a replaced slot started afresh)
                    slot.in_flight -= 1
                self._refill(slots, queue, in_flight, out)  # before the runner's bookkeeping
                yield job, result
            if queue:  # every worker failed to start
                self._no_worker_left(start_error)
            finished = True
        finally:
            for *_, held in in_flight.values():
                held.close()
            for slot in slots:
                self._stop(slot)
            if finished:  # folders of jobs cut short by dead workers; no worker writes any more
                for stale in Path(out).glob(f"{TMP_PREFIX}*"):
                    shutil.rmtree(stale, ignore_errors=True)
            self._predictor_ref = None
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    def _fill(self, slot: _Slot, queue: collections.deque, in_flight: dict, out: str) -> None:
        while queue and slot.actor is not None and slot.ready is None and slot.in_flight < _IN_FLIGHT:
            job, attempt = queue.popleft()
            held = contextlib.ExitStack()
            try:  # the worker reads the fetched scan's files; the manifest keeps the job's scan
                fetched = replace(job, scan=held.enter_context(self.source.fetch(job.scan)))
            except Exception:  # the worker's load then fails and records it
                fetched = job
            ref = slot.actor.run.remote(_absolute(fetched), out)
            in_flight[ref] = (slot, slot.generation, job, attempt, held)
            slot.in_flight += 1

    def _refill(self, slots: list[_Slot], queue: collections.deque, in_flight: dict, out: str) -> None:
        for slot in sorted(slots, key=lambda s: s.in_flight):
            self._fill(slot, queue, in_flight, out)

    def _worker_failed_to_start(self, slot: _Slot, exc: Exception, starting: dict) -> None:
        """A new actor died before it had loaded the model: start another, up to ``max_attempts``."""
        self._stop(slot)
        slot.failed_starts += 1
        if slot.failed_starts < self.settings.max_attempts:
            self._start(slot)
            starting[slot.ready] = slot

    def _no_worker_left(self, exc: Exception | None) -> None:
        text = _last_line(exc) if exc is not None else "no worker could be started"
        msg = f"Ray workers must start and load the model, got: {text}"
        raise ConfigError(msg) from exc


def _last_line(exc: BaseException) -> str:
    """The last non-empty line of an error's text (Ray wraps the cause's traceback into it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
