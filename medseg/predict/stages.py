"""The prediction stages: small functions, each doing one step and returning its record.

The :class:`~medseg.pipeline.Predictor` calls them in the order of the pipeline (check the input,
preprocess, plan, model, back to the source grid, labels, refine, post-process); a
:class:`~medseg.predict.plan.ScanPlan` decided beforehand says which ones run and how. Each returns
what it made and a :class:`~medseg.predict.records.StageRecord`.

Examples:
    >>> import torch
    >>> probs = torch.tensor([[[0.5, 1.0]], [[0.5, 0.0]]])  # (K=2, 1, 2)
    >>> round(foreground_entropy(probs, np.array([[1, 0]])), 4)
    0.6931
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from torch import nn

from medseg.errors import InputError
from medseg.geometry import spacing_from_affine
from medseg.labelmap import torch_label_dtype
from medseg.predict.plan import MemberPlan, ScanPlan
from medseg.predict.records import Fact, Preprocessed, StageRecord
from medseg.preprocess import invert_to_source
from medseg.refine import PostprocessConfig, RefineConfig, RefineReport, postprocess_with_report, refine
from medseg.tiling import argmax_channels, infer
from medseg.tiling.sinks import (
    ENTROPY_SAMPLES,
    ForegroundEntropy,
    ProbabilityWriter,
    entropy_sum,
    sampling_step,
)
from medseg.tiling.to_source import SourceGridLabels


@contextlib.contextmanager
def _clock() -> Iterator[list[float]]:
    """Measures the wall time of its block into the yielded list's only item."""
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value is finite: one reduction (NaN and inf propagate into the sum), and the
    exact check only when the sum itself is not finite (say an overflow of huge finite values)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_input(image: MetaTensor, *, channels: int) -> tuple[MetaTensor, StageRecord]:
    """The image as float32 on its own grid, checked: ``(C, X, Y, Z)``, ``channels`` channels, finite.

    Raises:
        InputError: Wrong channel count or dimensionality, or non-finite voxels.
    """
    with _clock() as took:
        if image.ndim != 4:
            msg = f"image must be 3D with a channel axis (C, X, Y, Z), got shape {tuple(image.shape)}"
            raise InputError(msg)
        if image.shape[0] != channels:
            msg = f"image must have {channels} channel(s) as the model was trained, got {image.shape[0]}"
            raise InputError(msg)
        source = MetaTensor(image.as_tensor().float(), meta=dict(image.meta))
        if not _all_finite(source.as_tensor()):
            msg = "image voxels must be finite, got NaN or inf values"
            raise InputError(msg)
    changed: dict[str, Fact] = {"shape": tuple(source.shape), "dtype": f"{image.dtype} -> float32"}
    return source, StageRecord("input", took[0], changed=changed)


def preprocess(source: MetaTensor, transform: Compose, *, member: int) -> tuple[Preprocessed, StageRecord]:
    """One member's preprocessing (orientation, spacing, intensity) of the source image."""
    with _clock() as took:
        sample = transform({"image": source})
    prepared = Preprocessed(member, sample, transform)
    spacing = spacing_from_affine(np.asarray(prepared.grid.affine))
    changed: dict[str, Fact] = {
        "shape": tuple(prepared.grid.shape),
        "spacing": tuple(round(float(s), 6) for s in spacing),
    }
    return prepared, StageRecord("preprocess", took[0], params={"member": member}, changed=changed)


@dataclass(frozen=True)
class MemberOutput:
    """One member's output on the source grid: labels or probabilities, and the stages' records.

    Attributes:
        labels: The label map (routes ``labels_to_source`` and ``crf_on_grid``).
        probabilities: ``(K, *spatial)`` probabilities (route ``probabilities``).
        refine: What the CRF changed (route ``crf_on_grid``).
        entropy: The mean foreground entropy, where the route measured it.
        records: The records of the stages that ran.
    """

    labels: np.ndarray | None = None
    probabilities: torch.Tensor | None = None
    refine: RefineReport | None = None
    entropy: float | None = None
    records: tuple[StageRecord, ...] = ()


def _facts(values: dict[str, object]) -> dict[str, Fact]:
    """A report's fields as facts (JSON-ready values: numbers, ``None``, lists of numbers)."""
    out: dict[str, Fact] = {}
    for key, value in values.items():
        assert value is None or isinstance(value, (int, float, str, list, tuple))
        out[key] = value
    return out


def _model_record(plan: MemberPlan, seconds: float, timings: dict[str, float]) -> StageRecord:
    params = {"member": plan.member, "route": plan.route, "memory": plan.settings.memory}
    changed = {"windows": plan.patches.num_windows, "passes": 2 ** len(plan.settings.tta_axes)}
    return StageRecord("model", seconds, params=params, changed=changed, timings=timings)


def run_labels_to_source(
    network: nn.Module, prepared: Preprocessed, *, plan: MemberPlan, device: torch.device, crf: object
) -> MemberOutput:
    """Tile, run and stitch; each finished slab goes straight to the source grid as labels."""
    assert plan.mapping is not None
    grid = prepared.grid
    sink, entropy = SourceGridLabels(plan.mapping), ForegroundEntropy(grid.shape[1:])
    with _clock() as took:
        result = infer(
            network, grid, plan.settings, plan=plan.patches, output=None, sinks=[sink, entropy], device=device
        )
        labels = sink.result().numpy()
    record = _model_record(plan, took[0], dict(result.timings))
    return MemberOutput(labels=labels, entropy=entropy.result(), records=(record,))


