"""The exception hierarchy of medseg.

The library raises these; only the CLI turns them into exit codes and one-line messages.
Messages are worded as facts about the input: "X must be Y, got Z", naming the file or field.
"""

from __future__ import annotations

from types import ModuleType


class MedsegError(Exception):
    """Root of every error medseg raises on purpose."""


class ConfigError(MedsegError, ValueError):
    """A pipeline config or data spec is invalid (unknown key, wrong type, missing file, ...)."""


class InputError(MedsegError, ValueError):
    """An input image cannot be used (unreadable, corrupt, wrong dimensionality, ...)."""


class GeometryError(InputError):
    """An input's geometry is not a valid volume (mixed orientations, missing slices, ...)."""


def optional_import(module_name: str, feature: str, extra: str) -> ModuleType:
    """Import an optional dependency, or fail with a sentence that says how to get it.

    Args:
        module_name: The module to import, e.g. ``"highdicom"``.
        feature: What needs it, e.g. ``"DICOM SEG export"``.
        extra: The medseg extra that installs it, e.g. ``"dicom"``.

    Returns:
        The imported module.

    Raises:
        MedsegError: If the module is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"{feature} needs {module_name}; install medseg[{extra}]"
        raise MedsegError(msg) from exc


def choice_error(what: str, name: object, choices: object) -> str:
    """The message for a name that is not one of the valid choices, with the nearest as a hint.

    Args:
        what: What was being chosen, e.g. ``"model"``.
        name: The name given.
        choices: The valid names (any iterable of strings).

    Returns:
        "``what`` must be one of [...], got 'name'", with "; did you mean 'x'?" when one is close.

    Examples:
        >>> choice_error("model", "unet3", ["unet3d", "unet2d"])
        "model must be one of ['unet2d', 'unet3d'], got 'unet3'; did you mean 'unet3d'?"
    """
    valid = sorted(str(c) for c in choices)  # type: ignore[attr-defined]
    return f"{what} must be one of {valid}, got '{name}'{did_you_mean(name, valid)}"


def did_you_mean(name: object, choices: object) -> str:
    """``"; did you mean 'x'?"`` for the valid choice nearest ``name``, or ``""`` when none is close.

    For messages that word the rest themselves (:func:`choice_error` lists every choice).

    Examples:
        >>> did_you_mean("dice_men", ["dice_mean", "hd95"])
        "; did you mean 'dice_mean'?"
        >>> did_you_mean("zzz", ["dice_mean"])
        ''
    """
    import difflib

    near = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)  # type: ignore[attr-defined]
    return f"; did you mean '{near[0]}'?" if near else ""
