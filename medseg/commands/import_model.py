"""``medseg import``: bring models trained with other tools into medseg as bundles.

``medseg import nnunet PATH --out BUNDLE`` writes a bundle (see :mod:`medseg.sources.nnunet.bundle`)
that ``--model BUNDLE`` runs and that ``--register NAME`` logs to MLflow and registers, so it can be
named as ``models:/NAME@alias`` and compared with medseg's own models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import_app = typer.Typer(
    name="import",
    help="Turn a model trained elsewhere (nnU-Net v2) into a medseg bundle.",
    no_args_is_help=True,
)


def _fail(message: str) -> None:
    typer.secho(f"medseg: error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@import_app.command("nnunet")
def import_nnunet(
    path: Annotated[Path, typer.Argument(help="A trained nnU-Net v2 model folder, or its exported zip.")],
    out: Annotated[Path, typer.Option("--out", help="The bundle folder to write (must not exist).")],
    folds: Annotated[
        str | None, typer.Option(help="Folds to keep, e.g. 0,1,2 (default: every fold present).")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="final or best.")] = "final",
    configuration: Annotated[
        str | None, typer.Option(help="In a zip of several configurations: which one.")
    ] = None,
    register: Annotated[
        str | None, typer.Option(help="Log the bundle to MLflow and register it under this name.")
    ] = None,
    alias: Annotated[str | None, typer.Option(help="With --register: point this alias at it.")] = None,
    experiment: Annotated[str, typer.Option(help="With --register: the MLflow experiment.")] = "medseg",
) -> None:
    """Convert an nnU-Net model folder into a medseg bundle (weights, plans, hashes)."""
    from medseg.errors import MedsegError
    from medseg.sources.nnunet.bundle import import_model_folder
    from medseg.sources.nnunet.folder import parse_folds

    try:
        bundle = import_model_folder(
            path, out, folds=parse_folds(folds), checkpoint=checkpoint, configuration=configuration
        )
    except MedsegError as exc:
        _fail(str(exc))
    typer.echo(f"bundle: {bundle.path} ({bundle.configuration}, folds {','.join(bundle.folds)})")
    typer.echo(f"weights sha256: {bundle.sha256}")
    if register is None:
        return
    from medseg.sources import load_model
    from medseg.tracking import tracked_run
    from medseg.tracking.models import register_bundle

    description = load_model([str(bundle.path)]).describe()
    params = {"model": {"kind": description.kind, "sha256": description.sha256, **description.params}}
    params["model"]["source"] = str(path)
    with tracked_run("import", experiment=experiment, params=params) as run:
        run.log_artifacts(bundle.path, "bundle")
        run_id = run.run_id
    version = register_bundle(run_id, register, alias=alias)
    typer.echo(f"registered: models:/{register}/{version} (run {run_id})")
