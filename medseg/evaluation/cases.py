"""Which cases to evaluate (all, by id, or a cross-validation fold) and where their predictions are."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medseg.config.spec import LoadedSpec, ResolvedCase
from medseg.errors import ConfigError, did_you_mean
from medseg.labelmap import LABEL_FILE

PREDICTION_FILE = LABEL_FILE  # what medseg.batch.runner writes per case
_FLAT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _stored_splits(loaded: LoadedSpec, split_dirs: Sequence[Path]) -> tuple[Path, list[dict]] | None:
    candidates = []
    if loaded.source is not None:
        candidates.append(loaded.source.with_name(f"{loaded.source.stem}.splits.json"))
    candidates += [Path(d) / "splits.json" for d in split_dirs]
    for path in candidates:
        if path.is_file():
            try:
                return path, json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                msg = f"{path}: must be valid JSON, got {exc}"
                raise ConfigError(msg) from exc
    return None


def fold_case_ids(
    loaded: LoadedSpec,
    fold: int,
    case_ids: Sequence[str],
    folds: int | None = None,
    seed: int = 0,
    split_dirs: Sequence[Path] = (),
) -> list[str]:
    """The validation case ids of cross-validation fold ``fold``.

    The splits stored beside the spec (``<spec>.splits.json``, as training writes them) or in one of
    ``split_dirs`` are used; without them, the splits are remade as training makes them (same
    ``folds`` and ``seed``), without writing them.

    Raises:
        ConfigError: If the fold is out of range, or there are no stored splits and ``folds`` is None.
    """
    from medseg.training.splits import make_splits

    stored = _stored_splits(loaded, split_dirs)
    where: Path | str
    if stored is not None:
        where, splits = stored
    elif folds is not None:
        where, splits = "remade splits", make_splits(case_ids, folds, seed)
    else:
        where = (
            loaded.source.with_name(f"{loaded.source.stem}.splits.json") if loaded.source else "splits.json"
        )
        msg = f"fold selection needs stored splits ({where}) or a model's fold count, got neither"
        raise ConfigError(msg)
    if not 0 <= fold < len(splits):
        msg = f"fold must be in 0..{len(splits) - 1} ({where}), got {fold}"
        raise ConfigError(msg)
    return list(splits[fold]["val"])


def select_cases(
    loaded: LoadedSpec,
    cases: Sequence[str] | None = None,
    fold: int | None = None,
    *,
    folds: int | None = None,
    seed: int = 0,
    split_dirs: Sequence[Path] = (),
) -> list[ResolvedCase]:
    """The spec's cases to evaluate: all, the named ones, or the validation cases of a fold.

    Args:
        loaded: The data spec.
        cases: Only these case ids, in this order.
        fold: Only the validation cases of this fold (see :func:`fold_case_ids`).
        folds: Number of folds to remake the splits with when none are stored (a model's).
        seed: Seed to remake the splits with.
        split_dirs: More folders that may hold a training run's ``splits.json``.

    Returns:
        The resolved cases.

    Raises:
        ConfigError: Both ``cases`` and ``fold`` given, an unknown case id (nearest suggested), or a bad fold.
    """
    every = loaded.resolve_cases()
    by_id = {c.id: c for c in every}
    if cases and fold is not None:
        msg = f"choose cases by ids or by fold, got both {list(cases)} and fold {fold}"
        raise ConfigError(msg)
    if fold is not None:
        ids = fold_case_ids(loaded, fold, list(by_id), folds, seed, split_dirs)
    elif cases:
        ids = list(dict.fromkeys(cases))
    else:
        return every
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        hint = did_you_mean(unknown[0], by_id)
        msg = f"case ids must be cases of spec '{loaded.spec.name}', got unknown {unknown[:5]}{hint}"
        raise ConfigError(msg)
    return [by_id[i] for i in ids]


def find_prediction(pred_dir: Path, case_id: str) -> Path | None:
    """The prediction of a case: ``<case_id>/labels.nii.gz`` (as ``medseg predict`` writes) or flat.

    Args:
        pred_dir: The prediction folder.
        case_id: The case id.

    Returns:
        The file, or None when the folder holds no prediction for the case.
    """
    nested = pred_dir / case_id / PREDICTION_FILE
    if nested.is_file():
        return nested
    for suffix in _FLAT_SUFFIXES:
        flat = pred_dir / f"{case_id}{suffix}"
        if flat.is_file():
            return flat
    return None


def prediction_ids(pred_dir: Path) -> set[str]:
    """The case ids of every prediction in a folder (nested or flat)."""
    ids = {p.parent.name for p in pred_dir.glob(f"*/{PREDICTION_FILE}")}
    for p in pred_dir.iterdir():
        for suffix in _FLAT_SUFFIXES:
            if p.is_file() and p.name.endswith(suffix):
                ids.add(p.name[: -len(suffix)])
    return ids
