"""The four sections of a bundle's inference config that medseg reads, built into objects.

medseg reads ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` and ignores the
rest (datalists, device, data loaders, handlers, the evaluator). It loads scans with its own readers
and writes results with its own writers, so the bundle's loading and channel-first transforms
(``LoadImage(d)``, ``EnsureChannelFirst(d)``) and its writers (``SaveImage(d)``) are left out
(:data:`SKIPPED`); the rest run as the bundle says.

Without trust the sections are checked and built by :mod:`.resolver` (no code of the bundle runs;
what needs code is refused, naming every key). With trust, MONAI's own ``ConfigParser`` builds them
(``$``-expressions, ``imports`` and all).

Examples:
    >>> config = {"preprocessing": {"_target_": "Compose", "transforms": [
    ...     {"_target_": "LoadImaged", "keys": "image"}, {"_target_": "ScaleIntensityd", "keys": "image"}]}}
    >>> io_transforms(config)
    {'preprocessing::transforms::0': 'LoadImaged'}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from medseg.errors import ConfigError
from medseg.sources.monai_bundle.resolver import (
    SEP,
    TARGET,
    SafeResolver,
    check,
    is_reference,
    lookup,
    reference_target,
)

NETWORK, PREPROCESSING, INFERER, POSTPROCESSING = "network_def", "preprocessing", "inferer", "postprocessing"
SECTIONS = (NETWORK, PREPROCESSING, INFERER, POSTPROCESSING)
#: Transforms medseg replaces with its own loading and writing.
SKIPPED = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd", "SaveImage", "SaveImaged")
#: The inferers whose settings medseg's tiling engine reproduces (see :mod:`.inferer`).
INFERERS = ("SlidingWindowInferer", "SlidingWindowInfererAdapt", "SimpleInferer")


@dataclass(frozen=True)
class BundleParts:
    """The built sections of a bundle.

    Attributes:
        network: The network from ``network_def`` (weights not loaded yet).
        preprocessing: A MONAI ``Compose`` without the loading transforms.
        inferer: The MONAI inferer object (its settings are read, not its ``__call__``).
        postprocessing: A MONAI ``Compose`` without the writers.
        skipped: The transforms left out, by key path and class.
        trusted: Whether MONAI's ``ConfigParser`` built them (the user trusted the bundle's code).
    """

    network: nn.Module
    preprocessing: Any
    inferer: Any
    postprocessing: Any
    skipped: tuple[str, ...]
    trusted: bool


def _short(target: object) -> str:
    return str(target).rsplit(".", 1)[-1]


def _transform_list(config: Any, section: str) -> tuple[str, list[Any]] | None:
    """The id and list of a section's ``Compose(transforms=[...])``, following ``@`` references."""
    key = section
    node = lookup(config, key)
    for _ in range(8):
        if is_reference(node):
            key = reference_target(node, key.split(SEP))
            node = lookup(config, key)
        elif isinstance(node, Mapping) and _short(node.get(TARGET, "")) == "Compose" and "transforms" in node:
            key = f"{key}{SEP}transforms"
            node = node["transforms"]
        elif isinstance(node, list):
            return key, node
        else:
            return None
    return None


def io_transforms(config: Mapping[str, Any]) -> dict[str, str]:
    """The :data:`SKIPPED` transforms of the pre- and postprocessing lists, by key path.

    Returns:
        Key path -> class name, for each transform medseg leaves out.
    """
    skipped: dict[str, str] = {}
    for section in (PREPROCESSING, POSTPROCESSING):
        try:
            found = _transform_list(config, section) if section in config else None
        except KeyError:
            continue
        if found is None:
            continue
        key, items = found
        for i, item in enumerate(items):
            entry = item
            try:
                if is_reference(entry):
                    entry = lookup(config, reference_target(entry, [*key.split(SEP), str(i)]))
            except KeyError:
                pass
            if isinstance(entry, Mapping) and _short(entry.get(TARGET, "")) in SKIPPED:
                skipped[f"{key}{SEP}{i}"] = _short(entry[TARGET])
    return skipped


def _drop_io_instances(compose: Any) -> tuple[str, ...]:
    """Remove the :data:`SKIPPED` transforms from a built ``Compose`` (what expressions made)."""
    transforms = getattr(compose, "transforms", None)
    if transforms is None:
        return ()
    kept = [t for t in transforms if type(t).__name__ not in SKIPPED]
    dropped = tuple(type(t).__name__ for t in transforms if type(t).__name__ in SKIPPED)
    compose.transforms = type(transforms)(kept) if isinstance(transforms, tuple | list) else kept
    return dropped


