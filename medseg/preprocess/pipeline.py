"""The preprocessing chain built from a data spec, and the way back to the source grid.

:func:`build_preprocess` returns a MONAI ``Compose`` of three invertible stages:

1. ``Orientationd`` to RAS (flips and axis permutations only; oblique affines stay oblique);
2. :class:`~medseg.preprocess.spacing.ResampleToSpacingd` to ``spec.target_spacing`` (left out
   when the spec gives none), with nnU-Net's nearest-neighbour slice axis for anisotropic data;
3. :class:`~medseg.preprocess.intensity.NormalizeChannelsd` with each channel's settings.

Every stage records itself in the image's ``applied_operations``. ``transform.inverse(data)``
(or MONAI's ``Invertd``) undoes all three; :func:`invert_to_source` takes a model's prediction on
the preprocessed grid back to the source grid, undoing only the spatial stages.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, InvertibleTransform, MapTransform, Orientationd
from monai.transforms.utils import allow_missing_keys_mode

from medseg.config.spec import DatasetSpec
from medseg.errors import GeometryError, InputError, MedsegError
from medseg.preprocess.intensity import NormalizeChannelsd
from medseg.preprocess.spacing import InterpMode, ResampleToSpacingd, check_mode

#: The canonical frame images are reoriented to.
CANONICAL_AXCODES = "RAS"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _medseg_cause(exc: BaseException) -> MedsegError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MedsegError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


class PreprocessCompose(Compose):
    """A MONAI ``Compose`` that lets medseg's own errors through.

    MONAI wraps every exception raised inside a transform in ``RuntimeError("applying transform
    ...")``; this subclass re-raises the :class:`~medseg.errors.MedsegError` underneath instead,
    so callers (and the CLI) see ``InputError`` and friends. Other exceptions stay wrapped.
    """

    def __call__(
        self,
        input_: Any,
        start: int = 0,
        end: int | None = None,
        threading: bool = False,
        lazy: bool | None = None,
    ) -> Any:
        """Apply the transforms (see ``monai.transforms.Compose.__call__``).

        Args:
            input_: The sample dict.
            start: Index of the first transform to apply.
            end: Index after the last transform to apply (``None``: to the end).
            threading: Whether to run as in MONAI's threaded data loading.
            lazy: MONAI's lazy-resampling override.

        Returns:
            The transformed sample.

        Raises:
            MedsegError: The medseg error a transform raised (e.g. ``InputError``).
        """
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as exc:
            cause = _medseg_cause(exc)
            if cause is None:
                raise
            raise cause from None

    def inverse(self, data: Any) -> Any:
        """Undo the transforms in reverse order (see ``monai.transforms.Compose.inverse``).

        Args:
            data: A sample this Compose produced.

        Returns:
            The sample back on its source grid and intensity scale (up to clipping).

        Raises:
            MedsegError: The medseg error a transform raised.
        """
        try:
            return super().inverse(data)
        except RuntimeError as exc:
            cause = _medseg_cause(exc)
            if cause is None:
                raise
            raise cause from None


def build_preprocess(
    spec: DatasetSpec,
    keys: Sequence[str] = ("image",),
    label_key: str | None = "label",
    image_mode: InterpMode = "bilinear",
) -> Compose:
    """Build the preprocessing transforms a data spec asks for.

    Args:
        spec: The data set's spec (channels' intensity settings, ``target_spacing`` in RAS axis
            order x, y, z, ``anisotropy_threshold``).
        keys: Keys of the ``(C, X, Y, Z)`` images, each with one channel per ``spec.channels``.
        label_key: Key of the label map (oriented and resampled with nearest neighbour, never
            normalised), or ``None`` for data without labels (inference). When given, it must
            be present in every sample.
        image_mode: Interpolation for images: ``"bilinear"`` or a spline order 1-5 (``3`` is
            nnU-Net's choice; slower, run by scipy).

    Returns:
        A :class:`PreprocessCompose` (a MONAI ``Compose`` that re-raises medseg errors unwrapped)
        of dictionary transforms; each sample must hold MetaTensors at the keys.

    Raises:
        ValueError: If ``keys`` is empty, holds ``label_key``, or ``image_mode`` is unknown.

    Examples:
        >>> spec = DatasetSpec.model_validate({
        ...     "name": "demo", "channels": [{"name": "ct", "modality": "CT"}],
        ...     "labels": {"background": 0, "liver": 1}, "cases": [{"id": "c1", "images": ["c1.nii.gz"]}],
        ...     "target_spacing": [1.0, 1.0, 2.0],
        ... })
        >>> [type(t).__name__ for t in build_preprocess(spec).transforms]
        ['Orientationd', 'ResampleToSpacingd', 'NormalizeChannelsd']
    """
    image_keys = tuple(keys)
    if not image_keys:
        msg = "keys must name at least one image key, got none"
        raise ValueError(msg)
    if label_key is not None and label_key in image_keys:
        msg = f"label_key must differ from the image keys {image_keys}, got '{label_key}'"
        raise ValueError(msg)
    if check_mode(image_mode, "image_mode") in ("nearest", 0):
        msg = f"image_mode must be 'bilinear' or a spline order 1-5, got {image_mode!r}"
        raise ValueError(msg)
    spatial_keys = (*image_keys, label_key) if label_key is not None else image_keys
    stages: list[MapTransform] = [
        Orientationd(spatial_keys, axcodes=CANONICAL_AXCODES, labels=_RAS_LABELS),
    ]
    if spec.target_spacing is not None:
        modes = [image_mode] * len(image_keys) + (["nearest"] if label_key is not None else [])
        stages.append(
            ResampleToSpacingd(
                spatial_keys,
                pixdim=spec.target_spacing,
                mode=modes,
                anisotropy_threshold=spec.anisotropy_threshold,
            )
        )
    stages.append(NormalizeChannelsd(image_keys, [c.effective_intensity() for c in spec.channels]))
    return PreprocessCompose(stages)


def _override_modes(ops: Any, mode: Literal["bilinear", "nearest"]) -> Any:
    """Copy of an applied-operations stack with its interpolation modes changed.

    ``"nearest"`` turns every mode to nearest; ``"bilinear"`` turns every smooth mode (a name
    other than nearest, or a spline order >= 1) to bilinear and keeps nearest steps nearest (the
    slice axis of anisotropic data, as nnU-Net resamples probabilities with ``order_z = 0``).
    """
    if isinstance(ops, list | tuple):
        return [_override_modes(op, mode) for op in ops]
    if not isinstance(ops, Mapping):
        return ops
    out = {k: _override_modes(v, mode) for k, v in ops.items()}
    current = out.get("mode")
    if isinstance(current, str | int) and not isinstance(current, bool):
        is_nearest = current in ("nearest", 0)
        out["mode"] = "nearest" if mode == "nearest" or is_nearest else "bilinear"
    return out


def _reference(preprocessed: MetaTensor | Mapping[Hashable, Any], key: str) -> MetaTensor:
    ref = preprocessed
    if isinstance(preprocessed, Mapping):
        if key not in preprocessed:
            msg = f"preprocessed must hold the key '{key}', got keys {sorted(map(str, preprocessed))}"
            raise InputError(msg)
        ref = preprocessed[key]
    if not isinstance(ref, MetaTensor):
        msg = f"preprocessed image must be a MetaTensor with applied_operations, got {type(ref).__name__}"
        raise InputError(msg)
    return ref


def _invertible_stages(transform: Compose, key: str) -> list[InvertibleTransform]:
    stages = []
    for t in transform.flatten().transforms:
        if not isinstance(t, InvertibleTransform):
            continue
        if isinstance(t, MapTransform) and key not in t.keys:
            continue
        stages.append(t)
    return stages


def invert_to_source(
    pred: torch.Tensor,
    preprocessed: MetaTensor | Mapping[Hashable, Any],
    transform: Compose,
    mode: Literal["bilinear", "nearest"] = "bilinear",
    key: str = "image",
) -> MetaTensor:
    """Take a prediction on the preprocessed grid back to the source image's grid.

    The prediction gets a copy of the preprocessed image's ``applied_operations`` (and meta);
    the spatial stages of ``transform`` are then undone in reverse order with MONAI's inverse
    machinery, while intensity stages are only popped (a prediction has no intensities to undo).

    Args:
        pred: ``(C, X, Y, Z)`` probabilities, logits or labels on the preprocessed image's grid.
        preprocessed: The preprocessed image, or the sample dict holding it at ``key``.
        transform: The ``Compose`` that produced it (the same object: entries are matched by
            transform instance).
        mode: ``"bilinear"`` for probabilities (smooth steps linear, slice-axis steps of
            anisotropic data nearest, as nnU-Net does); ``"nearest"`` for label maps (exact
            label values).
        key: The image key in ``transform`` whose operations are inverted.

    Returns:
        The prediction on the source grid: same spatial shape and affine as the image before
        preprocessing. ``float32``, except that integer labels inverted with ``"nearest"``
        keep their dtype.

    Raises:
        InputError: If ``preprocessed`` is not (or does not hold) a MetaTensor, or does not
            carry ``transform``'s operations.
        GeometryError: If ``pred``'s spatial shape differs from the preprocessed image's.
        ValueError: If ``mode`` is unknown.
    """
    if mode not in ("bilinear", "nearest"):
        msg = f"mode must be 'bilinear' or 'nearest', got {mode!r}"
        raise ValueError(msg)
    ref = _reference(preprocessed, key)
    if pred.ndim != ref.ndim or tuple(pred.shape[1:]) != tuple(ref.shape[1:]):
        msg = (
            f"pred must be (C, *spatial) with the preprocessed image's spatial shape {tuple(ref.shape[1:])}, "
            f"got {tuple(pred.shape)}"
        )
        raise GeometryError(msg)
    in_dtype = pred.dtype
    data = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
    out = MetaTensor(data.detach(), meta=copy.deepcopy(dict(ref.meta)))
    out.affine = ref.affine.clone()
    out.applied_operations = _override_modes(copy.deepcopy(ref.applied_operations), mode)
    sample: dict[Hashable, Any] = {key: out}
    try:
        for stage in reversed(_invertible_stages(transform, key)):
            if isinstance(stage, NormalizeChannelsd):
                stage.pop_transform(sample[key])
                continue
            if isinstance(stage, MapTransform):
                with allow_missing_keys_mode(stage):
                    sample = dict(stage.inverse(sample))
            else:
                sample[key] = stage.inverse(sample[key])
    except (IndexError, KeyError, RuntimeError) as exc:
        msg = (
            f"preprocessed '{key}' must carry the applied operations of the given transform "
            f"(was it produced by this Compose?), got: {exc}"
        )
        raise InputError(msg) from exc
    result = sample[key]
    if mode == "nearest" and not in_dtype.is_floating_point and result.dtype != in_dtype:
        result = result.round().to(in_dtype)
    return result
