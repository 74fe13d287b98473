"""Dataset specs: what a data set holds (channels, labels, cases) and how to normalise it.

A spec lives in ``data_specs/*.yaml``. Paths in it are relative to its ``data_root``, which is
itself relative to the spec file and can be overridden (argument or ``MEDSEG_DATA_ROOT``).

Examples:
    >>> spec = DatasetSpec.model_validate({
    ...     "name": "demo",
    ...     "channels": [{"name": "ct", "modality": "CT"}],
    ...     "labels": {"background": 0, "liver": 1},
    ...     "cases": [{"id": "c1", "images": ["c1.nii.gz"], "label": "c1_seg.nii.gz"}],
    ... })
    >>> spec.label_values
    (0, 1)
"""

from __future__ import annotations

import enum
import glob
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveFloat, field_validator, model_validator

from medseg.config.base import Axes3, FrozenModel, distinct_axes, dump_yaml, read_yaml, validate
from medseg.errors import ConfigError

DATA_ROOT_ENV = "MEDSEG_DATA_ROOT"
CASE_PLACEHOLDER = "{case}"


class Modality(str, enum.Enum):
    """Imaging modality of a channel; decides the default intensity normalisation."""

    CT = "CT"
    MR = "MR"
    PT = "PT"
    US = "US"
    OTHER = "OTHER"


class IntensitySpec(FrozenModel):
    """How one channel's intensities are normalised.

    ``ct``: clip to ``clip`` (foreground percentiles, in HU) then subtract ``mean`` and divide by
    ``std`` (foreground statistics), as nnU-Net does. ``zscore``: per image, over the non-zero
    voxels when ``nonzero`` is set. ``none``: leave the values as they are.
    """

    scheme: Literal["ct", "zscore", "none"]
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: PositiveFloat | None = None
    nonzero: bool = False

    @model_validator(mode="after")
    def _check_scheme(self) -> IntensitySpec:
        if self.scheme == "ct":
            if self.clip is None:
                msg = "intensity.clip must be given for scheme 'ct', got none"
                raise ValueError(msg)
            if self.clip[0] >= self.clip[1]:
                msg = f"intensity.clip must be (low, high) with low < high, got {self.clip}"
                raise ValueError(msg)
        return self


class ChannelSpec(FrozenModel):
    """One input channel (several channels of a case must share one voxel grid)."""

    name: str
    modality: Modality
    intensity: IntensitySpec | None = None

    def effective_intensity(self) -> IntensitySpec:
        """The intensity settings, with the modality's default when none is given.

        Returns:
            CT without statistics falls back to clipping to [-1000, 1000] and scaling to about
            [-1, 1]; every other modality gets a per-image z-score.
        """
        if self.intensity is not None:
            return self.intensity
        if self.modality is Modality.CT:
            return IntensitySpec(scheme="ct", clip=(-1000.0, 1000.0), mean=0.0, std=1000.0)
        return IntensitySpec(scheme="zscore")


class CaseSpec(FrozenModel):
    """One case: an image path per channel (or one 4D file of every channel), and an optional label map."""

    id: Annotated[str, Field(min_length=1)]
    images: Annotated[list[str], Field(min_length=1)]
    label: str | None = None


class CasePatterns(FrozenModel):
    """Cases found by glob patterns; ``{case}`` stands for the case id in every pattern.

    Example: ``images: ["imagesTr/{case}_0000.nii.gz"]``, ``label: "labelsTr/{case}.nii.gz"``.
    """

    images: Annotated[list[str], Field(min_length=1)]
    label: str | None = None

    @model_validator(mode="after")
    def _check_placeholder(self) -> CasePatterns:
        for pattern in [*self.images, *([self.label] if self.label else [])]:
            if pattern.count(CASE_PLACEHOLDER) != 1:
                msg = f"case pattern must contain '{CASE_PLACEHOLDER}' exactly once, got '{pattern}'"
                raise ValueError(msg)
        return self


class CodedConcept(FrozenModel):
    """A coded concept, e.g. SNOMED CT ``{scheme: SCT, value: "10200004", meaning: Liver}``."""

    value: Annotated[str, Field(min_length=1, max_length=64)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)] = "SCT"
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


class LabelCodes(FrozenModel):
    """What a label is, in codes (DICOM SEG's segmented property category and type)."""

    category: CodedConcept
    property_type: CodedConcept


