"""A bundle's channels and labels, from ``configs/metadata.json``'s ``network_data_format``.

The Model Zoo's metadata describes the network's first input (``inputs.image``: ``num_channels``,
``modality``, ``channel_def``) and first output (``outputs.pred``: ``num_channels`` and
``channel_def``, the class index of each label name). medseg turns them into a
:class:`~medseg.config.spec.DatasetSpec`, so exports, tables and the review page name the labels.

Examples:
    >>> meta = {"name": "Spleen", "network_data_format": {
    ...     "inputs": {"image": {"modality": "CT", "num_channels": 1, "channel_def": {"0": "image"}}},
    ...     "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "spleen"}}}}}
    >>> spec = spec_from_metadata(meta, source=Path("configs/metadata.json"))
    >>> spec.labels, [c.name for c in spec.channels], spec.channels[0].modality.value
    ({'background': 0, 'spleen': 1}, ['image'], 'CT')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from medseg.config.base import format_validation_error
from medseg.config.spec import ChannelSpec, DatasetSpec, Modality
from medseg.errors import ConfigError

_MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR", "PT": "PT", "PET": "PT", "US": "US"}


def _first(section: Any, what: str, source: Path) -> Mapping[str, Any]:
    if not isinstance(section, Mapping) or not section:
        msg = f"{source}: network_data_format.{what} must describe at least one tensor, got {section!r}"
        raise ConfigError(msg)
    key = "image" if what == "inputs" and "image" in section else "pred" if "pred" in section else None
    entry = section[key] if key else next(iter(section.values()))
    if not isinstance(entry, Mapping):
        msg = f"{source}: network_data_format.{what} entries must be mappings, got {entry!r}"
        raise ConfigError(msg)
    return entry


def _names(entry: Mapping[str, Any], default: str, source: Path, what: str) -> dict[int, str]:
    """Index -> name from ``channel_def`` (or ``num_channels`` with made-up names)."""
    defs = entry.get("channel_def")
    try:
        if isinstance(defs, Mapping) and defs:
            names = {int(k): str(v) for k, v in defs.items()}
        else:
            names = {i: f"{default}_{i}" for i in range(int(entry.get("num_channels", 1)))}
            if what == "outputs":
                names[0] = "background"
    except (TypeError, ValueError) as exc:
        msg = f"{source}: network_data_format.{what} must give integer channel indices, got {defs!r}"
        raise ConfigError(msg) from exc
    seen: dict[str, int] = {}
    unique = {}
    for index in sorted(names):
        name = re.sub(r"\s+", "_", names[index].strip()) or f"{default}_{index}"
        seen[name] = seen.get(name, 0) + 1
        unique[index] = name if seen[name] == 1 else f"{name}_{index}"
    return unique


def input_channels(meta: Mapping[str, Any], *, source: Path) -> int:
    """The number of image channels the bundle's network takes (``inputs.image.num_channels``)."""
    entry = _first(_format(meta, source).get("inputs"), "inputs", source)
    try:
        return int(entry.get("num_channels", len(entry.get("channel_def") or {}) or 1))
    except (TypeError, ValueError) as exc:
        msg = f"{source}: inputs num_channels must be an integer, got {entry.get('num_channels')!r}"
        raise ConfigError(msg) from exc


def _format(meta: Mapping[str, Any], source: Path) -> Mapping[str, Any]:
    fmt = meta.get("network_data_format")
    if not isinstance(fmt, Mapping):
        msg = f"{source}: must have a network_data_format mapping (inputs and outputs), got {fmt!r}"
        raise ConfigError(msg)
    return fmt


def spec_from_metadata(meta: Mapping[str, Any], *, source: Path) -> DatasetSpec:
    """The channels and labels a bundle declares, as a data spec without cases.

    Args:
        meta: The parsed ``metadata.json``.
        source: Its path (for messages).

    Returns:
        A :class:`DatasetSpec` named after the bundle, one channel per input channel and one label
        per output class (index 0 is background).

    Raises:
        ConfigError: Missing or inconsistent ``network_data_format``.
    """
    fmt = _format(meta, source)
    image = _first(fmt.get("inputs"), "inputs", source)
    pred = _first(fmt.get("outputs"), "outputs", source)
    n_in = input_channels(meta, source=source)
    channel_names = _names({**image, "num_channels": n_in}, "channel", source, "inputs")
    if len(channel_names) != n_in:
        channel_names = {i: f"channel_{i}" for i in range(n_in)}
    modality = _MODALITIES.get(str(image.get("modality", "")).upper(), Modality.OTHER.value)
    labels = {name: index for index, name in _names(pred, "label", source, "outputs").items()}
    if 0 not in labels.values():
        labels = {"background": 0, **labels}
    try:
        return DatasetSpec(
            name=str(meta.get("name") or source.parent.parent.name or "monai-bundle"),
            description=str(meta.get("description", ""))[:500],
            channels=[ChannelSpec(name=channel_names[i], modality=Modality(modality)) for i in range(n_in)],
            labels=labels,
            cases=[],
        )
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(source))) from exc
