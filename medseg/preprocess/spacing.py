"""Resampling to a target spacing, with nnU-Net's separate treatment of the slice axis.

:class:`ResampleToSpacingd` plans the steps per image with
:func:`~medseg.preprocess.geometry.plan_resampling` and runs each as a MONAI
:class:`~monai.transforms.Spacing` (which keeps the affine's direction, so oblique and flipped
volumes stay oblique and flipped). The steps it ran are recorded as one entry of the image's
``applied_operations``, so ``inverse`` (and MONAI's ``Invertd``) puts the data back on the grid
it came from: same spatial shape, same affine.

Grid convention (MONAI's): the output's first voxel centre sits on the input's first voxel centre
and the output spans the input's voxel centres, so a ``(0.7, 0.7, 5.0)`` volume with 8 slices
becomes ``(8 - 1) * 5 + 1 = 36`` slices at 1 mm, not nnU-Net's ``round(8 * 5) = 40``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform, MapTransform, Spacing, SpatialResample
from monai.utils import TraceKeys

from medseg.errors import InputError
from medseg.preprocess.geometry import plan_resampling, spacing_from_affine

#: Interpolation modes accepted for resampling: MONAI's names, or a spline order (0-5).
InterpMode = str | int

_NAMED_MODES = ("nearest", "bilinear")
_PADDING = "border"


def check_mode(mode: InterpMode, name: str = "mode") -> InterpMode:
    """Validate an interpolation mode.

    Args:
        mode: ``"nearest"``, ``"bilinear"`` (trilinear in 3D), or a spline order 0-5 (an ``int``,
            run by scipy, e.g. ``3`` for nnU-Net's cubic image resampling).
        name: The argument's name, for the error message.

    Returns:
        The mode, unchanged.

    Raises:
        ValueError: If the mode is none of these.

    Examples:
        >>> check_mode("bilinear")
        'bilinear'
        >>> check_mode(3)
        3
    """
    valid_int = isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 5
    if not (valid_int or mode in _NAMED_MODES):
        msg = f"{name} must be one of {_NAMED_MODES} or a spline order 0-5, got {mode!r}"
        raise ValueError(msg)
    return mode


def _as_volume(img: Any, key: Hashable) -> MetaTensor:
    if not isinstance(img, MetaTensor):
        msg = f"'{key}' must be a MetaTensor with an affine, got {type(img).__name__}"
        raise InputError(msg)
    if img.ndim != 4:
        msg = f"'{key}' must have shape (C, X, Y, Z), got {tuple(img.shape)}"
        raise InputError(msg)
    return img


class ResampleToSpacingd(MapTransform, InvertibleTransform):
    """Resample images and labels to a target spacing; invertible.

    Images use ``mode`` for the smooth steps; every key uses nearest neighbour on the slice-axis
    step of anisotropic data (nnU-Net's ``order_z = 0``). Give labels ``mode="nearest"``.

    Args:
        keys: Keys of the ``(C, X, Y, Z)`` MetaTensors to resample (all on one grid).
        pixdim: Target spacing in mm per voxel axis, after orientation (RAS: x, y, z).
        mode: Interpolation mode per key (or one for all): ``"bilinear"``, ``"nearest"`` or a
            spline order 0-5.
        anisotropy_threshold: ``max / min`` spacing ratio above which the slice axis is resampled
            separately with nearest neighbour.
        allow_missing_keys: Skip keys missing from the data instead of failing.

    Raises:
        ValueError: If ``pixdim`` is not three values > 0, a mode is unknown, or
            ``anisotropy_threshold`` is not > 0.

    Examples:
        >>> import torch
        >>> from monai.data import MetaTensor
        >>> img = MetaTensor(torch.ones(1, 10, 10, 4), affine=torch.diag(torch.tensor([0.5, 0.5, 4.0, 1.0])))
        >>> t = ResampleToSpacingd("image", pixdim=(1.0, 1.0, 2.0))
        >>> out = t({"image": img})["image"]
        >>> tuple(out.shape), tuple(float(v) for v in out.affine.diagonal()[:3])
        ((1, 6, 6, 7), (1.0, 1.0, 2.0))
        >>> tuple(t.inverse({"image": out})["image"].shape)
        (1, 10, 10, 4)
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float],
        mode: InterpMode | Sequence[InterpMode] = "bilinear",
        anisotropy_threshold: float = 3.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        target = tuple(float(p) for p in pixdim)
        if len(target) != 3 or not all(np.isfinite(p) and p > 0 for p in target):
            msg = f"pixdim must be three spacings > 0 (mm), got {tuple(pixdim)}"
            raise ValueError(msg)
        if not anisotropy_threshold > 0:
            msg = f"anisotropy_threshold must be > 0, got {anisotropy_threshold}"
            raise ValueError(msg)
        modes = (mode,) * len(self.keys) if isinstance(mode, (str, int)) else tuple(mode)
        if len(modes) != len(self.keys):
            msg = f"mode must give one mode per key ({len(self.keys)}), got {len(modes)}"
            raise ValueError(msg)
        self.pixdim = target
        self.modes = tuple(check_mode(m) for m in modes)
        self.anisotropy_threshold = float(anisotropy_threshold)
        self._resampler = SpatialResample()

    def resample(self, img: MetaTensor, mode: InterpMode) -> MetaTensor:
        """Resample one volume (the array-level step behind ``__call__``).

        Args:
            img: A ``(C, X, Y, Z)`` MetaTensor.
            mode: Interpolation mode for the smooth steps.

        Returns:
            The resampled volume (``float32`` if any step ran; unchanged if the spacing already
            matches), with one entry pushed on ``applied_operations`` that holds the steps run.
        """
        source = spacing_from_affine(img.affine.detach().cpu().numpy())
        steps = plan_resampling(source, self.pixdim, self.anisotropy_threshold)
        orig_size = tuple(int(s) for s in img.shape[1:])
        records: list[dict[str, Any]] = []
        out = img
        for step in steps:
            resample = Spacing(
                pixdim=step.pixdim,
                mode=mode if step.smooth else "nearest",
                padding_mode=_PADDING,
                dtype=np.float64,
            )
            n_ops = len(out.applied_operations)
            out = resample(out)  # type: ignore[assignment]  # a MetaTensor stays one while meta is tracked
            if isinstance(out, MetaTensor) and len(out.applied_operations) > n_ops:
                record = dict(out.applied_operations.pop())
                # Spacing instances are per call; let any resampler invert the entry.
                record[TraceKeys.ID] = TraceKeys.NONE
                records.append(record)
        if isinstance(out, MetaTensor) and get_track_meta():
            info = {
                "source_spacing": source,
                "steps": records,
                "smooth": [s.smooth for s in steps],
            }
            self.push_transform(out, orig_size=orig_size, extra_info=info)
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resample every key.

        Args:
            data: Mapping holding ``(C, X, Y, Z)`` MetaTensors at ``keys``.

        Returns:
            A new dict with the keys resampled.

        Raises:
            InputError: If a key does not hold a 4D MetaTensor.
        """
        d = dict(data)
        for key, mode in self.key_iterator(d, self.modes):
            d[key] = self.resample(_as_volume(d[key], key), mode)
        return d

    def invert(self, img: MetaTensor) -> MetaTensor:
        """Undo :meth:`resample` on one volume, using the entry it recorded.

        The interpolation modes recorded with the entry are used; edit them before calling to
        invert differently (see :func:`medseg.preprocess.pipeline.invert_to_source`).

        Args:
            img: The resampled volume (or a prediction carrying its ``applied_operations``).

        Returns:
            The volume on the grid it had before :meth:`resample`.
        """
        transform = self.pop_transform(img)
        records = transform[TraceKeys.EXTRA_INFO]["steps"]
        out = img
        for record in reversed(records):
            out.applied_operations.append(dict(record))
            out = self._resampler.inverse(out)  # type: ignore[assignment]  # keeps the MetaTensor
        return out

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the resampling on every key present.

        Args:
            data: Mapping holding the resampled MetaTensors.

        Returns:
            A new dict with the keys back on their source grids.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.invert(d[key])
        return d

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(keys={self.keys}, pixdim={self.pixdim}, modes={self.modes}, "
            f"anisotropy_threshold={self.anisotropy_threshold})"
        )
