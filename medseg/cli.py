"""The ``medseg`` command. Each subcommand calls the library; heavy modules load lazily.

Exit status: 0 success; 1 when some scans failed; 2 when the run could not start (bad arguments,
config or model, an output folder that cannot be written). :class:`Commands` is the one place that
turns the library's errors into that status and a one-line message on stderr.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from medseg.cli_watch import (
    CaBundle,
    CredentialsFile,
    Queries,
    RecordUids,
    SeriesUids,
    StoreCredentialsFile,
    StoreTo,
    Studies,
    archive_options,
    check_selection,
    check_source,
    export_names,
    watch_command,
)


class Commands(TyperGroup):
    """medseg's subcommands, run under its one error policy.

    Errors that mean the run could not start or go on — medseg's own (:class:`~medseg.errors.MedsegError`:
    a bad config, spec, model or argument) and the operating system's (an output folder that cannot be
    made or written) — end the command with exit status 2 and one line on stderr, never a traceback.
    Anything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]  # typer passes its Context
        """Run the chosen subcommand, turning errors that stop it into exit status 2 and one line."""
        from medseg.errors import MedsegError

        try:
            return super().invoke(ctx)
        except (MedsegError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # a closed pipe (``medseg ... | head``): click ends quietly
            _fail(_one_line(exc))


app = typer.Typer(
    cls=Commands,
    name="medseg",
    help="Medical image segmentation: load, preprocess, tile, model, stitch, refine, export, track.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from medseg.cli_import import import_app  # noqa: E402 (after the app it joins)

app.add_typer(import_app, name="import")

EXIT_SOME_FAILED = 1
EXIT_CANNOT_START = 2


def _fail(message: str, code: int = EXIT_CANNOT_START) -> NoReturn:
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
        spec = generate_dataset(out_dir, cases, shape=shape, seed=seed, modality=modality, dicom=dicom)
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
        _fail(str(exc))

    def progress(epoch: int, total: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch_s")
        typer.echo(f"epoch {epoch}/{total}: {shown}")

    if init_from is not None and nproc != 1:
        _fail(f"--init-from trains in one process, got --nproc {nproc}")
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
        _fail(str(exc))
    typer.echo(
        f"model bundle: {result.bundle} (MLflow run {result.run_id}, best val Dice {result.best_dice:.4f})"
    )
    if register:
        from medseg.tracking import register_bundle

        version = register_bundle(result.run_id, register)
        typer.echo(f"registered as models:/{register}/{version}")


def _foreign_model_options(
    folds: str | None, checkpoint: str | None, label_codes: Path | None, pairs: list[str] | None
) -> dict[str, str]:
    """The model source's options from ``predict``'s flags and ``--model-option KEY=VALUE`` pairs."""
    options = {k: v for k, v in (("folds", folds), ("checkpoint", checkpoint)) if v is not None}
    if label_codes is not None:
        options["label_codes"] = str(label_codes)
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--model-option must be KEY=VALUE, got '{pair}'")
        options[key.strip()] = value.strip()
    return options


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
    precision: Annotated[
        str | None,
        typer.Option(
            help="Network precision: auto, float32, bfloat16 or float16 (default: as the model says)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Windows per forward pass, pinned (default: measured once).")
    ] = None,
    memory_format: Annotated[
        str | None,
        typer.Option(help="Window layout, pinned: contiguous or channels_last (default: measured once)."),
    ] = None,
    trust_model_code: Annotated[
        bool,
        typer.Option(
            "--trust-model-code",
            help="Let a foreign model's config run Python (a MONAI bundle's $-expressions and any "
            "_target_); without it such configs are refused, naming the keys.",
        ),
    ] = False,
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
    _reliability_settings(max_memory, tracking_optional)
    problem = check_source(source)
    if problem:
        _fail(problem)
    options = archive_options(
        study=study,
        series=series,
        query=query,
        credentials=credentials,
        store_credentials=store_credentials,
        ca_bundle=ca_bundle,
        record_uids=record_uids,
    )
    problem = check_selection(source, options)
    if problem:
        _fail(problem)
    scan_filter = ScanFilter(tuple(modality or ()), series_description, min_slices)
    if engine != "ray" and (address or workers):
        _fail(f"--address and --workers need --engine ray, got --engine {engine}")
    try:
        ray_settings = RaySettings(address=address, workers=workers, cpus_per_worker=threads or 1)
    except ValueError as exc:
        _fail(f"--{str(exc).replace('cpus_per_worker', 'threads')}")
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
                    **_model_options(precision, batch_size, memory_format, trust_model_code),
                    **_foreign_model_options(folds, checkpoint, label_codes, model_option),
                },
            ),
            echo=typer.echo,
        )
    except StorageError as exc:  # the disk stayed full: some scans failed, the rest wait for a rerun
        _fail(str(exc), EXIT_SOME_FAILED)
    except MedsegError as exc:
        _fail(str(exc))
    stored = f", {summary.store_failed} not stored to {store_to.split(':')[0]}" if store_to else ""
    typer.echo(
        f"{summary.ok} scan(s) segmented ({summary.reused} kept from an earlier run), "
        f"{summary.failed} failed, {summary.skipped} file(s) skipped{stored}; "
        f"manifest: {out_dir / 'manifest.json'}"
    )
    _say_pending_tracking(out_dir)
    if summary.failed or summary.store_failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _reliability_settings(max_memory: str | None, tracking_optional: bool) -> None:
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
            _fail(f"--{exc}")
    if tracking_optional:
        os.environ[OPTIONAL_ENV] = "1"


