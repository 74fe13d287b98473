"""An nnU-Net v2 model folder as a medseg :class:`~medseg.sources.models.SegmentationModel`.

Inference follows nnU-Net's own, step by step, on the scan's stored voxel order (no reorientation):
medseg's ``(C, X, Y, Z)`` is SimpleITK's ``(C, z, y, x)`` reversed, so the array is reversed, run
through nnU-Net's preprocessing (:mod:`.preprocess`), the sliding window of every fold
(:mod:`.sliding`), the logits resampled back to the cropped grid with the plans' probability
resampling, turned into labels (argmax, or regions by ``regions_class_order``), the crop undone,
the transpose undone, and reversed back to medseg's order. nnU-Net's post-processing runs only when
asked, and the description records whether it ran.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.config.spec import DatasetSpec
from medseg.errors import ConfigError, InputError
from medseg.io.hashing import file_sha256
from medseg.labelmap import label_dtype
from medseg.sources.models import ModelDescription
from medseg.sources.nnunet.checkpoint import Checkpoint, load_checkpoint
from medseg.sources.nnunet.folder import ModelFolder, open_model_folder
from medseg.sources.nnunet.network import build_network, load_weights
from medseg.sources.nnunet.plans import Configuration, DatasetInfo, Plans, read_json
from medseg.sources.nnunet.postprocess import Postprocessing, read_postprocessing
from medseg.sources.nnunet.preprocess import Preprocessed, preprocess
from medseg.sources.nnunet.resample import resample_to_shape
from medseg.sources.nnunet.settings import NnunetSettings
from medseg.sources.nnunet.sliding import SlidingTimings, sliding_window_logits

_MR_NAMES = ("MR", "MRI", "T1", "T2", "T1CE", "T1GD", "FLAIR", "ADC", "DWI", "PD")


def _modality(channel: str) -> str:
    name = channel.strip().upper()
    return "CT" if name == "CT" else "MR" if name in _MR_NAMES else "OTHER"


def _spec(info: DatasetInfo, name: str, codes: Path | None) -> DatasetSpec:
    """A :class:`DatasetSpec` for exports and checks: channels and labels from ``dataset.json``.

    Its cases are nnU-Net's file naming (``imagesTs/{case}_0000<ending>``, one pattern per channel).
    """
    from pydantic import ValidationError

    from medseg.config.base import format_validation_error, read_yaml

    n = len(info.channel_names)
    data: dict[str, Any] = {
        "name": name,
        "channels": [{"name": c, "modality": _modality(c)} for c in info.channel_names],
        "labels": info.output_labels,
        "case_patterns": {"images": [f"imagesTs/{{case}}_{c:04d}{info.file_ending}" for c in range(n)]},
    }
    if codes is not None:
        data["label_codes"] = read_yaml(codes)
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(codes or "dataset.json"))) from exc


class NnunetModel:
    """A loaded nnU-Net v2 model folder (one configuration, one or more folds).

    Args:
        location: The model folder or its zip.
        settings: Folds, checkpoint, mirroring, post-processing.
        device: Where the network runs.
    """

    def __init__(self, location: str | Path, settings: NnunetSettings, device: str = "cpu") -> None:
        self.settings = settings
        self.location = str(location)
        self.folder: ModelFolder = open_model_folder(
            location,
            folds=settings.folds,
            checkpoint=settings.checkpoint,
            configuration=settings.configuration,
        )
        self.plans = Plans.from_json(read_json(self.folder.plans_file), source=str(self.folder.plans_file))
        self.dataset = DatasetInfo.from_json(
            read_json(self.folder.dataset_file), source=str(self.folder.dataset_file)
        )
        self.checkpoints: list[Checkpoint] = [
            load_checkpoint(p, extra_trainers=settings.trainers) for p in self.folder.checkpoints
        ]
        first = self.checkpoints[0]
        name = first.configuration or self.folder.configuration_hint or ""
        self.config: Configuration = self.plans.configuration(name)
        for ckpt in self.checkpoints[1:]:
            if ckpt.configuration and ckpt.configuration != name:
                msg = f"{ckpt.path} must be trained for configuration '{name}', got '{ckpt.configuration}'"
                raise ConfigError(msg)
        self.device = torch.device(device)
        self.networks = []
        for ckpt in self.checkpoints:
            network = build_network(
                self.config,
                input_channels=len(self.dataset.channel_names),
                num_classes=self.dataset.num_heads,
                source=str(self.folder.plans_file),
            )
            load_weights(network, ckpt.weights, checkpoint=str(ckpt.path))
            self.networks.append(network.to(self.device).eval())
        self.mirror_axes: tuple[int, ...] = (first.mirror_axes or ()) if settings.mirroring else ()
        self.postprocessing: Postprocessing | None = (
            read_postprocessing(self.folder.postprocessing_file) if settings.postprocessing else None
        )
        self.spec = _spec(self.dataset, self.folder.path.parent.name or "nnunet", settings.label_codes)

    @property
    def sha256(self) -> str:
        """The checkpoints' SHA-256, ``+``-joined in fold order."""
        return "+".join(c.sha256 for c in self.checkpoints)

    def describe(self) -> ModelDescription:
        """Kind ``nnunet``: folder, configuration, folds, plans and dataset hashes, weights' hashes."""
        return ModelDescription(
            kind="nnunet",
            location=str(self.folder.path),
            sha256=self.sha256,
            params={
                "configuration": self.config.name,
                "trainer": self.checkpoints[0].trainer_name,
                "plans": self.plans.name,
                "folds": ",".join(self.folder.folds),
                "checkpoint": self.settings.checkpoint,
                "mirroring": ",".join(str(a) for a in self.mirror_axes) or "off",
                "postprocessing": self.postprocessing.describe() if self.postprocessing else "not applied",
                "plans_sha256": file_sha256(self.folder.plans_file),
                "dataset_sha256": file_sha256(self.folder.dataset_file),
            },
        )

    def predict(self, image: Any, *, keep_probabilities: bool = False) -> Any:
        """Segment one loaded ``(C, X, Y, Z)`` scan as nnU-Net would; labels on its own grid.

        Args:
            image: A MetaTensor as :func:`medseg.io.load_image` gives it (stored voxel order).
            keep_probabilities: Also return ``(K, X, Y, Z)`` probabilities (softmax, or sigmoid
                per region).

        Returns:
            A :class:`medseg.pipeline.Prediction`.

        Raises:
            InputError: Wrong channel count or dimensionality, or non-finite voxels.
        """
        from medseg.geometry import spacing_from_affine
        from medseg.predict.records import Prediction, StageRecord, seconds_by_stage

        n = len(self.dataset.channel_names)
        where = str(image.meta.get("filename_or_obj", "image")) if hasattr(image, "meta") else "image"
        if image.ndim == 4 and image.shape[0] == 1 and n > 1 and Path(where).is_file():
            image = self._sibling_channels(Path(where), image)
        if image.ndim != 4 or image.shape[0] != n:
            msg = (
                f"{where}: image must have {n} channel(s) {list(self.dataset.channel_names)} "
                f"as (C, X, Y, Z), got shape {tuple(image.shape)}"
            )
            raise InputError(msg)
        array = np.asarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image)
        if not np.isfinite(array).all():
            msg = "image voxels must be finite, got NaN or inf values"
            raise InputError(msg)
        affine = np.asarray(image.affine, dtype=np.float64)
        spacing = tuple(float(s) for s in spacing_from_affine(affine))
        t0 = time.perf_counter()
        case = preprocess(
            array.transpose(0, 3, 2, 1),
            spacing=spacing[::-1],
            config=self.config,
            transpose_forward=self.plans.transpose_forward,
            intensity_properties=self.plans.intensity_properties,
        )
        t1 = time.perf_counter()
        timings = SlidingTimings()
        logits = sliding_window_logits(
            self.networks,
            case.data,
            patch_size=self.config.patch_size,
            num_heads=self.dataset.num_heads,
            mirror_axes=self.mirror_axes,
            step=self.settings.step,
            device=self.device,
            timings=timings,
        )
        t2 = time.perf_counter()
        labels, probabilities = self._to_source(logits, case, keep_probabilities)
        t3 = time.perf_counter()
        records = [
            StageRecord(
                "preprocess",
                t1 - t0,
                params={
                    "configuration": self.config.name,
                    "transpose": list(self.plans.transpose_forward),
                    "normalization": list(self.config.normalization_schemes),
                    "spacing": list(case.network_spacing),
                },
                changed={"crop": [list(b) for b in case.bbox], "shape": list(case.data.shape[1:])},
            ),
            StageRecord(
                "model",
                t2 - t1,
                params={
                    "folds": list(self.folder.folds),
                    "mirror_axes": list(self.mirror_axes),
                    "step": self.settings.step,
                    "patch_size": list(self.config.patch_size),
                },
                changed={"windows": timings.windows},
                timings={"forward": timings.forward},
            ),
            StageRecord("to_source", t3 - t2, params={"shape": list(labels.shape)}),
        ]
        if self.postprocessing is not None:
            before = labels
            labels = self.postprocessing.apply(labels)
            records.append(
                StageRecord(
                    "postprocess",
                    time.perf_counter() - t3,
                    params={"steps": self.postprocessing.describe()},
                    changed={"voxels": int((before != labels).sum())},
                )
            )
        seconds = {**seconds_by_stage(records), "network": timings.forward}
        return Prediction(labels, affine, probabilities, seconds, provenance=tuple(records))

    def _sibling_channels(self, path: Path, image: Any) -> Any:
        """A multi-channel case given by its ``_0000`` file: the other channel files, stacked."""
        from medseg.sources.nnunet.channels import channel_files, load_channels, split_channel_name

        parsed = split_channel_name(path.name, self.dataset.file_ending)
        if parsed is None:
            return image
        if parsed[1] != 0:
            msg = f"{path}: is channel {parsed[1]} of case '{parsed[0]}', segmented from its _0000 file"
            raise InputError(msg)
        return load_channels(channel_files(path, n_channels=len(self.dataset.channel_names)))

    def predict_files(self, files: Sequence[str | Path], *, keep_probabilities: bool = False) -> Any:
        """Segment a case given as files: one per channel, or any one ``CASE_XXXX`` file of it.

        Args:
            files: The channel files in order, or one of them (the others are found by suffix).
            keep_probabilities: Also return the probabilities.

        Returns:
            A :class:`medseg.pipeline.Prediction`.
        """
        from medseg.sources.nnunet.channels import channel_files, load_channels

        n = len(self.dataset.channel_names)
        paths: list[str | Path] = list(files)
        if len(paths) == 1:
            paths = list(channel_files(paths[0], n_channels=n, file_ending=self.dataset.file_ending))
        return self.predict(load_channels(paths), keep_probabilities=keep_probabilities)

    def _to_source(
        self, logits: torch.Tensor, case: Preprocessed, keep_probabilities: bool
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """Logits on the network grid to labels (and probabilities) in medseg's order on the source grid."""
        _, kwargs = self.config.resampling_probabilities
        current = (
            self.config.spacing
            if len(self.config.spacing) == len(case.shape_after_crop)
            else (case.spacing[0], *self.config.spacing)
        )
        resampled = resample_to_shape(
            logits.numpy(),
            case.shape_after_crop,
            current,
            case.spacing,
            order=int(kwargs.get("order", 1)),
            order_z=int(kwargs.get("order_z", 0)),
            force_separate_z=kwargs.get("force_separate_z"),
        )
        values = torch.from_numpy(np.ascontiguousarray(resampled)).float()
        probabilities = None
        if self.dataset.has_regions or keep_probabilities:
            probabilities = torch.sigmoid(values) if self.dataset.has_regions else torch.softmax(values, 0)
        dtype = label_dtype(self.spec.num_classes)
        if self.dataset.has_regions:
            assert probabilities is not None
            assert self.dataset.regions_class_order is not None
            crop_labels = np.zeros(values.shape[1:], dtype=dtype)
            for i, value in enumerate(self.dataset.regions_class_order):
                crop_labels[(probabilities[i] > 0.5).numpy()] = value
        else:
            crop_labels = values.numpy().argmax(0).astype(dtype)
        box = tuple(slice(a, b) for a, b in case.bbox)
        labels = np.zeros(case.shape_before_crop, dtype=dtype)
        labels[box] = crop_labels
        back = list(self.plans.transpose_backward)
        labels = labels.transpose(back).transpose(2, 1, 0)
        if not keep_probabilities:
            return np.ascontiguousarray(labels), None
        assert probabilities is not None
        full = torch.zeros((probabilities.shape[0], *case.shape_before_crop), dtype=torch.float32)
        if not self.dataset.has_regions:
            full[0] = 1.0
        full[(slice(None), *box)] = probabilities
        full = full.permute(0, *[b + 1 for b in back]).permute(0, 3, 2, 1).contiguous()
        return np.ascontiguousarray(labels), full


def load_nnunet(locations: Sequence[str], *, device: str = "cpu", options: Mapping[str, Any]) -> NnunetModel:
    """The ``nnunet`` model source: one model folder (or zip); its folds are the ensemble.

    Raises:
        ConfigError: Several locations, or what :class:`NnunetModel` refuses.
    """
    if len(locations) != 1:
        msg = f"nnunet: model must be one model folder (its folds are the ensemble), got {len(locations)}"
        raise ConfigError(msg)
    return NnunetModel(locations[0], NnunetSettings.from_options(options), device=device)
