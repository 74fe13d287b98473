"""Run a model over every scan of a file or folder: resumable, failure-isolating, one MLflow run.

The runner discovers scans, skips those already done (same input fingerprint, same model), runs the
others on an engine, writes the manifest after every scan, and records the batch in MLflow (case ids,
fingerprints and timings only: no paths, no patient data). Engines: ``local`` runs the jobs one after
another in this process, loading the next scan in a background thread and writing the previous one's
outputs in another while the current one is segmented; ``ray`` runs them on a pool of Ray actors
(:mod:`medseg.batch.ray_engine`). Both run the same jobs, so manifests and outputs are the same.

On CPU the local engine segments two scans at once by default, each with half the torch threads: the
network then keeps both cores busy while the other scan is in the single-threaded parts of its job
(preprocessing, stitching, the way back to the source grid). Peak memory is about twice one scan's.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.batch.job import (
    TMP_PREFIX,
    JobResult,
    ScanJob,
    Segmented,
    completed,
    input_fingerprint,
    segment_scan,
    write_outputs,
)
from medseg.batch.manifest import Manifest, check_existing
from medseg.errors import ConfigError, InputError, choice_error, optional_import
from medseg.sources.folder import Scan, ScanFilter, discover

if TYPE_CHECKING:
    from medseg.batch.ray_engine import RaySettings


class Engine(str, Enum):
    """Where a batch's jobs run."""

    LOCAL = "local"
    RAY = "ray"

    @classmethod
    def parse(cls, engine: Engine | str) -> Engine:
        """Accept an engine or its name.

        Raises:
            ConfigError: For an unknown name, suggesting the nearest and listing the choices.

        Examples:
            >>> Engine.parse("ray")
            <Engine.RAY: 'ray'>
        """
        try:
            return cls(engine)
        except ValueError:
            raise ConfigError(choice_error("engine", engine, [e.value for e in cls])) from None


@dataclass
class BatchSummary:
    """Outcome of a prediction run.

    Attributes:
        ok: Scans segmented (now or by an earlier run).
        failed: Scans that failed (each with its reason in ``entries``).
        skipped: Files that are not scans (or were filtered out).
        reused: Scans whose earlier outputs were kept.
        entries: One record per scan (as in the manifest).
        run_id: The MLflow run id.
        seconds: Wall time of the run.
        model_seconds: Sum of the network time (the forward passes alone, not cutting windows or
            stitching) over the scans segmented in this run.
        engine: The engine that ran the jobs.
        workers: Jobs that ran at once (the Ray actor pool's size; the local engine's parallel scans).
        retried: Jobs run again because their Ray worker died.
        start_seconds: Seconds until every Ray worker had loaded the model (0 for the local engine).
    """

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    reused: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""
    seconds: float = 0.0
    model_seconds: float = 0.0
    engine: str = "local"
    workers: int = 1
    retried: int = 0
    start_seconds: float = 0.0


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
        return load_image(list(scan.files) if scan.files else scan.path, **scan.load_kwargs)
    except Exception as exc:  # handed to the job, which records it as this scan's failure
        return exc


def _entry(job: ScanJob, result: JobResult) -> dict[str, Any]:
    return {
        "case_id": job.scan.case_id,
        "inputs": [str(p) for p in job.scan.inputs],
        "fingerprint": job.fingerprint,
        "status": result.status,
        "error": result.error,
        "outputs": result.outputs,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        **{k: result.details[k] for k in ("refine", "quality") if k in result.details},
    }


def _private(entry: dict[str, Any]) -> dict[str, Any]:
    """What MLflow may see of a manifest entry: no input paths."""
    return {k: v for k, v in entry.items() if k != "inputs"}


def default_parallel_scans(device: str) -> int:
    """Scans the local engine segments at once by default: 2 on CPU with 2+ torch threads, else 1."""
    import torch

    return 2 if torch.device(device).type == "cpu" and torch.get_num_threads() >= 2 else 1


def _parallel_scans(setting: int | None, device: str, jobs: int) -> int:
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


def _write(segmented: Segmented, out: Path) -> JobResult:
    """:func:`write_outputs` in the writing thread."""
    _one_thread()
    return write_outputs(segmented, out)


