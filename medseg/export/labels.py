"""The label table every export shares: value, name, display colour and coded concepts per label.

Colours are fixed per label value (a spec's ``label_colors`` override them), so a label has the
same colour in the overlays, the review page, the ITK-SNAP/Slicer tables and the DICOM SEG of
every case. Codes come from a spec's ``label_codes``; labels without codes get the generic
SNOMED CT concept "Tissue" as category and type (the segment label still carries the name).

Examples:
    >>> table = label_table({"background": 0, "liver": 1, "spleen": 3})
    >>> [(e.value, e.name, e.color) for e in table]
    [(1, 'liver', (230, 25, 75)), (3, 'spleen', (255, 225, 25))]
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError

# 20 distinct colours (Sasha Trubetskoy's list), by label value: 1 → first
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


@dataclass(frozen=True)
class Concept:
    """A coded concept: code value, coding scheme designator (``SCT`` for SNOMED CT), meaning."""

    value: str
    scheme: str
    meaning: str

    def as_dict(self) -> dict[str, str]:
        """A JSON-ready dict."""
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}


TISSUE = Concept("85756007", "SCT", "Tissue")
"""The generic concept used where a spec gives no codes for a label."""


@dataclass(frozen=True)
class LabelEntry:
    """One foreground label of a label map.

    Attributes:
        value: Its value in the label map (> 0).
        name: Its name (from the data spec).
        color: RGB display colour, 0-255.
        category: Segmented property category (DICOM SEG).
        property_type: Segmented property type (DICOM SEG).
    """

    value: int
    name: str
    color: tuple[int, int, int]
    category: Concept = TISSUE
    property_type: Concept = TISSUE

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see :func:`entries_from_dicts`)."""
        return {
            "value": self.value,
            "name": self.name,
            "color": list(self.color),
            "category": self.category.as_dict(),
            "property_type": self.property_type.as_dict(),
        }


def default_color(value: int) -> tuple[int, int, int]:
    """The display colour of a label value when the spec gives none."""
    return PALETTE[(value - 1) % len(PALETTE)]


def label_table(
    labels: Mapping[str, int],
    codes: Mapping[str, Any] | None = None,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
) -> tuple[LabelEntry, ...]:
    """The foreground labels of a spec, sorted by value.

    Args:
        labels: Name to value, background (0) included or not.
        codes: Name to codes with ``category`` and ``property_type`` (each with ``value``,
            ``scheme``, ``meaning``), as pydantic models or dicts.
        colors: Name to RGB.

    Returns:
        One :class:`LabelEntry` per label value > 0.
    """
    codes = codes or {}
    colors = colors or {}
    out = []
    for name, value in sorted(labels.items(), key=lambda kv: kv[1]):
        if value == 0:
            continue
        entry = LabelEntry(int(value), name, tuple(colors.get(name, default_color(int(value)))))  # type: ignore[arg-type]
        code = codes.get(name)
        if code is not None:
            entry = LabelEntry(
                entry.value,
                entry.name,
                entry.color,
                _concept(code, "category"),
                _concept(code, "property_type"),
            )
        out.append(entry)
    return tuple(out)


def spec_label_table(spec: Any) -> tuple[LabelEntry, ...]:
    """The label table of a :class:`~medseg.config.spec.DatasetSpec` (codes and colours included)."""
    return label_table(spec.labels, getattr(spec, "label_codes", {}), getattr(spec, "label_colors", {}))


def _concept(code: Any, key: str) -> Concept:
    item = code[key] if isinstance(code, Mapping) else getattr(code, key)
    get = item.get if isinstance(item, Mapping) else lambda k: getattr(item, k)
    return Concept(str(get("value")), str(get("scheme")), str(get("meaning")))


def entries_from_dicts(items: list[dict[str, Any]]) -> tuple[LabelEntry, ...]:
    """Rebuild a label table from :meth:`LabelEntry.as_dict` records (e.g. a case's ``case.json``)."""
    return tuple(
        LabelEntry(
            int(d["value"]),
            str(d["name"]),
            tuple(int(c) for c in d["color"]),  # type: ignore[arg-type]
            _concept(d, "category"),
            _concept(d, "property_type"),
        )
        for d in items
    )


_ITKSNAP_LINE = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+\s+\d+\s+\d+\s+"(.*)"\s*$')


def read_label_names(path: str | Path) -> dict[str, int]:
    """Read label names made elsewhere: JSON, an ITK-SNAP label file, a Slicer table or plain text.

    Accepted forms:

    * JSON: ``{"liver": 1}`` or ``{"1": "liver"}`` (or a list of names, the first being value 1);
    * an ITK-SNAP label description file (``IDX R G B A VIS MSH "LABEL"`` lines);
    * a 3D Slicer colour table (``value name R G B A`` lines) or plain ``value name`` lines;
    * plain text with one name per line, the first line being value 1.

    Args:
        path: The file.

    Returns:
        Name to value, with ``background: 0`` added when absent.

    Raises:
        ConfigError: If the file is missing, unparsable, or repeats a value or a name.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"label-name file must exist, got missing {path}"
        raise ConfigError(msg)
    text = path.read_text(encoding="utf-8")
    pairs: list[tuple[str, int]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            msg = f"{path}: must be valid JSON, got {exc}"
            raise ConfigError(msg) from exc
        if isinstance(data, list):
            pairs = [(str(n), i + 1) for i, n in enumerate(data)]
        elif isinstance(data, dict):
            for k, v in data.items():
                if str(k).isdigit():
                    pairs.append((str(v), int(k)))
                elif isinstance(v, int):
                    pairs.append((str(k), v))
                else:
                    msg = f"{path}: entries must be name: value or value: name, got {k!r}: {v!r}"
                    raise ConfigError(msg)
        else:
            msg = f"{path}: must hold a JSON object or list, got {type(data).__name__}"
            raise ConfigError(msg)
    else:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        numbered = all(ln.split()[0].isdigit() for ln in lines)
        for i, line in enumerate(lines):
            m = _ITKSNAP_LINE.match(line)
            if m:
                pairs.append((m.group(5), int(m.group(1))))
            elif numbered:
                parts = shlex.split(line) if '"' in line else line.split()
                if len(parts) < 2:
                    msg = f"{path}: line {i + 1} must be 'value name', got {line!r}"
                    raise ConfigError(msg)
                pairs.append((parts[1], int(parts[0])))
            else:
                pairs.append((line.strip(), i + 1))
    names = dict(pairs)
    values = [v for _, v in pairs]
    if len(names) != len(pairs) or len(set(values)) != len(values):
        msg = f"{path}: label names and values must be distinct, got {pairs}"
        raise ConfigError(msg)
    if 0 not in values:
        names = {"background": 0, **names}
    return names
