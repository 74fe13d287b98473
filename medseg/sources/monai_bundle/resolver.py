"""A resolver for the part of MONAI's config language that runs no code of the bundle's.

MONAI configs are programs: a string starting with ``$`` is evaluated as Python, ``%`` pastes in
other files, ``_target_`` may name any importable callable, ``_requires_`` runs other items first and
``_disabled_``/``_mode_`` change what is built. medseg reads a bundle's sections through this
resolver, which accepts only:

* literal JSON values (numbers, strings, booleans, null, lists, mappings);
* ``@id`` references to other items (``::`` or ``#`` separated, relative ``@::id`` included);
* components ``{"_target_": NAME, ...}`` whose class lives in :data:`NAMESPACES`: a network
  (``torch.nn.Module``) from ``monai.networks.nets``, a transform from ``monai.transforms``, an
  inferer from ``monai.inferers``, given by its short name (``"UNet"``) or its dotted path inside
  those packages, with arguments that are themselves literals, references or allowed components.

Everything else is a :class:`Finding`, named by its key path; :func:`check` collects them all and
the caller refuses the bundle (or hands it to MONAI's own ``ConfigParser`` when the user trusts it).

Examples:
    >>> config = {"size": [8, 8], "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@size"},
    ...           "evil": {"_target_": "os.system", "command": "$print('hi')"}}
    >>> check(config, ["inferer"])
    []
    >>> [f.key for f in check(config, ["evil"])]
    ['evil::_target_', 'evil::command']
    >>> SafeResolver(config).resolve("inferer").roi_size
    [8, 8]
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medseg.errors import ConfigError

SEP = "::"
TARGET, REQUIRES, DISABLED, MODE, DESC = "_target_", "_requires_", "_disabled_", "_mode_", "_desc_"
_REFERENCE = re.compile(r"^@(?:\w*)(?:::\w*)*$")
_RELATIVE = re.compile(r"^@((?:::)+)")
#: Arguments that download weights from the internet when true (refused without trust).
_DOWNLOADS = re.compile(r"pretrain|download|^weights$", re.IGNORECASE)
#: Arguments MONAI resolves as dotted import paths when they are strings (``LoadImage(reader=...)``).
_IMPORTING = ("reader", "writer", "merger_cls", "backbone")
#: Readers and writers: medseg loads and writes scans itself (they are left out of transform lists).
_IO_CLASSES = ("LoadImage", "LoadImaged", "SaveImage", "SaveImaged")


def _namespaces() -> dict[str, type]:
    """Packages whose classes a bundle may name, with the base class each must derive from."""
    import torch
    from monai.inferers import Inferer
    from monai.transforms import Transform

    return {"monai.networks.nets": torch.nn.Module, "monai.transforms": Transform, "monai.inferers": Inferer}


NAMESPACES = ("monai.networks.nets", "monai.transforms", "monai.inferers")


@dataclass(frozen=True)
class Finding:
    """One item of a config that needs the user's trust, and why.

    Attributes:
        key: Its key path (``preprocessing::transforms::4::a_min``).
        reason: What it is (``a $-expression``, ``a _target_ outside ...``).
    """

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key} ({self.reason})"


def normalize(text: str) -> str:
    """MONAI's old ``#`` separator as ``::``."""
    return text.replace("#", SEP)


def is_reference(value: object) -> bool:
    """Whether a config value is a whole ``@id`` reference (as MONAI decides it).

    Examples:
        >>> is_reference("@preprocessing"), is_reference("@a::b#0"), is_reference("an @ sign")
        (True, True, False)
    """
    return isinstance(value, str) and bool(_REFERENCE.match(normalize(value)))


def reference_target(value: str, path: Sequence[str]) -> str:
    """The absolute id an ``@`` reference at ``path`` points to (relative ids resolved as MONAI does).

    Args:
        value: The reference, e.g. ``"@network_def"`` or ``"@::roi"`` (the sibling ``roi``).
        path: The key path of the item that holds it.

    Returns:
        The absolute id (``::``-joined keys).

    Examples:
        >>> reference_target("@::roi", ["inferer", "roi_size"])
        'inferer::roi'
        >>> reference_target("@::::size", ["inferer", "roi_size"])
        'size'
    """
    text = normalize(value)
    match = _RELATIVE.match(text)
    if match is None:
        return text[1:]
    up = match.group(1).count(SEP)
    if up > len(path):
        msg = f"relative reference {value!r} at {SEP.join(path)} must stay inside the config"
        raise ConfigError(msg)
    base = list(path[:-up])
    return SEP.join([*base, text[match.end() :]]) if base else text[match.end() :]


