"""The training loop: patches in, a model bundle and an MLflow run out."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss

from medseg.bundle import build_network, save_bundle
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import LoadedSpec, ResolvedCase
from medseg.errors import ConfigError
from medseg.models.registry import check_input_size
from medseg.tiling import sliding_window_probabilities
from medseg.training.data import load_validation, make_train_loader
from medseg.training.metrics import dice_per_label

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


def training_progress(epoch: int, epochs: int, elapsed_min: float, max_minutes: float | None) -> float:
    """Fraction of training done: by epochs, or by the time budget when that runs out first.

    Examples:
        >>> training_progress(10, 100, 3.0, 4.0)
        0.75
    """
    done = epoch / epochs
    if max_minutes is not None:
        done = max(done, elapsed_min / max_minutes)
    return min(1.0, done)


def set_cosine_lr(opt: torch.optim.Optimizer, base_lr: float, progress: float, floor: float = 0.01) -> float:
    """Set a cosine-annealed learning rate for the given training progress; returns it."""
    lr = base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def validate_model(
    network: torch.nn.Module, volumes: list[dict[str, Any]], cfg: PipelineConfig, labels: list[int]
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


def train(
    cfg: PipelineConfig,
    data: LoadedSpec,
    out_dir: str | Path,
    *,
    tracking_uri: str | None = None,
    experiment: str = "medseg",
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train the pipeline's model on a spec's cases and save the best model as a bundle.

    Args:
        cfg: Pipeline config (model, training, inference settings).
        data: The data spec with its resolved root.
        out_dir: Where the bundle (``out_dir/bundle``) and checkpoints go.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        experiment: MLflow experiment name.
        progress: Called after each epoch with ``(epoch, epochs, metrics)``.

    Returns:
        The :class:`TrainResult`.

    Raises:
        ConfigError: If the patch size does not suit the model, or cases lack labels.
    """
    from medseg.tracking import tracked_run

    out = Path(out_dir)
    spec = data.spec
    tcfg = cfg.train
    seed_everything(tcfg.seed)
    cases = data.resolve_cases(require_labels=True)
    train_cases, val_cases = split_cases(cases, tcfg.val_fraction, tcfg.seed)
    network = build_network(cfg, spec)
    divisor = int(getattr(network, "size_divisor", 1))
    check_input_size(tcfg.patch_size, divisor)
    check_input_size(cfg.window, divisor)
    if not any(p.requires_grad for p in network.parameters()):
        msg = f"model '{cfg.model.name}' must have trainable parameters, got none"
        raise ConfigError(msg)
    fg_labels = [v for v in spec.label_values if v != 0]

    loader = make_train_loader(train_cases, spec, tcfg, tcfg.seed)
    val_volumes = load_validation(val_cases, spec) if val_cases else []
    loss_fn = DiceCELoss(
        to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5
    )
    opt = torch.optim.AdamW(network.parameters(), lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)

    params = {
        "pipeline": cfg.model_dump(mode="json"),
        "spec_name": spec.name,
        "n_train_cases": len(train_cases),
        "n_val_cases": len(val_cases),
        "size_divisor": divisor,
        "n_parameters": sum(p.numel() for p in network.parameters()),
    }
    result = TrainResult(bundle=out / "bundle", run_id="", val_cases=[c.id for c in val_cases])
    best = -1.0
    start = time.perf_counter()
    with tracked_run(
        "train", experiment=experiment, run_name=cfg.name, params=params, uri=tracking_uri
    ) as run:
        result.run_id = run.run_id
        run.log_dict(cfg.model_dump(mode="json"), "pipeline.json")
        run.log_dict(spec.model_dump(mode="json"), "spec.json")
        network.train()
        for epoch in range(1, tcfg.epochs + 1):
            t0 = time.perf_counter()
            losses = []
            for batch in loader:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(network(batch["image"]), batch["label"])
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            elapsed_min = (time.perf_counter() - start) / 60
            lr = set_cosine_lr(
                opt, tcfg.learning_rate, training_progress(epoch, tcfg.epochs, elapsed_min, tcfg.max_minutes)
            )
            metrics = {"train_loss": float(np.mean(losses)), "epoch_s": time.perf_counter() - t0, "lr": lr}
            last = epoch == tcfg.epochs or (tcfg.max_minutes is not None and elapsed_min >= tcfg.max_minutes)
            if val_volumes and (epoch % tcfg.val_every == 0 or last):
                dice = validate_model(network, val_volumes, cfg, fg_labels)
                mean = float(np.mean(list(dice.values())))
                metrics.update({f"val_dice_{spec.label_names[v]}": d for v, d in dice.items()})
                metrics["val_dice_mean"] = mean
                if mean > best:
                    best = mean
                    save_bundle(result.bundle, cfg, spec, network, {"epoch": epoch, "val_dice_mean": mean})
            run.log_metrics(metrics, step=epoch)
            result.history.append({"epoch": epoch, **metrics})
            if progress is not None:
                progress(epoch, tcfg.epochs, metrics)
            if last:
                break
        if not val_volumes:
            save_bundle(result.bundle, cfg, spec, network, {"epoch": epoch})
        save_bundle(out / "last", cfg, spec, network, {"epoch": epoch})
        result.seconds = time.perf_counter() - start
        result.best_dice = best if best >= 0 else math.nan
        run.log_metrics({"train_seconds": result.seconds, "best_val_dice_mean": result.best_dice})
        run.log_artifacts(result.bundle, "bundle")
    return result
