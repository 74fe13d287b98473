"""What the review page adds for clinicians: the viewer and verdict panel of a case, the index's bar.

The HTML review page (:mod:`medseg.export.review_page`) asks this module for three things:

* :func:`case_review_html`: on each case page, the verdict panel (accept / needs correction /
  reject, a note, the reviewer's name) and the viewer (three linked views of the scan with its
  labels, from ``<case>/viewer/volume.js``, see :mod:`medseg.export.viewer`);
* :func:`index_review_html`: on the index, the review progress ("reviewed n of N"), a filter by
  verdict and the ``review.json`` download;
* :func:`write_batch_identity`: ``report/batch.js``, the batch id and model hash
  (:class:`BatchIdentity`, given by the batch's owner through
  :attr:`~medseg.export.review_rows.ReviewSettings.batch`) that every page stamps on the verdicts
  it keeps and on ``review.json``.

Everything is inline or beside the pages (no CDN, no network); verdicts live in the browser's
``localStorage`` under the batch id until downloaded and imported with ``medseg review import``.

Examples:
    >>> files = ["viewer/volume.js"]
    >>> html = case_review_html(case_id="a b", segmented=True, files=files, base="../../a%20b/")
    >>> 'data-case="a b"' in html and 'src="../../a%20b/viewer/volume.js"' in html
    True
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

from medseg.export.risk import review_order
from medseg.export.viewer import VOLUME_PATH
from medseg.io.atomic import atomic_write_text

__all__ = [
    "BATCH_SCRIPT",
    "BatchIdentity",
    "case_review_html",
    "index_review_html",
    "review_order",
    "write_batch_identity",
]

BATCH_SCRIPT = "batch.js"
"""The batch's identity for the pages, in ``report/``."""


@cache
def asset(name: str) -> str:
    """The text of a file shipped in ``medseg/export/viewer_assets``."""
    return files("medseg.export").joinpath("viewer_assets", name).read_text(encoding="utf-8")


def _script(code: str) -> str:
    return "<script>" + code.replace("</script", "<\\/script") + "</script>"


def case_review_html(*, case_id: str, segmented: bool, files: Sequence[str], base: str) -> str:
    """The verdict panel and the viewer of one case page.

    Args:
        case_id: The case.
        segmented: Whether it was segmented (a case that failed has nothing to review).
        files: Its files, relative to its folder.
        base: The case folder relative to the page, ending in ``/``.

    Returns:
        HTML (the viewer only where the case has viewer data; nothing for a case that failed).
    """
    if not segmented:
        return ""
    case_attr = html.escape(str(case_id), quote=True)
    parts = [
        f"<style>{asset('viewer.css')}</style>",
        f'<script src="../{BATCH_SCRIPT}"></script>',
        "<h2>Review</h2>",
        f'<div class="mv-verdict" id="medseg-verdict" data-case="{case_attr}"></div>',
    ]
    if VOLUME_PATH in files:
        parts += [
            '<div id="medseg-viewer">loading the viewer…</div>',
            _script(asset("viewer.js")),
            f'<script src="{html.escape(base, quote=True)}{VOLUME_PATH}"></script>',
        ]
    parts.append(_script(asset("review.js")))
    return "\n".join(parts)


def index_review_html() -> str:
    """The review bar of the index: progress, verdict filter, reviewer, ``review.json`` download."""
    return "\n".join(
        [
            f"<style>{asset('viewer.css')}</style>",
            f'<script src="{BATCH_SCRIPT}"></script>',
            '<div class="mv-review-bar" id="medseg-review-bar"></div>',
            _script(asset("review.js")),
        ]
    )


@dataclass(frozen=True)
class BatchIdentity:
    """What a review is of: the batch id and model hash the batch's manifest records.

    Every page stamps them on the verdicts it keeps and on ``review.json``;
    ``medseg review import`` refuses a file of another batch or model.

    Attributes:
        batch_id: The batch's id (empty where the folder has no manifest).
        model_sha256: The model bundle hash(es).
    """

    batch_id: str = ""
    model_sha256: str = ""


def write_batch_identity(report_dir: Path, identity: BatchIdentity, case_ids: Sequence[str]) -> Path:
    """Write ``report/batch.js`` (atomically): the batch's identity and case ids, for the pages' scripts.

    Returns:
        Its path.
    """
    data = {"batch_id": identity.batch_id, "model_sha256": identity.model_sha256, "cases": list(case_ids)}
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    dest = Path(report_dir) / BATCH_SCRIPT
    atomic_write_text(dest, f"window.MEDSEG_BATCH = {text};\n")
    return dest
