"""The manifest of a bundle imported from an nnU-Net model folder: what marks it, and its file hashes.

Examples:
    >>> is_nnunet_bundle("no-such-folder")
    False
"""

from __future__ import annotations

import json
from pathlib import Path

from medseg.errors import ConfigError
from medseg.io.hashing import file_sha256
from medseg.sources.nnunet.plans import read_json

FORMAT = "nnunet"
MANIFEST = "bundle.json"


def is_nnunet_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle written by :func:`import_model_folder`."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return bool(json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT)
    except (OSError, ValueError):
        return False


def verify_bundle(path: Path) -> dict[str, object]:
    """Read a bundle's manifest and check every file's hash.

    Raises:
        ConfigError: A missing or changed file.
    """
    manifest = read_json(path / MANIFEST)
    for name, digest in dict(manifest.get("files", {})).items():
        file = path / name
        if not file.is_file():
            msg = f"{file} must exist as {path / MANIFEST} lists it, got a missing file"
            raise ConfigError(msg)
        if file_sha256(file) != digest:
            msg = f"{file} must have SHA-256 {digest} as {path / MANIFEST} records, got another"
            raise ConfigError(msg)
    return manifest
