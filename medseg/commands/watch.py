"""``medseg watch``, and what it shares with ``medseg predict``: archive options, ``--export`` names.

Kept apart from :mod:`medseg.commands.predict` (which imports from here, never the
other way) so that these are declared once. Credentials are never options with a value: they come
from environment variables or a file (see :mod:`medseg.sources.dicomweb.connection`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from medseg.commands.app import fail

Studies = Annotated[
    list[str] | None, typer.Option("--study", help="dicomweb source: a StudyInstanceUID to process (repeat).")
]
SeriesUids = Annotated[
    list[str] | None,
    typer.Option("--series", help="dicomweb source: a SeriesInstanceUID to process (repeat)."),
]
Queries = Annotated[
    list[str] | None,
    typer.Option(
        "--query", help="dicomweb source: a QIDO-RS filter KEY=VALUE, e.g. StudyDate=20240101- (repeat)."
    ),
]
CredentialsFile = Annotated[
    Path | None,
    typer.Option(
        "--credentials",
        help='JSON file {"username","password"} or {"token"} for the archive (default: MEDSEG_DICOMWEB_USER/'
        "_PASSWORD or MEDSEG_DICOMWEB_TOKEN from the environment).",
    ),
]
StoreCredentialsFile = Annotated[
    Path | None,
    typer.Option("--store-credentials", help="Like --credentials, for --store-to (default: the same)."),
]
CaBundle = Annotated[
    Path | None,
    typer.Option("--ca-bundle", help="PEM file of the CA(s) that sign the archive's TLS certificate."),
]
StoreTo = Annotated[
    str | None,
    typer.Option(
        "--store-to", help="Send each case's DICOM SEG (RTSTRUCT, secondary captures) to dicomweb:URL."
    ),
]
RecordUids = Annotated[
    bool,
    typer.Option("--record-uids", help="Record Study/Series/SOP UIDs in the manifest (default: hashes)."),
]


def archive_options(
    source: str,
    *,
    study: list[str] | None,
    series: list[str] | None,
    query: list[str] | None,
    credentials: Path | None,
    store_credentials: Path | None,
    ca_bundle: Path | None,
    record_uids: bool,
) -> dict[str, Any]:
    """The scan-source and destination options from the command line's archive options, checked against
    ``source`` (exits 2 for a missing input, or a selection given for a folder)."""
    problem = check_source(source)
    if problem:
        fail(problem)
    options = {
        "studies": tuple(study or ()),
        "series": tuple(series or ()),
        "query": tuple(query or ()),
        "credentials": credentials,
        "store_credentials": store_credentials,
        "ca_bundle": ca_bundle,
        "record_uids": record_uids,
    }
    problem = check_selection(source, options)
    if problem:
        fail(problem)
    return options


def check_selection(source: str, options: dict[str, Any]) -> str | None:
    """Why archive options cannot apply to ``source`` (given for a folder), or ``None``.

    Examples:
        >>> check_selection("scans/", {"studies": ("1.2",), "series": (), "query": ()})
        '--study, --series and --query need a dicomweb: source, got scans/'
    """
    chosen = any(options.get(k) for k in ("studies", "series", "query"))
    if chosen and not source.startswith("dicomweb:"):
        return f"--study, --series and --query need a dicomweb: source, got {source}"
    return None


def check_source(source: str) -> str | None:
    """Why a batch input cannot be used (a missing local path that is not ``SCHEME:LOCATION``), or ``None``.

    Examples:
        >>> check_source("dicomweb:https://pacs/dicom-web") is None
        True
        >>> check_source("no/such/folder")
        'input must exist, got missing no/such/folder'
    """
    if Path(source).exists() or re.match(r"^[a-z][a-z0-9+.-]*:.", source):
        return None
    return f"input must exist, got missing {source}"


def export_names(text: str) -> list[str]:
    """Export names from ``--export`` (``default``, ``none``, or a list); exits 2 for an unknown name.

    ``default`` leaves out, with a note, exports whose optional dependency is not installed; a name
    asked for explicitly fails instead.
    """
    from medseg.errors import MedsegError
    from medseg.export import parse_exports
    from medseg.export.registry import check_dependencies, missing_dependency

    try:
        names = list(parse_exports(text))
        if text.strip().lower() == "default":  # the default skips what is not installed, saying so
            for why in filter(None, map(missing_dependency, names)):
                typer.echo(f"medseg: note: {why}; skipping it", err=True)
            return [n for n in names if missing_dependency(n) is None]
        check_dependencies(names)
        return names
    except MedsegError as exc:
        fail(str(exc))
    return []


def watch_command(
    source: Annotated[str, typer.Argument(help="A folder, or dicomweb:URL of an archive.")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (as for predict).")],
    model: Annotated[
        list[str], typer.Option("--model", help="Bundle folder or MLflow URI (repeat: ensemble).")
    ],
    store_to: StoreTo = None,
    quiet_seconds: Annotated[
        float, typer.Option(help="Seconds a series must stay unchanged before it is segmented.")
    ] = 60.0,
    poll_seconds: Annotated[float, typer.Option(help="Seconds between looks at the source.")] = 10.0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    modality: Annotated[list[str] | None, typer.Option(help="Keep series of this modality (repeat).")] = None,
    series_description: Annotated[
        str | None, typer.Option(help="Keep series whose description matches.")
    ] = None,
    min_slices: Annotated[int, typer.Option(help="Skip series with fewer instances.")] = 1,
    export: Annotated[str, typer.Option(help="Exports, as for predict.")] = "default",
    study: Studies = None,
    series: SeriesUids = None,
    query: Queries = None,
    credentials: CredentialsFile = None,
    store_credentials: StoreCredentialsFile = None,
    ca_bundle: CaBundle = None,
    record_uids: RecordUids = False,
) -> None:
    """Keep segmenting series as they arrive (complete ones only) until SIGTERM or Ctrl-C.

    Exit status: 0 stopped by a signal; 2 could not start (bad arguments, credentials, model).
    """
    from medseg.batch.runner import PredictionSettings, run_prediction
    from medseg.errors import MedsegError
    from medseg.sources.destinations import open_destination
    from medseg.sources.folder import ScanFilter
    from medseg.watch import WatchSettings, watch

    if threads:
        import torch

        torch.set_num_threads(threads)
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
    try:
        destination = open_destination(store_to, options=options) if store_to else None
        watching = WatchSettings(quiet_s=quiet_seconds, poll_s=poll_seconds)
        exports = export_names(export)

        def run_batch(scan_filter: ScanFilter) -> None:
            settings = PredictionSettings(
                device=device,
                scan_filter=scan_filter,
                exports=exports,
                source_options=options,
                destination=destination,
            )
            summary = run_prediction(source, out_dir, models=model, settings=settings, echo=typer.echo)
            typer.echo(
                f"watch: {summary.ok} ok ({summary.reused} kept), {summary.failed} failed, "
                f"{summary.store_failed} not stored"
            )

        stopped = watch(
            source,
            out_dir,
            run_batch=run_batch,
            settings=watching,
            scan_filter=ScanFilter(tuple(modality or ()), series_description, min_slices),
            source_options=options,
            echo=typer.echo,
        )
    except MedsegError as exc:
        fail(str(exc))
    typer.echo(f"watch stopped ({stopped}); outputs in {out_dir}")
