"""Training data: MONAI datasets over a spec's cases, with caching and patch sampling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureTyped,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from medseg.config.pipeline import TrainConfig
from medseg.config.spec import DatasetSpec, ResolvedCase
from medseg.io.load import make_load_transform
from medseg.preprocess import build_preprocess


def case_dict(case: ResolvedCase) -> dict[str, Any]:
    """A MONAI data dict for a case (several channel files become a list)."""
    images = [str(p) for p in case.images]
    item: dict[str, Any] = {"image": images[0] if len(images) == 1 else images, "id": case.id}
    if case.label is not None:
        item["label"] = str(case.label)
    return item


def deterministic_transforms(spec: DatasetSpec) -> Compose:
    """Load and preprocess image and label (the part worth caching)."""
    return Compose(
        [
            make_load_transform(["image", "label"], dtype=np.float32),
            build_preprocess(spec, keys=("image",), label_key="label"),
            CastToTyped(keys=["image", "label"], dtype=[torch.float32, torch.uint8]),
        ]
    )


def random_transforms(train: TrainConfig) -> Compose:
    """Patch sampling with foreground oversampling, then the configured augmentation."""
    keys = ["image", "label"]
    aug = train.augment
    steps: list[Any] = [
        SpatialPadd(keys, spatial_size=train.patch_size),
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=train.patch_size,
            pos=train.pos_fraction,
            neg=1.0 - train.pos_fraction,
            num_samples=train.samples_per_volume,
            allow_smaller=False,
        ),
        EnsureTyped(keys, track_meta=False),
    ]
    if aug.rotate_prob > 0 or aug.scale_prob > 0:
        angle = float(np.radians(aug.rotate_deg)) if aug.rotate_prob > 0 else 0.0
        steps.append(
            RandAffined(
                keys,
                prob=max(aug.rotate_prob, aug.scale_prob),
                rotate_range=(angle, angle, angle),
                scale_range=(aug.scale,) * 3 if aug.scale_prob > 0 else None,
                mode=("bilinear", "nearest"),
                padding_mode="border",
            )
        )
    if aug.elastic_prob > 0:
        steps.append(
            Rand3DElasticd(
                keys,
                sigma_range=(5, 7),
                magnitude_range=(50, 150),
                prob=aug.elastic_prob,
                mode=("bilinear", "nearest"),
            )
        )
    if aug.flip_prob > 0:
        steps += [RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis) for axis in aug.flip_axes]
    if aug.intensity_prob > 0:
        steps += [
            RandScaleIntensityd("image", factors=0.1, prob=aug.intensity_prob),
            RandShiftIntensityd("image", offsets=0.1, prob=aug.intensity_prob),
        ]
    if aug.noise_prob > 0:
        steps.append(RandGaussianNoised("image", std=0.05, prob=aug.noise_prob))
    if aug.gamma_prob > 0:
        steps.append(RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=aug.gamma_prob))
    steps.append(EnsureTyped(keys, track_meta=False))
    return Compose(steps)


class PatchLoader:
    """Random training patches over cached, preprocessed volumes, re-seeded per epoch.

    Seeding each epoch from ``(seed, epoch)`` makes an epoch's patches independent of what ran
    before, so a resumed run sees exactly the patches an uninterrupted one would.

    Args:
        cases: Training cases (with labels).
        spec: The data spec.
        train: Training settings (patch size, batch size, sampling, augmentation, cache).
        seed: Base seed.
        cache_dir: Folder for the on-disk cache (``train.cache == "disk"``).
    """

    def __init__(
        self,
        cases: Sequence[ResolvedCase],
        spec: DatasetSpec,
        train: TrainConfig,
        seed: int,
        cache_dir: Path | None = None,
    ) -> None:
        items = [case_dict(c) for c in cases]
        det = deterministic_transforms(spec)
        if train.cache == "memory":
            volumes: Any = CacheDataset(items, transform=det, progress=False, num_workers=0)
        elif train.cache == "disk":
            volumes = PersistentDataset(items, transform=det, cache_dir=cache_dir)
        else:
            volumes = Dataset(items, transform=det)
        self.sampler = random_transforms(train)
        self.seed = seed
        self.generator = torch.Generator()
        self.loader = DataLoader(
            Dataset(volumes, transform=self.sampler),
            batch_size=train.batch_size,
            shuffle=True,
            num_workers=0,
            generator=self.generator,
        )

    def epoch(self, epoch: int) -> DataLoader:
        """The loader for one epoch, seeded from ``(seed, epoch)``."""
        epoch_seed = (self.seed * 100_003 + epoch) % (2**31)
        self.sampler.set_random_state(seed=epoch_seed)
        self.generator.manual_seed(epoch_seed)
        return self.loader


def load_validation(cases: Sequence[ResolvedCase], spec: DatasetSpec) -> list[dict[str, Any]]:
    """Preprocessed validation volumes, loaded once."""
    det = deterministic_transforms(spec)
    return [det(case_dict(c)) for c in cases]