def lookup(config: Any, key: str) -> Any:
    """The item at an id in the config.

    Raises:
        KeyError: No item with that id.
    """
    node = config
    for part in key.split(SEP) if key else []:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(key)
    return node


def locate(name: str) -> type:
    """The class a ``_target_`` names, if it is in an allowed namespace.

    Args:
        name: A short name (``"UNet"``, looked up in each namespace's package) or a dotted path
            that starts with one of :data:`NAMESPACES`.

    Returns:
        The class.

    Raises:
        LookupError: The name is outside the namespaces, not found, or not a network, transform or
            inferer class.

    Examples:
        >>> locate("UNet").__name__, locate("monai.transforms.spatial.dictionary.Spacingd").__name__
        ('UNet', 'Spacingd')
    """
    spaces = _namespaces()
    candidates: list[tuple[str, str]] = []
    if "." not in name:
        candidates = [(space, name) for space in spaces]
    else:
        for space in spaces:
            if name.startswith(space + "."):
                candidates.append((space, name[len(space) + 1 :]))
    for space, rest in candidates:
        found = _walk(space, rest)
        if isinstance(found, type) and issubclass(found, spaces[space]):
            return found
    raise LookupError(name)


def _walk(space: str, rest: str) -> object:
    """``space.rest`` by importing the longest module prefix under ``space`` and then attributes."""
    parts = rest.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module_name = ".".join([space, *parts[:cut]])
        try:
            obj: object = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[cut:]:
            if attr.startswith("_") or not hasattr(obj, attr):
                return None
            obj = getattr(obj, attr)
        return obj
    return None


def check(config: Mapping[str, Any], roots: Iterable[str], *, skip: Collection[str] = ()) -> list[Finding]:
    """Everything reachable from ``roots`` (through references too) that needs trust.

    Args:
        config: The parsed config.
        roots: The ids medseg reads (``network_def``, ``preprocessing``, ...).
        skip: Ids of list items medseg leaves out (neither checked nor built).

    Returns:
        The findings, in the order met.
    """
    findings: list[Finding] = []
    seen: set[str] = set()
    todo = [r for r in roots if _exists(config, r)]
    while todo:
        key = todo.pop(0)
        if key in seen:
            continue
        seen.add(key)
        _check_item(config, lookup(config, key), key.split(SEP) if key else [], findings, todo, skip)
    return findings


def _exists(config: Any, key: str) -> bool:
    try:
        lookup(config, key)
    except KeyError:
        return False
    return True


def _check_item(
    config: Any, value: Any, path: list[str], out: list[Finding], todo: list[str], skip: Collection[str]
) -> None:
    key = SEP.join(path)
    if key in skip:
        return
    if isinstance(value, str):
        if value.startswith("$"):
            out.append(Finding(key, "a $-expression"))
        elif value.startswith("%"):
            out.append(Finding(key, "a %-macro"))
        elif is_reference(value):
            target = reference_target(value, path)
            if not _exists(config, target):
                out.append(Finding(key, f"a reference to the missing id {target!r}"))
            elif target in skip:
                out.append(Finding(key, f"a reference to {target!r}, a reader or writer medseg leaves out"))
            else:
                todo.append(target)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_item(config, item, [*path, str(i)], out, todo, skip)
        return
    if not isinstance(value, Mapping):
        return
    if TARGET in value:
        target = value[TARGET]
        where = f"{key}{SEP}{TARGET}"
        if not isinstance(target, str) or target.startswith(("$", "%", "@")):
            out.append(Finding(where, "a _target_ that is not a class name"))
        else:
            try:
                locate(target)
            except LookupError:
                out.append(Finding(where, f"_target_ {target!r} is not a class of {', '.join(NAMESPACES)}"))
        for special in (REQUIRES, DISABLED):
            if special in value:
                out.append(Finding(f"{key}{SEP}{special}", f"{special} changes what is built"))
        if value.get(MODE, "default") != "default":
            out.append(Finding(f"{key}{SEP}{MODE}", f"_mode_ {value[MODE]!r}"))
        if isinstance(target, str) and target.rsplit(".", 1)[-1] in _IO_CLASSES:
            out.append(Finding(where, "reads or writes files outside a transform list"))
        for arg, given in value.items():
            if isinstance(arg, str) and _DOWNLOADS.search(arg) and given not in (False, None, 0, ""):
                out.append(Finding(f"{key}{SEP}{arg}", "downloads weights"))
            if arg in _IMPORTING and isinstance(given, str) and "." in given:
                out.append(Finding(f"{key}{SEP}{arg}", "a dotted path MONAI would import"))
    for k, v in value.items():
        if TARGET in value and k in (TARGET, REQUIRES, DISABLED, MODE, DESC):
            continue  # a component's own keys, judged above (a plain mapping's are plain values)
        _check_item(config, v, [*path, str(k)], out, todo, skip)