def _say_pending_tracking(out_dir: Path) -> None:
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
        _fail(str(exc))
    typer.echo(f"{pending} tracking record(s) sent from {out_dir}")


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


@app.command()
def evaluate(
    data: Annotated[
        Path, typer.Option("--data", help="Data spec (YAML) or dataset.json with reference labels.")
    ],
    pred: Annotated[
        Path | None,
        typer.Option("--pred", help="Prediction folder: PRED/<case>/labels.nii.gz or PRED/<case>.nii.gz."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", help="Run this bundle or MLflow URI on the cases instead (repeat: ensemble)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for per_case.csv/json and summary.csv/json.")] = Path(
        "evaluation"
    ),
    cases: Annotated[str | None, typer.Option(help="Only these case ids, comma-separated.")] = None,
    fold: Annotated[int | None, typer.Option(help="Only the validation cases of this fold.")] = None,
    tolerance: Annotated[float, typer.Option(help="Surface Dice tolerance in mm.")] = 1.0,
    data_root: Annotated[Path | None, typer.Option(help="Override the spec's data root.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "medseg",
    run_name: Annotated[str | None, typer.Option(help="MLflow run name.")] = None,
    save_predictions: Annotated[
        bool, typer.Option(help="With --model: also write OUT/predictions/<case>/labels.nii.gz.")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda (with --model).")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (with --model).")] = None,
    crf: Annotated[
        bool | None,
        typer.Option("--crf/--no-crf", help="With --model: the dense CRF on or off (default: as stored)."),
    ] = None,
    postprocess: Annotated[
        bool | None,
        typer.Option("--postprocess/--no-postprocess", help="With --model: post-processing on or off."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Network precision: auto, float32, bfloat16 or float16 (default: as the model says)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Windows per forward pass, pinned (default: measured once).")
    ] = None,
    memory_format: Annotated[
        str | None,
        typer.Option(help="Window layout, pinned: contiguous or channels_last (default: measured once)."),
    ] = None,
    trust_model_code: Annotated[
        bool,
        typer.Option(
            "--trust-model-code",
            help="Let a foreign model's config run Python (a MONAI bundle's $-expressions and any "
            "_target_); without it such configs are refused, naming the keys.",
        ),
    ] = False,
) -> None:
    """Score predictions (a folder, or a model run now) against a spec's labels; log an MLflow evaluate run.

    Per case and label: Dice, HD95 (mm), surface Dice at --tolerance mm, volume difference (mL and
    relative). Exit status 1 when some cases had no prediction or failed.
    """
    from medseg.config.spec import load_spec
    from medseg.errors import MedsegError
    from medseg.evaluation import evaluate_folder, evaluate_model, log_evaluation, write_evaluation

    if (pred is None) == (not model):
        _fail("give exactly one of --pred (a prediction folder) and --model (a bundle or MLflow URI)")
    ids = [c.strip() for c in cases.split(",") if c.strip()] if cases else None
    try:
        loaded = load_spec(data, data_root)
        if model:
            if threads:
                import torch

                torch.set_num_threads(threads)
            save = out / "predictions" if save_predictions else None
            ev = evaluate_model(
                loaded,
                model,
                cases=ids,
                fold=fold,
                tolerance_mm=tolerance,
                device=device,
                save_dir=save,
                echo=typer.echo,
                crf=crf,
                postprocess=postprocess,
                options=_model_options(precision, batch_size, memory_format, trust_model_code),
            )
        else:
            assert pred is not None
            ev = evaluate_folder(loaded, pred, cases=ids, fold=fold, tolerance_mm=tolerance, echo=typer.echo)
        files = write_evaluation(ev, out)
        run_id = log_evaluation(ev, files, experiment=experiment, run_name=run_name)
    except MedsegError as exc:
        _fail(str(exc))
    for stat in ev.summary():
        if stat.metric in ("dice", "hd95", "surface_dice"):
            undefined = f", {stat.n_undefined} undefined" if stat.n_undefined else ""
            shown = f"{stat.mean:8.4f}" if stat.n else "undefined"
            shown += f" ± {stat.sd:.4f}" if stat.n > 1 else ""
            typer.echo(f"{stat.label:>16} {stat.metric:<12} {shown}  (n={stat.n}{undefined})")
    for what, ids_ in (
        ("no prediction", ev.missing),
        ("failed", list(ev.failed)),
        ("no reference", ev.unlabelled),
    ):
        if ids_:
            typer.echo(
                f"{len(ids_)} case(s) {what}: {', '.join(ids_[:10])}{' ...' if len(ids_) > 10 else ''}"
            )
    typer.echo(f"{len(ev.scores)} case(s) evaluated; tables in {out} (MLflow run {run_id})")
    if not ev.complete:
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def compare(
    run_ids: Annotated[
        list[str] | None, typer.Argument(help="Run ids to compare (default: the experiment's).")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment to take runs from.")] = "medseg",
    kind: Annotated[str | None, typer.Option(help="Only runs of this kind (train, evaluate, ...).")] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", help="Metric to show (repeat); default all *_mean metrics."),
    ] = None,
    sort: Annotated[str | None, typer.Option(help="Metric to sort by (default: the first shown).")] = None,
    ascending: Annotated[
        bool | None, typer.Option("--ascending/--descending", help="Sort order (default: by metric).")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Run id for paired differences (default: first).")
    ] = None,
    curve: Annotated[
        list[str] | None,
        typer.Option("--curve", help="Metric history to plot (default train_loss, val_dice_mean)."),
    ] = None,
    max_runs: Annotated[int | None, typer.Option(help="At most this many runs (newest first).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for runs.csv, paired.csv and PNG plots.")] = Path(
        "comparison"
    ),
    group_by: Annotated[
        str | None,
        typer.Option(
            help="Group runs into variants by these params (comma-separated, e.g. "
            "pipeline,refine.crf.enabled): mean ± sd over seeds/folds, differences to --baseline-group."
        ),
    ] = None,
    baseline_group: Annotated[
        str | None, typer.Option(help="The baseline variant: its params' values joined by ' | '.")
    ] = None,
) -> None:
    """Compare MLflow runs: differing params, metrics (mean ± sd), paired per-case tests, plots."""
    from rich.console import Console
    from rich.table import Table

    from medseg.errors import MedsegError
    from medseg.evaluation.compare import DEFAULT_CURVES, compare_runs, write_comparison

    try:
        comp = compare_runs(
            run_ids or None,
            experiment=experiment,
            kind=kind,
            metrics=metric or None,
            sort_by=sort,
            ascending=ascending,
            baseline=baseline,
            curves=curve or DEFAULT_CURVES,
            max_runs=max_runs,
        )
        files = write_comparison(comp, out)
        grouped = None
        if group_by:
            from medseg.evaluation.groups import group_runs, write_groups

            grouped = group_runs(comp, group_by.split(","), baseline_group)
            files.update(write_groups(grouped, out))
    except MedsegError as exc:
        _fail(str(exc))
    console = Console(width=max(120, Console().width))
    transpose = len(comp.runs) <= 6 < len(comp.metrics) + len(comp.params)
    header, rows = comp.display(transpose=transpose)
    table = Table(title=f"{len(comp.runs)} run(s)" + (f", sorted by {comp.sort_by}" if comp.sort_by else ""))
    for col in header:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if comp.paired:
        names = {r.run_id: comp.run_label(r) for r in comp.runs}
        paired = Table(title=f"paired per-case differences (other - {names[comp.baseline or '']})")
        for col in ("run", "metric", "label", "n", "mean diff", "sd", "p (Wilcoxon)", "p (t-test)"):
            paired.add_column(col)
        for p in comp.paired:
            paired.add_row(
                names[p.other_run],
                p.metric,
                p.label,
                str(p.n),
                f"{p.mean_diff:.4g}",
                f"{p.sd_diff:.3g}",
                f"{p.p_wilcoxon:.3g}",
                f"{p.p_ttest:.3g}",
            )
        console.print(paired)
    if grouped is not None:
        console.print(_group_table(grouped))
    typer.echo("wrote " + ", ".join(str(p) for p in files.values()))


def _group_table(grouped: Any) -> Any:
    """The variants table: per group and metric ``mean ± sd (n)``, difference to the baseline."""
    from rich.table import Table

    metrics = list(dict.fromkeys(s.metric for s in grouped.stats))
    table = Table(title=f"variants by {', '.join(grouped.by)} (baseline: {grouped.baseline})")
    table.add_column("variant", overflow="fold")
    for m in metrics:
        table.add_column(m, overflow="fold")
    for name in grouped.groups:
        cells = [name]
        for m in metrics:
            st = grouped.stat(name, m)
            d = next((x for x in grouped.diffs if x.group == name and x.metric == m), None)
            text = "" if st is None else f"{st.mean:.4f} ± {st.sd:.4f} ({st.n_runs})"
            if d is not None:
                mark = {True: " *", False: "", None: " ?"}[d.beyond_noise]
                text += f"  Δ {d.diff:+.4f}{mark}"
            cells.append(text)
        table.add_row(*cells)
    table.caption = "Δ: difference of means to the baseline; * larger than twice the seed noise"
    return table


@app.command("export")
def export_command(
    out_dir: Annotated[
        Path | None, typer.Argument(help="A prediction folder (medseg predict's OUT_DIR) to export again.")
    ] = None,
    export: Annotated[
        str | None,
        typer.Option(
            help="Exports, comma-separated: nifti, dicom-seg, rtstruct, stats, overlays, secondary-capture, "
            "report, or 'default' (the default for a prediction folder; with --image: dicom-seg,nifti)."
        ),
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Convert a label map: the DICOM series folder it was drawn on.")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Convert a label map: the label map (NIfTI, NRRD, MHA) to convert.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Convert a label map: the output folder.")] = None,
    spec: Annotated[
        Path | None, typer.Option(help="Data spec (YAML or dataset.json): label names, colours and codes.")
    ] = None,
    label_names: Annotated[
        Path | None,
        typer.Option(help="Label names instead of a spec: JSON, ITK-SNAP label file, Slicer .ctbl or text."),
    ] = None,
    show_patient_info: Annotated[
        bool, typer.Option(help="Show patient identifiers on the HTML review page.")
    ] = False,
) -> None:
    """Make clinician exports without running a model.

    medseg export OUT_DIR remakes the exports of every segmented case of a prediction folder, then
    the batch table and review page. medseg export --image SERIES --labels LABELMAP --out DIR turns a
    label map made elsewhere into a DICOM SEG (and more) for that series. Exit status 1 when some
    cases failed.
    """
    from medseg.batch.lock import output_lock
    from medseg.batch.outputs import export_folder
    from medseg.errors import MedsegError
    from medseg.export import convert_label_map, label_table, read_label_names

    convert = image is not None or labels is not None
    if convert and (image is None or labels is None or out is None):
        _fail("converting a label map needs --image, --labels and --out together")
    if convert == (out_dir is not None):
        _fail("give either OUT_DIR (a prediction folder) or --image/--labels/--out (a label map to convert)")
    if spec is not None and label_names is not None:
        _fail("give at most one of --spec and --label-names")
    try:
        names = export_names(export or ("dicom-seg,nifti" if convert else "default"))
        table = None
        if spec is not None:
            from medseg.export.labels import spec_label_table

            table = spec_label_table(_read_spec(spec))
        elif label_names is not None:
            table = label_table(read_label_names(label_names))
        if convert:
            assert image is not None
            assert labels is not None
            assert out is not None
            written = convert_label_map(image, labels, out, table=table, exports=names)
            typer.echo(f"wrote {len(written)} file(s) into {out}: " + ", ".join(p.name for p in written))
            return
        assert out_dir is not None
        with output_lock(out_dir):  # one writer per output folder
            done, failed = export_folder(
                out_dir, names, table=table, show_patient_info=show_patient_info, echo=typer.echo
            )
    except MedsegError as exc:
        _fail(str(exc))
    where = f"; review page: {out_dir / 'report' / 'index.html'}" if "report" in names else ""
    typer.echo(f"{done} case(s) exported, {failed} failed{where}")
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)


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
        _fail(f"--precision must be bfloat16 or float16, got {precision}")
    try:
        result = check_bundle_on_spec(bundle, data, device=device, max_cases=cases, dtype=precision)
    except MedsegError as exc:
        _fail(str(exc))
    typer.echo(result.summary())
    if not result.passed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _inference_options(precision: str | None, batch_size: int | None, memory_format: str | None) -> dict:
    """``--precision``, ``--batch-size`` and ``--memory-format`` as model-source options (checked)."""
    from medseg.errors import ConfigError
    from medseg.tiling.runtime import InferenceOptions

    try:
        options = InferenceOptions(precision=precision, batch_size=batch_size, memory_format=memory_format)
    except ConfigError as exc:
        _fail(f"--{str(exc).replace('_', '-')}")
    return options.as_mapping()


def _model_options(
    precision: str | None, batch_size: int | None, memory_format: str | None, trust_model_code: bool
) -> dict:
    """The model source's options: the inference options, and ``trust_model_code`` when given."""
    options = _inference_options(precision, batch_size, memory_format)
    return {**options, "trust_model_code": True} if trust_model_code else options


def _read_spec(path: Path):
    """A data spec's labels part, without resolving its data (which may be elsewhere)."""
    from medseg.config.base import read_yaml, validate
    from medseg.config.spec import DatasetSpec

    if path.suffix == ".json":
        from medseg.config.msd import spec_from_dataset_json

        return spec_from_dataset_json(path)
    return validate(DatasetSpec, read_yaml(path), str(path))


def _one_line(exc: BaseException) -> str:
    """The message of an error that stopped a command, on one line, naming the file where there is one."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        text = f"cannot use {where}{exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


app.command("watch")(watch_command)


def _add_review() -> None:
    from medseg.review.cli import review_app

    app.add_typer(review_app)


_add_review()


def main() -> None:
    """Entry point of the ``medseg`` console script (errors become exit codes in :class:`Commands`)."""
    sys.exit(app())


if __name__ == "__main__":
    main()
