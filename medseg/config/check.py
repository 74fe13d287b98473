"""Check a data spec against its files: co-registered channels and label values that match."""

from __future__ import annotations

import numpy as np

from medseg.config.spec import LoadedSpec
from medseg.errors import ConfigError, MedsegError


def check_spec_data(loaded: LoadedSpec, max_cases: int | None = None) -> int:
    """Load every case of a spec and check it against the spec.

    Checks: each case has one image per channel (or one 4D image with that many channels), the
    channels and the label map share one voxel grid, and the label map holds only declared values.

    Args:
        loaded: The spec with its data root.
        max_cases: Check at most this many cases (``None``: all).

    Returns:
        The number of cases checked.

    Raises:
        ConfigError: Naming the spec file, the case, the file and what was expected.
    """
    from medseg.io.load import load_case, load_image, same_grid

    spec = loaded.spec
    src = loaded.source or "<spec>"
    declared = set(spec.label_values)
    cases = loaded.resolve_cases()
    if max_cases is not None:
        cases = cases[:max_cases]
    for case in cases:
        try:
            image = load_case(list(case.images))
        except MedsegError as exc:
            msg = f"{src}: case '{case.id}' must have co-registered, readable images: {exc}"
            raise ConfigError(msg) from exc
        if image.shape[0] != len(spec.channels):
            msg = (
                f"{src}: case '{case.id}' must have {len(spec.channels)} channel(s) as declared, "
                f"got {image.shape[0]} in {case.images[0]}"
            )
            raise ConfigError(msg)
        if case.label is None:
            continue
        label = load_image(case.label)
        if not same_grid(image, label):
            msg = (
                f"{src}: label map of case '{case.id}' must share the image's voxel grid "
                f"{tuple(image.shape[1:])}, got {tuple(label.shape[1:])} (or another affine) in {case.label}"
            )
            raise ConfigError(msg)
        values = np.unique(label.numpy())
        if not np.allclose(values, np.round(values)):
            msg = f"{src}: label map {case.label} must hold integer values, got {values[:5]}"
            raise ConfigError(msg)
        extra = sorted({int(v) for v in values} - declared)
        if extra:
            msg = (
                f"{src}: field 'labels' must declare every value found in the label maps {sorted(declared)}, "
                f"got undeclared {extra} in {case.label}"
            )
            raise ConfigError(msg)
    return len(cases)
