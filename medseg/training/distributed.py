"""Data-parallel training with ``torch.distributed``: N processes, one model, one MLflow run.

:func:`train_distributed` starts ``nproc`` processes on this machine (``gloo`` on the CPU, ``nccl``
with one GPU per process) that each run :func:`medseg.training.loop.train` with a
:class:`DistContext`. The loop then

* trains on this rank's shard of the training cases (:func:`shard_cases`: a seeded permutation,
  padded so that every rank has as many cases, and so as many batches, as the others);
* wraps the network in :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the
  gradients, so every rank holds the same weights after every step;
* takes the time budget's clock from rank 0, so every rank sets the same learning rate and stops at
  the same epoch;
* validates, saves checkpoints and bundles, and logs to MLflow on rank 0 only: one run, whose
  ``train_loss`` is the mean over the ranks. The other ranks log nothing and leave no files;
* checks at the end that every rank holds the same weights (bit for bit).

Rank 0's progress and result come back to the calling process through a queue; an error in any rank
stops them all and is raised here.

Examples:
    >>> from medseg.training.process_group import shard_cases
    >>> shard_cases(list("abcde"), rank=0, world_size=2, seed=0)
    ['c', 'a', 'd']
    >>> shard_cases(list("abcde"), rank=1, world_size=2, seed=0)
    ['b', 'e', 'c']
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import ConfigError, MedsegError
from medseg.training.process_group import DistContext, QuietRun, shard_cases

if TYPE_CHECKING:
    from medseg.config.pipeline import PipelineConfig
    from medseg.config.spec import LoadedSpec
    from medseg.training.loop import ProgressFn, TrainResult

__all__ = ["DistContext", "QuietRun", "shard_cases", "train_distributed"]


@dataclass(frozen=True)
class _RankJob:
    """Everything one rank's process needs (sent to it pickled)."""

    rank: int
    world_size: int
    backend: str
    address: str
    device: str
    threads: int
    timeout_s: float
    cfg: PipelineConfig
    data: LoadedSpec
    out_dir: Path
    fold: int | None
    resume: bool
    tracking_uri: str
    experiment: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _weights_digest(bundle_dir: Path) -> str:
    """A hash of a bundle's weights (tensor bytes, in state-dict order)."""
    import hashlib

    from medseg.bundle import load_bundle

    h = hashlib.sha256()
    for name, tensor in load_bundle(bundle_dir).network.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank_entry(job: _RankJob, events: Any) -> None:
    """A rank's process: :func:`_rank_main`, then leave without the interpreter's teardown.

    Tearing down the interpreter while gloo's and torch's C++ threads still exist sometimes aborts
    the process ("terminate called without an active exception", exit code -6) after it has done
    all its work; so the rank flushes its messages and output and exits at once.
    """
    code = 1
    try:
        _rank_main(job, events)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        with contextlib.suppress(Exception):
            events.close()
            events.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _rank_main(job: _RankJob, events: Any) -> None:
    """One rank: join the group, train, report to the parent through ``events``."""
    import torch
    import torch.distributed as dist

    from medseg.training.loop import train

    torch.set_num_threads(job.threads)
    if job.device.startswith("cuda"):
        torch.cuda.set_device(job.device)
    try:
        dist.init_process_group(
            job.backend,
            init_method=job.address,
            rank=job.rank,
            world_size=job.world_size,
            timeout=timedelta(seconds=job.timeout_s),
        )
        ctx = DistContext(job.rank, job.world_size, job.device)

        def progress(epoch: int, total: int, metrics: dict[str, float]) -> None:
            events.put(("progress", (epoch, total, dict(metrics))))

        result = train(
            job.cfg,
            job.data,
            job.out_dir,
            fold=job.fold,
            resume=job.resume,
            device=job.device,
            tracking_uri=job.tracking_uri,
            experiment=job.experiment,
            progress=progress if ctx.is_main else None,
            distributed=ctx,
        )
        # every rank must end where rank 0 did: gradients were averaged, so the weights agree bit for bit
        digests: list[Any] = [None] * job.world_size
        dist.all_gather_object(digests, _weights_digest(job.out_dir / "last"))
        if len(set(digests)) != 1:
            msg = f"every rank must end with rank 0's weights, got {len(set(digests))} different sets"
            raise MedsegError(msg)
        if ctx.is_main:
            events.put(("result", result))
    except BaseException as exc:
        kind = "config" if isinstance(exc, ConfigError) else "medseg" if isinstance(exc, MedsegError) else ""
        events.put(("error", (job.rank, kind, f"{type(exc).__name__}: {exc}" if not kind else str(exc))))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_distributed(
    cfg: PipelineConfig,
    data: LoadedSpec,
    out_dir: str | Path,
    *,
    nproc: int,
    fold: int | None = None,
    resume: bool = False,
    device: str = "cpu",
    tracking_uri: str | None = None,
    experiment: str = "medseg",
    progress: ProgressFn | None = None,
    threads: int | None = None,
    timeout_s: float = 1800.0,
) -> TrainResult:
    """Train with ``nproc`` data-parallel processes on this machine; see the module docstring.

    Args:
        cfg: Pipeline config.
        data: The data spec with its resolved root.
        out_dir: Where rank 0 writes the bundle, the last model and the checkpoint.
        nproc: Processes (1: plain :func:`~medseg.training.loop.train` in this process).
        fold: Cross-validation fold, as for :func:`~medseg.training.loop.train`.
        resume: Continue from ``out_dir/checkpoint.pt`` (every rank loads it).
        device: ``cpu`` (gloo) or ``cuda`` (nccl, process ``r`` on GPU ``r``).
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        experiment: MLflow experiment name.
        progress: Called in this process after each epoch with rank 0's ``(epoch, epochs, metrics)``.
        threads: torch CPU threads per process (default: this machine's CPUs shared out).
        timeout_s: How long a rank waits for the others at a collective before it gives up.

    Returns:
        Rank 0's :class:`~medseg.training.loop.TrainResult`.

    Raises:
        ConfigError: A bad ``nproc``, too few GPUs, or a config error in any rank.
        MedsegError: Any other failure of a rank.
    """
    from medseg.training.loop import train

    if nproc < 1:
        msg = f"nproc must be >= 1, got {nproc}"
        raise ConfigError(msg)
    if nproc == 1:
        return train(
            cfg,
            data,
            out_dir,
            fold=fold,
            resume=resume,
            device=device,
            tracking_uri=tracking_uri,
            experiment=experiment,
            progress=progress,
        )
    import torch.multiprocessing as mp

    from medseg.tracking import tracking_uri as default_uri

    cuda = device.startswith("cuda")
    if cuda:
        import torch

        if torch.cuda.device_count() < nproc:
            msg = f"nproc must be at most the {torch.cuda.device_count()} GPU(s) here, got {nproc}"
            raise ConfigError(msg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume and not (out / "checkpoint.pt").is_file():
        msg = f"--resume needs a checkpoint at {out / 'checkpoint.pt'}, got none"
        raise ConfigError(msg)
    scratch = Path(tempfile.mkdtemp(prefix="medseg-ddp-"))
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    address = f"tcp://127.0.0.1:{_free_port()}"
    per_rank_threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        rank_out = out
        if rank:  # the other ranks write nothing of their own; they read the checkpoint to resume
            rank_out = scratch / f"rank{rank}"
            rank_out.mkdir()
            if resume:
                shutil.copy2(out / "checkpoint.pt", rank_out / "checkpoint.pt")
        job = _RankJob(
            rank=rank,
            world_size=nproc,
            backend="nccl" if cuda else "gloo",
            address=address,
            device=f"cuda:{rank}" if cuda else "cpu",
            threads=per_rank_threads,
            timeout_s=timeout_s,
            cfg=cfg,
            data=data,
            out_dir=rank_out,
            fold=fold,
            resume=resume,
            tracking_uri=tracking_uri or default_uri(),
            experiment=experiment,
        )
        procs.append(
            ctx.Process(target=_rank_entry, args=(job, events), daemon=True, name=f"medseg-rank{rank}")
        )
    result: TrainResult | None = None
    errors: list[tuple[int, str, str]] = []
    try:
        for p in procs:
            p.start()
        while True:
            try:
                kind, payload = events.get(timeout=0.2)
            except queue.Empty:
                if all(p.exitcode is not None for p in procs):
                    break
                if any(p.exitcode not in (None, 0) for p in procs):
                    time.sleep(0.5)  # let the failed rank's message arrive, then stop the others
                    with contextlib.suppress(queue.Empty):
                        while True:
                            kind, payload = events.get_nowait()
                            if kind == "error":
                                errors.append(payload)
                    break
                continue
            if kind == "progress" and progress is not None:
                progress(*payload)
            elif kind == "result":
                result = payload
            elif kind == "error":
                errors.append(payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=30)
        events.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if errors:
        rank, kind, message = errors[0]  # the first to fail; the others lost their peers
        if kind == "config":
            raise ConfigError(message)
        msg = f"distributed training failed in rank {rank}: {message}"
        raise MedsegError(msg)
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad or result is None:
        msg = f"every training process must exit cleanly, got exit codes {dict(bad) or 'without a result'}"
        raise MedsegError(msg)
    return result
