"""A static HTML review page for a batch: ``OUT/report/index.html`` and one page per case.

The index lists every case with its status, series description, volume per label and QC flags
(:mod:`medseg.export.qc`), failed and flagged cases first; clicking a column header sorts the
table (a few lines of inline JavaScript; ``index.html#sort=-4`` opens it sorted by the fifth
column, descending). Each case page shows the overlay montages, the statistics table and links to every
exported file. Everything is plain files with relative links, no CDN, no network: the folder
works offline and inside the batch folder wherever it is copied. Patient identifiers appear only
when asked for (``show_patient_info``), read from the source DICOM at build time.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from medseg.export.case import read_case_facts
from medseg.export.qc import Flag, QcSettings, batch_medians, case_flags
from medseg.export.stats import read_stats
from medseg.io.atomic import atomic_write_text

REPORT_DIR = "report"
INDEX = "index.html"
_PATIENT_TAGS = (
    ("PatientName", "patient name"),
    ("PatientID", "patient id"),
    ("PatientBirthDate", "birth date"),
    ("StudyDate", "study date"),
    ("AccessionNumber", "accession"),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:18px 0 6px}
.meta{color:#555;font-size:13px;margin-bottom:10px}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;cursor:pointer;user-select:none;white-space:nowrap}
th.sorted-asc:after{content:" \\25B2"}th.sorted-desc:after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.flagged td{background:#fff4e5}tr.failed td{background:#fde8e8}
.flag{display:inline-block;background:#f59e0b;color:#fff;border-radius:3px;padding:0 5px;margin:1px;
font-size:12px}
.flag.failed,.flag.empty{background:#dc2626}
.ok{color:#15803d}.bad{color:#b91c1c}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #333;margin-right:5px;
vertical-align:-1px}
img.montage{max-width:100%;border:1px solid #ccc;margin:4px 0}
ul.files{font-size:13px}
"""

_SORT_JS = r"""
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var asc = !th.classList.contains('sorted-asc');
      table.querySelectorAll('th').forEach(function(h){h.classList.remove('sorted-asc','sorted-desc');});
      th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function(a, b){
        var x = a.cells[col].getAttribute('data-sort') || a.cells[col].textContent.trim();
        var y = b.cells[col].getAttribute('data-sort') || b.cells[col].textContent.trim();
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
// index.html#sort=3 sorts by the 4th column, #sort=-3 the other way round (links that open sorted)
(function(){
  var m = /^#sort=(-?)(\d+)$/.exec(window.location.hash);
  var th = m && document.querySelectorAll('table.sortable')[0].querySelectorAll('th')[+m[2]];
  if (th) { th.click(); if (m[1]) { th.click(); } }
})();
"""