def _segment_loaded(job: ScanJob, predictor: Any, image: Future, share: _ThreadShare) -> Segmented:
    """Wait for the scan's load, then segment it with its share of torch's threads."""
    t_wait = time.perf_counter()
    loaded = image.result()
    waited = time.perf_counter() - t_wait
    with share:
        segmented = segment_scan(job, predictor, image=loaded)
    segmented.result.seconds["load_wait"] = waited
    return segmented


def _local_results(
    jobs: Sequence[ScanJob],
    predictor: Any,
    out: Path,
    overlap: bool,
    prefetched: tuple[ThreadPoolExecutor, Future] | None = None,
    parallel: int = 1,
) -> Iterator[tuple[ScanJob, JobResult]]:
    """Run the jobs in this process, in three overlapping steps; results come out as scans finish.

    With ``overlap``, while scans are segmented (the network, on torch's threads), a background
    thread loads the next one and another writes the finished ones' outputs (label map, exports,
    ``result.json``, the rename into place), so that only segmentation is on the critical path.
    ``parallel`` scans are segmented at once, each in its own thread with an equal share of torch's
    threads among the scans in flight (see :class:`_ThreadShare`; restored at the end); a thread
    that finishes takes the next scan at once, so one large scan does not hold up the others.
    ``prefetched`` is a loading pool and its future of the first scan, started earlier (while the
    MLflow run starts); the pool is shut down here. Without ``overlap`` the jobs run one after
    another in this thread.
    """
    import torch

    from medseg.refine.memory import reuse_freed_memory

    if not overlap:
        for job in jobs:
            yield job, write_outputs(segment_scan(job, predictor), out)
        return
    if not jobs:
        return
    loader, first = prefetched or _prefetcher(jobs) or (None, None)
    assert loader is not None
    threads_before = torch.get_num_threads()
    share = _ThreadShare(threads_before, parallel)
    hooks = [b.network.register_forward_pre_hook(share.apply) for b in predictor.bundles]
    segmenter = None
    # Outside the main thread glibc serves the network's large temporaries from per-thread heaps
    # that it maps and unmaps afresh (about a million page faults, a third more CPU time, per
    # 256x256x200 CT): while scans run in pool threads, freed memory is kept for reuse instead
    memory = contextlib.ExitStack()
    if parallel > 1:
        segmenter = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="medseg-segment")
        memory.enter_context(reuse_freed_memory())
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-writer")
    loads: dict[int, Future] = {0: first}
    segmenting: dict[Future, ScanJob] = {}
    writing: dict[Future, ScanJob] = {}
    started = 0
    try:
        while started < len(jobs) or segmenting or writing:
            # a free thread takes the next scan (while at most `parallel` wait to be written)
            while started < len(jobs) and len(segmenting) < parallel and len(writing) <= parallel:
                job = jobs[started]
                image = loads.pop(started, None) or loader.submit(_load, job.scan)
                started += 1
                if started < len(jobs) and started not in loads:
                    loads[started] = loader.submit(_load, jobs[started].scan)  # the next scan, ahead
                if segmenter is None:  # one at a time: in this thread (its network ran faster here)
                    future: Future = Future()
                    future.set_result(_segment_loaded(job, predictor, image, share))
                else:
                    future = segmenter.submit(_segment_loaded, job, predictor, image, share)
                segmenting[future] = job
                share.tail = started == len(jobs)
            done, _ = wait([*segmenting, *writing], return_when=FIRST_COMPLETED)
            for future in done:
                if future in segmenting:
                    job = segmenting.pop(future)
                    segmented = future.result()
                    writing[writer.submit(_write, segmented, out)] = job
                    del segmented
                else:
                    yield writing.pop(future), future.result()
    finally:
        for pool in (loader, segmenter, writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        for hook in hooks:
            hook.remove()
        torch.set_num_threads(threads_before)
        memory.close()


def _prefetcher(jobs: Sequence[ScanJob]) -> tuple[ThreadPoolExecutor, Future] | None:
    """A one-thread loading pool and its future of the first job's scan (``None`` without jobs)."""
    if not jobs:
        return None
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-prefetch")
    return loader, loader.submit(_load, jobs[0].scan)


def _refine_means(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Batch means of what refinement changed and of the review facts, as MLflow metrics."""
    values: dict[str, list[float]] = {}
    for e in entries:
        for key in ("crf_changed_fraction", "post_changed_fraction", "changed_fraction"):
            if key in e.get("refine", {}):
                values.setdefault(f"refine/{key}_mean", []).append(float(e["refine"][key]))
        if "foreground_entropy" in e.get("quality", {}):
            values.setdefault("foreground_entropy_mean", []).append(float(e["quality"]["foreground_entropy"]))
    return {k: sum(v) / len(v) for k, v in values.items()}


def run_prediction(
    source: str | Path,
    out_dir: str | Path,
    models: Sequence[str | Path],
    *,
    device: str = "cpu",
    tracking_uri: str | None = None,
    experiment: str = "medseg",
    echo: Callable[[str], Any] | None = None,
    scan_filter: ScanFilter | None = None,
    keep_probabilities: bool = False,
    exports: Sequence[str] = (),
    overwrite: bool = False,
    prefetch: bool = True,
    progress_bar: bool | None = None,
    engine: Engine | str = Engine.LOCAL,
    ray_settings: RaySettings | None = None,
    crf: bool | None = None,
    postprocess: bool | None = None,
    show_patient_info: bool = False,
    parallel_scans: int | None = None,
) -> BatchSummary:
    """Segment every scan under ``source`` into ``out_dir/<case_id>/labels.nii.gz``.

    A scan that fails is recorded with its reason and the run goes on. Re-running into the same
    ``out_dir`` skips scans whose outputs are complete and whose input is unchanged, and retries the
    others.

    Args:
        source: A scan file, a DICOM series folder or a folder of scans.
        out_dir: Output folder.
        models: Model bundle folder(s) or MLflow URIs; several are an ensemble.
        device: Where the network runs.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        experiment: MLflow experiment name.
        echo: Where to print one line per scan.
        scan_filter: Which DICOM series to process.
        keep_probabilities: Also write class probabilities per scan.
        exports: Per-scan exports by name (see :mod:`medseg.export.registry`).
        overwrite: Allow an output folder made with another model.
        prefetch: Load the next scan and write the previous one's outputs while the current one is
            segmented (local engine).
        progress_bar: Show a progress bar (default: when stderr is a terminal).
        engine: ``local`` (this process) or ``ray`` (a pool of Ray actors; needs medseg[distributed]).
        ray_settings: Cluster address and pool size for the Ray engine.
        crf: Switch the dense CRF on or off (``None``: as the model's pipeline says).
        postprocess: Switch the post-processing chosen at training on or off (``None``: as stored).
        show_patient_info: Show patient identifiers on the review page (export ``report``).
        parallel_scans: Scans the local engine segments at once, sharing torch's threads equally
            (default: :func:`default_parallel_scans`, 2 on CPU; on CPU at most one per thread).
            Needs ``prefetch``.

    Returns:
        The :class:`BatchSummary`; ``out_dir/manifest.json`` and ``.csv`` hold the same records.

    Raises:
        InputError: No scan found, or ``out_dir`` made with another model.
        ConfigError: A model bundle that cannot be loaded.
    """
    from medseg.export.registry import parse_exports
    from medseg.pipeline import Predictor
    from medseg.tracking import tracked_run

    say = echo or (lambda _msg: None)
    engine = Engine.parse(engine)
    if parallel_scans is not None and parallel_scans < 1:
        msg = f"parallel_scans must be at least 1, got {parallel_scans}"
        raise ConfigError(msg)
    if engine is Engine.RAY:  # before any work: a missing extra is a reason not to start
        optional_import("ray", "the Ray batch engine", "distributed")
    start = time.perf_counter()
    found = discover(source, scan_filter)
    if not found.scans:
        msg = f"input must hold at least one scan (NIfTI, NRRD, MHA or DICOM series), got none in {source}"
        raise InputError(msg)
    exports = list(parse_exports(list(exports)))
    # the Ray engine ships the predictor to its workers, which move it to their device
    predictor = Predictor.from_path(*models, device=device if engine is Engine.LOCAL else "cpu")
    predictor.refine = predictor.refine.switched(crf=crf, postprocess=postprocess)
    model_sha = "+".join(b.sha256 for b in predictor.bundles)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_existing(out, model_sha, overwrite)
    for stale in out.glob(f"{TMP_PREFIX}*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)

    manifest = Manifest(model_sha256=model_sha)
    manifest.skipped = [{"path": str(s.path), "reason": s.reason} for s in found.skipped]
    jobs: list[ScanJob] = []
    summary = BatchSummary(skipped=len(found.skipped))
    for scan in found.scans:
        try:
            fingerprint = input_fingerprint(list(scan.inputs))
        except OSError as exc:
            fingerprint = f"unreadable: {exc.strerror or exc}"
        job = ScanJob(scan, fingerprint, model_sha, keep_probabilities, tuple(exports))
        earlier = completed(out, job)
        if earlier is not None:
            manifest.entries[scan.case_id] = _entry(job, earlier)
            summary.reused += 1
        else:
            manifest.entries[scan.case_id] = {
                **_entry(job, JobResult(scan.case_id, "pending", fingerprint, model_sha))
            }
            jobs.append(job)
    manifest.save(out)

    params = {
        "model_sha256": model_sha,
        "n_scans": len(found.scans),
        "n_to_run": len(jobs),
        "n_skipped_files": len(found.skipped),
        "device": device,
        "keep_probabilities": keep_probabilities,
        "exports": list(exports),
        "engine": engine.value,
        "pipeline": predictor.bundles[0].pipeline.model_dump(mode="json"),
        "refine": predictor.refine.model_dump(mode="json"),
    }
    show_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
    parallel = _parallel_scans(parallel_scans, device, len(jobs)) if prefetch else 1
    # the first scan loads while the MLflow run starts
    prefetched = _prefetcher(jobs) if engine is Engine.LOCAL and prefetch else None
    with contextlib.ExitStack() as stack:
        if prefetched is not None:
            stack.callback(prefetched[0].shutdown, wait=True, cancel_futures=True)
        run = stack.enter_context(
            tracked_run("predict", experiment=experiment, params=params, uri=tracking_uri)
        )
        summary.run_id = run.run_id
        summary.engine = engine.value
        ray_engine = None
        if engine is Engine.RAY:
            from medseg.batch.ray_engine import RayEngine

            ray_engine = RayEngine(predictor, device=device, settings=ray_settings)
            results = ray_engine.results(jobs, out)
        else:
            results = _local_results(jobs, predictor, out, prefetch, prefetched, parallel)
            summary.workers = parallel
        with contextlib.closing(results), _progress(len(jobs), show_bar) as advance:
            for i, (job, result) in enumerate(results):
                entry = _entry(job, result)
                manifest.entries[job.scan.case_id] = entry
                manifest.save(out)
                summary.model_seconds += result.seconds.get("network", 0.0)
                failed = sum(e["status"] == "failed" for e in manifest.entries.values())
                advance(failed)
                reason = f" ({result.error})" if result.error else ""
                say(f"[{i + 1}/{len(jobs)}] {job.scan.case_id}: {result.status}{reason}")
                run.log_metrics({"scans_done": i + 1, "scans_failed": failed}, step=i + 1)
        if ray_engine is not None:
            summary.workers, summary.retried = ray_engine.workers, ray_engine.retried
            summary.start_seconds = ray_engine.start_seconds
            run.log_params({"ray_workers": ray_engine.workers})
            run.log_metrics(
                {
                    "scans_retried": ray_engine.retried,
                    "workers_replaced": ray_engine.replaced,
                    "workers_start_s": ray_engine.start_seconds,
                }
            )
        counts = manifest.counts()
        summary.ok, summary.failed = counts["ok"], counts["failed"]
        summary.entries = list(manifest.entries.values())
        summary.seconds = time.perf_counter() - start
        run.log_metrics(_refine_means(summary.entries))
        run.log_metrics(
            {
                "scans_ok": summary.ok,
                "scans_failed": summary.failed,
                "scans_reused": summary.reused,
                "files_skipped": summary.skipped,
                "total_s": summary.seconds,
                "model_s": summary.model_seconds,
            }
        )
        run.log_dict({"scans": [_private(e) for e in summary.entries]}, "manifest.json")
    if exports:  # batch outputs (stats table, review page), and exports for cases kept from earlier runs
        from medseg.batch.outputs import finish_batch

        finish_batch(out, exports, predictor=predictor, show_patient_info=show_patient_info, echo=say)
    return summary


class _progress:  # noqa: N801  (a context manager used like a function)
    """A rich progress bar (scans done, failures, ETA), or nothing when not on a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and total > 0

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda _failed: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("scans"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.bar.__enter__()
        task = self.bar.add_task("scans", total=self.total, failed=0)
        return lambda failed: self.bar.update(task, advance=1, failed=failed)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
