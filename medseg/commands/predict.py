"""``medseg predict`` and ``medseg track sync``: a batch of scans, and its tracking records."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.commands.app import EXIT_SOME_FAILED, app, fail
from medseg.commands.options import (
    BatchSize,
    MemoryFormat,
    Precision,
    TrustModelCode,
    foreign_model_options,
    model_options,
)
from medseg.commands.watch import (
    CaBundle,
    CredentialsFile,
    Queries,
    RecordUids,
    SeriesUids,
    StoreCredentialsFile,
    StoreTo,
    Studies,
    archive_options,
    export_names,
)


@app.command()
def predict(
    source: Annotated[
        str,
        typer.Argument(
            help="A scan file, a DICOM series folder, a folder of scans, or dicomweb:URL of an archive."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="Output folder: one sub-folder per scan, plus the manifest.")
    ],
    model: Annotated[
        list[str],
        typer.Option(
            "--model",
            help="Bundle folder, MLflow URI runs:/... models:/..., or SCHEME:PATH of a registered "
            "model source (repeat: ensemble).",
        ),
    ],
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    modality: Annotated[
        list[str] | None, typer.Option(help="Keep DICOM series of this modality (repeat).")
    ] = None,
    series_description: Annotated[
        str | None, typer.Option(help="Keep series whose description matches.")
    ] = None,
    min_slices: Annotated[int, typer.Option(help="Skip DICOM series with fewer files.")] = 1,
    probabilities: Annotated[bool, typer.Option(help="Also write class probabilities.")] = False,
    export: Annotated[
        str,
        typer.Option(
            help="Exports, comma-separated: nifti, dicom-seg, rtstruct, stats, overlays, "
            "secondary-capture, report, volumes; 'default' = nifti,dicom-seg,stats,overlays,report "
            "(each where it applies); 'none'."
        ),
    ] = "default",
    show_patient_info: Annotated[
        bool, typer.Option(help="Show patient identifiers on the HTML review page (off by default).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Allow an output folder made with another model.")] = False,
    engine: Annotated[
        str, typer.Option(help="Where scans run: local (this process) or ray (a pool of Ray workers).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="With --engine ray: the Ray cluster to join (e.g. auto); default: a local one."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="With --engine ray: workers (default: one per free CPU, or per GPU with cuda)."),
    ] = None,
    parallel_scans: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Local engine: scans segmented at once, sharing --threads equally "
            "(default: 2 on CPU with 2+ threads, else 1; memory grows with it).",
        ),
    ] = None,
    tracking_optional: Annotated[
        bool,
        typer.Option(
            help="Segment even when the tracking server is unreachable at start (records are kept "
            "in OUT/tracking.journal.jsonl until `medseg track sync OUT`)."
        ),
    ] = False,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Refuse a scan whose headers declare more voxels than this (e.g. 8G; "
            "default: half the RAM), before loading it."
        ),
    ] = None,
    crf: Annotated[
        bool | None,
        typer.Option("--crf/--no-crf", help="Refine with the dense CRF (default: as the pipeline says)."),
    ] = None,
    postprocess: Annotated[
        bool | None,
        typer.Option(
            "--postprocess/--no-postprocess",
            help="Apply the post-processing chosen at training (default: on).",
        ),
    ] = None,
    study: Studies = None,
    series: SeriesUids = None,
    query: Queries = None,
    credentials: CredentialsFile = None,
    ca_bundle: CaBundle = None,
    store_to: StoreTo = None,
    store_credentials: StoreCredentialsFile = None,
    record_uids: RecordUids = False,
    precision: Precision = None,
    batch_size: BatchSize = None,
    memory_format: MemoryFormat = None,
    trust_model_code: TrustModelCode = False,
    folds: Annotated[
        str | None,
        typer.Option(help="nnunet: models: the folds to ensemble, e.g. 0,1,2 (default: every fold present)."),
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="nnunet: models: the checkpoint, final or best (default: final).")
    ] = None,
    label_codes: Annotated[
        Path | None,
        typer.Option(help="YAML of DICOM codes per label name (for SEG) where the model has none (nnunet:)."),
    ] = None,
    model_option: Annotated[
        list[str] | None,
        typer.Option("--model-option", help="KEY=VALUE for the model source (repeat), e.g. mirroring=false."),
    ] = None,
) -> None:
    """Segment scans; write each label map on its scan's own voxel grid, with a manifest.

    Exit status: 0 every scan succeeded; 1 some failed; 2 the run could not start.
    """
    import torch

    from medseg.batch.ray_engine import RaySettings
    from medseg.batch.runner import Engine, PredictionSettings, run_prediction
    from medseg.batch.storage import StorageError
    from medseg.errors import MedsegError
    from medseg.sources.destinations import open_destination
    from medseg.sources.folder import ScanFilter

    if threads:
        torch.set_num_threads(threads)
    reliability_settings(max_memory, tracking_optional)
    options = archive_options(
        source,
        study=study,
        series=series,
        query=query,
        credentials=credentials,
        store_credentials=store_credentials,
        ca_bundle=ca_bundle,
        record_uids=record_uids,
    )
    scan_filter = ScanFilter(tuple(modality or ()), series_description, min_slices)
    if engine != "ray" and (address or workers):
        fail(f"--address and --workers need --engine ray, got --engine {engine}")
    try:
        ray_settings = RaySettings(address=address, workers=workers, cpus_per_worker=threads or 1)
    except ValueError as exc:
        fail(f"--{str(exc).replace('cpus_per_worker', 'threads')}")
    try:
        destination = open_destination(store_to, options=options) if store_to else None
        summary = run_prediction(
            str(source),  # a path, or SCHEME:LOCATION of a scan source
            out_dir,
            models=model,
            settings=PredictionSettings(
                device=device,
                scan_filter=scan_filter,
                keep_probabilities=probabilities,
                exports=export_names(export),
                show_patient_info=show_patient_info,
                overwrite=overwrite,
                engine=Engine.parse(engine),
                crf=crf,
                postprocess=postprocess,
                parallel_scans=parallel_scans,
                ray=ray_settings,
                source_options=options,
                destination=destination,
                model_options={
                    **model_options(precision, batch_size, memory_format, trust_model_code),
                    **foreign_model_options(folds, checkpoint, label_codes, model_option),
                },
            ),
            echo=typer.echo,
        )
    except StorageError as exc:  # the disk stayed full: some scans failed, the rest wait for a rerun
        fail(str(exc), EXIT_SOME_FAILED)
    except MedsegError as exc:
        fail(str(exc))
    stored = f", {summary.store_failed} not stored to {store_to.split(':')[0]}" if store_to else ""
    typer.echo(
        f"{summary.ok} scan(s) segmented ({summary.reused} kept from an earlier run), "
        f"{summary.failed} failed, {summary.skipped} file(s) skipped{stored}; "
        f"manifest: {out_dir / 'manifest.json'}"
    )
    say_pending_tracking(out_dir)
    if summary.failed or summary.store_failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def reliability_settings(max_memory: str | None, tracking_optional: bool) -> None:
    """``--max-memory`` and ``--tracking-optional`` as the environment settings that loaders (also in
    Ray workers) and the batch's tracking read; exits 2 for a bad size."""
    import os

    from medseg.errors import ConfigError
    from medseg.io.limits import MEMORY_ENV, parse_size
    from medseg.tracking.journal import OPTIONAL_ENV

    if max_memory is not None:
        try:
            os.environ[MEMORY_ENV] = str(parse_size(max_memory))
        except ConfigError as exc:
            fail(f"--{exc}")
    if tracking_optional:
        os.environ[OPTIONAL_ENV] = "1"


def say_pending_tracking(out_dir: Path) -> None:
    from medseg.tracking.journal import JOURNAL_FILE, pending_records

    pending = pending_records(out_dir)
    if pending:
        typer.secho(
            f"medseg: the tracking server was unreachable: {pending} record(s) kept in "
            f"{out_dir / JOURNAL_FILE}; run `medseg track sync {out_dir}` when it is back",
            err=True,
            fg=typer.colors.YELLOW,
        )


track_app = typer.Typer(help="Tracking records of batch folders.", no_args_is_help=True)
app.add_typer(track_app, name="track")


@track_app.command("sync")
def track_sync(
    out_dir: Annotated[Path, typer.Argument(help="A prediction folder with journalled tracking records.")],
) -> None:
    """Send a batch folder's journalled tracking records to the tracking server.

    Exit status: 0 sent (or nothing to send); 2 the server is still unreachable.
    """
    from medseg.errors import MedsegError
    from medseg.tracking.journal import pending_records, sync

    pending = pending_records(out_dir)
    try:
        sync(out_dir)
    except MedsegError as exc:
        fail(str(exc))
    typer.echo(f"{pending} tracking record(s) sent from {out_dir}")