@dataclass(frozen=True)
class ReviewSettings:
    """What the review page shows.

    Attributes:
        show_patient_info: Show patient name, id, birth date, study date and accession number.
        qc: QC thresholds.
        title: Page title.
    """

    show_patient_info: bool = False
    qc: QcSettings = field(default_factory=QcSettings)
    title: str = "medseg review"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _entries(out_dir: Path) -> list[dict[str, Any]]:
    """The batch's scans: from ``manifest.json``, else from the case folders' ``result.json``."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        return list(manifest.get("scans", []))
    except (OSError, json.JSONDecodeError):
        pass
    entries = []
    for result in sorted(out_dir.glob("*/result.json")):
        try:
            data = json.loads(result.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        entries.append(
            {"case_id": result.parent.name, "status": data.get("status"), "outputs": data.get("outputs", [])}
        )
    return entries


def _patient_info(inputs: list[str]) -> dict[str, str]:
    import pydicom

    for path in inputs[:1]:
        p = Path(path)
        if p.is_dir():
            p = next((f for f in sorted(p.rglob("*")) if f.is_file()), p)
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # not DICOM, or unreadable: nothing to show
            return {}
        return {label: str(ds.get(tag, "")) for tag, label in _PATIENT_TAGS if str(ds.get(tag, ""))}
    return {}


def collect_rows(out_dir: Path, settings: ReviewSettings | None = None) -> list[dict[str, Any]]:
    """One record per case for the review page: status, facts, volumes, statistics, files, flags.

    Args:
        out_dir: The batch's output folder.
        settings: What to show.

    Returns:
        The records, in manifest order, each with ``flags`` (a list of :class:`~medseg.export.qc.Flag`).
    """
    settings = settings or ReviewSettings()
    rows = []
    for entry in _entries(out_dir):
        case_id = str(entry["case_id"])
        case_dir = out_dir / case_id
        facts = read_case_facts(case_dir) if entry.get("status") == "ok" else {}
        stats = read_stats(case_dir) if entry.get("status") == "ok" else None
        row: dict[str, Any] = {
            "case_id": case_id,
            "status": entry.get("status", "?"),
            "error": entry.get("error"),
            "series_description": facts.get("series_description", ""),
            "modality": facts.get("modality", ""),
            "facts": facts,
            "stats": stats,
            "volumes": {r["name"]: float(r["volume_ml"]) for r in stats["labels"]} if stats else None,
            "quality": facts.get("quality") or entry.get("quality") or {},
            "refine": facts.get("refine") or entry.get("refine"),
            "errors": facts.get("errors") or {},
            "files": sorted(
                str(Path(p).relative_to(case_id))
                for p in entry.get("outputs", [])
                if Path(p).parts[:1] == (case_id,)
            ),
            "patient": _patient_info(entry.get("inputs", [])) if settings.show_patient_info else {},
        }
        if not row["files"] and case_dir.is_dir():
            row["files"] = sorted(str(p.relative_to(case_dir)) for p in case_dir.rglob("*") if p.is_file())
        rows.append(row)
    medians = batch_medians(rows, settings.qc)
    for row in rows:
        row["flags"] = case_flags(row, medians, settings.qc)
    return rows


def _flags_html(flags: list[Flag]) -> str:
    return " ".join(
        f'<span class="flag {_e(f.code)}" title="{_e(f.text)}">{_e(f.code)}</span>' for f in flags
    )


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n{body}\n"
        f"<script>{_SORT_JS}</script></body></html>\n"
    )


def _label_names(rows: list[dict[str, Any]]) -> list[tuple[str, tuple[int, int, int]]]:
    seen: dict[str, tuple[int, int, int]] = {}
    for row in rows:
        for lab in row["facts"].get("labels", []):
            seen.setdefault(lab["name"], tuple(lab.get("color", (128, 128, 128))))
        for name in row["volumes"] or {}:
            seen.setdefault(name, (128, 128, 128))
    return list(seen.items())


def render_index(rows: list[dict[str, Any]], settings: ReviewSettings) -> str:
    """The HTML of ``report/index.html``."""
    names = _label_names(rows)
    flagged = sum(bool(r["flags"]) for r in rows)
    head = ["case", "series", "modality", "status"]
    if settings.show_patient_info:
        head += ["patient"]
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    cells += "".join(
        f'<th><span class="swatch" style="background:rgb{tuple(c)}"></span>{_e(n)} (mL)</th>'
        for n, c in names
    )
    cells += "<th>flags</th>"
    body_rows = []
    # what needs a look comes first: failed cases, then flagged ones, then the rest
    for row in sorted(rows, key=lambda r: (r["status"] == "ok", not r["flags"])):
        cls = "failed" if row["status"] != "ok" else ("flagged" if row["flags"] else "")
        link = f'<a href="cases/{quote(row["case_id"])}.html">{_e(row["case_id"])}</a>'
        status_cls = "ok" if row["status"] == "ok" else "bad"
        tds = [
            f"<td>{link}</td>",
            f"<td>{_e(row['series_description'])}</td>",
            f"<td>{_e(row['modality'])}</td>",
            f'<td class="{status_cls}" title="{_e(row["error"] or "")}">{_e(row["status"])}</td>',
        ]
        if settings.show_patient_info:
            tds.append(f"<td>{_e(' / '.join(row['patient'].values()))}</td>")
        for name, _ in names:
            v = (row["volumes"] or {}).get(name)
            tds.append(
                f'<td class="num" data-sort="{-1 if v is None else v}">{"" if v is None else f"{v:.2f}"}</td>'
            )
        tds.append(f'<td data-sort="{len(row["flags"])}">{_flags_html(row["flags"])}</td>')
        body_rows.append(f'<tr class="{cls}" data-case="{_e(row["case_id"])}">{"".join(tds)}</tr>')
    when = time.strftime("%Y-%m-%d %H:%M")
    body = (
        f"<h1>{_e(settings.title)}</h1>"
        f'<div class="meta">{len(rows)} case(s), {sum(r["status"] == "ok" for r in rows)} segmented, '
        f"{flagged} flagged for review, listed first. Click a column header to sort. Built {when}.</div>"
        f'<table class="sortable" id="cases"><thead><tr>{cells}</tr></thead>'
        f"<tbody>{''.join(body_rows)}</tbody></table>"
    )
    return _page(settings.title, body)


def render_case(row: dict[str, Any], settings: ReviewSettings) -> str:
    """The HTML of ``report/cases/<case_id>.html``."""
    case_id = row["case_id"]
    base = f"../../{quote(case_id)}/"
    facts = row["facts"]
    algo = facts.get("algorithm", {})
    info = [
        ("status", row["status"] + (f" ({row['error']})" if row["error"] else "")),
        ("series", row["series_description"]),
        ("modality", row["modality"]),
        ("grid", " x ".join(str(s) for s in facts.get("shape", []))),
        ("spacing (mm)", " x ".join(f"{s:g}" for s in facts.get("spacing_mm", []))),
        (
            "model",
            f"{algo.get('name', '')} ({algo.get('pipeline', '')}), bundle {str(algo.get('sha256', ''))[:16]}",
        ),
    ]
    info += [(k.replace("_", " "), _fmt(v)) for k, v in (row["quality"] or {}).items()]
    info += [(f"refine: {k.replace('_', ' ')}", _fmt(v)) for k, v in (row["refine"] or {}).items()]
    info += list(row["patient"].items())
    parts = [
        '<div class="meta"><a href="../index.html">&larr; all cases</a></div>',
        f"<h1>{_e(case_id)}</h1>",
        "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info if v) + "</table>",
    ]
    if row["flags"]:
        parts.append(
            "<h2>QC flags</h2><ul>"
            + "".join(f"<li>{_e(f.code)}: {_e(f.text)}</li>" for f in row["flags"])
            + "</ul>"
        )
    colors = {lab["name"]: tuple(lab.get("color", (128, 128, 128))) for lab in facts.get("labels", [])}
    if row["stats"]:
        head = "".join(
            f"<th>{h}</th>" for h in ("label", "value", "voxels", "volume (mL)", "components", "mean", "std")
        )
        trs = []
        for r in row["stats"]["labels"]:
            sw = (
                f'<span class="swatch" style="background:rgb{colors.get(r["name"], (128, 128, 128))}"></span>'
            )
            nums = [r["value"], r["voxels"], r["volume_ml"], r["components"], r["mean"], r["std"]]
            tds = "".join(f'<td class="num">{"" if n is None else _e(n)}</td>' for n in nums)
            trs.append(f"<tr><td>{sw}{_e(r['name'])}</td>{tds}</tr>")
        parts.append(
            '<h2>Statistics</h2><table class="sortable">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>"
        )
    montages = [f for f in row["files"] if f.startswith("overlays/") and f.endswith(".png")]
    if montages:
        parts.append("<h2>Overlays</h2>")
        parts += [f'<div><img class="montage" src="{base}{quote(m)}" alt="{_e(m)}"></div>' for m in montages]
    if row["files"]:
        parts.append(
            '<h2>Files</h2><ul class="files">'
            + "".join(f'<li><a href="{base}{quote(f)}">{_e(f)}</a></li>' for f in row["files"])
            + "</ul>"
        )
    return _page(f"{case_id} - {settings.title}", "\n".join(parts))


def write_review(out_dir: Path, settings: ReviewSettings | None = None) -> list[Path]:
    """Write the review pages of a batch folder (each file atomically).

    Args:
        out_dir: The batch's output folder (``manifest.json`` and case folders).
        settings: What to show.

    Returns:
        The written paths, ``report/index.html`` first.
    """
    settings = settings or ReviewSettings()
    out_dir = Path(out_dir)
    rows = collect_rows(out_dir, settings)
    report = out_dir / REPORT_DIR
    atomic_write_text(report / INDEX, render_index(rows, settings))
    written = [report / INDEX]
    for row in rows:
        dest = report / "cases" / f"{row['case_id']}.html"
        atomic_write_text(dest, render_case(row, settings))
        written.append(dest)
    return written
