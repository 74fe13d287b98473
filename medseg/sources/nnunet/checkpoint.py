"""nnU-Net checkpoints, read without running any of their code.

A trained nnU-Net checkpoint is a pickle: network weights, optimizer state, the training log (numpy
scalars), the best EMA Dice (a numpy scalar), the trainer's init arguments and its class name. It is
read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only, plus a
named allow-list: numpy's scalar reconstructor and dtypes under their numpy-1 and numpy-2 module
names. Anything else in the pickle is refused. The trainer named in it must be one whose network is
the plans' own (nnU-Net's stock trainers that change training only), since a custom trainer may
build another network than ``plans.json`` describes.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.io.hashing import file_sha256

_EPOCHS = (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)
KNOWN_TRAINERS: frozenset[str] = frozenset(
    {
        "nnUNetTrainer",
        "nnUNetTrainerNoDeepSupervision",
        "nnUNetTrainerNoMirroring",
        "nnUNetTrainer_onlyMirror01",
        "nnUNetTrainer_onlyMirror01_1500ep",
        "nnUNetTrainer_onlyMirror01_DASegOrd0",
        "nnUNetTrainerDA5",
        "nnUNetTrainerDA5ord0",
        "nnUNetTrainerDA5Segord0",
        "nnUNetTrainerDA5_10epochs",
        "nnUNetTrainerNoDA",
        "nnUNetTrainer_DASegOrd0",
        "nnUNetTrainer_DASegOrd0_NoMirroring",
        "nnUNetTrainer_noDummy2DDA",
        "nnUNetTrainerDiceLoss",
        "nnUNetTrainerDiceCELoss_noSmooth",
        "nnUNetTrainerTopk10Loss",
        "nnUNetTrainerTopk10LossLS01",
        "nnUNetTrainerDiceTopK10Loss",
        "nnUNetTrainerCELoss",
        "nnUNetTrainerCELoss_5epochs",
        "nnUNetTrainer_warmup",
        "nnUNetTrainerCosAnneal",
        "nnUNetTrainerAdam",
        "nnUNetTrainerVanillaAdam",
        "nnUNetTrainerVanillaAdam1en3",
        "nnUNetTrainerVanillaAdam3en4",
        "nnUNetTrainerAdam1en3",
        "nnUNetTrainerAdam3en4",
        "nnUNetTrainer_probabilisticOversampling",
        "nnUNetTrainer_probabilisticOversampling_033",
        "nnUNetTrainer_probabilisticOversampling_010",
        *(f"nnUNetTrainer_{n}epoch{'s' if n > 1 else ''}" for n in _EPOCHS),
        *(f"nnUNetTrainer_{n}epochs_NoMirroring" for n in (250, 2000, 4000, 8000)),
    }
)
"""Trainers that build the plans' network unchanged (custom ``build_network_architecture`` refused)."""


def _numpy_globals() -> list[Any]:
    """numpy's scalar reconstructor and dtype classes, under numpy-1 and numpy-2 module names."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((scalar, f"{module}.scalar"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


@dataclass(frozen=True)
class Checkpoint:
    """The parts of an nnU-Net checkpoint inference uses.

    Attributes:
        path: The ``checkpoint_*.pth`` file.
        sha256: Its bytes' SHA-256.
        trainer_name: The trainer class that wrote it.
        configuration: The configuration it was trained with.
        mirror_axes: ``inference_allowed_mirroring_axes`` (network axes), or ``None``.
        weights: The network's state dict.
    """

    path: Path
    sha256: str
    trainer_name: str
    configuration: str
    mirror_axes: tuple[int, ...] | None
    weights: Mapping[str, Any]


def load_checkpoint(path: Path, *, extra_trainers: frozenset[str] = frozenset()) -> Checkpoint:
    """Read a checkpoint with the weights-only unpickler and the numpy allow-list.

    Args:
        path: ``fold_K/checkpoint_final.pth`` or ``checkpoint_best.pth``.
        extra_trainers: More trainer names accepted as building the plans' network.

    Returns:
        The :class:`Checkpoint`.

    Raises:
        ConfigError: Missing or unreadable file, an object outside the allow-list, or an unknown
            trainer.
    """
    import torch

    if not path.is_file():
        msg = f"{path} must exist (a trained fold's checkpoint), got a missing file"
        raise ConfigError(msg)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"{path} must be an nnU-Net checkpoint of tensors and plain values, got: {first}"
        raise ConfigError(msg) from exc
    if not isinstance(data, Mapping) or "network_weights" not in data:
        msg = f"{path} must hold 'network_weights' (an nnU-Net checkpoint), got {type(data).__name__}"
        raise ConfigError(msg)
    trainer = str(data.get("trainer_name", ""))
    if trainer not in KNOWN_TRAINERS | extra_trainers:
        msg = (
            f"{path}: trainer must be one whose network is the plans' own (nnU-Net's stock trainers), "
            f"got '{trainer}'; accept it with the option trainers={trainer}"
        )
        raise ConfigError(msg)
    init = data.get("init_args") or {}
    axes = data.get("inference_allowed_mirroring_axes")
    return Checkpoint(
        path=path,
        sha256=file_sha256(path),
        trainer_name=trainer,
        configuration=str(init.get("configuration", "")),
        mirror_axes=tuple(int(a) for a in axes) if axes is not None else None,
        weights=data["network_weights"],
    )
