"""How an nnU-Net model folder is loaded and run: the ``nnunet`` source's options, checked once.

Examples:
    >>> NnunetSettings.from_options({"folds": "0,1", "mirroring": "false"}).mirroring
    False
    >>> NnunetSettings.from_options({"postprocess": True}).postprocessing
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.sources.nnunet.folder import parse_folds

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag(options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    msg = f"option {key} must be true or false, got '{value}'"
    raise ConfigError(msg)


@dataclass(frozen=True)
class NnunetSettings:
    """How an nnU-Net model folder is loaded and run.

    Attributes:
        folds: Folds to ensemble (``None``: every fold present).
        checkpoint: ``final`` or ``best``.
        mirroring: Test-time mirroring along the checkpoint's allowed axes.
        postprocessing: Apply the folder's ``postprocessing.pkl``.
        step: Sliding-window step (fraction of the patch).
        configuration: Which configuration of a zip holding several.
        trainers: Trainer names accepted besides nnU-Net's stock ones.
        label_codes: A YAML/JSON file of DICOM codes per label name (for SEG), or ``None``.

    ``load_model``'s ``postprocess`` (the batch's ``--postprocess`` switch) sets ``postprocessing``;
    ``crf`` may only be off.
    """

    folds: tuple[str, ...] | None = None
    checkpoint: str = "final"
    mirroring: bool = True
    postprocessing: bool = False
    step: float = 0.5
    configuration: str | None = None
    trainers: frozenset[str] = frozenset()
    label_codes: Path | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> NnunetSettings:
        """Settings from ``load_model``'s options (strings as the CLI gives them, or values).

        Raises:
            ConfigError: An unknown option or a bad value.
        """
        known = {
            "crf",
            "postprocess",
            "folds",
            "checkpoint",
            "mirroring",
            "postprocessing",
            "step",
            "configuration",
            "trainers",
            "label_codes",
        }
        unknown = sorted(set(options) - known)
        if unknown:
            msg = f"nnU-Net model options must be among {sorted(known)}, got {unknown}"
            raise ConfigError(msg)
        if options.get("crf") not in (None, False):
            msg = f"option crf must be off for nnU-Net models (they have no CRF), got {options['crf']!r}"
            raise ConfigError(msg)
        if options.get("postprocess") is not None:  # the batch's switch: nnU-Net's postprocessing.pkl
            options = {"postprocessing": options["postprocess"], **options}
        step = float(options.get("step", 0.5))
        if not 0 < step <= 1:
            msg = f"option step must be > 0 and <= 1, got {step}"
            raise ConfigError(msg)
        trainers = options.get("trainers") or ()
        if isinstance(trainers, str):
            trainers = [t.strip() for t in trainers.split(",") if t.strip()]
        codes = options.get("label_codes")
        return cls(
            folds=parse_folds(options.get("folds")),
            checkpoint=str(options.get("checkpoint") or "final"),
            mirroring=_flag(options, "mirroring", True),
            postprocessing=_flag(options, "postprocessing", False),
            step=step,
            configuration=options.get("configuration") or None,
            trainers=frozenset(trainers),
            label_codes=Path(codes) if codes else None,
        )
