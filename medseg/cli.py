"""The ``medseg`` command. Each subcommand calls the library; heavy modules load lazily.

Exit status: 0 success; 1 when some scans failed; 2 when the run could not start (bad arguments,
config or model).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="medseg",
    help="Medical image segmentation: load, preprocess, tile, model, stitch, refine, export, track.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_SOME_FAILED = 1
EXIT_CANNOT_START = 2


def _fail(message: str, code: int = EXIT_CANNOT_START) -> None:
    typer.secho(f"medseg: error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the data set (created).")],
    cases: Annotated[int, typer.Option(help="Number of cases.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    modality: Annotated[str, typer.Option(help="CT or MR.")] = "CT",
    size: Annotated[str, typer.Option(help="Volume size X,Y,Z.")] = "64,64,32",
    dicom: Annotated[bool, typer.Option(help="Also write each case as a DICOM series.")] = True,
) -> None:
    """Write a synthetic multi-label phantom data set (NIfTI, DICOM series and a data spec)."""
    from medseg.errors import MedsegError
    from medseg.synth import generate_dataset

    try:
        shape = tuple(int(s) for s in size.split(","))
        if len(shape) != 3:
            raise ValueError
    except ValueError:
        _fail(f"--size must be three integers X,Y,Z, got {size!r}")
    try:
        spec = generate_dataset(out_dir, cases, shape=shape, seed=seed, modality=modality, dicom=dicom)  # type: ignore[arg-type]
    except (MedsegError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {cases} cases; data spec: {spec}")


@app.command()
def check(
    spec: Annotated[Path, typer.Argument(help="Data spec (YAML) or dataset.json.")],
    data_root: Annotated[Path | None, typer.Option(help="Override the spec's data root.")] = None,
) -> None:
    """Validate a data spec against its files (co-registered channels, declared label values)."""
    from medseg.config.check import check_spec_data
    from medseg.config.spec import load_spec
    from medseg.errors import MedsegError

    try:
        n = check_spec_data(load_spec(spec, data_root))
    except MedsegError as exc:
        _fail(str(exc))
    typer.echo(f"{spec}: {n} cases OK")


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="Data spec (YAML) or dataset.json.")],
    out: Annotated[Path, typer.Option(help="Pipeline YAML to write.")] = Path("pipeline.yaml"),
    data_root: Annotated[Path | None, typer.Option(help="Override the spec's data root.")] = None,
    model: Annotated[str, typer.Option(help="Model to plan for.")] = "unet3d",
    budget_mb: Annotated[float | None, typer.Option(help="Training memory budget in MB.")] = None,
    gpu: Annotated[bool, typer.Option(help="Plan for a GPU (bigger budget and network).")] = False,
) -> None:
    """Fingerprint a data set and write a pipeline config with every decision explained."""
    from medseg.config.spec import load_spec
    from medseg.errors import MedsegError
    from medseg.tracking import tracked_run
    from medseg.training.planning import plan_pipeline, write_plan

    try:
        loaded = load_spec(spec, data_root)
        cfg, text = plan_pipeline(loaded, model=model, budget_mb=budget_mb, gpu=gpu)
        write_plan(out, text)
        with tracked_run("plan", run_name=cfg.name, params=cfg.model_dump(mode="json")) as run:
            run.log_text(text, "pipeline.yaml")
    except MedsegError as exc:
        _fail(str(exc))
    typer.echo(text)
    typer.echo(f"wrote {out}")


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
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    register: Annotated[
        str | None, typer.Option(help="Register the bundle in the MLflow Model Registry.")
    ] = None,
) -> None:
    """Train a model on a data spec; logs the run to MLflow and writes a model bundle."""
    import torch

    from medseg.config.pipeline import load_pipeline
    from medseg.config.spec import load_spec
    from medseg.errors import MedsegError
    from medseg.training.loop import train as run_training

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = load_pipeline(pipeline)
        if epochs is not None:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
        loaded = load_spec(data, data_root)
    except MedsegError as exc:
        _fail(str(exc))

    def progress(epoch: int, total: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch_s")
        typer.echo(f"epoch {epoch}/{total}: {shown}")

    try:
        result = run_training(cfg, loaded, out, fold=fold, resume=resume, device=device, progress=progress)
    except MedsegError as exc:
        _fail(str(exc))
    typer.echo(
        f"model bundle: {result.bundle} (MLflow run {result.run_id}, best val Dice {result.best_dice:.4f})"
    )
    if register:
        from medseg.tracking import register_bundle

        version = register_bundle(result.run_id, register)
        typer.echo(f"registered as models:/{register}/{version}")


@app.command()
def predict(
    source: Annotated[Path, typer.Argument(help="A scan file, a DICOM series folder, or a folder of scans.")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder: one sub-folder per scan.")],
    model: Annotated[
        list[str],
        typer.Option("--model", help="Bundle folder or MLflow URI runs:/... models:/... (repeat: ensemble)."),
    ],
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Segment scans; write each label map on its scan's own voxel grid (NIfTI)."""
    import torch

    from medseg.batch.runner import run_prediction
    from medseg.errors import MedsegError

    if threads:
        torch.set_num_threads(threads)
    if not source.exists():
        _fail(f"input must exist, got missing {source}")
    try:
        summary = run_prediction(source, out_dir, model, device=device, echo=typer.echo)
    except MedsegError as exc:
        _fail(str(exc))
    typer.echo(f"{summary.ok} scan(s) segmented, {summary.failed} failed; outputs in {out_dir}")
    if summary.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path("demo_out"),
    cases: Annotated[int, typer.Option(help="Synthetic cases (training + validation + test).")] = 20,
    minutes: Annotated[float, typer.Option(help="Training time budget in minutes.")] = 6.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Synthetic data → training → prediction (NIfTI and DICOM) → MLflow, end to end, with a report."""
    from medseg.demo import run_demo
    from medseg.errors import MedsegError

    try:
        run_demo(out, cases=cases, minutes=minutes, seed=seed, echo=typer.echo)
    except MedsegError as exc:
        _fail(str(exc))


def main() -> None:
    """Entry point of the ``medseg`` console script."""
    sys.exit(app())


if __name__ == "__main__":
    main()
