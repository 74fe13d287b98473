"""The records passed between the prediction stages, and the prediction they make.

Every stage returns what it made together with a :class:`StageRecord`: its name, the parameters it
ran with, its measured wall time and what it changed. The records of one scan, in order, are its
provenance (kept on :class:`Prediction`, written to the case's ``result.json`` and logged to MLflow),
so any output can be traced to the plan and the stages that made it.

Examples:
    >>> r = StageRecord("preprocess", 0.25, params={"member": 0}, changed={"shape": (4, 4, 2)})
    >>> r.as_dict()["changed"]
    {'shape': [4, 4, 2]}
    >>> seconds_by_stage([r, StageRecord("preprocess", 0.5, params={"member": 1})])
    {'preprocess': 0.75}
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
from monai.data.meta_tensor import MetaTensor

if TYPE_CHECKING:
    import torch
    from monai.transforms.compose import Compose

    from medseg.config.spec import DatasetSpec
    from medseg.refine import RefineReport

Fact: TypeAlias = "str | int | float | bool | Sequence[Fact] | Mapping[str, Fact] | None"
"""A JSON-ready value: what a record says about a stage."""

Facts: TypeAlias = Mapping[str, Fact]


def jsonable(value: Fact) -> Fact:
    """``value`` with tuples as lists and mapping keys as strings (what ``json.dumps`` writes)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class StageRecord:
    """What one stage did to one scan.

    Attributes:
        name: The stage (``input``, ``preprocess``, ``plan``, ``model``, ``to_source``, ``labels``,
            ``refine``, ``postprocess``; the batch job adds ``load``).
        seconds: Its wall time, measured around the stage.
        params: The settings it ran with (``member``: the ensemble member, where there are several).
        changed: What it made or changed (shapes, voxels changed, windows run).
        timings: Sub-steps timed inside the stage (the tiling engine's ``extract``, ``forward``,
            ``stitch``, ``finalize``).
    """

    name: str
    seconds: float
    params: Facts = field(default_factory=dict)
    changed: Facts = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Fact]:
        """The record as JSON-ready values."""
        out: dict[str, Fact] = {"name": self.name, "seconds": round(self.seconds, 6)}
        for key, value in (("params", self.params), ("changed", self.changed), ("timings", self.timings)):
            if value:
                out[key] = jsonable(value)
        return out


def seconds_by_stage(records: Sequence[StageRecord]) -> dict[str, float]:
    """Wall time per stage name, summed over ensemble members (the ``seconds`` of a prediction)."""
    out: dict[str, float] = {}
    for r in records:
        out[r.name] = out.get(r.name, 0.0) + r.seconds
    return out


@dataclass
class Prediction:
    """A prediction on the source image's grid.

    Attributes:
        labels: ``(X, Y, Z)`` label map on the source grid (dtype: :func:`medseg.labelmap.label_dtype`).
        affine: The source grid's RAS+ affine (as loaded from disk).
        probabilities: ``(K, X, Y, Z)`` class probabilities on the source grid, if kept (before
            refinement).
        seconds: Wall time per stage (see :class:`StageRecord`; summed over ensemble members), and
            ``network``: the forward passes alone, as the tiling engine timed them. Where labels go
            back to the source grid slab by slab during stitching, ``to_source`` is the engine's
            timing of that last step, which is also part of ``model``.
        refine: What refinement changed, or ``None`` if neither the CRF nor post-processing ran.
        quality: Facts for review: ``foreground_entropy``, the mean softmax entropy (in nats) over
            the voxels predicted as foreground (on a regular sub-grid of large volumes; not with
            the CRF in the memory-bounded mode).
        provenance: The stages' records, in the order they ran.
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    refine: RefineReport | None = None
    quality: dict[str, float] = field(default_factory=dict)
    provenance: tuple[StageRecord, ...] = ()


@dataclass(frozen=True)
class Preprocessed:
    """A scan on one ensemble member's preprocessed grid.

    Attributes:
        member: The ensemble member whose preprocessing made it.
        sample: MONAI's sample dict (``image`` on the grid, with the applied transforms, which the
            way back to the source grid inverts).
        transform: The preprocessing transform (a MONAI ``Compose``).
    """

    member: int
    sample: Mapping[Hashable, Any]
    transform: Compose

    @property
    def grid(self) -> MetaTensor:
        """The ``(C, *spatial)`` image on the preprocessed grid."""
        image = self.sample["image"]
        assert isinstance(image, MetaTensor)
        return image


@dataclass(frozen=True)
class ModelDescription:
    """What a model is, for tracking and provenance.

    Attributes:
        kind: The model source's scheme (``medseg``, ``nnunet``, ...).
        location: Where it was loaded from (folder or URI, as given).
        sha256: A hash of its weights (``+``-joined for an ensemble); resume and the manifest key on it.
        params: Other facts worth logging (configuration, folds, hashes of its plans), as strings.
    """

    kind: str
    location: str
    sha256: str
    params: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class SegmentationModel(Protocol):
    """A loaded model that segments scans on their own voxel grid.

    Attributes:
        spec: Its channels and labels (names and values), for exports and checks.
        sha256: Identity of its weights.
    """

    spec: DatasetSpec

    @property
    def sha256(self) -> str:
        """A hash of the weights (``+``-joined for an ensemble)."""
        ...

    def predict(self, image: MetaTensor, *, keep_probabilities: bool = False) -> Prediction:
        """Segment one loaded ``(C, X, Y, Z)`` scan; labels on the scan's own grid."""
        ...

    def describe(self) -> ModelDescription:
        """What the model is, for tracking."""
        ...