class ResolvedCase(FrozenModel):
    """A case with absolute paths that exist."""

    id: str
    images: tuple[Path, ...]
    label: Path | None = None


class DatasetSpec(FrozenModel):
    """A data set: channels, labels, training cases, and preprocessing targets.

    ``label_codes`` and ``label_colors`` are optional: per foreground label name, coded concepts
    (e.g. SNOMED CT, written into DICOM SEG) and an RGB display colour (used by every export).

    ``mirror_axes`` are the RAS axes (0 left-right, 1 posterior-anterior, 2 inferior-superior) along
    which a mirrored scan is still a valid case with the same labels. All three by default, as
    nnU-Net assumes; leave out an axis along which the labels name a direction (the anterior and
    posterior hippocampus: leave out 1; left and right kidney: leave out 0). ``medseg plan`` flips
    training patches and mirrors predictions along these axes only.
    """

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    data_root: str = "."
    channels: Annotated[list[ChannelSpec], Field(min_length=1)]
    labels: dict[str, int]
    label_codes: dict[str, LabelCodes] = Field(default_factory=dict)
    label_colors: dict[str, tuple[int, int, int]] = Field(default_factory=dict)
    cases: list[CaseSpec] | None = None
    case_patterns: CasePatterns | None = None
    target_spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None
    anisotropy_threshold: PositiveFloat = 3.0
    mirror_axes: Axes3 = (0, 1, 2)

    @field_validator("mirror_axes")
    @classmethod
    def _distinct_mirror_axes(cls, axes: tuple[int, ...]) -> tuple[int, ...]:
        return distinct_axes("mirror_axes", axes)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        values = list(self.labels.values())
        if len(set(values)) != len(values):
            msg = f"labels must have distinct values, got {self.labels}"
            raise ValueError(msg)
        if 0 not in values:
            msg = f"labels must include the background value 0, got {self.labels}"
            raise ValueError(msg)
        if any(v < 0 for v in values):
            msg = f"label values must be >= 0, got {self.labels}"
            raise ValueError(msg)
        for field, given in (("label_codes", self.label_codes), ("label_colors", self.label_colors)):
            unknown = sorted(set(given) - {k for k, v in self.labels.items() if v != 0})
            if unknown:
                msg = f"{field} must name foreground labels {sorted(self.labels)}, got {unknown}"
                raise ValueError(msg)
        for name, rgb in self.label_colors.items():
            if any(not 0 <= c <= 255 for c in rgb):
                msg = f"label_colors.{name} must be three values 0-255, got {list(rgb)}"
                raise ValueError(msg)
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            msg = f"channel names must be distinct, got {names}"
            raise ValueError(msg)
        if (self.cases is None) == (self.case_patterns is None):
            msg = "exactly one of 'cases' and 'case_patterns' must be given"
            raise ValueError(msg)
        n = len(self.channels)
        if self.cases is not None:
            ids = [c.id for c in self.cases]
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                msg = f"case ids must be unique, got duplicates {dupes}"
                raise ValueError(msg)
            for case in self.cases:
                if len(case.images) not in (1, n):
                    msg = (
                        f"case '{case.id}' must list {n} image(s), one per channel (or one 4D file), "
                        f"got {len(case.images)}"
                    )
                    raise ValueError(msg)
        if self.case_patterns is not None and len(self.case_patterns.images) != n:
            got = len(self.case_patterns.images)
            msg = f"case_patterns.images must hold {n} pattern(s), one per channel, got {got}"
            raise ValueError(msg)
        return self

    @property
    def label_values(self) -> tuple[int, ...]:
        """The declared label values, sorted."""
        return tuple(sorted(self.labels.values()))

    @property
    def label_names(self) -> dict[int, str]:
        """Map from label value to name."""
        return {v: k for k, v in self.labels.items()}

    @property
    def num_classes(self) -> int:
        """Number of output classes a model needs (largest label value + 1)."""
        return max(self.labels.values()) + 1


def _case_regex(pattern: str) -> re.Pattern[str]:
    head, tail = pattern.split(CASE_PLACEHOLDER)
    return re.compile(re.escape(head) + r"(?P<case>.+?)" + re.escape(tail) + r"$")


