"""The plan of one scan's prediction, decided before any network runs.

After preprocessing, the grids' shapes are known; :func:`plan_scan` then decides, for each ensemble
member, its tiling settings, its windows (:class:`~medseg.tiling.PatchPlan`), the memory mode and
the route its output takes back to the scan's own grid, and for the scan where the CRF runs and
whether post-processing runs as a stage of its own. The stages only carry the plan out.

Routes (one model's output back to the source grid):

* ``labels_to_source``: one model, no probabilities wanted, no CRF; finished slabs go straight to
  the source grid and only labels are kept (where the grids map exactly, or with bounded memory);
* ``crf_on_grid``: one model, bounded memory, CRF on: probabilities memory-mapped on disk, the CRF
  on the preprocessed grid, its labels then taken back to the source grid;
* ``probabilities``: whole-volume probabilities resampled to the source grid (ensembles, kept
  probabilities, the CRF on the source grid, resampled grids).

Examples:
    >>> decide_route(members=1, keep_probabilities=False, bounded=False, crf=False, exact=True)
    'labels_to_source'
    >>> decide_route(members=1, keep_probabilities=False, bounded=True, crf=True, exact=None)
    'crf_on_grid'
    >>> decide_route(members=2, keep_probabilities=False, bounded=True, crf=False, exact=True)
    'probabilities'
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
from monai.data.meta_tensor import MetaTensor

from medseg.errors import GeometryError
from medseg.labelmap import label_dtype
from medseg.predict.records import Fact, Preprocessed, StageRecord
from medseg.tiling import PatchPlan, TilingSettings, choose_memory_mode, plan_for
from medseg.tiling.to_source import SourceMapping, source_mapping

if TYPE_CHECKING:
    from medseg.bundle import Bundle
    from medseg.refine import RefineConfig

Route = Literal["labels_to_source", "crf_on_grid", "probabilities"]
CrfSite = Literal["off", "source_grid", "preprocessed_grid"]


@dataclass(frozen=True)
class MemberPlan:
    """How one ensemble member's network runs over the scan and where its output goes.

    Attributes:
        member: The member's index.
        settings: Its tiling settings, with the memory mode the engine is given.
        patches: Its windows on the preprocessed grid.
        memory: The memory mode the volume's size calls for (``full`` or ``bounded``).
        route: Where the output goes (see the module docstring).
        mapping: The grid-to-source mapping (route ``labels_to_source`` only).
    """

    member: int
    settings: TilingSettings
    patches: PatchPlan
    memory: Literal["full", "bounded"]
    route: Route
    mapping: SourceMapping | None = None

    def facts(self) -> dict[str, Fact]:
        """The plan as plain values (for provenance and MLflow)."""
        return {
            "member": self.member,
            "route": self.route,
            "memory": self.memory,
            "exact_mapping": None if self.mapping is None else self.mapping.exact,
            "tta_axes": list(self.settings.tta_axes),
            "batch_size": self.settings.batch_size,
            "memory_format": self.settings.memory_format,
            "precision": self.settings.precision,
            "blend": self.settings.blend,
            "patches": self.patches.as_dict() | {"starts": len(self.patches.starts)},
        }


@dataclass(frozen=True)
class ScanPlan:
    """The whole plan of one scan.

    Attributes:
        members: One plan per ensemble member.
        keep_probabilities: Whether the probabilities on the source grid are returned.
        crf: Where the dense CRF runs (``off``, ``source_grid`` or ``preprocessed_grid``).
        postprocess: Whether post-processing runs as a stage of its own (with the CRF on the
            source grid it runs inside the refine stage).
        label_dtype: The dtype of the label map returned (:func:`medseg.labelmap.label_dtype`).
        num_classes: Classes the model predicts.
    """

    members: tuple[MemberPlan, ...]
    keep_probabilities: bool
    crf: CrfSite
    postprocess: bool
    label_dtype: str
    num_classes: int

    def facts(self) -> dict[str, Fact]:
        """The plan as plain values (for provenance and MLflow)."""
        return {
            "members": [m.facts() for m in self.members],
            "keep_probabilities": self.keep_probabilities,
            "crf": self.crf,
            "postprocess": self.postprocess,
            "label_dtype": self.label_dtype,
        }


def decide_route(
    *, members: int, keep_probabilities: bool, bounded: bool, crf: bool, exact: bool | None
) -> Route:
    """The route of a member's output (``exact``: whether the grids map exactly; ``None``: not
    axis-aligned)."""
    streaming = members == 1 and not keep_probabilities
    if streaming and bounded and crf:
        return "crf_on_grid"
    if streaming and not crf and exact is not None and (bounded or exact):
        return "labels_to_source"
    return "probabilities"


def _mapping(grid: MetaTensor, source: MetaTensor, transform: object) -> SourceMapping | None:
    """The grid-to-source mapping for slab-wise inversion (``None``: grids not axis-aligned)."""
    try:
        return source_mapping(grid, source, transform)  # type: ignore[arg-type]
    except GeometryError:
        return None


def _member_plan(
    bundle: Bundle, prepared: Preprocessed, *, source: MetaTensor, members: int, keep: bool, crf: bool
) -> MemberPlan:
    """Plan one member: settings from its pipeline config, windows, memory mode, route."""
    settings = TilingSettings.from_config(bundle.pipeline.inference, bundle.pipeline.window)
    patches = plan_for(bundle.network, prepared.grid.shape[1:], settings)
    memory = (
        "bounded" if choose_memory_mode(settings, patches, bundle.spec.num_classes) == "bounded" else "full"
    )
    streaming = members == 1 and not keep
    bounded = streaming and memory == "bounded"
    mapping = _mapping(prepared.grid, source, prepared.transform) if streaming and not crf else None
    exact = None if mapping is None else mapping.exact
    route = decide_route(members=members, keep_probabilities=keep, bounded=bounded, crf=crf, exact=exact)
    engine_memory = {"crf_on_grid": "bounded", "probabilities": "full"}.get(
        route, "bounded" if bounded else settings.memory
    )
    return MemberPlan(
        member=prepared.member,
        settings=replace(settings, memory=engine_memory),  # type: ignore[arg-type]
        patches=patches,
        memory=memory,  # type: ignore[arg-type]
        route=route,
        mapping=mapping if route == "labels_to_source" else None,
    )


def plan_scan(
    bundles: Sequence[Bundle],
    prepared: Sequence[Preprocessed],
    *,
    source: MetaTensor,
    refine: RefineConfig,
    keep_probabilities: bool,
) -> tuple[ScanPlan, StageRecord]:
    """Decide the plan of one scan (see the module docstring).

    Args:
        bundles: The ensemble's members.
        prepared: The scan on each member's preprocessed grid.
        source: The scan on its own grid.
        refine: The refinement settings.
        keep_probabilities: Whether the probabilities on the source grid are wanted.

    Returns:
        The plan and its record.
    """
    t0 = time.perf_counter()
    crf = refine.crf.enabled
    members = tuple(
        _member_plan(b, p, source=source, members=len(bundles), keep=keep_probabilities, crf=crf)
        for b, p in zip(bundles, prepared)
    )
    on_grid = any(m.route == "crf_on_grid" for m in members)
    site: CrfSite = "preprocessed_grid" if on_grid else "source_grid" if crf else "off"
    post = refine.postprocess.enabled and bool(refine.postprocess.labels) and site != "source_grid"
    plan = ScanPlan(
        members=members,
        keep_probabilities=keep_probabilities,
        crf=site,
        postprocess=post,
        label_dtype=str(label_dtype(bundles[0].spec.num_classes)),
        num_classes=bundles[0].spec.num_classes,
    )
    return plan, StageRecord("plan", time.perf_counter() - t0, params=plan.facts())


def as_label_dtype(labels: np.ndarray, plan: ScanPlan) -> np.ndarray:
    """The labels in the plan's dtype (no copy when they already are)."""
    return labels.astype(plan.label_dtype, copy=False)
