"""The precision guard: does a bundle segment the same in reduced precision as in float32?

The validation cases are predicted twice, with the network's forward pass in float32 and in the
reduced type (bfloat16 on a CPU, float16 on CUDA), with the same windows and batch size. Two facts
decide: the label agreement over the union of both predictions' foregrounds (``>= 99.9 %``) and,
per label, how much the Dice against the reference moves (``<= 0.002``; pooled over the cases).
The result is stored in the bundle's ``bundle.json`` (``info.precision_check.<type>``); under
``precision: auto`` a bundle that failed keeps float32 (:mod:`medseg.tiling.runtime`).

It runs at the end of training and with ``medseg check-precision BUNDLE --data SPEC``.

Examples:
    >>> import numpy as np
    >>> a = np.array([0, 1, 1, 2, 0]); b = np.array([0, 1, 2, 2, 0])
    >>> foreground_agreement([a], [b])
    0.6666666666666666
    >>> round(pooled_dice([a], [np.array([0, 1, 1, 2, 2])], 1), 3)
    1.0
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.bundle import MANIFEST
from medseg.config.pipeline import PipelineConfig
from medseg.errors import InputError
from medseg.io.atomic import atomic_write_text
from medseg.tiling import TilingSettings, infer
from medseg.tiling.precision import resolve_precision

MIN_AGREEMENT = 0.999
"""Label agreement over the union of foregrounds a bundle must reach."""
MAX_DICE_CHANGE = 0.002
"""How far any label's Dice may move."""


