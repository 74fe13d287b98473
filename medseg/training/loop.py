"""The training loop: patches in, a model bundle and an MLflow run out."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.losses import DiceCELoss

from medseg.bundle import build_network, load_bundle, save_bundle
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import LoadedSpec, ResolvedCase
from medseg.errors import ConfigError
from medseg.models.registry import check_patch
from medseg.tiling import sliding_window_probabilities
from medseg.training.data import PatchLoader, load_validation
from medseg.training.metrics import dice_per_label
from medseg.training.postprocess_choice import choose_on_validation
from medseg.training.precision import as_float32, autocast_dtype
from medseg.training.precision_guard import guard_bundle

if TYPE_CHECKING:
    from medseg.training.process_group import DistContext

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        bundle: Folder of the best model bundle.
        run_id: MLflow run id.
        history: Per-epoch metrics.
        best_dice: Best mean foreground validation Dice (NaN without validation cases).
        seconds: Wall time of the loop.
        val_cases: Ids of the held-out cases.
    """

    bundle: Path
    run_id: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_dice: float = math.nan
    seconds: float = 0.0
    val_cases: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def split_cases(cases: list[ResolvedCase], val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random split into training and validation cases (at least one of each when possible)."""
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n_val = round(len(cases) * val_fraction)
    if val_fraction > 0 and len(cases) > 1:
        n_val = max(1, n_val)
    n_val = min(n_val, len(cases) - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [cases[i] for i in train], [cases[i] for i in val]


def training_progress(epoch: int, epochs: int, *, elapsed_min: float, max_minutes: float | None) -> float:
    """Fraction of training done: by epochs, or by the time budget when that runs out first.

    Examples:
        >>> training_progress(10, 100, elapsed_min=3.0, max_minutes=4.0)
        0.75
    """
    done = epoch / epochs
    if max_minutes is not None:
        done = max(done, elapsed_min / max_minutes)
    return min(1.0, done)


def set_lr(
    opt: torch.optim.Optimizer,
    base_lr: float,
    *,
    progress: float,
    schedule: str = "cosine",
    floor: float = 0.01,
) -> float:
    """Set the learning rate for the given training progress (cosine or poly decay); returns it.

    Examples:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> cos = set_lr(opt, 1.0, progress=0.5, schedule="cosine")
        >>> poly = set_lr(opt, 1.0, progress=0.5, schedule="poly")
        >>> round(cos, 3), round(poly, 3)
        (0.505, 0.536)
    """
    if schedule == "poly":
        lr = base_lr * max(floor, (1 - progress) ** 0.9)
    else:
        lr = base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def validate_model(
    network: torch.nn.Module, volumes: list[dict[str, Any]], *, cfg: PipelineConfig, labels: list[int]
) -> dict[int, float]:
    """Mean Dice per foreground label over whole preprocessed validation volumes (tiled inference)."""
    network.eval()
    scores: dict[int, list[float]] = {v: [] for v in labels}
    for item in volumes:
        probs = sliding_window_probabilities(
            network,
            item["image"],
            cfg.window,
            overlap=cfg.inference.overlap,
            batch_size=cfg.inference.batch_size,
            blend=cfg.inference.blend,
        )
        pred = probs.argmax(0).numpy()
        for v, d in dice_per_label(pred, np.asarray(item["label"][0]), labels).items():
            scores[v].append(d)
    network.train()
    return {v: float(np.mean(s)) for v, s in scores.items()}


def _checkpoint_state(
    network: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int, best: float, run_id: str, history: list
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "model": network.state_dict(),
        "optimizer": opt.state_dict(),
        "best": best,
        "run_id": run_id,
        "history": history,
        "torch_rng": torch.get_rng_state(),
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    from medseg.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _loss(loss_fn: Any, output: Any, target: torch.Tensor) -> torch.Tensor:
    if isinstance(output, (list, tuple)):  # deep supervision heads: the models package weighs them
        from medseg.models import deep_supervision_loss

        return deep_supervision_loss(loss_fn, output, target)
    return loss_fn(output, target)


def _minutes(start: float, distributed: DistContext | None) -> float:
    """Minutes since ``start``; rank 0's in a distributed run, so every rank decides alike."""
    minutes = (time.perf_counter() - start) / 60
    return minutes if distributed is None else distributed.from_main(minutes)


def _choose_postprocessing(
    bundle_dir: Path, volumes: list[dict[str, Any]], labels: list[int], run: Any, device: Any
) -> None:
    """Choose post-processing with the best model on the validation cases; store it in its bundle."""
    bundle = load_bundle(bundle_dir, device=device)
    choice = choose_on_validation(bundle.network, volumes, bundle.pipeline, labels)
    refine = bundle.pipeline.refine.model_copy(update={"postprocess": choice.config})
    pipeline = bundle.pipeline.model_copy(update={"refine": refine})
    info = {k: v for k, v in bundle.info.items() if k not in ("weights_sha256", "path")}
    info["postprocess_chosen_on"] = len(volumes)
    save_bundle(bundle_dir, pipeline, bundle.spec, bundle.network, info)
    run.log_metrics(choice.metrics(bundle.spec.label_names))
    run.log_dict(choice.config.model_dump(mode="json"), "postprocess.json")


def _initial_weights(network: torch.nn.Module, init_from: str | Path | None) -> str:
    """Load a bundle's weights into ``network`` for fine-tuning; its hash, or "" without one."""
    if init_from is None:
        return ""
    from medseg.training.init_from import load_initial_weights

    return load_initial_weights(network, init_from)


def train(
    cfg: PipelineConfig,
    data: LoadedSpec,
    out_dir: str | Path,
    *,
    fold: int | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
    experiment: str = "medseg",
    progress: ProgressFn | None = None,
    distributed: DistContext | None = None,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Train the pipeline's model on a spec's cases and save the best model as a bundle.

    Args:
        cfg: Pipeline config (preprocessing overrides, model, training, inference settings).
        data: The data spec with its resolved root.
        out_dir: Where the bundle (``out_dir/bundle``), the last model (``out_dir/last``) and the
            checkpoint (``out_dir/checkpoint.pt``) go.
        fold: Train on fold ``fold`` of ``cfg.train.folds`` (splits stored beside the spec);
            ``None`` holds out ``val_fraction`` of the cases at random.
        resume: Continue from ``out_dir/checkpoint.pt`` (epoch, weights, optimizer, MLflow run).
        device: Where the network trains.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        experiment: MLflow experiment name.
        progress: Called after each epoch with ``(epoch, epochs, metrics)``.
        distributed: This process's place in a data-parallel group (see
            :mod:`medseg.training.distributed`): it trains on its shard of the cases, and only rank 0
            validates, saves and logs.
        init_from: Start from this bundle's weights (see :mod:`medseg.training.init_from`).

    Returns:
        The :class:`TrainResult`.

    Raises:
        ConfigError: A patch size the model refuses, cases without labels, a bad fold, or
            ``resume`` without a checkpoint.
    """
    from medseg.tracking import tracked_run
    from medseg.training.splits import load_or_create_splits, splits_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    try:
        spec = cfg.effective_spec(data.spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    seed_everything(tcfg.seed)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cases = data.resolve_cases(require_labels=True)
    if fold is None:
        train_cases, val_cases = split_cases(cases, tcfg.val_fraction, tcfg.seed)
    else:
        if not 0 <= fold < tcfg.folds:
            msg = f"fold must be in 0..{tcfg.folds - 1}, got {fold}"
            raise ConfigError(msg)
        splits = load_or_create_splits(
            splits_path(data.source, out), [c.id for c in cases], tcfg.folds, tcfg.seed
        )
        val_ids = set(splits[fold]["val"])
        train_cases = [c for c in cases if c.id not in val_ids]
        val_cases = [c for c in cases if c.id in val_ids]
    network = build_network(cfg, spec)
    init_sha = _initial_weights(network, init_from)
    network = network.to(device)
    divisor = int(getattr(network, "size_divisor", 1))
    check_patch(cfg.model.name, tcfg.patch_size, **cfg.model.params)
    check_patch(cfg.model.name, cfg.window, **cfg.model.params)
    fg_labels = [v for v in spec.label_values if v != 0]

    main = distributed is None or distributed.is_main
    shard, patch_seed = (train_cases, tcfg.seed)
    if distributed is not None:
        shard, patch_seed = distributed.shard(train_cases, tcfg.seed)
    patches = PatchLoader(shard, spec, tcfg, patch_seed, cache_dir=out / "cache")
    val_volumes = load_validation(val_cases, spec) if val_cases and main else []
    loss_fn = DiceCELoss(
        to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5
    )
    if tcfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            network.parameters(),
            lr=tcfg.learning_rate,
            momentum=0.99,
            nesterov=True,
            weight_decay=tcfg.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(network.parameters(), lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    amp_dtype = autocast_dtype(device, tcfg.mixed_precision)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    result = TrainResult(bundle=out / "bundle", run_id="", val_cases=[c.id for c in val_cases])
    best, first_epoch, elapsed_before, resume_id = -1.0, 1, 0.0, None
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            msg = f"--resume needs a checkpoint at {ckpt_path}, got none"
            raise ConfigError(msg)
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        best, first_epoch, resume_id = float(state["best"]), int(state["epoch"]) + 1, str(state["run_id"])
        result.history = list(state["history"])
        elapsed_before = float(state.get("elapsed", 0.0))

    params = {
        "pipeline": cfg.model_dump(mode="json"),
        "spec_name": spec.name,
        "fold": fold if fold is not None else "random",
        "n_train_cases": len(train_cases),
        "n_val_cases": len(val_cases),
        "size_divisor": divisor,
        "n_parameters": sum(p.numel() for p in network.parameters()),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
        "nproc": 1 if distributed is None else distributed.world_size,
        "init_from": init_sha,
    }
    start = time.perf_counter() - elapsed_before
    epoch = first_epoch - 1
    tracking = tracked_run(
        "train",
        experiment=experiment,
        run_name=cfg.name if fold is None else f"{cfg.name}-fold{fold}",
        params=params,
        tags={"medseg.spec": spec.name, "medseg.model": cfg.model.name, "medseg.fold": str(fold)},
        uri=tracking_uri,
        resume_run_id=resume_id,
    )
    with tracking if main or distributed is None else distributed.quiet_run() as run:
        result.run_id = run.run_id
        if not resume:
            run.log_dict(cfg.model_dump(mode="json"), "pipeline.json")
            run.log_dict(spec.model_dump(mode="json"), "spec.json")
            run.log_dict(
                {"train": [c.id for c in train_cases], "val": [c.id for c in val_cases]}, "split.json"
            )
        network.train()
        model = network if distributed is None else distributed.wrap(network)
        for epoch in range(first_epoch, tcfg.epochs + 1):
            t0 = time.perf_counter()
            elapsed_min = _minutes(start, distributed)
            budget = None if tcfg.deterministic else tcfg.max_minutes
            done = training_progress(epoch - 1, tcfg.epochs, elapsed_min=elapsed_min, max_minutes=budget)
            lr = set_lr(opt, tcfg.learning_rate, progress=done, schedule=tcfg.schedule)
            losses = []
            for batch in patches.epoch(epoch):
                image, label = batch["image"].to(device), batch["label"].to(device)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(
                    device_type=torch.device(device).type,
                    dtype=amp_dtype or torch.float32,
                    enabled=amp_dtype is not None,
                ):
                    output = model(image)
                loss = _loss(loss_fn, as_float32(output), label)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                losses.append(float(loss.detach()))
            train_loss = float(np.mean(losses))
            if distributed is not None:
                train_loss = distributed.mean(train_loss)
            metrics = {"train_loss": train_loss, "epoch_s": time.perf_counter() - t0, "lr": lr}
            elapsed_min = _minutes(start, distributed)
            out_of_time = budget is not None and elapsed_min >= budget
            last = epoch == tcfg.epochs or out_of_time
            if val_volumes and (epoch % tcfg.val_every == 0 or last):
                dice = validate_model(network, val_volumes, cfg=cfg, labels=fg_labels)
                mean = float(np.mean(list(dice.values())))
                metrics.update({f"val_dice_{spec.label_names[v]}": d for v, d in dice.items()})
                metrics["val_dice_mean"] = mean
                if mean > best:
                    best = mean
                    save_bundle(
                        result.bundle,
                        cfg,
                        spec,
                        network,
                        {"epoch": epoch, "val_dice_mean": mean, "fold": fold},
                    )
            run.log_metrics(metrics, step=epoch)
            result.history.append({"epoch": epoch, **metrics})
            if main:
                state = _checkpoint_state(network, opt, epoch, best, run.run_id, result.history)
                state["elapsed"] = time.perf_counter() - start
                _save_checkpoint(ckpt_path, state)
            if progress is not None:
                progress(epoch, tcfg.epochs, metrics)
            if last:
                break
        if not val_volumes:
            save_bundle(result.bundle, cfg, spec, network, {"epoch": epoch, "fold": fold})
        save_bundle(out / "last", cfg, spec, network, {"epoch": epoch, "fold": fold})
        if val_volumes and cfg.refine.postprocess.enabled and cfg.refine.postprocess.choose:
            _choose_postprocessing(result.bundle, val_volumes, fg_labels, run, device)
        if val_volumes:  # reduced-precision inference is allowed only if it agrees with float32
            check = guard_bundle(result.bundle, val_volumes, device=device)
            run.log_metrics({"precision_agreement": check.agreement, "precision_passed": float(check.passed)})
        result.seconds = time.perf_counter() - start
        result.best_dice = best if best >= 0 else math.nan
        run.log_metrics({"train_seconds": result.seconds, "best_val_dice_mean": result.best_dice})
        run.log_artifacts(result.bundle, "bundle")
    return result
