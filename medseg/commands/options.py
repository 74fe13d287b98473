"""Model-source options from command-line flags (precision, window layout, foreign models' settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.commands.app import fail

Precision = Annotated[
    str | None,
    typer.Option(help="Network precision: auto, float32, bfloat16 or float16 (default: as the model says)."),
]
BatchSize = Annotated[
    int | None, typer.Option(min=1, help="Windows per forward pass, pinned (default: measured once).")
]
MemoryFormat = Annotated[
    str | None,
    typer.Option(help="Window layout, pinned: contiguous or channels_last (default: measured once)."),
]
TrustModelCode = Annotated[
    bool,
    typer.Option(
        "--trust-model-code",
        help="Let a foreign model's config run Python (a MONAI bundle's $-expressions and any "
        "_target_); without it such configs are refused, naming the keys.",
    ),
]


def foreign_model_options(
    folds: str | None, checkpoint: str | None, label_codes: Path | None, pairs: list[str] | None
) -> dict[str, str]:
    """The model source's options from ``predict``'s flags and ``--model-option KEY=VALUE`` pairs."""
    options = {k: v for k, v in (("folds", folds), ("checkpoint", checkpoint)) if v is not None}
    if label_codes is not None:
        options["label_codes"] = str(label_codes)
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--model-option must be KEY=VALUE, got '{pair}'")
        options[key.strip()] = value.strip()
    return options


def inference_options(precision: str | None, batch_size: int | None, memory_format: str | None) -> dict:
    """``--precision``, ``--batch-size`` and ``--memory-format`` as model-source options (checked)."""
    from medseg.errors import ConfigError
    from medseg.tiling.runtime import InferenceOptions

    try:
        options = InferenceOptions(precision=precision, batch_size=batch_size, memory_format=memory_format)
    except ConfigError as exc:
        fail(f"--{str(exc).replace('_', '-')}")
    return options.as_mapping()


def model_options(
    precision: str | None, batch_size: int | None, memory_format: str | None, trust_model_code: bool
) -> dict:
    """The model source's options: the inference options, and ``trust_model_code`` when given."""
    options = inference_options(precision, batch_size, memory_format)
    return {**options, "trust_model_code": True} if trust_model_code else options


def read_spec(path: Path):
    """A data spec's labels part, without resolving its data (which may be elsewhere)."""
    from medseg.config.base import read_yaml, validate
    from medseg.config.spec import DatasetSpec

    if path.suffix == ".json":
        from medseg.config.msd import spec_from_dataset_json

        return spec_from_dataset_json(path)
    return validate(DatasetSpec, read_yaml(path), str(path))
