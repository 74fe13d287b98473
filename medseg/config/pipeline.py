"""Pipeline configs (``pipelines/*.yaml``): which model, how to train it, how to run it.

Examples:
    >>> cfg = PipelineConfig.model_validate({"name": "tiny", "model": {"name": "unet3d"}})
    >>> cfg.inference.overlap
    0.25
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    FiniteFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from medseg.config.base import Axes3, FrozenModel, distinct_axes, dump_yaml, read_yaml, validate
from medseg.config.refine import RefineConfig
from medseg.config.spec import DatasetSpec, IntensitySpec

Size3 = tuple[PositiveInt, PositiveInt, PositiveInt]
Precision = Literal["auto", "float32", "bfloat16", "float16"]
"""What a network's forward pass computes in (see :mod:`medseg.tiling.precision`)."""
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
    """Sliding-window inference settings: the one schema of the tiling settings.

    :class:`~medseg.tiling.TilingSettings` (the tiling engine's value, with a concrete window size)
    is checked against this model too (:func:`check_tiling`), so every rule lives here.

    Attributes:
        patch_size: Window size (defaults to the training patch size).
        overlap: Fraction of overlap between neighbouring windows, ``0 <= overlap < 1``.
        batch_size: Windows per forward pass.
        blend: Weighting of overlapping windows (``gaussian`` or ``constant``).
        sigma_scale: Gaussian sigma as a fraction of the window size.
        tta_axes: Test-time augmentation by mirroring (as nnU-Net): every combination of flips along
            these spatial axes of the preprocessed grid is run (``2 ** len(tta_axes)`` passes) and the
            predictions averaged. Empty: none.
        memory: ``full`` (whole-volume accumulation buffers), ``bounded`` (slab by slab, for volumes
            larger than memory) or ``auto`` (bounded above ``memory_limit_mb``).
        memory_limit_mb: Size of the full float32 accumulation buffer above which ``auto`` bounds.
        placement: ``even`` (nnU-Net's evenly spread windows) or ``monai`` (MONAI's grid).
        slice_axis: For a 2D network on volumes, the axis it runs along.
        context: For a 2D network on volumes, neighbouring slices per side given as channels (2.5D).
        pad_value: Value of the padding added where the volume is smaller than a window.
        memory_format: ``contiguous``, ``channels_last`` or ``auto`` (the network's preference).
        stitch_threads: Intra-op threads for cutting windows and stitching; ``0``: chosen by a probe.
        precision: What the network's forward pass computes in: ``auto`` (bfloat16 on CPUs that
            compute it natively, float16 on CUDA, else float32; see
            :mod:`medseg.tiling.precision`), ``float32``, ``bfloat16`` or ``float16``. Blending,
            probabilities and labels are float32 whatever it is.
        tuning: ``measure`` (batch size and memory format chosen by a short measurement, cached;
            see :mod:`medseg.tiling.tuning`) or ``pinned`` (``batch_size`` and ``memory_format``
            as given, for identical outputs across runs).

    Examples:
        >>> InferenceConfig.model_validate({"memory": "bounded"}).memory
        'bounded'
        >>> check_tiling({"overlap": 1.5})
        Traceback (most recent call last):
        ...
        ValueError: overlap must be less than 1, got 1.5
    """

    patch_size: Size3 | None = None
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    batch_size: PositiveInt = 4
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: PositiveFloat = 0.125
    tta_axes: Axes3 = ()
    memory: Literal["auto", "full", "bounded"] = "auto"
    memory_limit_mb: PositiveFloat = 1024.0
    placement: Literal["even", "monai"] = "even"
    slice_axis: Literal[0, 1, 2] = 2
    context: Annotated[int, Field(ge=0)] = 0
    pad_value: FiniteFloat = 0.0
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    stitch_threads: Annotated[int, Field(ge=0)] = 0
    precision: Precision = "auto"
    tuning: Literal["measure", "pinned"] = "measure"

    @field_validator("tta_axes")
    @classmethod
    def _distinct_axes(cls, axes: tuple[int, ...]) -> tuple[int, ...]:
        return distinct_axes("tta_axes", axes)


def check_tiling(values: Mapping[str, Any]) -> None:
    """Check tiling settings by the rules of :class:`InferenceConfig` (absent fields: defaults).

    Raises:
        ValueError: Naming the first invalid field: "``field`` must be ..., got ...".
    """
    try:
        InferenceConfig.model_validate(dict(values))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(part) for part in err["loc"] if not isinstance(part, int)) or "settings"
        text = str(err["msg"])
        if text.startswith("Value error, "):  # our own validators word the whole message
            raise ValueError(text.removeprefix("Value error, ")) from None
        want = text.removeprefix("Input should be ").removeprefix("input should be ")
        msg = f"{field} must be {want}, got {err.get('input')!r}"
        raise ValueError(msg) from None


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