class SafeResolver:
    """Builds the items of a config that :func:`check` passed, with MONAI's semantics.

    Each id is built once: two references to one item give the same object (MONAI's ``Invertd``
    needs the very ``Compose`` that preprocessed the image).

    Args:
        config: The parsed config (already checked).
        source: The config file, for messages.
        skip: Ids of list items to leave out of their lists.
    """

    def __init__(self, config: Mapping[str, Any], source: str = "config", skip: Collection[str] = ()) -> None:
        self.config, self.source, self.skip = config, source, frozenset(skip)
        self._built: dict[str, Any] = {}
        self._building: set[str] = set()

    def resolve(self, key: str) -> Any:
        """The built item at an id.

        Raises:
            ConfigError: A missing id, a reference cycle, or a component whose class refused its
                arguments (naming the key path and the class).
        """
        if key in self._built:
            return self._built[key]
        if key in self.skip:
            msg = f"{self.source}: {key} is a reader or writer medseg leaves out and must not be referenced"
            raise ConfigError(msg)
        if key in self._building:
            msg = f"{self.source}: references must not form a cycle, got one through {key!r}"
            raise ConfigError(msg)
        try:
            value = lookup(self.config, key)
        except KeyError:
            msg = f"{self.source}: must define {key!r}, got no such item"
            raise ConfigError(msg) from None
        self._building.add(key)
        try:
            built = self._build(value, key.split(SEP) if key else [])
        finally:
            self._building.discard(key)
        self._built[key] = built
        return built

    def _build(self, value: Any, path: list[str]) -> Any:
        key = SEP.join(path)
        if isinstance(value, str) and is_reference(value):
            return self.resolve(reference_target(value, path))
        if isinstance(value, str) and value.startswith(("$", "%")):
            msg = f"{self.source}: {key} needs --trust-model-code, got {value!r}"
            raise ConfigError(msg)
        if isinstance(value, list):
            return [
                self._child(item, [*path, str(i)])
                for i, item in enumerate(value)
                if SEP.join([*path, str(i)]) not in self.skip
            ]
        if not isinstance(value, Mapping):
            return value
        if TARGET not in value:
            return {k: self._child(v, [*path, str(k)]) for k, v in value.items()}
        name = str(value[TARGET])
        try:
            cls = locate(name)
        except LookupError:
            msg = f"{self.source}: {key}::_target_ must be a class of {', '.join(NAMESPACES)}, got {name!r}"
            raise ConfigError(msg) from None
        kwargs = {
            str(k): self._child(v, [*path, str(k)])
            for k, v in value.items()
            if k not in (TARGET, REQUIRES, DISABLED, MODE, DESC)
        }
        try:
            return cls(**kwargs)
        except Exception as exc:  # the class's own argument checks, worded by MONAI
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            msg = f"{self.source}: {key} ({name}) could not be built: {type(exc).__name__}: {first}"
            raise ConfigError(msg) from exc

    def _child(self, value: Any, path: list[str]) -> Any:
        """A nested value; nested components are cached under their own id, as MONAI does."""
        if isinstance(value, Mapping) and TARGET in value:
            key = SEP.join(path)
            if key not in self._built:
                self._built[key] = self._build(value, path)
            return self._built[key]
        return self._build(value, path)
