"""A loaded MONAI bundle as a :class:`~medseg.sources.models.SegmentationModel`.

One scan goes: the bundle's preprocessing (MONAI transforms, on the scan as medseg loaded it, in
float32 as ``LoadImaged`` gives it) → medseg's tiling engine with the inferer's windows
(:mod:`.inferer`) → the bundle's postprocessing, its ``Invertd`` taking the result back through the
preprocessing to the scan's own grid (:mod:`.postprocess`) → a :class:`~medseg.predict.Prediction`
that medseg's writers, exports and tracking take like any other.
"""

from __future__ import annotations

import time
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.errors import ConfigError, InputError, MedsegError
from medseg.io.hashing import file_sha256
from medseg.predict.records import ModelDescription
from medseg.sources.monai_bundle.inferer import WindowSetup, window_setup
from medseg.sources.monai_bundle.layout import BundleFiles, read_config
from medseg.sources.monai_bundle.metadata import spec_from_metadata
from medseg.sources.monai_bundle.postprocess import (
    IMAGE,
    PRED,
    check_postprocessing,
    describe_steps,
    run_postprocessing,
)
from medseg.sources.monai_bundle.sections import BundleParts, build_safely, build_trusted

if TYPE_CHECKING:
    from medseg.config.spec import DatasetSpec
    from medseg.predict.records import Prediction

KIND = "monai-bundle"


def _first_line(exc: BaseException) -> str:
    """The innermost cause's type and first line (MONAI wraps transform errors in RuntimeErrors)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _scan_name(image: object) -> str:
    """``"path: "`` for messages about a scan, or nothing where the scan's file is not known."""
    meta = image.meta if isinstance(image, MetaTensor) else {}
    name = str(meta.get("filename_or_obj", "") or "")
    return f"{name}: " if name and not name.startswith("<") else ""


