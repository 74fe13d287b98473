"""Pure geometry helpers for resampling: voxel spacing, anisotropy, and the resampling plan.

Everything here works on plain numbers (spacings in mm, per voxel axis) so that the rules can be
read and tested without images. The transforms in :mod:`medseg.preprocess.spacing` apply them.

The anisotropy rule is nnU-Net's: a volume is *anisotropic* when its largest spacing exceeds
``threshold`` times its smallest one; its *slice axis* is then the single axis with the largest
spacing. Such volumes are resampled in two steps: in-plane with a smooth interpolator, then along
the slice axis with nearest neighbour (order 0), so that slices are never blended.

Examples:
    >>> is_anisotropic((0.7, 0.7, 5.0), threshold=3.0)
    True
    >>> slice_axis((0.7, 0.7, 5.0))
    2
    >>> [step.pixdim for step in plan_resampling((0.7, 0.7, 5.0), (1.0, 1.0, 1.0))]
    [(1.0, 1.0, 5.0), (1.0, 1.0, 1.0)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medseg.geometry import spacing_from_affine as spacing_from_affine  # re-exported

#: Relative tolerance under which two spacings count as equal.
SPACING_RTOL = 1e-5


def _check_spacing(spacing: Sequence[float], name: str = "spacing") -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if not values or not all(math.isfinite(s) and s > 0 for s in values):
        msg = f"{name} must be one or more finite values > 0, got {tuple(spacing)}"
        raise ValueError(msg)
    return values


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=SPACING_RTOL, abs_tol=0.0)


def is_anisotropic(spacing: Sequence[float], threshold: float = 3.0) -> bool:
    """Whether a spacing is strongly anisotropic (nnU-Net rule: ``max / min > threshold``).

    Args:
        spacing: Voxel spacing per axis, in mm.
        threshold: The ratio above which the spacing counts as anisotropic.

    Returns:
        ``True`` if the largest spacing exceeds ``threshold`` times the smallest.

    Raises:
        ValueError: If a spacing is not > 0 or ``threshold`` is not > 0.

    Examples:
        >>> is_anisotropic((1.0, 1.0, 3.0), threshold=3.0)
        False
        >>> is_anisotropic((0.8, 0.8, 4.0))
        True
    """
    values = _check_spacing(spacing)
    if not threshold > 0:
        msg = f"threshold must be > 0, got {threshold}"
        raise ValueError(msg)
    return max(values) / min(values) > threshold


def slice_axis(spacing: Sequence[float]) -> int | None:
    """The slice (coarsest) axis: the single axis with the largest spacing.

    As in nnU-Net, there is no slice axis when the largest spacing is shared by two or more axes
    (e.g. ``(0.25, 1.25, 1.25)``), since then no single axis is the out-of-plane one.

    Args:
        spacing: Voxel spacing per axis, in mm.

    Returns:
        The axis index, or ``None`` if the largest spacing is not unique.

    Raises:
        ValueError: If a spacing is not > 0.

    Examples:
        >>> slice_axis((0.7, 5.0, 0.7))
        1
        >>> slice_axis((0.25, 1.25, 1.25)) is None
        True
        >>> slice_axis((1.0, 1.0, 1.0)) is None
        True
    """
    values = _check_spacing(spacing)
    largest = max(values)
    axes = [i for i, s in enumerate(values) if _close(s, largest)]
    return axes[0] if len(axes) == 1 else None


@dataclass(frozen=True)
class ResampleStep:
    """One resampling step: the spacing to reach and whether to interpolate smoothly.

    Attributes:
        pixdim: The spacing after the step, per voxel axis, in mm.
        smooth: ``True`` for the image's smooth interpolator (labels always use nearest);
            ``False`` for nearest neighbour on every key (the slice-axis step).
    """

    pixdim: tuple[float, ...]
    smooth: bool


def separate_slice_axis(
    source: Sequence[float], target: Sequence[float], threshold: float = 3.0
) -> int | None:
    """The axis to resample separately with nearest neighbour, following nnU-Net.

    The source spacing decides first: if it is anisotropic, its slice axis is used. Otherwise an
    anisotropic target spacing decides. When the coarse axis is not unique, nothing is separated.

    Args:
        source: Current spacing per axis, in mm.
        target: Spacing to resample to, per axis, in mm.
        threshold: Anisotropy threshold (``max / min`` spacing ratio).

    Returns:
        The axis to treat separately, or ``None`` for a single smooth resampling.

    Raises:
        ValueError: If the spacings differ in length or are not > 0.

    Examples:
        >>> separate_slice_axis((0.7, 0.7, 5.0), (1.0, 1.0, 1.0))
        2
        >>> separate_slice_axis((1.0, 1.0, 1.0), (1.0, 4.0, 1.0))
        1
        >>> separate_slice_axis((1.0, 1.0, 2.0), (1.0, 1.0, 1.0)) is None
        True
    """
    src = _check_spacing(source, "source spacing")
    tgt = _check_spacing(target, "target spacing")
    if len(src) != len(tgt):
        msg = f"target spacing must have {len(src)} values, one per axis, got {tgt}"
        raise ValueError(msg)
    if is_anisotropic(src, threshold):
        return slice_axis(src)
    if is_anisotropic(tgt, threshold):
        return slice_axis(tgt)
    return None


def plan_resampling(
    source: Sequence[float], target: Sequence[float], threshold: float = 3.0
) -> tuple[ResampleStep, ...]:
    """The resampling steps that take ``source`` spacing to ``target`` spacing.

    Isotropic-enough data gets one smooth step. Anisotropic data (see :func:`separate_slice_axis`)
    gets a smooth in-plane step that keeps the slice axis's spacing, then a nearest-neighbour step
    along the slice axis. Steps that would not change the spacing are left out, so a spacing that
    already matches gives no step at all.

    Args:
        source: Current spacing per axis, in mm.
        target: Spacing to resample to, per axis, in mm.
        threshold: Anisotropy threshold (``max / min`` spacing ratio).

    Returns:
        The steps, in order (zero, one or two).

    Raises:
        ValueError: If the spacings differ in length or are not > 0.

    Examples:
        >>> plan_resampling((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
        ()
        >>> plan_resampling((0.9, 0.9, 2.0), (1.0, 1.0, 1.0))
        (ResampleStep(pixdim=(1.0, 1.0, 1.0), smooth=True),)
        >>> plan_resampling((1.0, 1.0, 5.0), (1.0, 1.0, 2.5))
        (ResampleStep(pixdim=(1.0, 1.0, 2.5), smooth=False),)
    """
    src = _check_spacing(source, "source spacing")
    tgt = _check_spacing(target, "target spacing")
    axis = separate_slice_axis(src, tgt, threshold)
    if axis is None:
        same = all(_close(s, t) for s, t in zip(src, tgt, strict=True))
        return () if same else (ResampleStep(pixdim=tgt, smooth=True),)
    in_plane = tuple(src[i] if i == axis else t for i, t in enumerate(tgt))
    steps = []
    if not all(_close(s, t) for s, t in zip(src, in_plane, strict=True)):
        steps.append(ResampleStep(pixdim=in_plane, smooth=True))
    if not _close(src[axis], tgt[axis]):
        steps.append(ResampleStep(pixdim=tgt, smooth=False))
    return tuple(steps)
