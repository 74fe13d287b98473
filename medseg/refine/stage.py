"""The refine stage: stitched probabilities in, label map and a report of what changed out.

Examples:
    >>> probs = torch.full((2, 8, 8), 0.1)
    >>> probs[1, 2:6, 2:6] = 0.9
    >>> probs[1, 0, 0] = 0.6  # an isolated voxel: the CRF's smoothness term removes it
    >>> probs[0] = 1 - probs[1]
    >>> image = torch.zeros(1, 8, 8)
    >>> image[0, 2:6, 2:6] = 2.0  # the square is brighter
    >>> labels, report = refine(probs, image, (1.0, 1.0), DenseCRFConfig(), PostprocessConfig())
    >>> labels.shape, int(labels[0, 0]), int(labels[3, 3]), report.crf_changed_fraction
    ((8, 8), 0, 1, 0.015625)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from medseg.config.refine import DenseCRFConfig, PostprocessConfig
from medseg.labelmap import label_dtype
from medseg.refine.components import postprocess
from medseg.refine.crf import as_plain_tensor, iter_blocks, plan_crf


@dataclass(frozen=True)
class RefineReport:
    """What refinement did to one case (reviewers want to know).

    Attributes:
        voxels: Voxels in the label map.
        crf_changed_fraction: Fraction of all voxels whose label (argmax) the CRF changed.
        post_changed_fraction: Fraction of all voxels whose label post-processing changed.
        changed_fraction: Fraction whose final label differs from the argmax of the input.
        crf_roi: Per axis ``(start, stop)`` of the box the CRF refined, or ``None`` if it did not run.
        crf_blocks: Slabs the CRF was run in.
        crf_seconds: Wall time of the CRF.
        post_seconds: Wall time of post-processing.
    """

    voxels: int
    crf_changed_fraction: float
    post_changed_fraction: float
    changed_fraction: float
    crf_roi: tuple[tuple[int, int], ...] | None
    crf_blocks: int
    crf_seconds: float
    post_seconds: float

    def metrics(self, prefix: str = "refine/") -> dict[str, float]:
        """The numeric facts, as MLflow metrics (flat names, floats)."""
        keys: tuple[str, ...] = ("crf_changed_fraction", "post_changed_fraction", "changed_fraction")
        keys += ("crf_blocks", "crf_seconds", "post_seconds")
        return {f"{prefix}{k}": float(getattr(self, k)) for k in keys}

    def as_dict(self) -> dict[str, object]:
        """All fields, JSON-ready."""
        out = asdict(self)
        out["crf_roi"] = [list(r) for r in self.crf_roi] if self.crf_roi is not None else None
        return out


def postprocess_with_report(
    labels: np.ndarray,
    post_cfg: PostprocessConfig,
    spacing: Sequence[float],
    crf: RefineReport | None = None,
) -> tuple[np.ndarray, RefineReport]:
    """Post-process a label map and report it, for labels refined elsewhere (or not at all).

    Used where the CRF ran on another grid than post-processing (the memory-bounded prediction
    mode refines on the preprocessed grid, then post-processes on the source grid).

    Args:
        labels: The label map (left unchanged).
        post_cfg: The post-processing settings.
        spacing: Voxel spacing of ``labels`` in mm.
        crf: The report of the CRF that made ``labels`` (its CRF fields are kept), or ``None``.

    Returns:
        The post-processed labels and the report; ``changed_fraction`` is then the sum of the CRF's
        and post-processing's fractions (an upper bound: the grids differ).
    """
    t0 = time.perf_counter()
    final = postprocess(labels, post_cfg, spacing) if post_cfg.enabled and post_cfg.labels else labels
    seconds = time.perf_counter() - t0
    post_changed = float(np.count_nonzero(final != labels)) / max(1, labels.size)
    crf_changed = crf.crf_changed_fraction if crf is not None else 0.0
    report = RefineReport(
        voxels=int(labels.size),
        crf_changed_fraction=crf_changed,
        post_changed_fraction=post_changed,
        changed_fraction=min(1.0, crf_changed + post_changed),
        crf_roi=crf.crf_roi if crf is not None else None,
        crf_blocks=crf.crf_blocks if crf is not None else 0,
        crf_seconds=crf.crf_seconds if crf is not None else 0.0,
        post_seconds=seconds,
    )
    return final, report


def _argmax(probs: torch.Tensor | np.ndarray, dtype: np.dtype, chunk_voxels: int = 1 << 22) -> np.ndarray:
    """Argmax over labels as a CPU array of ``dtype``, slab by slab (no full-size int64 map)."""
    probs = as_plain_tensor(probs)
    shape = tuple(probs.shape[1:])
    out = np.empty(shape, dtype)
    step = max(1, chunk_voxels // max(1, int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        out[start : start + step] = probs[:, start : start + step].argmax(0).cpu().numpy()
    return out


def refine(
    probs: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    crf_cfg: DenseCRFConfig,
    post_cfg: PostprocessConfig,
) -> tuple[np.ndarray, RefineReport]:
    """Refine stitched probabilities into a label map: dense CRF, argmax, then post-processing.

    Args:
        probs: ``(K, *spatial)`` softmax probabilities (2D or 3D), CPU or CUDA, or a NumPy array such as
            the memory-mapped ``.npy`` of the bounded tiling mode (only blocks are read into memory).
        image: ``(C, *spatial)`` normalised image on the same grid.
        spacing: Voxel spacing in mm (e.g. ``spacing_from_affine(affine)``).
        crf_cfg: The CRF settings (``enabled=False`` skips it).
        post_cfg: The post-processing settings (``enabled=False`` skips it).

    Returns:
        The ``(*spatial)`` label map (in :func:`~medseg.labelmap.label_dtype`) on the CPU, and the
        :class:`RefineReport`.

    Raises:
        InputError: If the inputs do not fit together (see :func:`~medseg.refine.crf.dense_crf`).
    """
    t0 = time.perf_counter()
    info = plan_crf(probs, image, spacing, crf_cfg)
    dtype = label_dtype(probs.shape[0])
    before = _argmax(probs, dtype)
    labels = before.copy()
    for core, q in iter_blocks(probs, image, spacing, crf_cfg, info):
        labels[core] = _argmax(q, dtype)
    crf_changed = float(np.count_nonzero(labels != before)) / labels.size
    t1 = time.perf_counter()
    final = postprocess(labels, post_cfg, spacing) if post_cfg.enabled and post_cfg.labels else labels
    t2 = time.perf_counter()
    voxels = int(labels.size)
    post_changed = float(np.count_nonzero(final != labels)) / voxels
    total_changed = float(np.count_nonzero(final != before)) / voxels
    report = RefineReport(
        voxels=voxels,
        crf_changed_fraction=crf_changed,
        post_changed_fraction=post_changed,
        changed_fraction=total_changed,
        crf_roi=info.roi,
        crf_blocks=len(info.blocks),
        crf_seconds=t1 - t0,
        post_seconds=t2 - t1,
    )
    return final, report
