"""nnU-Net v2 ``plans.json`` and ``dataset.json`` as frozen, typed records.

Only what inference needs is read; anything inference cannot reproduce faithfully (cascades, plans
written before nnU-Net 2.4's ``architecture`` entry, unknown preprocessors) is refused by name when
the model is loaded, never at the first scan.

Examples:
    >>> info = DatasetInfo.from_json(
    ...     {"channel_names": {"1": "T2", "0": "T1"}, "labels": {"background": 0, "tumour": 1},
    ...      "file_ending": ".nii.gz"}, source="dataset.json")
    >>> info.channel_names
    ('T1', 'T2')
    >>> info.output_labels
    {'background': 0, 'tumour': 1}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, choice_error

NORMALIZATION_SCHEMES = (
    "ZScoreNormalization",
    "CTNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape",)
PREPROCESSORS = ("DefaultPreprocessor",)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with errors that name the file."""
    if not path.is_file():
        msg = f"{path} must exist in an nnU-Net model folder, got a missing file"
        raise ConfigError(msg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path} must be readable JSON, got {type(exc).__name__}: {exc}"
        raise ConfigError(msg) from exc
    if not isinstance(data, dict):
        msg = f"{path} must hold a JSON object, got {type(data).__name__}"
        raise ConfigError(msg)
    return data


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says: channels, labels (or regions) and the file ending.

    Attributes:
        channel_names: Channel names in channel order (``_0000``, ``_0001``, ...).
        labels: Label name to value, or to the values a region covers, as written.
        regions_class_order: For region-based models, the label written for each region.
        file_ending: The raw images' file ending.
        ignore_label: The value of the ``ignore`` label, if any (never predicted).
    """

    channel_names: tuple[str, ...]
    labels: tuple[tuple[str, int | tuple[int, ...]], ...]
    regions_class_order: tuple[int, ...] | None
    file_ending: str
    ignore_label: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str) -> DatasetInfo:
        """Read and check a ``dataset.json`` mapping (``source`` names it in errors)."""
        channels = data.get("channel_names", data.get("modality"))
        if not isinstance(channels, Mapping) or not channels:
            msg = f"{source}: 'channel_names' must map channel numbers to names, got {channels!r}"
            raise ConfigError(msg)
        try:
            order = sorted(channels, key=int)
        except ValueError as exc:
            msg = f"{source}: 'channel_names' keys must be channel numbers, got {sorted(channels)}"
            raise ConfigError(msg) from exc
        raw_labels = data.get("labels")
        if not isinstance(raw_labels, Mapping) or "background" not in raw_labels:
            msg = f"{source}: 'labels' must map names to values including 'background', got {raw_labels!r}"
            raise ConfigError(msg)
        labels: list[tuple[str, int | tuple[int, ...]]] = []
        for name, value in raw_labels.items():
            if isinstance(value, (list, tuple)):
                labels.append((str(name), tuple(int(v) for v in value)))
            elif isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
                labels.append((str(name), int(value)))
            else:
                msg = f"{source}: label '{name}' must be an int or a list of ints, got {value!r}"
                raise ConfigError(msg)
        order_ = data.get("regions_class_order")
        regions = any(isinstance(v, tuple) for _, v in labels)
        if regions and order_ is None:
            msg = f"{source}: a region-based 'labels' needs 'regions_class_order', got none"
            raise ConfigError(msg)
        ignore = dict(labels).get("ignore")
        return cls(
            channel_names=tuple(str(channels[k]) for k in order),
            labels=tuple(labels),
            regions_class_order=tuple(int(v) for v in order_) if order_ is not None else None,
            file_ending=str(data.get("file_ending", ".nii.gz")),
            ignore_label=ignore if isinstance(ignore, int) else None,
        )

    @property
    def has_regions(self) -> bool:
        """Whether the model predicts overlapping regions (sigmoid) instead of classes (softmax)."""
        return self.regions_class_order is not None

    @property
    def foreground(self) -> tuple[tuple[str, int | tuple[int, ...]], ...]:
        """The predicted labels or regions, background and ``ignore`` left out."""
        return tuple((n, v) for n, v in self.labels if n not in ("background", "ignore"))

    @property
    def num_heads(self) -> int:
        """Output channels of the network: one per region, or one per class with background."""
        return len(self.foreground) + (0 if self.has_regions else 1)

    @property
    def output_labels(self) -> dict[str, int]:
        """Label name to the value written in the label map.

        Classes keep their values; each region is written as its ``regions_class_order`` value.
        """
        if self.regions_class_order is None:
            return {n: int(v) for n, v in self.labels if n != "ignore" and isinstance(v, int)}
        out = {"background": 0}
        for (name, _), value in zip(self.foreground, self.regions_class_order):
            out[name] = value
        return out


@dataclass(frozen=True)
class Architecture:
    """The network entry of a configuration: a class path and its keyword arguments."""

    class_name: str
    kwargs: Mapping[str, Any]
    requires_import: tuple[str, ...]


@dataclass(frozen=True)
class Configuration:
    """One configuration of ``plans.json`` (``inherits_from`` resolved).

    Attributes:
        name: ``3d_fullres``, ``2d``, ``3d_lowres`` or a custom name.
        patch_size: The sliding window, in the transposed voxel order.
        spacing: Target spacing in the transposed order (2 entries for 2D configurations).
        normalization_schemes: One scheme name per channel.
        use_mask_for_norm: Per channel, whether z-scores use the non-zero mask.
        resampling_data: Function name and keyword arguments resampling images.
        resampling_probabilities: Function name and keyword arguments resampling logits.
        architecture: The network to build.
    """

    name: str
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    resampling_data: tuple[str, Mapping[str, Any]]
    resampling_probabilities: tuple[str, Mapping[str, Any]]
    architecture: Architecture

    @property
    def is_2d(self) -> bool:
        """Whether the network sees 2D slices."""
        return len(self.patch_size) == 2


@dataclass(frozen=True)
class Plans:
    """What ``plans.json`` says that inference needs.

    Attributes:
        name: The plans identifier (``nnUNetPlans``).
        transpose_forward: Axis order applied to SimpleITK-ordered arrays before the network.
        transpose_backward: Its inverse.
        intensity_properties: Per channel (``"0"``, ...) foreground statistics for CT normalisation.
        configurations: The raw configuration entries, by name.
    """

    name: str
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    intensity_properties: Mapping[str, Mapping[str, float]]
    configurations: Mapping[str, Mapping[str, Any]]
    source: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str) -> Plans:
        """Read a ``plans.json`` mapping (``source`` names it in errors)."""
        for key in ("configurations", "transpose_forward", "transpose_backward"):
            if key not in data:
                msg = f"{source}: nnU-Net v2 plans must have '{key}', got keys {sorted(data)[:8]}"
                raise ConfigError(msg)
        return cls(
            name=str(data.get("plans_name", "nnUNetPlans")),
            transpose_forward=tuple(int(i) for i in data["transpose_forward"]),
            transpose_backward=tuple(int(i) for i in data["transpose_backward"]),
            intensity_properties=data.get("foreground_intensity_properties_per_channel", {}),
            configurations=data["configurations"],
            source=source,
        )

    def configuration(self, name: str) -> Configuration:
        """The configuration ``name``, checked for what medseg reproduces.

        Raises:
            ConfigError: Unknown name, a cascade stage, old-format plans, or an unsupported
                preprocessor, normalisation or resampling function (each named).
        """
        if name not in self.configurations:
            raise ConfigError(f"{self.source}: " + choice_error("configuration", name, self.configurations))
        entry = self._resolved(name)
        where = f"{self.source}: configuration '{name}'"
        if entry.get("previous_stage"):
            msg = (
                f"{where} must be a single-stage model, got a cascade stage after "
                f"'{entry['previous_stage']}'; run the cascade with nnU-Net, or use 3d_fullres or 2d"
            )
            raise ConfigError(msg)
        if "architecture" not in entry:
            old = "UNet_class_name" if "UNet_class_name" in entry else "no 'architecture'"
            msg = f"{where} must use nnU-Net >= 2.4 plans (an 'architecture' entry), got {old}"
            raise ConfigError(msg)
        preprocessor = entry.get("preprocessor_name", "DefaultPreprocessor")
        if preprocessor not in PREPROCESSORS:
            raise ConfigError(f"{where}: " + choice_error("preprocessor_name", preprocessor, PREPROCESSORS))
        schemes = tuple(str(s) for s in entry["normalization_schemes"])
        for scheme in schemes:
            if scheme not in NORMALIZATION_SCHEMES:
                raise ConfigError(
                    f"{where}: " + choice_error("normalization scheme", scheme, NORMALIZATION_SCHEMES)
                )
        resampling = []
        for key in ("resampling_fn_data", "resampling_fn_probabilities"):
            fn = str(entry[key])
            if fn not in RESAMPLING_FUNCTIONS:
                raise ConfigError(f"{where}: " + choice_error(key, fn, RESAMPLING_FUNCTIONS))
            resampling.append((fn, dict(entry.get(f"{key}_kwargs", {}))))
        arch = entry["architecture"]
        return Configuration(
            name=name,
            patch_size=tuple(int(p) for p in entry["patch_size"]),
            spacing=tuple(float(s) for s in entry["spacing"]),
            normalization_schemes=schemes,
            use_mask_for_norm=tuple(bool(m) for m in entry["use_mask_for_norm"]),
            resampling_data=resampling[0],
            resampling_probabilities=resampling[1],
            architecture=Architecture(
                class_name=str(arch["network_class_name"]),
                kwargs=dict(arch["arch_kwargs"]),
                requires_import=tuple(arch.get("_kw_requires_import", ())),
            ),
        )

    def _resolved(self, name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        entry = dict(self.configurations[name])
        parent = entry.pop("inherits_from", None)
        if parent is None:
            return entry
        if parent in seen or parent not in self.configurations:
            msg = (
                f"{self.source}: configuration '{name}' must inherit from another configuration, "
                f"got '{parent}'"
            )
            raise ConfigError(msg)
        merged = self._resolved(parent, (*seen, name))
        merged.update(entry)
        return merged
