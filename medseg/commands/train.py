"""``medseg train`` and ``medseg check-precision``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.commands.app import EXIT_SOME_FAILED, app, fail


@app.command()
def train(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline config (pipelines/*.yaml).")],
    data: Annotated[Path, typer.Option("--data", help="Data spec (YAML) or dataset.json.")],
    out: Annotated[Path, typer.Option(help="Output folder for the model bundle.")] = Path("model"),
    data_root: Annotated[Path | None, typer.Option(help="Override the spec's data root.")] = None,
    fold: Annotated[
        int | None, typer.Option(help="Cross-validation fold (splits stored beside the spec).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Override the number of epochs.")] = None,
    minutes: Annotated[float | None, typer.Option(help="Override the training time budget.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the random seed.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "medseg",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    register: Annotated[
        str | None, typer.Option(help="Register the bundle in the MLflow Model Registry.")
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            help="Data-parallel processes (torch.distributed: gloo on the CPU, one GPU each with cuda)."
        ),
    ] = 1,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this bundle's weights (fine-tuning; shapes must fit).")
    ] = None,
) -> None:
    """Train a model on a data spec; logs the run to MLflow and writes a model bundle.

    With --nproc N, N processes train one model on shards of the cases (DistributedDataParallel);
    rank 0 validates, writes the bundle and logs the one MLflow run.
    """
    import torch

    from medseg.config.pipeline import load_pipeline
    from medseg.config.spec import load_spec
    from medseg.errors import MedsegError
    from medseg.training.loop import train as run_training

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = load_pipeline(pipeline)
        overrides = {"epochs": epochs, "max_minutes": minutes, "seed": seed}
        update = {k: v for k, v in overrides.items() if v is not None}
        if update:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})
        loaded = load_spec(data, data_root)
    except MedsegError as exc:
        fail(str(exc))

    def progress(epoch: int, total: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch_s")
        typer.echo(f"epoch {epoch}/{total}: {shown}")

    if init_from is not None and nproc != 1:
        fail(f"--init-from trains in one process, got --nproc {nproc}")
    try:
        if nproc != 1:
            from medseg.training.distributed import train_distributed

            result = train_distributed(
                cfg,
                loaded,
                out,
                nproc=nproc,
                fold=fold,
                resume=resume,
                device=device,
                progress=progress,
                threads=threads,
                experiment=experiment,
            )
        else:
            result = run_training(
                cfg,
                loaded,
                out,
                fold=fold,
                resume=resume,
                device=device,
                progress=progress,
                experiment=experiment,
                init_from=init_from,
            )
    except MedsegError as exc:
        fail(str(exc))
    typer.echo(
        f"model bundle: {result.bundle} (MLflow run {result.run_id}, best val Dice {result.best_dice:.4f})"
    )
    if register:
        from medseg.tracking import register_bundle

        version = register_bundle(result.run_id, register)
        typer.echo(f"registered as models:/{register}/{version}")


@app.command("check-precision")
def check_precision(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder.")],
    data: Annotated[Path, typer.Option("--data", help="Data spec (YAML) or dataset.json with labels.")],
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    cases: Annotated[int | None, typer.Option(min=1, help="Use at most this many cases.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="Reduced type to check: bfloat16 or float16 (default: the device's).")
    ] = None,
) -> None:
    """Predict labelled cases in float32 and reduced precision; store agreement and Dice changes.

    ``precision: auto`` keeps float32 for a bundle that fails (agreement < 99.9 % or a Dice change
    > 0.002). Exit status: 0 passed; 1 failed; 2 the check could not run.
    """
    from medseg.errors import MedsegError
    from medseg.training.precision_guard import check_bundle_on_spec

    if precision not in (None, "bfloat16", "float16"):
        fail(f"--precision must be bfloat16 or float16, got {precision}")
    try:
        result = check_bundle_on_spec(bundle, data, device=device, max_cases=cases, dtype=precision)
    except MedsegError as exc:
        fail(str(exc))
    typer.echo(result.summary())
    if not result.passed:
        raise typer.Exit(EXIT_SOME_FAILED)
