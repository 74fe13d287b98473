"""Training data: MONAI datasets over a spec's cases, with caching and patch sampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureTyped,
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
    """Patch sampling with foreground oversampling, flips and intensity augmentation."""
    keys = ["image", "label"]
    return Compose(
        [
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
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd("image", factors=0.1, prob=0.3),
            RandShiftIntensityd("image", offsets=0.1, prob=0.3),
            RandGaussianNoised("image", std=0.05, prob=0.15),
            EnsureTyped(keys, track_meta=False),
        ]
    )


def make_train_loader(
    cases: Sequence[ResolvedCase], spec: DatasetSpec, train: TrainConfig, seed: int
) -> DataLoader:
    """A loader of random training patches over cached, preprocessed volumes.

    Args:
        cases: Training cases (with labels).
        spec: The data spec.
        train: Training settings (patch size, batch size, sampling).
        seed: Seed of the random transforms.

    Returns:
        A MONAI ``DataLoader`` yielding dicts of ``(B, C, X, Y, Z)`` tensors.
    """
    cached = CacheDataset(
        [case_dict(c) for c in cases], transform=deterministic_transforms(spec), progress=False, num_workers=0
    )
    sampler = random_transforms(train)
    sampler.set_random_state(seed=seed)
    patches = Dataset(cached, transform=sampler)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(patches, batch_size=train.batch_size, shuffle=True, num_workers=0, generator=generator)


def load_validation(cases: Sequence[ResolvedCase], spec: DatasetSpec) -> list[dict[str, Any]]:
    """Preprocessed validation volumes, loaded once."""
    det = deterministic_transforms(spec)
    return [det(case_dict(c)) for c in cases]