def run_crf_on_grid(
    network: nn.Module, prepared: Preprocessed, *, plan: MemberPlan, device: torch.device, crf: RefineConfig
) -> MemberOutput:
    """Bounded memory with the CRF: probabilities memory-mapped, CRF on the grid, labels to source."""
    grid = prepared.grid
    with tempfile.TemporaryDirectory(prefix="medseg-probabilities-") as tmp:
        writer = ProbabilityWriter(Path(tmp) / "probabilities.npy", grid.shape[1:])
        with _clock() as took:
            result = infer(
                network, grid, plan.settings, plan=plan.patches, output=None, sinks=[writer], device=device
            )
        model = _model_record(plan, took[0], dict(result.timings))
        with _clock() as took:
            probs = np.load(writer.path, mmap_mode="r")
            spacing = spacing_from_affine(np.asarray(grid.affine))
            on_grid, report = refine(
                probs, grid.as_tensor(), spacing, crf.crf, PostprocessConfig(enabled=False)
            )
            del probs
        refined = StageRecord(
            "refine", took[0], params={"site": "preprocessed_grid"}, changed=_facts(report.as_dict())
        )
    with _clock() as took:
        labels = torch.from_numpy(on_grid.astype(np.int32))[None]
        back = invert_to_source(labels, prepared.sample, prepared.transform, mode="nearest")
        out = back.as_tensor()[0].numpy()
    to_source = StageRecord("to_source", took[0], params={"mode": "nearest"}, changed={"shape": out.shape})
    return MemberOutput(labels=out, refine=report, records=(model, refined, to_source))


def run_probabilities(
    network: nn.Module, prepared: Preprocessed, *, plan: MemberPlan, device: torch.device, crf: object
) -> MemberOutput:
    """Whole-volume probabilities, resampled (bilinear) to the source grid."""
    with _clock() as took:
        result = infer(network, prepared.grid, plan.settings, plan=plan.patches, device=device)
    model = _model_record(plan, took[0], dict(result.timings))
    assert result.probabilities is not None
    with _clock() as took:
        back = invert_to_source(result.probabilities, prepared.sample, prepared.transform, mode="bilinear")
        probs = back.as_tensor()
    to_source = StageRecord(
        "to_source",
        took[0],
        params={"member": plan.member, "mode": "bilinear"},
        changed={"shape": tuple(probs.shape)},
    )
    return MemberOutput(probabilities=probs, records=(model, to_source))


ROUTES: dict[str, Callable[..., MemberOutput]] = {
    "labels_to_source": run_labels_to_source,
    "crf_on_grid": run_crf_on_grid,
    "probabilities": run_probabilities,
}
"""The function that carries out each route of :class:`~medseg.predict.plan.MemberPlan`."""


def foreground_entropy(
    probs: torch.Tensor, labels: np.ndarray, *, chunk: int = 1 << 20, max_voxels: int = ENTROPY_SAMPLES
) -> float | None:
    """Mean softmax entropy (nats) over the voxels labelled foreground; ``None`` if there are none.

    Large volumes are sampled on a regular sub-grid (every ``s``-th voxel along each axis, at most
    about ``max_voxels`` voxels): a mean over millions of voxels does not need all of them.

    Args:
        probs: ``(K, *spatial)`` probabilities.
        labels: The ``(*spatial)`` label map.
        chunk: Voxels per step (bounds the temporary memory).
        max_voxels: Voxels to look at, at most (about).
    """
    step = sampling_step(labels.shape, max_voxels)
    if step > 1:
        grid = tuple(slice(None, None, step) for _ in range(labels.ndim))
        probs, labels = probs[(slice(None), *grid)], labels[grid]
    mask = torch.from_numpy(np.ascontiguousarray(labels) != 0)
    n = int(mask.sum())
    return entropy_sum(probs, mask, chunk) / n if n else None


def labels_from_probabilities(
    total: torch.Tensor, *, members: int, plan: ScanPlan
) -> tuple[torch.Tensor, np.ndarray, float | None, StageRecord]:
    """Average the members' summed probabilities, take the argmax, measure the foreground entropy.

    Returns:
        The probabilities, the labels, the entropy (``None``: no foreground) and the record.
    """
    with _clock() as took:
        probs = total if members == 1 else total.div_(members)
        labels = argmax_channels(probs, torch_label_dtype(plan.num_classes)).numpy()
        entropy = foreground_entropy(probs, labels)
    changed = {"foreground_voxels": int(np.count_nonzero(labels))}
    return (
        probs,
        labels,
        entropy,
        StageRecord("labels", took[0], params={"members": members}, changed=changed),
    )


def refine_on_source(
    probs: torch.Tensor, image: torch.Tensor, *, spacing: tuple[float, ...], settings: RefineConfig
) -> tuple[np.ndarray, RefineReport, StageRecord]:
    """The dense CRF on the source grid, then the post-processing (one stage, one report)."""
    with _clock() as took:
        labels, report = refine(probs, image, spacing, settings.crf, settings.postprocess)
    record = StageRecord("refine", took[0], params={"site": "source_grid"}, changed=_facts(report.as_dict()))
    return labels, report, record


def postprocess(
    labels: np.ndarray, settings: PostprocessConfig, *, spacing: tuple[float, ...], crf: RefineReport | None
) -> tuple[np.ndarray, RefineReport, StageRecord]:
    """The post-processing chosen at training (components per label), on the source grid."""
    with _clock() as took:
        out, report = postprocess_with_report(labels, settings, spacing, crf)
    changed = {"post_changed_fraction": report.post_changed_fraction}
    return out, report, StageRecord("postprocess", took[0], changed=changed)
