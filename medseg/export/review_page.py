"""A static HTML review page for a batch: ``OUT/report/index.html`` and one page per case.

The index lists every case with its status, series description, volume per label and QC flags
(:mod:`medseg.export.qc`), failed cases first, then by QC risk; clicking a column header sorts the
table (a few lines of inline JavaScript; ``index.html#sort=-4`` opens it sorted by the fifth
column, descending). Each case page shows the overlay montages, the statistics table and links to every
exported file. Everything is plain files with relative links, no CDN, no network: the folder
works offline and inside the batch folder wherever it is copied. Patient identifiers appear only
when asked for (``show_patient_info``), read from the source DICOM at build time.

The pages are Jinja2 templates (``medseg/export/templates/``, autoescaped) filled from typed rows
(:mod:`medseg.export.review_rows`). The clinician's review (the QC risk order, the slice viewer,
verdicts and ``review.json``) comes from :mod:`medseg.export.review_panel`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.export.review_panel import (
    case_review_html,
    index_review_html,
    review_order,
    write_batch_identity,
)
from medseg.export.review_rows import GREY, ReviewRow, ReviewSettings, collect_rows, label_colors
from medseg.io.atomic import atomic_write_text

if TYPE_CHECKING:
    import jinja2

    from medseg.export.facts import BatchCase

REPORT_DIR = "report"
INDEX = "index.html"
INDEX_COLUMNS = ("case", "series", "modality", "status")

__all__ = ["INDEX", "REPORT_DIR", "ReviewSettings", "render_case", "render_index", "write_review"]


@functools.cache
def _templates() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("medseg.export", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def render_index(rows: Sequence[ReviewRow], settings: ReviewSettings) -> str:
    """The HTML of ``report/index.html``: what needs a look first (failed, then by QC risk)."""
    from markupsafe import Markup

    ordered = review_order(rows)
    columns = [*INDEX_COLUMNS, *(["patient"] if settings.show_patient_info else [])]
    return (
        _templates()
        .get_template("index.html")
        .render(
            title=settings.title,
            settings=settings,
            rows=ordered,
            columns=columns,
            labels=label_colors(rows),
            segmented=sum(r.status == "ok" for r in rows),
            flagged=sum(bool(r.flags) for r in rows),
            built=time.strftime("%Y-%m-%d %H:%M"),
            review=Markup(index_review_html()),
        )
    )


def render_case(row: ReviewRow, settings: ReviewSettings) -> str:
    """The HTML of ``report/cases/<case_id>.html``."""
    return (
        _templates()
        .get_template("case.html")
        .render(title=f"{row.case_id} - {settings.title}", row=row, grey=GREY, review=_case_review(row))
    )


def _case_review(row: ReviewRow) -> Any:
    from urllib.parse import quote

    from markupsafe import Markup

    html = case_review_html(
        case_id=row.case_id,
        segmented=row.status == "ok",
        files=row.files,
        base=f"../../{quote(row.case_id)}/",
    )
    return Markup(html)


def write_review(
    out_dir: Path, cases: Sequence[BatchCase], settings: ReviewSettings | None = None
) -> list[Path]:
    """Write the review pages of a batch folder (each file atomically).

    Args:
        out_dir: The batch's output folder (case folders).
        cases: Its cases, in manifest order (see :func:`medseg.batch.manifest.batch_cases`).
        settings: What to show.

    Returns:
        The written paths, ``report/index.html`` first.
    """
    settings = settings or ReviewSettings()
    out_dir = Path(out_dir)
    rows = collect_rows(out_dir, cases, settings)
    report = out_dir / REPORT_DIR
    atomic_write_text(report / INDEX, render_index(rows, settings))
    written = [report / INDEX, write_batch_identity(report, settings.batch, [r.case_id for r in rows])]
    for row in rows:
        dest = report / "cases" / f"{row.case_id}.html"
        atomic_write_text(dest, render_case(row, settings))
        written.append(dest)
    return written
