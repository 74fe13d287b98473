"""``medseg synth``, ``check``, ``plan`` and ``demo``: data specs, planning and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.commands.app import app, fail


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
        fail(f"--size must be three integers X,Y,Z, got {size!r}")
    try:
        spec = generate_dataset(out_dir, cases, shape=shape, seed=seed, modality=modality, dicom=dicom)
    except (MedsegError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {cases} cases; data spec: {spec}")


@app.command()
def check(
    spec: Annotated[Path, typer.Argument(help="Data spec (YAML) or dataset.json.")],
    data_root: Annotated[Path | None, typer.Option(help="Override the spec's data root.")] = None,
) -> None:
    """Validate a data spec against its files (co-registered channels, declared label values)."""
    from medseg.config.check import check_spec_data
    from medseg.config.spec import load_spec

    n = check_spec_data(load_spec(spec, data_root))
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
    from medseg.tracking import tracked_run
    from medseg.training.planning import plan_pipeline, write_plan

    loaded = load_spec(spec, data_root)
    cfg, text = plan_pipeline(loaded, model=model, budget_mb=budget_mb, gpu=gpu)
    write_plan(out, text)
    with tracked_run("plan", run_name=cfg.name, params=cfg.model_dump(mode="json")) as run:
        run.log_text(text, "pipeline.yaml")
    typer.echo(text)
    typer.echo(f"wrote {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path("demo_out"),
    cases: Annotated[int, typer.Option(help="Synthetic cases (training + validation + test).")] = 20,
    minutes: Annotated[float, typer.Option(help="Training time budget in minutes.")] = 7.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Synthetic data → training → prediction (NIfTI and DICOM) → MLflow, end to end, with a report."""
    from medseg.demo import run_demo

    run_demo(out, cases=cases, minutes=minutes, seed=seed, echo=typer.echo)
