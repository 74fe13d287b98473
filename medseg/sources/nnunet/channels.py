"""nnU-Net's channel files: ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... are one case's channels.

Examples:
    >>> split_channel_name("case_7_0001.nii.gz", ".nii.gz")
    ('case_7', 1)
    >>> split_channel_name("case_7.nii.gz", ".nii.gz") is None
    True
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import InputError

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def split_channel_name(name: str, file_ending: str) -> tuple[str, int] | None:
    """``(case id, channel)`` of an nnU-Net file name, or ``None`` without a ``_XXXX`` suffix."""
    if not name.endswith(file_ending):
        return None
    match = _CHANNEL.match(name[: -len(file_ending)])
    return (match.group("case"), int(match.group("channel"))) if match else None


def channel_files(path: str | Path, *, n_channels: int, file_ending: str = ".nii.gz") -> list[Path]:
    """The channel files of the case that ``path`` (any of its ``_XXXX`` files) belongs to.

    Args:
        path: One channel file of the case (or, for one channel, a file without suffix).
        n_channels: Channels the model takes.
        file_ending: The data set's file ending.

    Returns:
        ``n_channels`` files in channel order.

    Raises:
        InputError: A missing channel file.
    """
    path = Path(path)
    parsed = split_channel_name(path.name, file_ending)
    if parsed is None:
        if n_channels == 1:
            return [path]
        msg = f"{path}: a {n_channels}-channel model needs files CASE_0000{file_ending}, ..., got {path.name}"
        raise InputError(msg)
    case, _ = parsed
    files = [path.with_name(f"{case}_{c:04d}{file_ending}") for c in range(n_channels)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        msg = f"{path}: case '{case}' must have {n_channels} channel file(s), got missing {missing}"
        raise InputError(msg)
    return files


def load_channels(files: Sequence[str | Path]) -> Any:
    """Load one case's channel files and stack them into ``(C, X, Y, Z)`` (one voxel grid).

    Raises:
        InputError: Files on different grids, or what :func:`medseg.io.load_image` refuses.
    """
    import torch
    from monai.data import MetaTensor

    from medseg.io import load_image
    from medseg.io.load import same_grid

    images = [load_image(f) for f in files]
    for f, image in zip(files[1:], images[1:]):
        if not same_grid(images[0], image):
            msg = f"{f}: channels of a case must share one voxel grid, got another than {files[0]}"
            raise InputError(msg)
    data = torch.cat([torch.as_tensor(im.as_tensor(), dtype=torch.float32) for im in images])
    return MetaTensor(data, meta=dict(images[0].meta))
