"""``medseg export``: clinician exports remade from a batch folder, or one label map converted."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.commands.app import EXIT_SOME_FAILED, app, fail
from medseg.commands.options import read_spec
from medseg.commands.watch import (
    export_names,
)


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
        fail("converting a label map needs --image, --labels and --out together")
    if convert == (out_dir is not None):
        fail("give either OUT_DIR (a prediction folder) or --image/--labels/--out (a label map to convert)")
    if spec is not None and label_names is not None:
        fail("give at most one of --spec and --label-names")
    try:
        names = export_names(export or ("dicom-seg,nifti" if convert else "default"))
        table = None
        if spec is not None:
            from medseg.export.labels import spec_label_table

            table = spec_label_table(read_spec(spec))
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
        fail(str(exc))
    where = f"; review page: {out_dir / 'report' / 'index.html'}" if "report" in names else ""
    typer.echo(f"{done} case(s) exported, {failed} failed{where}")
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)