def load_weights(network: torch.nn.Module, path: Path) -> None:
    """Load ``models/model.pt`` into the network: tensors only, keys and shapes strictly.

    Accepts a state dict or ``{"model": state_dict}`` (what MONAI's ``CheckpointLoader`` takes).

    Raises:
        ConfigError: An unreadable file, one that holds more than tensors, or weights of another
            network (naming the file and the first mismatching keys).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles refused by weights_only, truncated files, ...
        msg = f"{path}: must be a PyTorch state dict of tensors, got {_first_line(exc)}"
        raise ConfigError(msg) from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        got = type(state).__name__
        msg = f"{path}: must be a state dict of tensors (or {{'model': state_dict}}), got {got}"
        raise ConfigError(msg)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        own = network.state_dict()
        missing = sorted(set(own) - set(state))[:3]
        extra = sorted(set(state) - set(own))[:3]
        shapes = [k for k in own if k in state and own[k].shape != state[k].shape][:3]
        detail = f"missing {missing}, unexpected {extra}, other shapes {shapes}"
        msg = f"{path}: must hold the weights of network_def ({type(network).__name__}), got {detail}"
        raise ConfigError(msg) from exc


class MonaiBundleModel:
    """A MONAI Model Zoo bundle, run by medseg.

    Args:
        files: The bundle's files.
        device: Where the network runs.
        trust_code: Build the config with MONAI's ``ConfigParser`` (runs its ``$``-expressions);
            otherwise only literal configs with MONAI networks, transforms and inferers are built.

    Raises:
        ConfigError: A config, metadata or weights file medseg cannot run (naming the file).
    """

    def __init__(
        self, files: BundleFiles, *, device: str | torch.device = "cpu", trust_code: bool = False
    ) -> None:
        self.files = files
        self.device = torch.device(device)
        meta = read_config(files.metadata)
        self.spec: DatasetSpec = spec_from_metadata(meta, source=files.metadata)
        self.version = str(meta.get("version", ""))
        if trust_code:
            parts = build_trusted(files.config, files.metadata, files.folder)
        else:
            parts = build_safely(read_config(files.config), source=files.config)
        self.parts: BundleParts = parts
        check_postprocessing(parts.postprocessing, source=str(files.config))
        try:
            self.windows: WindowSetup = window_setup(parts.inferer)
        except ConfigError as exc:
            raise ConfigError(f"{files.config}: {exc}") from exc
        load_weights(parts.network, files.weights)
        self.network = parts.network.to(self.device).eval()
        self._sha256 = file_sha256(files.weights)
        self._config_sha256 = file_sha256(files.config)
        self._metadata_sha256 = file_sha256(files.metadata)

    @property
    def sha256(self) -> str:
        """The SHA-256 of ``models/model.pt``."""
        return self._sha256

    def describe(self) -> ModelDescription:
        """Kind, folder, config and metadata hashes, weights hash and how it runs (for tracking)."""
        params = {
            "config": self.files.config.relative_to(self.files.folder).as_posix(),
            "config_sha256": self._config_sha256,
            "metadata_sha256": self._metadata_sha256,
            "bundle_name": self.spec.name,
            "bundle_version": self.version,
            "folder": str(self.files.folder),
            "model": type(self.network).__name__,
            "postprocessing": describe_steps(self.parts.postprocessing),
            "trusted_code": str(self.parts.trusted).lower(),
            "left_out": ", ".join(self.parts.skipped) or "(none)",
            **self.windows.as_params(),
        }
        return ModelDescription(kind=KIND, location=str(self.files.folder), sha256=self.sha256, params=params)

    def _check_image(self, image: MetaTensor) -> MetaTensor:
        name = _scan_name(image)
        n = len(self.spec.channels)
        if image.ndim != 4:
            msg = f"{name}image must be 3D with a channel axis (C, X, Y, Z), got shape {tuple(image.shape)}"
            raise InputError(msg)
        if image.shape[0] != n:
            msg = f"{name}image must have {n} channel(s) as {self.files.metadata} says, got {image.shape[0]}"
            raise InputError(msg)
        data = image.as_tensor().float() if isinstance(image, MetaTensor) else torch.as_tensor(image).float()
        if not torch.isfinite(data).all():
            msg = f"{name}image voxels must be finite, got NaN or inf values"
            raise InputError(msg)
        return MetaTensor(data, meta=deepcopy(dict(image.meta)) if isinstance(image, MetaTensor) else {})

    def predict(self, image: MetaTensor, *, keep_probabilities: bool = False) -> Prediction:
        """Segment one loaded ``(C, X, Y, Z)`` scan; labels (and probabilities) on its own grid.

        Raises:
            InputError: A wrong channel count or shape, non-finite voxels, or a transform of the
                bundle that failed on this scan (naming the scan).
        """
        from medseg.predict.records import Prediction, StageRecord
        from medseg.predict.stages import foreground_entropy

        source = self._check_image(image)
        name = _scan_name(source)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            sample = self.parts.preprocessing({IMAGE: source})
        except MedsegError:
            raise
        except Exception as exc:
            msg = f"{name}the bundle's preprocessing must accept the scan, got {_first_line(exc)}"
            raise InputError(msg) from exc
        grid = sample[IMAGE]
        t1 = time.perf_counter()
        windows = self.windows.run(self.network, grid, device=self.device)
        t2 = time.perf_counter()
        pred = MetaTensor(windows.logits, meta=deepcopy(dict(grid.meta)))
        try:
            post = run_postprocessing(
                self.parts.postprocessing,
                self.parts.preprocessing,
                {**sample, PRED: pred},
                want_probabilities=keep_probabilities,
            )
        except MedsegError:
            raise
        except Exception as exc:
            msg = f"{name}the bundle's postprocessing must accept the prediction, got {_first_line(exc)}"
            raise InputError(msg) from exc
        t3 = time.perf_counter()
        if tuple(post.labels.shape) != tuple(source.shape[1:]):
            want, got = tuple(source.shape[1:]), tuple(post.labels.shape)
            msg = f"{name}labels must come back on the scan's grid {want}, got {got}"
            raise InputError(msg)
        dtype = np.uint8 if self.spec.num_classes <= 256 else np.uint16
        labels = torch.round(post.labels.float()).numpy().astype(dtype)
        quality: dict[str, float] = {}
        if post.probabilities is not None:
            entropy = foreground_entropy(post.probabilities, labels)
            if entropy is not None:
                quality["foreground_entropy"] = entropy
        seconds.update(
            preprocess=t1 - t0, model=t2 - t1, network=windows.timings["forward"], to_source=t3 - t2
        )
        steps = self.parts.preprocessing.transforms
        provenance = (
            StageRecord(
                "preprocess",
                t1 - t0,
                params={"transforms": [type(t).__name__ for t in steps]},
                changed={"shape": list(grid.shape[1:])},
            ),
            StageRecord(
                "model",
                t2 - t1,
                params=dict(self.windows.as_params()),
                changed={"windows": windows.plan.num_windows, "padding": [list(p) for p in windows.pads]},
                timings=windows.timings,
            ),
            StageRecord(
                "to_source",
                t3 - t2,
                params={"postprocessing": describe_steps(self.parts.postprocessing)},
                changed={"shape": list(labels.shape)},
            ),
        )
        return Prediction(
            labels=labels,
            affine=np.asarray(image.affine, dtype=np.float64),
            probabilities=post.probabilities if keep_probabilities else None,
            seconds=seconds,
            quality=quality,
            provenance=provenance,
        )
