"""``medseg evaluate`` and ``medseg compare``: scores against reference labels, and runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medseg.commands.app import EXIT_SOME_FAILED, app, fail
from medseg.commands.options import BatchSize, MemoryFormat, Precision, TrustModelCode, model_options


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
    precision: Precision = None,
    batch_size: BatchSize = None,
    memory_format: MemoryFormat = None,
    trust_model_code: TrustModelCode = False,
) -> None:
    """Score predictions (a folder, or a model run now) against a spec's labels; log an MLflow evaluate run.

    Per case and label: Dice, HD95 (mm), surface Dice at --tolerance mm, volume difference (mL and
    relative). Exit status 1 when some cases had no prediction or failed.
    """
    from medseg.config.spec import load_spec
    from medseg.errors import MedsegError
    from medseg.evaluation import evaluate_folder, evaluate_model, log_evaluation, write_evaluation

    if (pred is None) == (not model):
        fail("give exactly one of --pred (a prediction folder) and --model (a bundle or MLflow URI)")
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
                options=model_options(precision, batch_size, memory_format, trust_model_code),
            )
        else:
            assert pred is not None
            ev = evaluate_folder(loaded, pred, cases=ids, fold=fold, tolerance_mm=tolerance, echo=typer.echo)
        files = write_evaluation(ev, out)
        run_id = log_evaluation(ev, files, experiment=experiment, run_name=run_name)
    except MedsegError as exc:
        fail(str(exc))
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
        fail(str(exc))
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