@dataclass(frozen=True)
class PrecisionCheck:
    """The outcome of a precision check.

    Attributes:
        dtype: The reduced type checked (``bfloat16`` or ``float16``).
        cases: Validation cases predicted.
        agreement: Label agreement over the union of foregrounds (1.0 when both are empty).
        dice_float32: Per label (as a string), the pooled Dice of the float32 prediction.
        dice_reduced: Likewise in the reduced type.
        dice_change: Per label, ``|dice_reduced - dice_float32|``.
        passed: ``agreement >= 0.999`` and every change ``<= 0.002``.
        seconds: Time the check took.
    """

    dtype: str
    cases: int
    agreement: float
    dice_float32: Mapping[str, float]
    dice_reduced: Mapping[str, float]
    dice_change: Mapping[str, float]
    passed: bool
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (what ``bundle.json`` stores), with the thresholds applied."""
        out = asdict(self)
        out["min_agreement"], out["max_dice_change"] = MIN_AGREEMENT, MAX_DICE_CHANGE
        return out

    def summary(self) -> str:
        """One line: the type, the agreement, the largest Dice change and the verdict."""
        worst = max(self.dice_change.values(), default=0.0)
        verdict = "passed" if self.passed else "failed: precision auto keeps float32"
        return (
            f"precision check {self.dtype} on {self.cases} case(s): agreement {100 * self.agreement:.3f} %, "
            f"largest Dice change {worst:.4f}; {verdict}"
        )


def foreground_agreement(first: Sequence[np.ndarray], second: Sequence[np.ndarray]) -> float:
    """Fraction of voxels, over the union of both foregrounds, where the labels agree."""
    union = same = 0
    for a, b in zip(first, second, strict=True):
        fg = (a != 0) | (b != 0)
        union += int(fg.sum())
        same += int((fg & (a == b)).sum())
    return same / union if union else 1.0


def pooled_dice(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], label: int) -> float:
    """Dice of one label pooled over cases (1.0 where both are empty everywhere)."""
    inter = total = 0
    for p, t in zip(preds, truths, strict=True):
        pm, tm = p == label, t == label
        inter += int((pm & tm).sum())
        total += int(pm.sum()) + int(tm.sum())
    return 2 * inter / total if total else 1.0


def reduced_type(device: torch.device | str) -> str:
    """The reduced type checked on ``device``: float16 on CUDA, else bfloat16."""
    choice = resolve_precision("auto", device=device)
    if choice.reduced:
        return choice.dtype
    return "float16" if torch.device(device).type == "cuda" else "bfloat16"


def _labels(
    network: nn.Module, image: torch.Tensor, settings: TilingSettings, device: torch.device
) -> np.ndarray:
    result = infer(network, image, settings, output="labels", device=device)
    assert result.labels is not None
    return result.labels.numpy()


def check_precision(
    network: nn.Module,
    volumes: Sequence[Mapping[str, Any]],
    pipeline: PipelineConfig,
    *,
    labels: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: str | None = None,
) -> PrecisionCheck:
    """Predict the volumes in float32 and in ``dtype``; measure agreement and Dice changes.

    Args:
        network: The trained network (eval mode, on ``device``).
        volumes: Preprocessed samples: ``image`` ``(C, *spatial)``, and ``label`` ``(1, *spatial)``
            (the reference; without it the float32 prediction is the reference).
        pipeline: The bundle's pipeline (window, overlap, blending, batch size).
        labels: The foreground labels.
        device: Where the network runs.
        dtype: The reduced type (default: :func:`reduced_type`).

    Returns:
        The check.

    Raises:
        InputError: If there are no volumes.
    """
    if not volumes:
        msg = "precision check needs validation cases, got none"
        raise InputError(msg)
    t0 = time.perf_counter()
    dev = torch.device(device)
    reduced = dtype or reduced_type(dev)
    base = TilingSettings.from_config(pipeline.inference, pipeline.window, memory="full")
    base = replace(base, memory_format="contiguous" if base.memory_format == "auto" else base.memory_format)
    network.eval()
    full, low, truths = [], [], []
    for item in volumes:
        image = item["image"]
        full.append(_labels(network, image, replace(base, precision="float32"), dev))
        low.append(_labels(network, image, replace(base, precision=reduced), dev))
        ref = item.get("label")
        truths.append(full[-1] if ref is None else np.asarray(ref)[0].astype(full[-1].dtype))
    d32 = {str(lab): pooled_dice(full, truths, lab) for lab in labels}
    dlow = {str(lab): pooled_dice(low, truths, lab) for lab in labels}
    change = {k: abs(dlow[k] - d32[k]) for k in d32}
    agreement = foreground_agreement(full, low)
    passed = agreement >= MIN_AGREEMENT and all(v <= MAX_DICE_CHANGE for v in change.values())
    return PrecisionCheck(
        dtype=reduced,
        cases=len(volumes),
        agreement=agreement,
        dice_float32=d32,
        dice_reduced=dlow,
        dice_change=change,
        passed=passed,
        seconds=time.perf_counter() - t0,
    )


def store_check(bundle_dir: str | Path, check: PrecisionCheck) -> Path:
    """Record the check in the bundle's ``bundle.json`` (``info.precision_check.<type>``), atomically.

    Returns:
        The manifest's path.

    Raises:
        InputError: If the folder holds no bundle.
    """
    path = Path(bundle_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"bundle must have a readable {MANIFEST}, got {path}: {exc}"
        raise InputError(msg) from None
    info = manifest.setdefault("info", {})
    checks = info.get("precision_check")
    checks = dict(checks) if isinstance(checks, dict) else {}
    checks[check.dtype] = check.as_dict()
    info["precision_check"] = checks
    atomic_write_text(path, json.dumps(manifest, indent=2))
    return path


def guard_bundle(
    bundle_dir: str | Path,
    volumes: Sequence[Mapping[str, Any]],
    *,
    device: torch.device | str = "cpu",
    dtype: str | None = None,
) -> PrecisionCheck:
    """Check a saved bundle on preprocessed validation volumes and store the result in it.

    Args:
        bundle_dir: The bundle folder.
        volumes: Preprocessed samples (``image``, ``label``) as its preprocessing makes them.
        device: Where the network runs.
        dtype: The reduced type (default: :func:`reduced_type`).

    Returns:
        The check (also in ``bundle.json``).
    """
    from medseg.bundle import load_bundle

    bundle = load_bundle(bundle_dir, device=device)
    labels = [v for v in bundle.spec.label_values if v != 0]
    check = check_precision(
        bundle.network, volumes, bundle.pipeline, labels=labels, device=device, dtype=dtype
    )
    store_check(bundle_dir, check)
    return check


def check_bundle_on_spec(
    bundle_dir: str | Path,
    spec_path: str | Path,
    *,
    device: torch.device | str = "cpu",
    max_cases: int | None = None,
    dtype: str | None = None,
) -> PrecisionCheck:
    """``medseg check-precision``: the labelled cases of a data spec, preprocessed as the bundle does.

    Args:
        bundle_dir: The bundle folder.
        spec_path: A data spec (YAML) or ``dataset.json`` whose cases have labels.
        device: Where the network runs.
        max_cases: Use at most this many cases (the first ones).
        dtype: The reduced type (default: :func:`reduced_type`).

    Returns:
        The check (also in ``bundle.json``).
    """
    from medseg.bundle import load_bundle
    from medseg.config.spec import load_spec
    from medseg.training.data import load_validation

    bundle = load_bundle(bundle_dir, device="cpu")
    cases = load_spec(spec_path).resolve_cases(require_labels=True)
    if max_cases is not None:
        cases = cases[:max_cases]
    volumes = load_validation(cases, bundle.spec)
    return guard_bundle(bundle_dir, volumes, device=device, dtype=dtype)
