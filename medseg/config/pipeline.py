"""Pipeline configs (``pipelines/*.yaml``): which model, how to train it, how to run it.

Examples:
    >>> cfg = PipelineConfig.model_validate({"name": "tiny", "model": {"name": "unet3d"}})
    >>> cfg.inference.overlap
    0.25
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from medseg.config.base import FrozenModel, dump_yaml, read_yaml, validate

Size3 = tuple[PositiveInt, PositiveInt, PositiveInt]


class ModelConfig(FrozenModel):
    """A registered model and its hyper-parameters (see ``medseg.models``)."""

    name: str = "unet3d"
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(FrozenModel):
    """Training settings.

    Attributes:
        epochs: Passes over the training cases.
        patch_size: Size of the random training patches (x, y, z), divisible by the model's divisor.
        batch_size: Volumes per step (each gives ``samples_per_volume`` patches).
        samples_per_volume: Patches cropped from each loaded volume.
        pos_fraction: Fraction of patches centred on foreground (oversampling, as nnU-Net does).
        learning_rate: AdamW learning rate (cosine schedule).
        weight_decay: AdamW weight decay.
        val_fraction: Fraction of cases held out for validation.
        val_every: Validate every N epochs (full tiled inference on whole volumes).
        seed: Random seed.
        max_minutes: Stop after this wall time (minutes), at an epoch boundary.
    """

    epochs: PositiveInt = 100
    patch_size: Size3 = (48, 48, 32)
    batch_size: PositiveInt = 2
    samples_per_volume: PositiveInt = 2
    pos_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.67
    learning_rate: PositiveFloat = 2e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-5
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    val_every: PositiveInt = 10
    seed: int = 0
    max_minutes: PositiveFloat | None = None


class InferenceConfig(FrozenModel):
    """Sliding-window inference settings.

    Attributes:
        patch_size: Window size (defaults to the training patch size).
        overlap: Fraction of overlap between neighbouring windows.
        batch_size: Windows per forward pass.
        blend: Weighting of overlapping windows.
    """

    patch_size: Size3 | None = None
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    batch_size: PositiveInt = 4
    blend: Literal["gaussian", "constant"] = "gaussian"


class PipelineConfig(FrozenModel):
    """A whole pipeline: model, training and inference."""

    name: Annotated[str, Field(min_length=1)]
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    @property
    def window(self) -> tuple[int, int, int]:
        """The inference window size."""
        return self.inference.patch_size or self.train.patch_size


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Load and validate a pipeline YAML.

    Raises:
        ConfigError: Naming the file and the field.
    """
    return validate(PipelineConfig, read_yaml(path), str(path))


def save_pipeline(cfg: PipelineConfig, path: str | Path) -> None:
    """Write a pipeline config as YAML (atomically)."""
    dump_yaml(cfg, path)
