"""Find what an nnU-Net model folder (or its exported zip) holds, and what to load from it.

A trained model folder is ``<Trainer>__<Plans>__<configuration>/`` with ``plans.json``,
``dataset.json`` and ``fold_K/checkpoint_final.pth`` (``fold_all`` for a model trained on every
case). ``nnUNetv2_export_model_to_zip`` packs such folders under ``DatasetXXX_Name/``; a zip is
unpacked (safely: no absolute paths, no ``..``) into a cache folder next to nothing else.

Examples:
    >>> parse_folds("0, 2,all")
    ('0', '2', 'all')
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ConfigError

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


def parse_folds(value: str | Sequence[str | int] | None) -> tuple[str, ...] | None:
    """Folds from ``"0,1,2"`` or a list (``None``: every fold present)."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    folds = tuple(i.strip() for i in items if i.strip())
    for fold in folds:
        if not (fold.isdigit() or fold == "all"):
            msg = f"folds must be fold numbers or 'all', comma-separated, got '{fold}'"
            raise ConfigError(msg)
    return folds


@dataclass(frozen=True)
class ModelFolder:
    """A model folder and the checkpoints chosen from it.

    Attributes:
        path: The ``<Trainer>__<Plans>__<configuration>`` folder.
        folds: The folds used, in order.
        checkpoints: One checkpoint file per fold.
        configuration_hint: The configuration named by the folder, if its name has one.
    """

    path: Path
    folds: tuple[str, ...]
    checkpoints: tuple[Path, ...]
    configuration_hint: str | None

    @property
    def plans_file(self) -> Path:
        """``plans.json``."""
        return self.path / "plans.json"

    @property
    def dataset_file(self) -> Path:
        """``dataset.json``."""
        return self.path / "dataset.json"

    @property
    def postprocessing_file(self) -> Path:
        """``postprocessing.pkl`` (written by ``nnUNetv2_find_best_configuration``), maybe missing."""
        return self.path / "postprocessing.pkl"


def _unpack_zip(path: Path, configuration: str | None) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"medseg-nnunet-{digest}"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        for name in names:
            if name.startswith("/") or ".." in Path(name).parts:
                msg = f"{path} must hold relative paths only, got '{name}'"
                raise ConfigError(msg)
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(prefix="medseg-nnunet-", dir=target.parent))
            archive.extractall(tmp)
            tmp.rename(target)
    found = sorted({p.parent for p in target.rglob("plans.json")})
    if configuration is not None:
        found = [p for p in found if p.name.endswith(f"__{configuration}")]
    if len(found) != 1:
        names = [p.name for p in found]
        msg = f"{path} must hold one model folder (choose with the option configuration=NAME), got {names}"
        raise ConfigError(msg)
    return found[0]


def open_model_folder(
    location: str | Path,
    *,
    folds: tuple[str, ...] | None = None,
    checkpoint: str = "final",
    configuration: str | None = None,
) -> ModelFolder:
    """Resolve a model folder or zip and pick the checkpoints to load.

    Args:
        location: The folder, or a zip made by ``nnUNetv2_export_model_to_zip``.
        folds: Folds to use; ``None`` uses every fold that has the checkpoint.
        checkpoint: ``final`` or ``best``.
        configuration: In a zip with several configurations, which one.

    Returns:
        The :class:`ModelFolder`.

    Raises:
        ConfigError: No such folder, no ``plans.json``, a missing fold or checkpoint, a bad
            checkpoint name.
    """
    path = Path(location)
    if checkpoint not in CHECKPOINTS:
        msg = f"checkpoint must be one of {sorted(CHECKPOINTS)}, got '{checkpoint}'"
        raise ConfigError(msg)
    name = CHECKPOINTS[checkpoint]
    if path.is_file() and zipfile.is_zipfile(path):
        path = _unpack_zip(path, configuration)
    if not path.is_dir():
        msg = f"nnU-Net model must be a trained model folder or its zip, got missing {path}"
        raise ConfigError(msg)
    if not (path / "plans.json").is_file():
        msg = (
            f"{path / 'plans.json'} must exist: an nnU-Net v2 model folder is "
            "<Trainer>__<Plans>__<configuration>/ with plans.json, dataset.json and fold_K/"
        )
        raise ConfigError(msg)
    if (path / "bundle.json").is_file():
        from medseg.sources.nnunet.manifest import is_nnunet_bundle, verify_bundle

        if is_nnunet_bundle(path):  # an imported bundle keeps the chosen checkpoint under one name
            verify_bundle(path)
            name = CHECKPOINTS["final"]
    if folds is None:
        present = sorted(
            (p.name.removeprefix("fold_") for p in path.glob("fold_*") if (p / name).is_file()),
            key=lambda f: (f == "all", int(f) if f.isdigit() else 0),
        )
        if not present:
            msg = f"{path} must hold at least one fold_K/{name}, got none"
            raise ConfigError(msg)
        folds = tuple(present)
    files = []
    for fold in folds:
        file = path / f"fold_{fold}" / name
        if not file.is_file():
            msg = f"{file} must exist for fold {fold} (checkpoint '{checkpoint}'), got a missing file"
            raise ConfigError(msg)
        files.append(file)
    parts = path.name.split("__")
    return ModelFolder(
        path=path,
        folds=folds,
        checkpoints=tuple(files),
        configuration_hint=parts[2] if len(parts) == 3 else None,
    )
