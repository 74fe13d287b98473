"""``medseg review``: bring clinicians' verdicts and corrections back into the batch and training.

Errors are the ``medseg`` command's to report (one line, exit status 2): these commands only raise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

review_app = typer.Typer(
    name="review",
    help="Import clinicians' verdicts (review.json) and collect their corrected label maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@review_app.command("import")
def import_command(
    out_dir: Annotated[Path, typer.Argument(help="The batch folder written by medseg predict.")],
    review_file: Annotated[Path, typer.Argument(help="review.json downloaded from the review page.")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store of the prediction run (default: the manifest's).")
    ] = None,
) -> None:
    """Check review.json against the batch; record its verdicts in the manifest, case.json and MLflow."""
    from medseg.batch.lock import output_lock
    from medseg.review.apply import import_review, review_summary

    with output_lock(out_dir):  # one writer per output folder
        summary = import_review(out_dir, review_file, tracking_uri=tracking_uri)
    typer.echo(review_summary(summary))


@review_app.command("collect")
def collect_command(
    out_dir: Annotated[Path, typer.Argument(help="The batch folder written by medseg predict.")],
    corrected: Annotated[
        Path, typer.Option(help="Folder of corrected segmentations (<case>.nii.gz/.nrrd/.seg.nrrd/.dcm).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The data set to write (a new folder).")],
    spec: Annotated[
        Path | None, typer.Option(help="The model's training data spec (channels and normalisation).")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store of the prediction run (default: the manifest's).")
    ] = None,
) -> None:
    """Check corrected label maps against their scans' grids and label tables; write them as a data set."""
    from medseg.review.collect import DATASET_SPEC, collect_corrections

    measures = collect_corrections(out_dir, corrected, out, spec=spec, tracking_uri=tracking_uri)
    for m in measures:
        typer.echo(
            f"{m.case_id}: Dice {m.dice:.3f} with the prediction, volume change {m.volume_change_ml:+.2f} mL"
        )
    typer.echo(f"{len(measures)} corrected case(s); data spec: {out / DATASET_SPEC}")
