"""The local engine: a batch's jobs in this process, loading, segmenting and writing overlapped.

While scans are segmented (the network, on torch's threads), a background thread fetches and loads
the next one and another writes the finished ones' outputs, so that only segmentation is on the
critical path. Each scan is held fetched from its scan source (see
:meth:`medseg.sources.ScanSource.fetch`) from before it is loaded until its outputs are written.

On CPU two scans are segmented at once by default, each with half the torch threads: the network
then keeps both cores busy while the other scan is in the single-threaded parts of its job
(preprocessing, stitching, the way back to the source grid). Peak memory is about twice one scan's.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from medseg.batch.job import JobResult, ScanJob, Segmented, segment_scan, write_outputs
from medseg.sources.folder import Scan

if TYPE_CHECKING:
    from torch import nn

    from medseg.sources import ScanSource, SegmentationModel


@runtime_checkable
class HasNetworks(Protocol):
    """A model that exposes its torch networks (their forward passes get the thread share)."""

    @property
    def networks(self) -> tuple[nn.Module, ...]:
        """The networks."""
        ...


def _one_thread() -> None:
    """Run this (background) thread's torch operations on one thread.

    Loading and writing are mostly decoding, copying and compression: on one core they never
    compete with the network for more (each thread that runs a parallel operation otherwise keeps an
    OpenMP team of its own).
    """
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _load(scan: Scan) -> Any:
    from medseg.io import load_image

    _one_thread()
    try:
        return load_image(list(scan.files) if scan.files else scan.path, series_uid=scan.series_uid)
    except Exception as exc:  # handed to the job, which records it as this scan's failure
        return exc


def default_parallel_scans(device: str) -> int:
    """Scans the local engine segments at once by default: 2 on CPU with 2+ torch threads, else 1."""
    import torch

    return 2 if torch.device(device).type == "cpu" and torch.get_num_threads() >= 2 else 1


def parallel_scans(setting: int | None, device: str, jobs: int) -> int:
    """Scans to segment at once: the setting (or the default), at most one per job and, on CPU, per thread."""
    import torch

    parallel = setting or default_parallel_scans(device)
    if torch.device(device).type == "cpu":
        parallel = min(parallel, torch.get_num_threads())
    return max(1, min(parallel, jobs))


class _ThreadShare:
    """Torch threads per scan in flight: an equal share of ``total`` among ``parallel`` scans.

    Used as a context manager around a scan's segmentation, and as a forward pre-hook on the
    network, which sets the calling thread's torch threads before every forward pass. Until the
    last scan has started, every scan gets ``total // parallel`` threads (also the first, before the
    second has started); after that the scans still running share every thread (the end of a
    batch).
    """

    def __init__(self, total: int, parallel: int = 1) -> None:
        self.total, self.parallel = total, parallel
        self.active = 0
        self.tail = False  # set when no scan is left to start
        self._lock = threading.Lock()

    def __enter__(self) -> _ThreadShare:
        with self._lock:
            self.active += 1
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.active -= 1

    def apply(self, *_hook_args: object) -> None:
        """Set this thread's torch threads to its share (also a forward pre-hook)."""
        import torch

        n = max(1, self.total // max(1, self.active if self.tail else self.parallel))
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


@dataclass
class Fetched:
    """A job whose scan its source holds readable until :meth:`release`.

    Attributes:
        job: The job with the fetched scan (its files are what is loaded and what exports read).
        image: The loaded scan, an exception if fetching or loading failed, or ``None`` (not loaded).
        stack: Holds the source's fetch open.
    """

    job: ScanJob
    image: Any = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def release(self) -> None:
        """Let the source clean up (remove temporary copies)."""
        self.stack.close()


class _Holding:
    """Every fetch still open, so that a batch cut short releases them all."""

    def __init__(self) -> None:
        self._items: dict[int, Fetched] = {}
        self._lock = threading.Lock()

    def fetch(self, source: ScanSource, job: ScanJob, *, load: bool) -> Fetched:
        """Fetch the job's scan (and load it); never raises: an error becomes ``image``."""
        held = Fetched(job)
        with self._lock:
            self._items[id(held)] = held
        try:
            scan = held.stack.enter_context(source.fetch(job.scan))
            held.job = replace(job, scan=scan)
        except Exception as exc:  # recorded as this scan's failure
            held.image = exc
            return held
        if load:
            held.image = _load(held.job.scan)
        return held

    def release(self, held: Fetched) -> None:
        """Release one fetch."""
        with self._lock:
            self._items.pop(id(held), None)
        held.release()

    def release_all(self) -> None:
        """Release every fetch still open."""
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for held in items:
            held.release()


def _write(segmented: Segmented, held: Fetched, holding: _Holding, out: Path) -> JobResult:
    """:func:`write_outputs` in the writing thread, then the fetch is released."""
    _one_thread()
    try:
        return write_outputs(segmented, out)
    finally:
        holding.release(held)


def _segment_loaded(
    predictor: SegmentationModel, loading: Future, share: _ThreadShare
) -> tuple[Segmented, Fetched]:
    """Wait for the scan's fetch and load, then segment it with its share of torch's threads."""
    t_wait = time.perf_counter()
    held: Fetched = loading.result()
    waited = time.perf_counter() - t_wait
    with share:
        segmented = segment_scan(held.job, predictor, image=held.image)
    segmented.result.seconds["load_wait"] = waited
    return segmented, held


def _one_by_one(
    jobs: Sequence[ScanJob], predictor: SegmentationModel, out: Path, source: ScanSource
) -> Iterator[tuple[ScanJob, JobResult]]:
    """The jobs one after another in this thread: fetch, load, segment, write, release."""
    holding = _Holding()
    for job in jobs:
        held = holding.fetch(source, job, load=False)
        try:
            result = write_outputs(segment_scan(held.job, predictor, image=held.image), out)
        finally:
            holding.release(held)
        yield job, result


def local_results(
    jobs: Sequence[ScanJob],
    predictor: SegmentationModel,
    *,
    out: Path,
    source: ScanSource,
    overlap: bool,
    prefetched: Prefetch | None = None,
    parallel: int = 1,
) -> Generator[tuple[ScanJob, JobResult], None, None]:
    """Run the jobs in this process, in three overlapping steps; results come out as scans finish.

    ``parallel`` scans are segmented at once, each in its own thread with an equal share of torch's
    threads among the scans in flight (see :class:`_ThreadShare`; restored at the end); a thread
    that finishes takes the next scan at once, so one large scan does not hold up the others.
    ``prefetched`` is the loading pool with the first scan's fetch and load already started (while
    the MLflow run starts); it is shut down here. Without ``overlap`` the jobs run one after another
    in this thread.
    """
    import torch

    from medseg.refine.memory import reuse_freed_memory

    if not overlap:
        yield from _one_by_one(jobs, predictor, out, source)
        return
    if not jobs:
        return
    pre = prefetched or prefetch(jobs, source)
    assert pre is not None
    loader, holding = pre.pool, pre.holding
    threads_before = torch.get_num_threads()
    share = _ThreadShare(threads_before, parallel)
    networks = predictor.networks if isinstance(predictor, HasNetworks) else ()
    hooks = [net.register_forward_pre_hook(share.apply) for net in networks]
    segmenter = None
    # Outside the main thread glibc serves the network's large temporaries from per-thread heaps
    # that it maps and unmaps afresh (about a million page faults, a third more CPU time, per
    # 256x256x200 CT): while scans run in pool threads, freed memory is kept for reuse instead
    memory = contextlib.ExitStack()
    if parallel > 1:
        segmenter = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="medseg-segment")
        memory.enter_context(reuse_freed_memory())
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-writer")
    loads: dict[int, Future] = {0: pre.first}
    segmenting: dict[Future, ScanJob] = {}
    writing: dict[Future, ScanJob] = {}
    started = 0

    def load(i: int) -> Future:
        return loader.submit(holding.fetch, source, jobs[i], load=True)

    try:
        while started < len(jobs) or segmenting or writing:
            # a free thread takes the next scan (while at most `parallel` wait to be written)
            while started < len(jobs) and len(segmenting) < parallel and len(writing) <= parallel:
                job = jobs[started]
                loading = loads.pop(started, None) or load(started)
                started += 1
                if started < len(jobs) and started not in loads:
                    loads[started] = load(started)  # the next scan, ahead
                if segmenter is None:  # one at a time: in this thread (its network ran faster here)
                    future: Future = Future()
                    future.set_result(_segment_loaded(predictor, loading, share))
                else:
                    future = segmenter.submit(_segment_loaded, predictor, loading, share)
                segmenting[future] = job
                share.tail = started == len(jobs)
            done, _ = wait([*segmenting, *writing], return_when=FIRST_COMPLETED)
            for future in done:
                if future in segmenting:
                    job = segmenting.pop(future)
                    segmented, held = future.result()
                    writing[writer.submit(_write, segmented, held, holding, out)] = job
                    del segmented, held
                else:
                    yield writing.pop(future), future.result()
    finally:
        for pool in (loader, segmenter, writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        holding.release_all()
        for hook in hooks:
            hook.remove()
        torch.set_num_threads(threads_before)
        memory.close()


@dataclass(frozen=True)
class Prefetch:
    """A one-thread loading pool, the first job's fetch-and-load in it, and the open fetches."""

    pool: ThreadPoolExecutor
    first: Future
    holding: _Holding

    def close(self) -> None:
        """Shut the pool down and release every fetch (when the run never started)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.holding.release_all()


def prefetch(jobs: Sequence[ScanJob], source: ScanSource) -> Prefetch | None:
    """Start fetching and loading the first job's scan in a one-thread pool (``None`` without jobs)."""
    if not jobs:
        return None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-prefetch")
    holding = _Holding()
    return Prefetch(pool, pool.submit(holding.fetch, source, jobs[0], load=True), holding)