class LoadedSpec(FrozenModel):
    """A spec together with the file it came from and the data root it resolves against."""

    spec: DatasetSpec
    source: Path | None
    root: Path

    def resolve_cases(self, require_labels: bool = False) -> list[ResolvedCase]:
        """List the cases with absolute paths, checking that every file exists.

        Args:
            require_labels: Fail when a case has no label map (training needs them).

        Returns:
            The cases, in spec order (patterns: sorted by case id).

        Raises:
            ConfigError: If a file is missing or no case is found.
        """
        src = self.source or "<spec>"
        spec = self.spec
        cases: list[ResolvedCase] = []
        if spec.cases is not None:
            for i, case in enumerate(spec.cases):
                images = tuple(self.root / p for p in case.images)
                label = self.root / case.label if case.label else None
                for j, path in enumerate(images):
                    if not path.exists():
                        field = f"cases.{i}.images.{j}"
                        msg = f"{src}: field '{field}' must name an existing file, got missing {path}"
                        raise ConfigError(msg)
                if label is not None and not label.exists():
                    msg = f"{src}: field 'cases.{i}.label' must name an existing file, got missing {label}"
                    raise ConfigError(msg)
                cases.append(ResolvedCase(id=case.id, images=images, label=label))
        else:
            pats = spec.case_patterns
            assert pats is not None
            first = pats.images[0]
            regex = _case_regex(first)
            found = sorted(glob.glob(str(self.root / first.replace(CASE_PLACEHOLDER, "*"))))
            for name in found:
                rel = Path(name).relative_to(self.root).as_posix()
                m = regex.match(rel)
                if m is None:
                    continue
                cid = m.group("case")
                images = tuple(self.root / p.replace(CASE_PLACEHOLDER, cid) for p in pats.images)
                for j, img in enumerate(images):
                    if not img.exists():
                        msg = (
                            f"{src}: field 'case_patterns.images.{j}' must match a file for case '{cid}', "
                            f"got missing {img}"
                        )
                        raise ConfigError(msg)
                label = self.root / pats.label.replace(CASE_PLACEHOLDER, cid) if pats.label else None
                if label is not None and not label.exists():
                    if require_labels:
                        msg = (
                            f"{src}: field 'case_patterns.label' must match a file for case '{cid}', "
                            f"got missing {label}"
                        )
                        raise ConfigError(msg)
                    label = None
                cases.append(ResolvedCase(id=cid, images=images, label=label))
        if not cases:
            msg = f"{src}: spec must describe at least one case under {self.root}, got none"
            raise ConfigError(msg)
        if require_labels:
            missing = [c.id for c in cases if c.label is None]
            if missing:
                msg = f"{src}: every case must have a label map for training, got none for {missing[:5]}"
                raise ConfigError(msg)
        return cases


SPEC_READERS: dict[str, Callable[[Path], DatasetSpec]] = {}
"""Readers of data specs in other formats, by file suffix (``.json``: an MSD/nnU-Net
``dataset.json``, registered by :mod:`medseg.config.msd`); their data root is the file's folder."""


def load_spec(path: str | Path, data_root: str | Path | None = None) -> LoadedSpec:
    """Load and validate a data spec (YAML, or an MSD/nnU-Net ``dataset.json``).

    Args:
        path: The spec file.
        data_root: Overrides the spec's ``data_root`` (else ``$MEDSEG_DATA_ROOT``, else the
            spec's own, relative to the spec file).

    Returns:
        The validated spec with its resolved data root.

    Raises:
        ConfigError: If the file is missing or invalid (message names file and field).
    """
    path = Path(path)
    reader = SPEC_READERS.get(path.suffix.lower())
    if reader is not None:
        spec = reader(path)
        default_root = path.parent
    else:
        spec = validate(DatasetSpec, read_yaml(path), str(path))
        default_root = (path.parent / spec.data_root).resolve()
    override = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV)
    root = Path(override).resolve() if override else default_root
    if not root.is_dir():
        msg = f"{path}: data root must be an existing folder, got {root}"
        raise ConfigError(msg)
    return LoadedSpec(spec=spec, source=path, root=root)


def save_spec(spec: DatasetSpec, path: str | Path) -> None:
    """Write a spec as YAML (the inverse of :func:`load_spec` for YAML files).

    Args:
        spec: The spec.
        path: Destination ``.yaml`` file.
    """
    dump_yaml(spec, path)


def spec_from_mapping(data: dict[str, Any], source: str = "<mapping>") -> DatasetSpec:
    """Validate a mapping into a :class:`DatasetSpec`.

    Args:
        data: The raw mapping.
        source: Where it came from, for error messages.

    Returns:
        The spec.
    """
    return validate(DatasetSpec, data, source)
