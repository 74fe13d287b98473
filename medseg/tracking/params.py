"""Turn nested run parameters into the flat ``key -> string`` form MLflow stores.

MLflow keeps parameters, metrics and tags under flat keys of a restricted alphabet (at most 250
characters) and parameter values as strings of at most 6000 characters. These pure functions bridge
medseg's nested configs to that form: nested mappings become dotted keys, lists become JSON strings,
over-long values are truncated with a visible ``...`` and keys MLflow would reject are sanitised.

Examples:
    >>> flatten_params({"model": {"name": "unet3d", "params": {"channels": [8, 16]}}})
    {'model.name': 'unet3d', 'model.params.channels': '[8, 16]'}
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

MAX_KEY_LENGTH = 250
"""MLflow's limit on a param, metric or tag key."""
MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a param value."""
MAX_TAG_LENGTH = 8000
"""MLflow's limit on a tag value."""

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_ELLIPSIS = "..."


def sanitize_key(key: object) -> str:
    """Make ``key`` a valid MLflow param, metric or tag key.

    Characters outside ``A-Z a-z 0-9 _ - . space /`` become ``_`` (colons too, which MLflow rejects on
    Windows); empty, ``.`` and ``..`` path segments are dropped or escaped so the key is a normalised
    relative path, as MLflow requires; keys are cut to 250 characters.

    Args:
        key: The key; anything ``str()`` accepts.

    Returns:
        The sanitised key, never empty.

    Examples:
        >>> sanitize_key("val/dice (organ:liver)")
        'val/dice _organ_liver_'
        >>> sanitize_key("/a//../b/")
        'a/__/b'
    """
    text = _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]
    parts = ["__" if part == ".." else part for part in text.split("/") if part not in ("", ".")]
    return "/".join(parts) or "_"


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, ending a cut text with ``...``.

    Args:
        text: The text.
        limit: The largest length allowed; at least 3.

    Returns:
        ``text`` itself if short enough, else its start followed by ``...``.

    Raises:
        ValueError: If ``limit`` is below 3.

    Examples:
        >>> truncate("abcdefgh", 6)
        'abc...'
    """
    if limit < len(_ELLIPSIS):
        msg = f"limit must be >= {len(_ELLIPSIS)}, got {limit}"
        raise ValueError(msg)
    if len(text) <= limit:
        return text
    return text[: limit - len(_ELLIPSIS)] + _ELLIPSIS


def as_mapping(value: object) -> Mapping[str, Any] | None:
    """Return ``value`` as a mapping if it is one, a pydantic model or a dataclass instance, else None.

    Examples:
        >>> as_mapping({"a": 1})
        {'a': 1}
        >>> as_mapping([1, 2]) is None
        True
    """
    if isinstance(value, Mapping):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return None


def format_value(value: object, limit: int = MAX_PARAM_LENGTH) -> str:
    """Render one parameter value as the string MLflow stores.

    Scalars use ``str()`` (enums their value), sequences and sets become JSON (non-JSON items as
    ``str()``), numpy and torch arrays go through ``tolist()``; the result is truncated to ``limit``.

    Args:
        value: The value.
        limit: The largest length allowed.

    Returns:
        The string.

    Examples:
        >>> format_value((0.5, 1.0, "x"))
        '[0.5, 1.0, "x"]'
        >>> format_value(None)
        'None'
    """
    if isinstance(value, Enum):
        value = value.value
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if isinstance(value, set | frozenset):
        value = sorted(value, key=str)
    if isinstance(value, list | tuple):
        text = json.dumps(list(value), default=str)
    elif isinstance(value, PurePath):
        text = value.as_posix()
    else:
        text = str(value)
    return truncate(text, limit)


def to_jsonable(value: object) -> Any:
    """Convert ``value`` into plain JSON types, for JSON or YAML artifacts.

    Mappings, pydantic models and dataclasses become dicts with string keys, sequences and sets lists,
    numpy and torch values Python numbers or lists, enums their value, paths POSIX strings and anything
    else its ``str()``.

    Examples:
        >>> from pathlib import PurePosixPath
        >>> to_jsonable({"out": PurePosixPath("/tmp/x"), "spacing": (1.0, 2.0), 3: {1, 2}})
        {'out': '/tmp/x', 'spacing': [1.0, 2.0], '3': [1, 2]}
    """
    mapping = as_mapping(value)
    if mapping is not None:
        return {str(k): to_jsonable(v) for k, v in mapping.items()}
    if isinstance(value, Enum):
        return to_jsonable(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, PurePath):
        return value.as_posix()
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if isinstance(value, set | frozenset):
        return [to_jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return str(value)


def flatten_params(d: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, str]:
    """Flatten nested parameters into MLflow's ``key -> string`` form.

    Nested mappings (and pydantic models or dataclass instances) become dotted keys, an empty one the
    value ``"{}"``; leaves are rendered by :func:`format_value` (lists as JSON, values cut to 6000
    characters) and keys by :func:`sanitize_key`. Keys that sanitise alike keep the last value.

    Args:
        d: The parameters: a mapping, a pydantic model or a dataclass instance.
        prefix: A dotted prefix for every key, e.g. ``"model"``.

    Returns:
        A new flat dict, in the order of ``d``.

    Raises:
        TypeError: If ``d`` is not a mapping, pydantic model or dataclass instance.

    Examples:
        >>> flatten_params({"model": {"name": "unet3d", "params": {"channels": [8, 16, 32]}}, "lr": 1e-3})
        {'model.name': 'unet3d', 'model.params.channels': '[8, 16, 32]', 'lr': '0.001'}
        >>> flatten_params({"spacing": (1.5, 1.5, 2.0), "crop": {}}, prefix="preprocess")
        {'preprocess.spacing': '[1.5, 1.5, 2.0]', 'preprocess.crop': '{}'}
    """
    mapping = as_mapping(d)
    if mapping is None:
        msg = f"params must be a mapping, pydantic model or dataclass instance, got {type(d).__name__}"
        raise TypeError(msg)
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        nested = as_mapping(value)
        if nested:
            flat.update(flatten_params(nested, name))
        else:
            flat[sanitize_key(name)] = "{}" if nested is not None else format_value(value)
    return flat
