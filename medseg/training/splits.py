"""k-fold cross-validation splits, stored beside the data spec so that they stay stable."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from medseg.errors import ConfigError
from medseg.io.atomic import atomic_write_text


def make_splits(case_ids: Sequence[str], k: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """Shuffle the cases once (seeded) and cut them into ``k`` validation folds.

    Args:
        case_ids: Every case id.
        k: Number of folds (at least 2, at most the number of cases).
        seed: Shuffle seed.

    Returns:
        ``k`` dicts with sorted ``train`` and ``val`` id lists; each case is validated exactly once.

    Examples:
        >>> [len(f["val"]) for f in make_splits([f"c{i}" for i in range(7)], 3)]
        [3, 2, 2]
    """
    ids = sorted(case_ids)
    if not 2 <= k <= len(ids):
        msg = f"folds must be between 2 and the number of cases ({len(ids)}), got {k}"
        raise ConfigError(msg)
    order = ids[:]
    random.Random(seed).shuffle(order)
    folds = [order[i::k] for i in range(k)]
    return [{"train": sorted(set(ids) - set(f)), "val": sorted(f)} for f in folds]


def splits_path(spec_source: Path | None, fallback_dir: Path) -> Path:
    """Where the splits of a spec live: ``<spec>.splits.json`` beside it, if that folder is writable."""
    if spec_source is not None and os.access(spec_source.parent, os.W_OK):
        return spec_source.with_name(f"{spec_source.stem}.splits.json")
    return fallback_dir / "splits.json"


def load_or_create_splits(
    path: Path, case_ids: Sequence[str], k: int, seed: int = 0
) -> list[dict[str, list[str]]]:
    """Read the stored splits, or make and store them the first time.

    Raises:
        ConfigError: If the stored file lists other cases or another number of folds.
    """
    ids = sorted(case_ids)
    if path.is_file():
        try:
            stored: list[dict[str, list[str]]] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            msg = f"{path}: must be valid JSON, got {exc}"
            raise ConfigError(msg) from exc
        stored_ids = sorted({c for fold in stored for c in fold["val"]})
        if stored_ids != ids or len(stored) != k:
            msg = (
                f"{path}: stored splits must cover the spec's {len(ids)} cases in {k} folds, got "
                f"{len(stored_ids)} cases in {len(stored)} folds (delete the file to split again)"
            )
            raise ConfigError(msg)
        return stored
    splits = make_splits(ids, k, seed)
    atomic_write_text(path, json.dumps(splits, indent=1))
    return splits
