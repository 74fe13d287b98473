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
import json
import shutil
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.batch.job import (
    TMP_PREFIX,
    JobResult,
    ScanJob,
    completed,
    input_fingerprint,
)
from medseg.batch.local_engine import default_parallel_scans, local_results, parallel_scans, prefetch
from medseg.batch.lock import holds_output_lock
from medseg.batch.manifest import Manifest, check_existing
from medseg.batch.settings import Engine, PredictionSettings
from medseg.batch.storage import StorageWatch
from medseg.errors import InputError, optional_import
from medseg.sources.folder import Discovery

if TYPE_CHECKING:
    from medseg.sources import ScanSource, SegmentationModel
    from medseg.sources.destinations import Destination

__all__ = ["BatchSummary", "Engine", "PredictionSettings", "default_parallel_scans", "run_prediction"]

LABEL_FILE = "labels.nii.gz"


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
        store_failed: Finished scans whose results the destination (``--store-to``) did not take.
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
    store_failed: int = 0


def _entry(job: ScanJob, result: JobResult) -> dict[str, Any]:
    return {
        "case_id": job.scan.case_id,
        "inputs": [str(p) for p in job.scan.inputs],
        "fingerprint": job.fingerprint,
        "status": result.status,
        "error": result.error,
        "outputs": result.outputs,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        **result.details.summary(),
        **({"copies": [str(p) for p in job.scan.copies]} if job.scan.copies else {}),
    }


def _private(entry: dict[str, Any]) -> dict[str, Any]:
    """What MLflow may see of a manifest entry: no input paths."""
    return {k: v for k, v in entry.items() if k not in ("inputs", "copies")}


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