def build_safely(config: Mapping[str, Any], *, source: Path) -> BundleParts:
    """Build the sections with medseg's resolver, refusing anything that needs code.

    Raises:
        ConfigError: Naming every key that needs ``--trust-model-code``, or a missing section.
    """
    _require_sections(config, source)
    _check_inferer_kind(config, source)
    leave_out = io_transforms(config)
    findings = check(config, SECTIONS, skip=leave_out)
    if findings:
        listed = "; ".join(str(f) for f in findings)
        msg = f"{source}: runs code, which needs --trust-model-code (or remove it): {listed}"
        raise ConfigError(msg)
    resolver = SafeResolver(config, source=str(source), skip=leave_out)
    built = {name: resolver.resolve(name) for name in SECTIONS if name in config}
    skipped = tuple(f"{key} ({name})" for key, name in leave_out.items())
    return _parts(built, skipped, trusted=False, source=source)


def build_trusted(files_config: Path, metadata: Path, folder: Path) -> BundleParts:
    """Build the sections with MONAI's ``ConfigParser`` (``$``-expressions evaluated).

    Args:
        files_config: The inference config.
        metadata: ``configs/metadata.json``.
        folder: The bundle folder (``bundle_root``).

    Raises:
        ConfigError: A section that is missing or fails to build (the error names the config file).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(metadata))
    parser.read_config(str(files_config))
    parser["bundle_root"] = str(folder)
    config = parser.get()
    _require_sections(config, files_config)
    _check_inferer_kind(config, files_config)
    leave_out = io_transforms(config)
    for key in sorted(leave_out, key=lambda k: -int(k.rsplit(SEP, 1)[1])):  # later items first
        parent, index = key.rsplit(SEP, 1)
        del lookup(config, parent)[int(index)]
    parser.set(config)
    built: dict[str, Any] = {}
    name = "imports"
    try:
        if name in config:
            parser.get_parsed_content(name)
        for name in SECTIONS:
            if name in config:
                built[name] = parser.get_parsed_content(name)
    except Exception as exc:  # the bundle's own code: anything may go wrong
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        msg = f"{files_config}: {name} could not be built: {type(exc).__name__}: {first}"
        raise ConfigError(msg) from exc
    skipped = tuple(f"{key} ({cls})" for key, cls in leave_out.items())
    return _parts(built, skipped, trusted=True, source=files_config)


def _check_inferer_kind(config: Mapping[str, Any], source: Path) -> None:
    """Refuse, before anything is built, an inferer medseg's engine does not run."""
    node = config.get(INFERER)
    if isinstance(node, Mapping) and isinstance(node.get(TARGET), str):
        kind = _short(node[TARGET])
        if kind not in INFERERS:
            msg = f"{source}: inferer must be one of {list(INFERERS)} to run in medseg's engine, got {kind}"
            raise ConfigError(msg)


def _require_sections(config: Mapping[str, Any], source: Path) -> None:
    missing = [s for s in (NETWORK, INFERER) if s not in config]
    if missing:
        wanted = " and ".join(missing)
        msg = f"{source}: must define {wanted} (a MONAI inference config), got keys {sorted(config)}"
        raise ConfigError(msg)


def _parts(built: dict[str, Any], skipped: tuple[str, ...], *, trusted: bool, source: Path) -> BundleParts:
    from monai.transforms import Compose

    network = built[NETWORK]
    if not isinstance(network, nn.Module):
        msg = f"{source}: {NETWORK} must build a torch.nn.Module, got {type(network).__name__}"
        raise ConfigError(msg)
    composed = {}
    for name in (PREPROCESSING, POSTPROCESSING):
        value = built.get(name)
        if value is None:
            value = Compose([])
        elif not isinstance(value, Compose):
            value = Compose(list(value) if isinstance(value, list | tuple) else [value])
        skipped += tuple(f"{name} ({n})" for n in _drop_io_instances(value))
        composed[name] = value
    return BundleParts(
        network=network,
        preprocessing=composed[PREPROCESSING],
        inferer=built[INFERER],
        postprocessing=composed[POSTPROCESSING],
        skipped=skipped,
        trusted=trusted,
    )
