"""Turn an nnU-Net model folder into a medseg bundle: what inference needs, hashed, nothing else.

The bundle is a folder that the ``nnunet`` source loads like the model folder it came from, and
that MLflow can log and register like a bundle medseg trained (``bundle.json`` marks it)::

    bundle.json            format "nnunet", configuration, trainer, folds, checkpoint, SHA-256 per file
    plans.json             copied
    dataset.json           copied
    postprocessing.pkl     copied when present
    fold_K/checkpoint_final.pth
                           the weights, the trainer's name, the configuration and the mirroring axes
                           only (no optimizer state, no training log), loadable weights-only

Loading checks every file against its recorded hash.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ConfigError
from medseg.io.hashing import file_sha256
from medseg.sources.nnunet.checkpoint import load_checkpoint
from medseg.sources.nnunet.folder import CHECKPOINTS, open_model_folder
from medseg.sources.nnunet.manifest import FORMAT, MANIFEST


@dataclass(frozen=True)
class ImportedBundle:
    """What an import wrote.

    Attributes:
        path: The bundle folder.
        sha256: The weights' hashes, ``+``-joined in fold order (the model's identity).
        configuration: The configuration.
        folds: The folds kept.
    """

    path: Path
    sha256: str
    configuration: str
    folds: tuple[str, ...]


def import_model_folder(
    source: str | Path,
    out: str | Path,
    *,
    folds: tuple[str, ...] | None = None,
    checkpoint: str = "final",
    configuration: str | None = None,
) -> ImportedBundle:
    """Write the bundle for an nnU-Net model folder (or zip), atomically.

    Args:
        source: The trained model folder, or its zip.
        out: The bundle folder to create (must not exist).
        folds: Folds to keep (default: every fold with the checkpoint).
        checkpoint: ``final`` or ``best``.
        configuration: In a zip of several configurations, which one.

    Returns:
        The :class:`ImportedBundle`.

    Raises:
        ConfigError: ``out`` exists, or the folder is refused (see :class:`NnunetModel`).
    """
    import torch

    from medseg.sources.nnunet.predictor import NnunetModel
    from medseg.sources.nnunet.settings import NnunetSettings

    out = Path(out)
    if out.exists():
        msg = f"bundle folder must not exist yet, got existing {out}"
        raise ConfigError(msg)
    settings = NnunetSettings(folds=folds, checkpoint=checkpoint, configuration=configuration)
    model = NnunetModel(source, settings)  # refuses what medseg cannot run, before writing anything
    folder = open_model_folder(source, folds=folds, checkpoint=checkpoint, configuration=configuration)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        files = ["plans.json", "dataset.json"]
        for name in files:
            shutil.copy2(folder.path / name, tmp / name)
        if folder.postprocessing_file.is_file():
            shutil.copy2(folder.postprocessing_file, tmp / "postprocessing.pkl")
            files.append("postprocessing.pkl")
        weights = []
        for fold, file in zip(folder.folds, folder.checkpoints):
            ckpt = load_checkpoint(file, extra_trainers=settings.trainers)
            rel = f"fold_{fold}/{CHECKPOINTS['final']}"
            (tmp / rel).parent.mkdir()
            slim = {
                "network_weights": dict(ckpt.weights),
                "trainer_name": ckpt.trainer_name,
                "init_args": {"configuration": model.config.name},
                "inference_allowed_mirroring_axes": list(ckpt.mirror_axes) if ckpt.mirror_axes else None,
            }
            torch.save(slim, tmp / rel)
            files.append(rel)
            weights.append(file_sha256(tmp / rel))
        manifest = {
            "format": FORMAT,
            "configuration": model.config.name,
            "trainer": model.checkpoints[0].trainer_name,
            "plans": model.plans.name,
            "folds": list(folder.folds),
            "checkpoint": checkpoint,
            "source": str(folder.path),
            "source_sha256": {str(f): model.checkpoints[i].sha256 for i, f in enumerate(folder.folds)},
            "weights_sha256": "+".join(weights),
            "files": {name: file_sha256(tmp / name) for name in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportedBundle(out, "+".join(weights), model.config.name, folder.folds)