@holds_output_lock("out_dir")
def run_prediction(
    source: str | Path,
    out_dir: str | Path,
    *,
    models: Sequence[str | Path],
    settings: PredictionSettings | None = None,
    echo: Callable[[str], Any] | None = None,
) -> BatchSummary:
    """Segment every scan of ``source`` into ``out_dir/<case_id>/labels.nii.gz``.

    A scan that fails is recorded with its reason and the run goes on. Re-running into the same
    ``out_dir`` skips scans whose outputs are complete and whose input is unchanged, and retries the
    others.

    Args:
        source: A scan file, a DICOM series folder, a folder of scans, or ``SCHEME:LOCATION`` of a
            registered scan source (see :func:`medseg.sources.open_scan_source`).
        out_dir: Output folder.
        models: Model references (bundle folders, MLflow URIs, ``SCHEME:PATH``); several are an
            ensemble (see :func:`medseg.sources.load_model`).
        settings: How to run (see :class:`PredictionSettings`; default: its defaults).
        echo: Where to print one line per scan.

    Returns:
        The :class:`BatchSummary`; ``out_dir/manifest.json`` and ``.csv`` hold the same records.

    Raises:
        InputError: No scan found, an unknown export, or ``out_dir`` made with another model.
        ConfigError: A model that cannot be loaded, or settings that cannot work.
    """
    from medseg.export.registry import parse_exports
    from medseg.sources import load_model, open_scan_source
    from medseg.tracking.journal import JOURNAL_FILE, journaled_run

    cfg = settings or PredictionSettings()
    say = echo or (lambda _msg: None)
    if cfg.engine is Engine.RAY:  # before any work: a missing extra is a reason not to start
        optional_import("ray", "the Ray batch engine", "distributed")
    start = time.perf_counter()
    scans = open_scan_source(source, options=cfg.source_options)
    found = _discover(scans, source, cfg)
    cfg = replace(cfg, exports=parse_exports(list(cfg.exports)))  # an unknown name: refused here
    # the Ray engine ships the model to its workers, which move it to their device
    device = cfg.device if cfg.engine is Engine.LOCAL else "cpu"
    model = load_model(list(models), device=device, options=cfg.load_options())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_existing(out, model.sha256, cfg.overwrite)
    for stale in out.glob(f"{TMP_PREFIX}*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    manifest, jobs, summary = _plan_jobs(found, out, model.sha256, cfg)
    manifest.save(out)
    with contextlib.ExitStack() as stack:
        if isinstance(scans, contextlib.AbstractContextManager):  # e.g. private downloads to remove
            stack.enter_context(scans)
        run = stack.enter_context(  # records the server cannot take are journalled beside the manifest
            journaled_run(
                "predict",
                experiment=cfg.experiment,
                params=_params(model, found, jobs, cfg),
                uri=cfg.tracking_uri,
                journal=out / JOURNAL_FILE,
            )
        )
        summary.run_id, summary.engine = run.run_id, cfg.engine.value
        manifest.link_run(out, run.run_id, run.uri)  # where clinicians' verdicts are logged
        results, ray_engine = _results(jobs, model, out, scans, cfg, stack)
        summary.workers = ray_engine.workers if ray_engine is not None else _workers(cfg, jobs)
        _follow(results, manifest, out, summary, run, say, cfg)
        if ray_engine is not None:
            _log_ray(ray_engine, summary, run)
        _finish(manifest, summary, run, start)
    if cfg.exports:  # batch outputs (stats table, review page), and exports for cases kept from earlier runs
        from medseg.batch.outputs import finish_batch

        finish_batch(
            out, list(cfg.exports), predictor=model, show_patient_info=cfg.show_patient_info, echo=say
        )
    return summary


def _discover(scans: ScanSource, source: str | Path, cfg: PredictionSettings) -> Discovery:
    """The scans to run; refuses an input without scans before any work."""
    found = scans.discover(cfg.scan_filter)
    if not found.scans:
        msg = f"input must hold at least one scan (NIfTI, NRRD, MHA or DICOM series), got none in {source}"
        raise InputError(msg)
    return found


def _plan_jobs(
    found: Discovery, out: Path, model_sha: str, cfg: PredictionSettings
) -> tuple[Manifest, list[ScanJob], BatchSummary]:
    """The manifest, the jobs still to run (others' earlier outputs are kept) and the summary so far."""
    manifest = Manifest(model_sha256=model_sha)
    manifest.skipped = [{"path": str(s.path), "reason": s.reason} for s in found.skipped]
    jobs: list[ScanJob] = []
    summary = BatchSummary(skipped=len(found.skipped))
    for scan in found.scans:
        try:
            fingerprint = input_fingerprint(list(scan.inputs))
        except OSError as exc:
            fingerprint = f"unreadable: {exc.strerror or exc}"
        job = ScanJob(scan, fingerprint, model_sha, cfg.keep_probabilities, tuple(cfg.exports))
        earlier = completed(out, job)
        if earlier is not None:
            manifest.entries[scan.case_id] = _entry(job, earlier)
            summary.reused += 1
            summary.store_failed += _store(cfg.destination, out, manifest.entries[scan.case_id])
        else:
            manifest.entries[scan.case_id] = _entry(
                job, JobResult(scan.case_id, "pending", fingerprint, model_sha)
            )
            jobs.append(job)
    return manifest, jobs, summary


def _params(
    model: SegmentationModel, found: Discovery, jobs: list[ScanJob], cfg: PredictionSettings
) -> dict[str, Any]:
    """The MLflow run's parameters: the batch's, and what the model says it is."""
    described = model.describe()
    params: dict[str, Any] = {
        "model_sha256": model.sha256,
        "model_kind": described.kind,
        "n_scans": len(found.scans),
        "n_to_run": len(jobs),
        "n_skipped_files": len(found.skipped),
        "device": cfg.device,
        "keep_probabilities": cfg.keep_probabilities,
        "exports": list(cfg.exports),
        "engine": cfg.engine.value,
    }
    for key, value in described.params.items():
        params[key] = _json_or_text(value)
    return params


def _json_or_text(value: str) -> Any:
    """A model parameter that is a JSON object as nested values (logged flattened), else the text."""
    if value.startswith("{"):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def _workers(cfg: PredictionSettings, jobs: Sequence[ScanJob]) -> int:
    return parallel_scans(cfg.parallel_scans, cfg.device, len(jobs)) if cfg.prefetch else 1


def _results(
    jobs: list[ScanJob],
    model: SegmentationModel,
    out: Path,
    scans: ScanSource,
    cfg: PredictionSettings,
    stack: contextlib.ExitStack,
) -> tuple[Generator[tuple[ScanJob, JobResult], None, None], Any]:
    """The engine's stream of results (and the Ray engine, for its counts)."""
    if cfg.engine is Engine.RAY:
        from medseg.batch.ray_engine import RayEngine

        ray_engine = RayEngine(model, device=cfg.device, settings=cfg.ray, source=scans)
        return ray_engine.results(jobs, out), ray_engine
    pre = prefetch(jobs, scans) if cfg.prefetch else None
    if pre is not None:
        stack.callback(pre.close)
    results = local_results(
        jobs, model, out=out, source=scans, overlap=cfg.prefetch, prefetched=pre, parallel=_workers(cfg, jobs)
    )
    return results, None


def _follow(
    results: Generator[tuple[ScanJob, JobResult], None, None],
    manifest: Manifest,
    out: Path,
    summary: BatchSummary,
    run: Any,
    say: Callable[[str], Any],
    cfg: PredictionSettings,
) -> None:
    """Record each result as it comes: manifest, progress, one line, MLflow metrics and provenance."""
    total = sum(e["status"] == "pending" for e in manifest.entries.values())
    show_bar = sys.stderr.isatty() if cfg.progress_bar is None else cfg.progress_bar
    watch = StorageWatch()  # stops the batch when the output disk stays full
    with contextlib.closing(results), _progress(total, show_bar) as advance:
        for i, (job, result) in enumerate(results):
            manifest.entries[job.scan.case_id] = _entry(job, result)
            summary.store_failed += _store(cfg.destination, out, manifest.entries[job.scan.case_id])
            manifest.save(out)
            watch.observe(result)
            summary.model_seconds += result.seconds.get("network", 0.0)
            failed = sum(e["status"] == "failed" for e in manifest.entries.values())
            advance(failed)
            reason = f" ({result.error})" if result.error else ""
            say(f"[{i + 1}/{total}] {job.scan.case_id}: {result.status}{reason}")
            run.log_metrics({"scans_done": i + 1, "scans_failed": failed}, step=i + 1)
            if result.details.provenance:
                run.log_dict(result.details.provenance_dict(), f"provenance/{job.scan.case_id}.json")


def _store(destination: Destination | None, out: Path, entry: dict[str, Any]) -> int:
    """Send a finished case to the destination, recording the answer in its entry; 1 if it failed.

    A failed store is also the case's export error ``store-to-SCHEME`` in ``case.json`` (the review
    page flags it) until a later run stores it.
    """
    from medseg.export.facts import read_case_facts, write_case_facts

    if destination is None or entry["status"] != "ok":
        return 0
    case_dir = out / entry["case_id"]
    entry["store"] = destination.store(case_dir)
    error = entry["store"].get("error") if entry["store"]["status"] == "failed" else None
    name = f"store-to-{destination.location.split(':')[0]}"
    facts = read_case_facts(case_dir)  # none for a case segmented without exports
    if facts is not None and error:
        write_case_facts(facts, case_dir, exports=[], errors={name: str(error)})
    elif facts is not None and name in facts.errors:
        write_case_facts(facts, case_dir, exports=[name])
    return int(error is not None)


def _log_ray(ray_engine: Any, summary: BatchSummary, run: Any) -> None:
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


def _finish(manifest: Manifest, summary: BatchSummary, run: Any, start: float) -> None:
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

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
