"""``medseg plan``: fingerprint a data set and derive a pipeline config from it, as nnU-Net does.

Every decision is written into the YAML with a comment that says why; users override any of them by
editing the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg.config.base import validate
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import LoadedSpec, Modality
from medseg.geometry import spacing_from_affine
from medseg.io.atomic import atomic_write_text

SAMPLES_PER_CASE = 10_000
CPU_BUDGET_MB = 2_000
GPU_BUDGET_MB = 8_000
MAX_LEVELS = 5
MIN_BOTTOM = 4  # smallest feature-map size at the deepest level
RAS_AXIS_NAMES = ("left-right", "posterior-anterior", "inferior-superior")
# nnU-Net's spatial and gamma augmentation (its defaults for 3D): rotation, scaling, gamma
NNUNET_SPATIAL_AUGMENT = {
    "rotate_prob": 0.2,
    "rotate_deg": 30,
    "scale_prob": 0.2,
    "scale": 0.25,
    "gamma_prob": 0.3,
}


@dataclass
class Fingerprint:
    """What planning needs to know about a data set (spacings and shapes in RAS axis order)."""

    spacings: list[tuple[float, float, float]] = field(default_factory=list)
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    foreground: list[np.ndarray] = field(default_factory=list)  # sampled intensities per channel
    class_voxels: dict[int, int] = field(default_factory=dict)

    @property
    def median_spacing(self) -> np.ndarray:
        """Median spacing per axis."""
        return np.median(np.asarray(self.spacings), axis=0)


def _ras_spacing_shape(
    affine: np.ndarray, shape: tuple[int, ...]
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    import nibabel as nib

    spacing = np.asarray(spacing_from_affine(affine))
    ornt = nib.orientations.io_orientation(affine)
    ras_spacing = [0.0, 0.0, 0.0]
    ras_shape = [0, 0, 0]
    for vox_axis, (ras_axis, _flip) in enumerate(ornt):
        ras_spacing[int(ras_axis)] = float(spacing[vox_axis])
        ras_shape[int(ras_axis)] = int(shape[vox_axis])
    return tuple(ras_spacing), tuple(ras_shape)


def fingerprint(data: LoadedSpec, seed: int = 0) -> Fingerprint:
    """Read every case once: spacing, shape, sampled foreground intensities, class frequencies.

    Args:
        data: The data spec with its root.
        seed: Seed of the intensity sampling.

    Returns:
        The :class:`Fingerprint`.
    """
    from medseg.io.load import load_case, load_image

    rng = np.random.default_rng(seed)
    fp = Fingerprint()
    n_channels = len(data.spec.channels)
    samples: list[list[np.ndarray]] = [[] for _ in range(n_channels)]
    for case in data.resolve_cases(require_labels=True):
        image = load_case(list(case.images))
        label = load_image(case.label)[0].numpy()  # type: ignore[arg-type]
        affine = np.asarray(image.affine, dtype=np.float64)
        spacing, shape = _ras_spacing_shape(affine, tuple(image.shape[1:]))
        fp.spacings.append(spacing)  # type: ignore[arg-type]
        fp.shapes.append(shape)  # type: ignore[arg-type]
        values, counts = np.unique(label, return_counts=True)
        for v, c in zip(values, counts):
            fp.class_voxels[int(v)] = fp.class_voxels.get(int(v), 0) + int(c)
        fg = np.flatnonzero(label > 0)
        if fg.size:
            pick = rng.choice(fg, size=min(SAMPLES_PER_CASE, fg.size), replace=False)
            for c in range(n_channels):
                samples[c].append(image[c].numpy().reshape(-1)[pick].astype(np.float64))
    fp.foreground = [np.concatenate(s) if s else np.zeros(0) for s in samples]
    return fp


def plan_target_spacing(fp: Fingerprint, threshold: float) -> tuple[tuple[float, float, float], str]:
    """Median spacing; for anisotropic data the coarse axis takes the 10th percentile (nnU-Net).

    Returns:
        The spacing and the reason, for the YAML comment.
    """
    spacings = np.asarray(fp.spacings)
    target = np.median(spacings, axis=0)
    if target.max() / target.min() > threshold:
        axis = int(np.argmax(target))
        others = np.delete(target, axis)
        target[axis] = max(float(np.percentile(spacings[:, axis], 10)), float(others.max()))
        why = (
            f"median spacing; axis {axis} is coarse (anisotropy > {threshold:g}), so it takes the 10th "
            "percentile of its spacings, as nnU-Net does"
        )
    else:
        why = "median spacing of the cases"
    return (float(target[0]), float(target[1]), float(target[2])), why


def plan_intensity(fp: Fingerprint, data: LoadedSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """CT: clip to foreground percentiles 0.5/99.5, then foreground mean/std; others: z-score."""
    settings, reasons = [], []
    for channel, values in zip(data.spec.channels, fp.foreground):
        if channel.modality is Modality.CT and values.size:
            lo, hi = np.percentile(values, [0.5, 99.5])
            clipped = np.clip(values, lo, hi)
            settings.append(
                {
                    "scheme": "ct",
                    "clip": [round(float(lo), 2), round(float(hi), 2)],
                    "mean": round(float(clipped.mean()), 4),
                    "std": round(max(float(clipped.std()), 1e-3), 4),
                }
            )
            reasons.append(
                f"{channel.name}: CT, clipped to foreground percentiles 0.5/99.5, foreground mean/std"
            )
        else:
            settings.append({"scheme": "zscore"})
            reasons.append(f"{channel.name}: {channel.modality.value}, z-score per image")
    return settings, reasons


def _memory_mb(patch: tuple[int, ...], channels: list[int], batch: int, in_ch: int, classes: int) -> float:
    """Rough training memory of a U-Net: activations kept for the backward pass (float32)."""
    voxels = float(np.prod(patch))
    total = voxels * (in_ch + classes)
    for level, c in enumerate(channels):
        total += voxels / (8**level) * c * 10  # convs, norms, activations, decoder copies
    return total * 4 * batch / 2**20


def plan_network(
    median_shape: np.ndarray, budget_mb: float, in_ch: int, classes: int, batch: int = 2
) -> tuple[tuple[int, int, int], list[int], str]:
    """Patch size and channels per level that fit the median shape and the memory budget.

    Every patch dimension is divisible by ``2 ** (levels - 1)``: the network can halve it at every
    level.
    """
    base = [16, 32, 64, 128, 256] if budget_mb <= CPU_BUDGET_MB else [32, 64, 128, 256, 320]
    patch = np.maximum(np.asarray(median_shape, dtype=float), 8)
    while True:
        levels = int(min(MAX_LEVELS, math.floor(math.log2(max(patch.min() / MIN_BOTTOM, 1))) + 1))
        levels = max(levels, 2)
        div = 2 ** (levels - 1)
        rounded = tuple(int(div * math.ceil(p / div)) for p in patch)
        channels = base[:levels]
        if _memory_mb(rounded, channels, batch, in_ch, classes) <= budget_mb or patch.max() <= 16:
            break
        axis = int(np.argmax(patch / np.asarray(median_shape)))
        patch[axis] *= 0.9
    why = (
        f"median shape {tuple(int(s) for s in median_shape)} after resampling, rounded up to multiples of "
        f"{div} ({levels} levels) and shrunk until the estimated training memory fits {budget_mb:g} MB"
    )
    return rounded, channels, why  # type: ignore[return-value]


def _flips_why(mirror: Sequence[int]) -> str:
    if mirror == [0, 1, 2]:
        return "flips along every axis (the data spec's mirror_axes)"
    if not mirror:
        return "no flips (the data spec's mirror_axes is empty)"
    names = ", ".join(RAS_AXIS_NAMES[a] for a in mirror)
    return f"flips only along {names} (the data spec's mirror_axes {mirror})"


def _spatial_why(aug: dict[str, float]) -> str:
    return (
        f"rotation up to {aug['rotate_deg']:g} degrees (p {aug['rotate_prob']:g}), scaling by up to "
        f"{aug['scale'] * 100:g} % (p {aug['scale_prob']:g}) and gamma (p {aug['gamma_prob']:g})"
    )


def plan_pipeline(
    data: LoadedSpec, *, model: str = "unet3d", budget_mb: float | None = None, gpu: bool = False
) -> tuple[PipelineConfig, str]:
    """Fingerprint a data set and plan a pipeline for it.

    Args:
        data: The data spec with its root.
        model: A U-Net model name (``unet3d``).
        budget_mb: Training memory budget (default: 2 GB CPU, 8 GB GPU).
        gpu: Plan for a GPU (larger budget and channels, mixed precision).

    Returns:
        The validated config and its YAML text with a comment on every decision.
    """
    fp = fingerprint(data)
    budget = budget_mb or (GPU_BUDGET_MB if gpu else CPU_BUDGET_MB)
    spacing, spacing_why = plan_target_spacing(fp, data.spec.anisotropy_threshold)
    intensity, intensity_why = plan_intensity(fp, data)
    shapes = np.asarray(fp.shapes, dtype=float) * np.asarray(fp.spacings) / np.asarray(spacing)
    median_shape = np.median(shapes, axis=0)
    patch, channels, net_why = plan_network(
        median_shape, budget, len(data.spec.channels), data.spec.num_classes
    )
    whole = bool(np.all(np.asarray(patch) >= median_shape))
    if whole:  # two crops of one volume would be the same patch: four volumes per step instead
        train, batch_why = (
            {"batch_size": 4, "samples_per_volume": 1},
            (
                "4 volumes of 1 patch each: the patch holds the median volume whole, so two patches of one "
                "volume would be the same"
            ),
        )
    else:
        train, batch_why = {"batch_size": 2}, "2, nnU-Net's minimum"
    total = sum(fp.class_voxels.values())
    freq = {
        data.spec.label_names.get(v, str(v)): round(n / total, 5) for v, n in sorted(fp.class_voxels.items())
    }
    mirror = sorted(data.spec.mirror_axes)
    augment = {"flip_axes": mirror, **NNUNET_SPATIAL_AUGMENT}
    raw = {
        "name": f"{data.spec.name}-{model}",
        "preprocess": {"target_spacing": [round(s, 4) for s in spacing], "intensity": intensity},
        "model": {"name": model, "params": {"channels": channels, "num_res_units": 1}},
        "train": {"patch_size": list(patch), **train, "augment": augment},
        "inference": {"overlap": 0.5, "tta_axes": mirror},
    }
    cfg = validate(PipelineConfig, raw, "planned pipeline")
    dumped = cfg.model_dump(mode="json", exclude_defaults=True)
    dumped["model"] = {"name": cfg.model.name, **dumped.get("model", {})}
    text = yaml.safe_dump(dumped, sort_keys=False, default_flow_style=None)
    header = [
        f"# Planned by `medseg plan` from {len(fp.shapes)} cases of '{data.spec.name}'.",
        f"# Class frequencies (voxels): {freq}",
        f"# preprocess.target_spacing: {spacing_why}.",
        *[f"# preprocess.intensity: {r}." for r in intensity_why],
        f"# train.patch_size / model.params.channels: {net_why}.",
        f"# train.batch_size: {batch_why}.",
        f"# train.augment: {_flips_why(mirror)}; {_spatial_why(NNUNET_SPATIAL_AUGMENT)}, as nnU-Net trains.",
        f"# inference: overlap 0.5 and mirroring along the same axes ({2 ** len(mirror)} passes averaged), "
        "as nnU-Net predicts.",
        "# Edit any value to override the plan.",
    ]
    return cfg, "\n".join(header) + "\n" + text


def write_plan(path: str | Path, text: str) -> Path:
    """Write a planned pipeline YAML atomically."""
    atomic_write_text(Path(path), text)
    return Path(path)
