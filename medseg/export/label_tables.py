"""Label tables beside a label map, so viewers show names and colours.

* ``labels.itksnap.txt``: an ITK-SNAP label description file (Segmentation → Import Label
  Descriptions);
* ``labels.ctbl``: a 3D Slicer colour table (load it, then pick it as the label map's colour node).

Both list background as value 0 and every label of the table, present in the label map or not.

Examples:
    >>> from medseg.export.labels import label_table
    >>> print(slicer_table(label_table({"liver": 1, "left kidney": 2})).splitlines()[-1])
    2 left_kidney 60 180 75 255
"""

from __future__ import annotations

from pathlib import Path

from medseg.export.case import CaseExport
from medseg.export.labels import LabelEntry
from medseg.io.atomic import atomic_write_text

ITKSNAP_FILE = "labels.itksnap.txt"
SLICER_FILE = "labels.ctbl"

_ITKSNAP_HEADER = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields:
#    IDX:   Zero-based index
#    -R-:   Red color component (0..255)
#    -G-:   Green color component (0..255)
#    -B-:   Blue color component (0..255)
#    -A-:   Label transparency (0.00 .. 1.00)
#    VIS:   Label visibility (0 or 1)
#    MSH:   Label mesh visibility (0 or 1)
#  LABEL:   Label description
################################################
"""


def itksnap_table(table: tuple[LabelEntry, ...]) -> str:
    """The text of an ITK-SNAP label description file."""
    lines = [
        _ITKSNAP_HEADER.rstrip("\n"),
        f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8g} {0:2d} {0:2d}    "Clear Label"',
    ]
    for e in table:
        name = e.name.replace('"', "'")
        r, g, b = e.color
        lines.append(f'{e.value:5d} {r:5d} {g:4d} {b:4d} {1:8g} {1:2d} {1:2d}    "{name}"')
    return "\n".join(lines) + "\n"


def slicer_table(table: tuple[LabelEntry, ...]) -> str:
    """The text of a 3D Slicer colour table (``.ctbl``); spaces in names become underscores."""
    top = max((e.value for e in table), default=0)
    lines = [f"# Color table file {SLICER_FILE}", f"# {top + 1} values", "0 background 0 0 0 0"]
    for e in table:
        r, g, b = e.color
        lines.append(f"{e.value} {'_'.join(e.name.split())} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def write_label_tables(case: CaseExport, out_dir: Path) -> list[Path]:
    """Write the ITK-SNAP and Slicer label tables of a case (atomically).

    Args:
        case: The case.
        out_dir: Its output folder (beside ``labels.nii.gz``).

    Returns:
        The written paths.
    """
    out = []
    for name, text in (
        (ITKSNAP_FILE, itksnap_table(case.label_table)),
        (SLICER_FILE, slicer_table(case.label_table)),
    ):
        atomic_write_text(Path(out_dir) / name, text)
        out.append(Path(out_dir) / name)
    return out
