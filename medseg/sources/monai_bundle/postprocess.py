"""The bundle's postprocessing, step by step, ending in labels on the scan's own grid.

MONAI's evaluator hands the postprocessing ``{"image": preprocessed image, "pred": blended network
output}``; a Zoo bundle then typically runs ``Activationsd`` (softmax), ``Invertd`` (back through
the preprocessing to the source grid), ``AsDiscreted`` (argmax) and ``SaveImaged``. medseg runs the
same transforms in the same order (without the writer) and watches two moments:

* just before the argmax (``AsDiscreted(argmax=True)`` on ``pred``): the class probabilities, kept
  when asked for (softmax applied if the bundle had not, and taken to the source grid with MONAI's
  ``Invertd`` if the bundle inverts only later, on labels);
* the end: the labels, taken to the source grid with ``Invertd`` (nearest) if the bundle had no
  ``Invertd`` of its own.

Examples:
    >>> from monai.transforms import Activationsd, AsDiscreted, Compose
    >>> steps = Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys="pred", argmax=True)])
    >>> describe_steps(steps)
    'Activationsd > AsDiscreted(argmax)'
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import MetaTensor

from medseg.errors import ConfigError

IMAGE, PRED = "image", "pred"


@dataclass(frozen=True)
class PostResult:
    """What the postprocessing made.

    Attributes:
        labels: ``(X, Y, Z)`` integer labels on the source grid.
        probabilities: ``(K, X, Y, Z)`` class probabilities on the source grid, if asked for.
    """

    labels: torch.Tensor
    probabilities: torch.Tensor | None


def _keys(transform: Any) -> tuple[str, ...]:
    return tuple(str(k) for k in getattr(transform, "keys", ()) or ())


def is_argmax(transform: Any) -> bool:
    """Whether a transform is ``AsDiscreted(argmax=True)`` on ``pred``."""
    from monai.transforms import AsDiscreted

    if not isinstance(transform, AsDiscreted) or PRED not in _keys(transform):
        return False
    return bool(transform.argmax[_keys(transform).index(PRED)])


def _is_invert(transform: Any) -> bool:
    from monai.transforms import Invertd

    return isinstance(transform, Invertd) and PRED in _keys(transform)


def _is_softmax(transform: Any) -> bool:
    from monai.transforms import Activationsd

    return isinstance(transform, Activationsd) and bool(transform.softmax[_keys(transform).index(PRED)])


def describe_steps(postprocessing: Any) -> str:
    """The postprocessing as ``A > B(argmax) > C`` (for tracking)."""
    names = [type(t).__name__ + ("(argmax)" if is_argmax(t) else "") for t in postprocessing.transforms]
    return " > ".join(names) or "(none)"


def check_postprocessing(postprocessing: Any, *, source: str) -> None:
    """Refuse postprocessing that does not end in one label map.

    Raises:
        ConfigError: No ``AsDiscreted(argmax=True)`` on ``pred`` (sigmoid/threshold multi-label
            outputs are not label maps).
    """
    if not any(is_argmax(t) for t in postprocessing.transforms):
        msg = (
            f"{source}: postprocessing must turn pred into labels with AsDiscreted(argmax=True), "
            f"got {describe_steps(postprocessing)}"
        )
        raise ConfigError(msg)


def _invert(preprocessing: Any, data: Mapping[Hashable, Any], *, nearest: bool) -> torch.Tensor:
    from monai.transforms import Invertd

    inverted = Invertd(keys=PRED, transform=preprocessing, orig_keys=IMAGE, nearest_interp=nearest)(
        dict(data)
    )
    out: torch.Tensor = inverted[PRED]
    return out


def run_postprocessing(
    postprocessing: Any, preprocessing: Any, data: Mapping[Hashable, Any], *, want_probabilities: bool
) -> PostResult:
    """Run the bundle's postprocessing on ``{"image": ..., "pred": ...}``.

    Args:
        postprocessing: The bundle's ``Compose`` (without writers).
        preprocessing: The ``Compose`` that made ``data["image"]`` (for the way back).
        data: The preprocessed image and the blended network output, both on the preprocessed grid.
        want_probabilities: Keep the class probabilities on the source grid (they are also kept
            when the bundle inverts them before the argmax, where they cost nothing).

    Returns:
        The :class:`PostResult`.

    Raises:
        ConfigError: The postprocessing left something other than one channel of labels.
    """
    from monai.transforms import apply_transform

    inverted = False
    probs: torch.Tensor | None = None
    for transform in postprocessing.transforms:
        # probabilities: when asked for, or free (already on the source grid, for the entropy)
        if is_argmax(transform) and probs is None and (want_probabilities or inverted):
            probs = data[PRED]
            if not any(_is_softmax(t) for t in _before(postprocessing, transform)):
                probs = torch.softmax(torch.as_tensor(probs).float(), dim=0)
                probs = (
                    MetaTensor(probs, meta=dict(data[PRED].meta))
                    if isinstance(data[PRED], MetaTensor)
                    else probs
                )
            if not inverted:
                probs = _invert(preprocessing, {**data, PRED: probs}, nearest=False)
        data = apply_transform(transform, data)  # type: ignore[assignment]
        inverted = inverted or _is_invert(transform)
    labels = data[PRED] if inverted else _invert(preprocessing, data, nearest=True)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 3:
        msg = f"postprocessing must leave one channel of labels, got pred of shape {tuple(labels.shape)}"
        raise ConfigError(msg)
    out_probs = None
    if probs is not None:
        out_probs = (probs.as_tensor() if isinstance(probs, MetaTensor) else torch.as_tensor(probs)).float()
    plain = labels.as_tensor() if isinstance(labels, MetaTensor) else torch.as_tensor(labels)
    return PostResult(labels=plain, probabilities=out_probs)


def _before(postprocessing: Any, transform: Any) -> list[Any]:
    steps = list(postprocessing.transforms)
    return steps[: next(i for i, t in enumerate(steps) if t is transform)]
