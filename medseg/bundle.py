"""Model bundles: everything prediction needs, in a folder, loadable without unpickling code.

A bundle folder holds ``weights.pt`` (a plain ``state_dict``, read with ``weights_only=True``) and
``bundle.json`` (the pipeline config, the data spec's channels, labels and preprocessing
settings, and the SHA-256 of the weights).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg import __version__
from medseg.config.base import read_json, validate
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.errors import ConfigError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.hashing import file_sha256

BUNDLE_FORMAT = "medseg-bundle"
BUNDLE_VERSION = 1
WEIGHTS = "weights.pt"
MANIFEST = "bundle.json"


@dataclass
class Bundle:
    """A trained model with its configuration.

    Attributes:
        pipeline: The pipeline config it was trained with.
        spec: The data spec (channels, labels, preprocessing); its case list is empty.
        network: The model, in ``eval()`` mode.
        info: Other recorded facts (training summary, hash, creation time).
    """

    pipeline: PipelineConfig
    spec: DatasetSpec
    network: nn.Module
    info: dict[str, Any]

    @property
    def sha256(self) -> str:
        """SHA-256 of the weights file."""
        return str(self.info.get("weights_sha256", ""))


def strip_cases(spec: DatasetSpec) -> DatasetSpec:
    """The spec without its case list (a bundle carries no paths to training data)."""
    return spec.model_copy(update={"cases": [], "case_patterns": None, "data_root": "."})


def build_network(pipeline: PipelineConfig, spec: DatasetSpec) -> nn.Module:
    """Build the pipeline's model for a spec's channels and labels."""
    from medseg.models import create_model

    return create_model(pipeline.model.name, len(spec.channels), spec.num_classes, **pipeline.model.params)


def save_bundle(
    out_dir: str | Path,
    pipeline: PipelineConfig,
    spec: DatasetSpec,
    network: nn.Module,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle folder (weights first, then the manifest, each atomically).

    Args:
        out_dir: Destination folder.
        pipeline: The pipeline config.
        spec: The data spec (its cases are dropped).
        network: The trained model.
        info: Extra facts to record (e.g. training metrics).

    Returns:
        The bundle folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp)
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "medseg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "weights_sha256": file_sha256(out / WEIGHTS),
        "pipeline": pipeline.model_dump(mode="json"),
        "spec": strip_cases(spec).model_dump(mode="json"),
        "info": info or {},
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return out


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle folder (never unpickling arbitrary objects).

    Args:
        path: The bundle folder (or its ``bundle.json``).
        device: Where to put the network.

    Returns:
        The bundle, with its network in ``eval()`` mode.

    Raises:
        ConfigError: Missing files, a foreign format, or weights whose hash does not match.
    """
    folder = Path(path)
    if folder.name == MANIFEST:
        folder = folder.parent
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file() or not (folder / WEIGHTS).is_file():
        msg = f"model bundle must be a folder with {MANIFEST} and {WEIGHTS}, got {folder}"
        raise ConfigError(msg)
    manifest = read_json(manifest_path)
    if manifest.get("format") != BUNDLE_FORMAT:
        msg = f"{manifest_path}: format must be '{BUNDLE_FORMAT}', got {manifest.get('format')!r}"
        raise ConfigError(msg)
    digest = file_sha256(folder / WEIGHTS)
    if digest != manifest.get("weights_sha256"):
        expected = manifest.get("weights_sha256")
        msg = f"{folder / WEIGHTS}: SHA-256 must match the manifest's {expected}, got {digest}"
        raise ConfigError(msg)
    pipeline = validate(PipelineConfig, manifest["pipeline"], f"{manifest_path} (pipeline)")
    spec = validate(DatasetSpec, manifest["spec"], f"{manifest_path} (spec)")
    network = build_network(pipeline, spec)
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    network.to(device).eval()
    info = dict(manifest.get("info", {}))
    info["weights_sha256"] = digest
    info["path"] = str(folder)
    return Bundle(pipeline=pipeline, spec=spec, network=network, info=info)
