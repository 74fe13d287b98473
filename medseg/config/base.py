"""Base model and YAML helpers shared by every config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medseg.errors import ConfigError

M = TypeVar("M", bound="FrozenModel")

# spatial axes of a 3D grid (RAS after orientation: 0 left-right, 1 posterior-anterior, 2 inferior-superior)
Axes3 = Annotated[tuple[Literal[0, 1, 2], ...], Field(max_length=3)]


def distinct_axes(name: str, axes: tuple[int, ...]) -> tuple[int, ...]:
    """Refuse a repeated axis (for a field validator).

    Raises:
        ValueError: ``axes`` names an axis twice.
    """
    if len(set(axes)) != len(axes):
        msg = f"{name} must be distinct spatial axes, got {list(axes)}"
        raise ValueError(msg)
    return axes


class FrozenModel(BaseModel):
    """A frozen pydantic model that refuses unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def format_validation_error(exc: ValidationError, source: str) -> str:
    """Word a pydantic error as one sentence per problem, naming the source and the field.

    Args:
        exc: The pydantic error.
        source: Where the data came from (a file path or a description).

    Returns:
        A message such as ``"spec.yaml: field 'labels.1' must be ..., got ..."``.
    """
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"field '{loc}' is required")
        else:
            got = err.get("input")
            text = repr(got) if not isinstance(got, dict) else "a mapping"
            if len(text) > 80:
                text = text[:77] + "..."
            parts.append(f"field '{loc}': {err['msg']}, got {text}")
    return f"{source}: " + "; ".join(parts)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (YAML never runs code here).

    Args:
        path: The YAML file.

    Returns:
        The mapping.

    Raises:
        ConfigError: If the file is missing, unparsable or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"config file must exist, got missing path {path}"
        raise ConfigError(msg)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        msg = f"{path}: must be valid YAML, got a parse error: {exc}"
        raise ConfigError(msg) from exc
    if not isinstance(data, dict):
        msg = f"{path}: must hold a mapping at the top level, got {type(data).__name__}"
        raise ConfigError(msg)
    return data


def read_json(path: str | Path) -> Any:
    """Read a JSON file.

    Raises:
        ConfigError: If it is missing or not valid JSON (naming the file).
    """
    import json

    path = Path(path)
    if not path.is_file():
        msg = f"JSON file must exist, got missing path {path}"
        raise ConfigError(msg)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        msg = f"{path}: must be valid JSON, got a parse error: {exc}"
        raise ConfigError(msg) from exc


def validate(model: type[M], data: dict[str, Any], source: str, **context: Any) -> M:
    """Validate ``data`` into ``model``, turning pydantic errors into a :class:`ConfigError`.

    Args:
        model: The config class.
        data: The raw mapping.
        source: Where the data came from, for the message.
        **context: Validation context passed to pydantic validators.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: If validation fails.
    """
    try:
        return model.model_validate(data, context=context or None)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def dump_yaml(model: BaseModel, path: str | Path) -> None:
    """Write a config as YAML, atomically.

    Args:
        model: The config to write.
        path: The destination file.
    """
    from medseg.io.atomic import atomic_write_text

    text = yaml.safe_dump(model.model_dump(mode="json", exclude_none=True), sort_keys=False)
    atomic_write_text(Path(path), text)
