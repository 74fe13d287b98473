"""The files of a MONAI bundle folder, as the MONAI Model Zoo lays them out, read as data.

A bundle holds ``configs/metadata.json`` (what goes in and comes out), ``configs/inference.json``
(or ``.yaml``/``.yml``: how to build and run the network) and ``models/model.pt`` (the weights, a
state dict or ``{"model": state_dict}``). Nothing here runs code from the bundle: JSON is parsed
with :mod:`json`, YAML with the safe loader, and hashes are taken of the bytes.

Examples:
    >>> import json, tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("configs", "models"):
    ...     (folder / name).mkdir()
    >>> _ = (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1"}))
    >>> _ = (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": {}}))
    >>> _ = (folder / "models" / "model.pt").write_bytes(b"weights")
    >>> files = find_bundle_files(folder)
    >>> files.config.name, files.weights.name
    ('inference.json', 'model.pt')
    >>> read_config(files.config)
    {'network_def': {}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medseg.errors import ConfigError

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
METADATA_NAME = "metadata.json"
WEIGHTS_NAME = "model.pt"


@dataclass(frozen=True)
class BundleFiles:
    """The files medseg reads from a MONAI bundle folder.

    Attributes:
        folder: The bundle folder.
        metadata: ``configs/metadata.json``.
        config: ``configs/inference.json`` (or ``.yaml``/``.yml``).
        weights: ``models/model.pt``.
    """

    folder: Path
    metadata: Path
    config: Path
    weights: Path


def find_bundle_files(folder: str | Path) -> BundleFiles:
    """Locate the metadata, inference config and weights of a bundle folder.

    Args:
        folder: The bundle folder (``configs/`` and ``models/`` inside).

    Returns:
        The :class:`BundleFiles`.

    Raises:
        ConfigError: Naming the first file that is missing.
    """
    root = Path(folder)
    if not root.is_dir():
        msg = f"MONAI bundle must be a folder with configs/ and models/, got {root}"
        raise ConfigError(msg)
    configs = root / "configs"
    metadata = configs / METADATA_NAME
    if not metadata.is_file():
        msg = f"MONAI bundle must have configs/{METADATA_NAME}, got missing {metadata}"
        raise ConfigError(msg)
    config = next((configs / n for n in CONFIG_NAMES if (configs / n).is_file()), None)
    if config is None:
        msg = f"MONAI bundle must have configs/inference.json (or .yaml), got none in {configs}"
        raise ConfigError(msg)
    weights = root / "models" / WEIGHTS_NAME
    if not weights.is_file():
        other = (
            sorted(p.name for p in (root / "models").glob("model.*")) if (root / "models").is_dir() else []
        )
        hint = f" (found {', '.join(other)}: TorchScript and ONNX weights are not run)" if other else ""
        msg = f"MONAI bundle must have models/{WEIGHTS_NAME}, got missing {weights}{hint}"
        raise ConfigError(msg)
    return BundleFiles(folder=root, metadata=metadata, config=config, weights=weights)


def read_config(path: Path) -> dict[str, Any]:
    """Read a bundle config file (JSON, or YAML with the safe loader) as plain data.

    Args:
        path: ``configs/*.json`` or ``configs/*.yaml``.

    Returns:
        The top-level mapping.

    Raises:
        ConfigError: An unparsable file or one that does not hold a mapping.
    """
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0]
        msg = f"{path}: must be valid {'JSON' if path.suffix == '.json' else 'YAML'}, got {first}"
        raise ConfigError(msg) from exc
    if not isinstance(data, dict):
        msg = f"{path}: must hold a mapping at the top level, got {type(data).__name__}"
        raise ConfigError(msg)
    return data
