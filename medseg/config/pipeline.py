"""Pipeline configs (``pipelines/*.yaml``): which model, how to train it, how to run it.

Examples:
    >>> cfg = PipelineConfig.model_validate({"name": "tiny", "model": {"name": "unet3d"}})
    >>> cfg.inference.overlap
    0.25
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from medseg.config.base import Axes3, FrozenModel, distinct_axes, dump_yaml, read_yaml, validate
from medseg.config.refine import RefineConfig
from medseg.config.spec import DatasetSpec, IntensitySpec

Size3 = tuple[PositiveInt, PositiveInt, PositiveInt]
Spacing3 = tuple[PositiveFloat, PositiveFloat, PositiveFloat]


class PreprocessConfig(FrozenModel):
    """Preprocessing decisions that override the data spec's (``medseg plan`` writes them).

    Attributes:
        target_spacing: Voxel spacing to resample to (x, y, z, RAS order), in mm.
        intensity: One intensity setting per channel.
    """

    target_spacing: Spacing3 | None = None
    intensity: list[IntensitySpec] | None = None


class AugmentConfig(FrozenModel):
    """Training augmentation (probabilities per patch; 0 turns a transform off).

    Attributes:
        flip_prob: Probability of a flip, per axis.
        flip_axes: Spatial axes of the preprocessed grid (RAS: 0 left-right, 1 posterior-anterior,
            2 inferior-superior) that may be flipped. All three by default, as nnU-Net; where labels
            depend on the direction along an axis (anterior vs posterior hippocampus), leave it out.
        rotate_prob: Probability of a random rotation (up to ``rotate_deg`` about each axis).
        rotate_deg: Largest rotation angle, degrees.
        scale_prob: Probability of a random zoom in ``[1 - scale, 1 + scale]``.
        scale: Zoom range.
        elastic_prob: Probability of an elastic deformation (slow on CPU).
        intensity_prob: Probability of a random intensity scale and shift (by 0.1).
        noise_prob: Probability of Gaussian noise (std 0.05).
        gamma_prob: Probability of a gamma change in ``[0.7, 1.5]``.
    """

    flip_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    flip_axes: Axes3 = (0, 1, 2)
    rotate_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    rotate_deg: Annotated[float, Field(ge=0.0, le=180.0)] = 15.0
    scale_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    scale: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.15
    elastic_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    intensity_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    noise_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.15
    gamma_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    @field_validator("flip_axes")
    @classmethod
    def _distinct_axes(cls, axes: tuple[int, ...]) -> tuple[int, ...]:
        return distinct_axes("flip_axes", axes)


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
        max_minutes: Stop after this wall time (minutes), at an epoch boundary; the learning-rate
            schedule follows the time budget (not in deterministic mode).
        optimizer: ``adamw`` or ``sgd`` (Nesterov, momentum 0.99, as nnU-Net).
        schedule: ``cosine`` or ``poly`` (exponent 0.9) learning-rate decay.
        deterministic: Deterministic algorithms, and a schedule by epochs only.
        cache: Keep preprocessed volumes in memory, on disk (``out/cache``), or not at all.
        folds: Number of cross-validation folds (used with ``--fold``).
        augment: Augmentation settings.
        mixed_precision: Autocast the forward pass to float16 on CUDA, and to bfloat16 on CPUs that
            compute it natively (AVX512-BF16 or AMX; about twice as fast there); float32 elsewhere.
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
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "poly"] = "cosine"
    deterministic: bool = False
    cache: Literal["memory", "disk", "none"] = "memory"
    folds: Annotated[int, Field(ge=2)] = 5
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    mixed_precision: bool = True


class InferenceConfig(FrozenModel):
    """Sliding-window inference settings.

    Attributes:
        patch_size: Window size (defaults to the training patch size).
        overlap: Fraction of overlap between neighbouring windows.
        batch_size: Windows per forward pass.
        blend: Weighting of overlapping windows.
        tta_axes: Test-time augmentation by mirroring (as nnU-Net): every combination of flips along
            these spatial axes of the preprocessed grid is run (``2 ** len(tta_axes)`` passes) and the
            predictions averaged. Empty: none.
    """

    patch_size: Size3 | None = None
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    batch_size: PositiveInt = 4
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta_axes: Axes3 = ()

    @field_validator("tta_axes")
    @classmethod
    def _distinct_axes(cls, axes: tuple[int, ...]) -> tuple[int, ...]:
        return distinct_axes("tta_axes", axes)


class PipelineConfig(FrozenModel):
    """A whole pipeline: preprocessing overrides, model, training, inference and refinement."""

    name: Annotated[str, Field(min_length=1)]
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)

    @model_validator(mode="after")
    def _mirror_as_trained(self) -> PipelineConfig:
        # as nnU-Net: predict only the mirror images the network saw in training
        aug = self.train.augment
        trained = set(aug.flip_axes) if aug.flip_prob > 0 else set()
        untrained = sorted(set(self.inference.tta_axes) - trained)
        if untrained:
            msg = (
                f"inference.tta_axes must be among the axes flipped in training "
                f"(train.augment.flip_axes {list(aug.flip_axes)}, flip_prob {aug.flip_prob}), "
                f"got {list(self.inference.tta_axes)}: the network never saw flips along {untrained}"
            )
            raise ValueError(msg)
        return self

    @property
    def window(self) -> tuple[int, int, int]:
        """The inference window size."""
        return self.inference.patch_size or self.train.patch_size

    def effective_spec(self, spec: DatasetSpec) -> DatasetSpec:
        """The data spec with this pipeline's preprocessing overrides applied.

        Raises:
            ValueError: If the override lists a different number of channels than the spec.
        """
        update: dict[str, object] = {}
        if self.preprocess.target_spacing is not None:
            update["target_spacing"] = self.preprocess.target_spacing
        if self.preprocess.intensity is not None:
            if len(self.preprocess.intensity) != len(spec.channels):
                msg = (
                    f"preprocess.intensity must hold one setting per channel ({len(spec.channels)}), "
                    f"got {len(self.preprocess.intensity)}"
                )
                raise ValueError(msg)
            update["channels"] = [
                c.model_copy(update={"intensity": i})
                for c, i in zip(spec.channels, self.preprocess.intensity)
            ]
        return spec.model_copy(update=update) if update else spec


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Load and validate a pipeline YAML.

    Raises:
        ConfigError: Naming the file and the field.
    """
    return validate(PipelineConfig, read_yaml(path), str(path))


def save_pipeline(cfg: PipelineConfig, path: str | Path) -> None:
    """Write a pipeline config as YAML (atomically)."""
    dump_yaml(cfg, path)
