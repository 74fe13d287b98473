"""The prediction pipeline, step by step: load → preprocess → tile/model/stitch → back to source →
refine → write.

Refinement follows the bundle's ``refine:`` settings (or an override): the dense CRF on the
probabilities on the source grid (in the memory-bounded mode for large volumes, on the preprocessed
grid from memory-mapped probabilities, its labels then taken back to the source grid), then the
post-processing chosen at training, on the source grid. Clinician exports follow in the batch runner.

Examples:
    >>> from medseg.pipeline import Predictor  # doctest: +SKIP
    >>> pred = Predictor.from_path("demo_out/model/bundle")  # doctest: +SKIP
    >>> result = pred.predict_path("scan.nii.gz")  # doctest: +SKIP
    >>> result.labels.shape  # on the scan's own voxel grid  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.bundle import Bundle, load_bundle
from medseg.errors import GeometryError, InputError
from medseg.geometry import spacing_from_affine
from medseg.io import load_image, write_label_map
from medseg.labelmap import label_dtype, torch_label_dtype
from medseg.preprocess import build_preprocess, invert_to_source
from medseg.preprocess.intensity import NormalizeChannelsd
from medseg.refine import PostprocessConfig, RefineConfig, RefineReport, postprocess_with_report, refine
from medseg.sources.models import ModelDescription
from medseg.tiling import TilingSettings, argmax_channels, choose_memory_mode, infer, plan_for
from medseg.tiling.sinks import (
    ENTROPY_SAMPLES,
    ForegroundEntropy,
    ProbabilityWriter,
    entropy_sum,
    sampling_step,
)
from medseg.tiling.to_source import SourceGridLabels, SourceMapping, source_mapping


@dataclass
class Prediction:
    """A prediction on the source image's grid.

    Attributes:
        labels: ``(X, Y, Z)`` label map (uint8/int) on the source grid.
        affine: The source grid's RAS+ affine (as loaded from disk).
        probabilities: ``(K, X, Y, Z)`` class probabilities on the source grid, if kept (before
            refinement).
        seconds: Wall time per step: ``preprocess``, ``model`` (tiled inference: cutting windows, the
            network, stitching), ``network`` (the forward passes alone), ``to_source`` and, when they
            ran, ``refine`` and ``postprocess``.
        refine: What refinement changed (:class:`~medseg.refine.RefineReport`), or ``None`` if
            neither the CRF nor post-processing ran.
        quality: Facts for review: ``foreground_entropy``, the mean softmax entropy (in nats) over
            the voxels predicted as foreground (on a regular sub-grid of large volumes; not with
            the CRF in the memory-bounded mode).
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    refine: Any = None
    quality: dict[str, float] = field(default_factory=dict)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value is finite: one reduction (NaN and inf propagate into the sum), and the
    exact check only when the sum itself is not finite (say an overflow of huge finite values)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def foreground_entropy(
    probs: torch.Tensor, labels: np.ndarray, chunk: int = 1 << 20, max_voxels: int = ENTROPY_SAMPLES
) -> float | None:
    """Mean softmax entropy (nats) over the voxels labelled foreground; ``None`` if there are none.

    Large volumes are sampled on a regular sub-grid (every ``s``-th voxel along each axis, at most
    about ``max_voxels`` voxels): a mean over millions of voxels does not need all of them.

    Args:
        probs: ``(K, *spatial)`` probabilities.
        labels: The ``(*spatial)`` label map.
        chunk: Voxels per step (bounds the temporary memory).
        max_voxels: Voxels to look at, at most (about).
    """
    step = sampling_step(labels.shape, max_voxels)
    if step > 1:
        grid = tuple(slice(None, None, step) for _ in range(labels.ndim))
        probs, labels = probs[(slice(None), *grid)], labels[grid]
    mask = torch.from_numpy(np.ascontiguousarray(labels) != 0)
    n = int(mask.sum())
    return entropy_sum(probs, mask, chunk) / n if n else None


class Predictor:
    """Runs one or more model bundles (an ensemble averages probabilities) over whole volumes.

    Args:
        bundles: The loaded bundle(s); all must share labels and channels.
        device: Where the network runs.
        refine: Refinement settings replacing the first bundle's ``refine:`` section (whose
            post-processing was chosen at training).
    """

    def __init__(
        self,
        bundles: Bundle | list[Bundle],
        device: str | torch.device = "cpu",
        refine: RefineConfig | None = None,
    ) -> None:
        self.bundles = bundles if isinstance(bundles, list) else [bundles]
        if not self.bundles:
            msg = "Predictor needs at least one bundle, got none"
            raise InputError(msg)
        first = self.bundles[0].spec
        for b in self.bundles[1:]:
            if b.spec.labels != first.labels or len(b.spec.channels) != len(first.channels):
                msg = (
                    f"ensemble members must share labels and channels, got {first.labels} and {b.spec.labels}"
                )
                raise InputError(msg)
        self.device = torch.device(device)
        self.refine = refine if refine is not None else self.bundles[0].pipeline.refine
        self._preprocess = [build_preprocess(b.spec, keys=("image",), label_key=None) for b in self.bundles]
        for b in self.bundles:
            b.network.to(self.device).eval()

    @classmethod
    def from_path(
        cls, *paths: str | Path, device: str | torch.device = "cpu", refine: RefineConfig | None = None
    ) -> Predictor:
        """Load bundles (folders, or MLflow ``runs:/``/``models:/`` URIs) and build a predictor."""
        from medseg.tracking.models import is_mlflow_uri, resolve_bundle_uri

        local = [resolve_bundle_uri(str(p)) if is_mlflow_uri(str(p)) else Path(p) for p in paths]
        return cls([load_bundle(p, device=device) for p in local], device=device, refine=refine)

    @property
    def spec(self):
        """The (shared) data spec of the bundles."""
        return self.bundles[0].spec

    @property
    def sha256(self) -> str:
        """The weights' SHA-256 of every bundle, ``+``-joined (an ensemble's identity)."""
        return "+".join(b.sha256 for b in self.bundles)

    def describe(self) -> ModelDescription:
        """What this model is, for tracking (kind ``medseg``)."""
        return ModelDescription(
            kind="medseg",
            location=",".join(str(b.info.get("path", "")) for b in self.bundles),
            sha256=self.sha256,
            params={"model": self.bundles[0].pipeline.model.name, "members": str(len(self.bundles))},
        )

    def predict(self, image: MetaTensor, keep_probabilities: bool = False) -> Prediction:
        """Segment one loaded image.

        Args:
            image: ``(C, X, Y, Z)`` MetaTensor as loaded (RAS affine of the source grid).
            keep_probabilities: Also return the probabilities on the source grid.

        Returns:
            The :class:`Prediction` on the image's own grid.

        Raises:
            InputError: Wrong channel count or dimensionality, or non-finite voxels.
        """
        n_channels = len(self.spec.channels)
        if image.ndim != 4:
            msg = f"image must be 3D with a channel axis (C, X, Y, Z), got shape {tuple(image.shape)}"
            raise InputError(msg)
        if image.shape[0] != n_channels:
            msg = f"image must have {n_channels} channel(s) as the model was trained, got {image.shape[0]}"
            raise InputError(msg)
        source = MetaTensor(image.as_tensor().float(), meta=dict(image.meta))
        if not _all_finite(source.as_tensor()):
            msg = "image voxels must be finite, got NaN or inf values"
            raise InputError(msg)
        seconds: dict[str, float] = {}
        total: torch.Tensor | None = None
        labels: np.ndarray | None = None
        crf_report = None
        quality: dict[str, float] = {}
        crf_on = self.refine.crf.enabled
        for bundle, pre in zip(self.bundles, self._preprocess):
            t0 = time.perf_counter()
            sample = pre({"image": source})
            t1 = time.perf_counter()
            grid = sample["image"]
            settings = TilingSettings.from_config(bundle.pipeline.inference, bundle.pipeline.window)
            plan = plan_for(bundle.network, grid.shape[1:], settings)
            mapping = None
            streaming = len(self.bundles) == 1 and not keep_probabilities
            bounded = streaming and choose_memory_mode(settings, plan, self.spec.num_classes) == "bounded"
            if bounded and crf_on:
                # large volume with the CRF: probabilities memory-mapped on disk, refined block by
                # block on the preprocessed grid, labels taken back to the source grid
                labels, crf_report, t2, result = self._refine_on_grid(bundle, sample, pre, settings, plan)
                t3 = time.perf_counter()
                seconds["refine"] = crf_report.crf_seconds
            elif streaming and not crf_on:
                # only labels wanted: stitch, then take each finished slab to the source grid and keep
                # its labels, with the foreground entropy from a sub-grid (no whole-volume
                # probabilities). Large volumes slab by slab; others in one piece, where the grids
                # differ by flips and permutations alone (no resampling, so no softmax at all)
                mapping = self._source_mapping(grid, source, pre)
                if mapping is not None and not (bounded or mapping.exact):
                    mapping = None  # resampled: the whole-volume path below, as MONAI inverts it
            if mapping is not None:
                sink, entropy = SourceGridLabels(mapping), ForegroundEntropy(grid.shape[1:])
                mode = "bounded" if bounded else settings.memory
                result = infer(
                    bundle.network,
                    grid,
                    replace(settings, memory=mode),
                    plan=plan,
                    output=None,
                    sinks=[sink, entropy],
                    device=self.device,
                )
                labels = sink.result().numpy()
                if entropy.result() is not None:
                    quality["foreground_entropy"] = entropy.result()
                t3 = time.perf_counter()
                t2 = t3 - result.timings["finalize"]
            elif labels is None:
                result = infer(
                    bundle.network, grid, replace(settings, memory="full"), plan=plan, device=self.device
                )
                t2 = time.perf_counter()
                assert result.probabilities is not None
                back = invert_to_source(result.probabilities, sample, pre, mode="bilinear").as_tensor()
                t3 = time.perf_counter()
                total = back if total is None else total + back
            seconds["preprocess"] = seconds.get("preprocess", 0.0) + t1 - t0
            seconds["model"] = seconds.get("model", 0.0) + t2 - t1
            seconds["network"] = seconds.get("network", 0.0) + result.timings["forward"]
            seconds["to_source"] = seconds.get("to_source", 0.0) + t3 - t2 - seconds.get("refine", 0.0)
        dtype = label_dtype(self.spec.num_classes)
        affine = np.asarray(image.affine, dtype=np.float64)
        spacing = spacing_from_affine(affine)
        post = self.refine.postprocess
        post_on = post.enabled and bool(post.labels)
        probs_src = None
        report = crf_report
        if labels is None:
            assert total is not None
            probs_src = total if len(self.bundles) == 1 else total.div_(len(self.bundles))
            labels = argmax_channels(probs_src, torch_label_dtype(self.spec.num_classes))
            labels = labels.numpy()
            entropy = foreground_entropy(probs_src, labels)
            if entropy is not None:
                quality["foreground_entropy"] = entropy
            if crf_on:
                t0 = time.perf_counter()
                labels, report = refine(probs_src, self._normalized(source), spacing, self.refine.crf, post)
                seconds["refine"] = time.perf_counter() - t0
                post_on = False
        if post_on:
            t0 = time.perf_counter()
            labels, report = postprocess_with_report(labels, post, spacing, crf_report)
            seconds["postprocess"] = time.perf_counter() - t0
        labels = labels.astype(dtype, copy=False)
        return Prediction(
            labels,
            affine,
            probs_src if keep_probabilities else None,
            seconds,
            refine=report,
            quality=quality,
        )

    def _infer_into(
        self, bundle: Bundle, grid: MetaTensor, settings: TilingSettings, plan: Any, sink: Any
    ) -> Any:
        """Memory-bounded tiled inference whose finished slabs go to ``sink`` only."""
        return infer(
            bundle.network,
            grid,
            replace(settings, memory="bounded"),
            plan=plan,
            output=None,
            sinks=[sink],
            device=self.device,
        )

    def _normalized(self, source: MetaTensor) -> torch.Tensor:
        """The source image normalised as the (first) bundle's preprocessing does (for the CRF)."""
        norm = next(t for t in self._preprocess[0].transforms if isinstance(t, NormalizeChannelsd))
        out = norm.normalize(source.as_tensor())
        return out.as_tensor() if isinstance(out, MetaTensor) else out

    def _refine_on_grid(
        self, bundle: Bundle, sample: dict[str, Any], pre: Any, settings: TilingSettings, plan: Any
    ) -> tuple[np.ndarray, RefineReport, float, Any]:
        """Bounded mode with the CRF: probabilities to a memory-mapped file, CRF, labels to source.

        Returns:
            The labels on the source grid, the CRF's report (on the preprocessed grid), the time at
            which the network had finished and the tiling result (its timings).
        """
        grid = sample["image"]
        with tempfile.TemporaryDirectory(prefix="medseg-probabilities-") as tmp:
            writer = ProbabilityWriter(Path(tmp) / "probabilities.npy", grid.shape[1:])
            result = self._infer_into(bundle, grid, settings, plan, writer)
            t_model = time.perf_counter()
            probs = np.load(writer.path, mmap_mode="r")
            on_grid, report = refine(
                probs,
                grid.as_tensor(),
                spacing_from_affine(np.asarray(grid.affine)),
                self.refine.crf,
                PostprocessConfig(enabled=False),
            )
            del probs
        labels = torch.from_numpy(on_grid.astype(np.int32))[None]
        back = invert_to_source(labels, sample, pre, mode="nearest")
        return back.as_tensor()[0].numpy(), report, t_model, result

    @staticmethod
    def _source_mapping(grid: MetaTensor, source: MetaTensor, pre: Any) -> SourceMapping | None:
        """The grid-to-source mapping for slab-wise inversion (``None``: grids not axis-aligned)."""
        try:
            return source_mapping(grid, source, pre)
        except GeometryError:
            return None

    def predict_array(
        self,
        array: np.ndarray | torch.Tensor,
        affine: np.ndarray,
        keep_probabilities: bool = False,
        space: str = "RAS",
    ) -> Prediction:
        """Segment a volume held in memory (a notebook's array, another service's buffer).

        Args:
            array: ``(X, Y, Z)`` for one channel or ``(C, X, Y, Z)``, any real dtype.
            affine: Its ``4 x 4`` voxel-to-world matrix in mm.
            keep_probabilities: Also return the probabilities on the array's grid.
            space: ``"RAS"`` (nibabel's convention) or ``"LPS"`` (ITK/SimpleITK and DICOM's).

        Returns:
            The :class:`Prediction` on the array's own grid (labels ``(X, Y, Z)``; its ``affine``
            is in RAS).

        Raises:
            InputError: A wrong shape or affine, or what :meth:`predict` refuses.

        Examples:
            >>> pred = Predictor.from_path("demo_out/model/bundle")  # doctest: +SKIP
            >>> result = pred.predict_array(ct_hu, affine)  # doctest: +SKIP
        """
        data = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
        if data.ndim == 3:
            data = data[None]
        matrix = np.asarray(affine, dtype=np.float64)
        if (
            matrix.shape != (4, 4)
            or not np.isfinite(matrix).all()
            or abs(np.linalg.det(matrix[:3, :3])) < 1e-12
        ):
            msg = f"affine must be a finite, invertible 4 x 4 matrix, got {np.asarray(affine).tolist()}"
            raise InputError(msg)
        if space not in ("RAS", "LPS"):
            msg = f"space must be 'RAS' or 'LPS', got {space!r}"
            raise InputError(msg)
        if space == "LPS":
            matrix = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
        meta = {
            "affine": torch.as_tensor(matrix),
            "original_affine": matrix.copy(),
            "spatial_shape": np.asarray(data.shape[1:]),
            "space": "RAS",
            "original_channel_dim": 0,
            "filename_or_obj": "<array>",
        }
        return self.predict(MetaTensor(data, meta=meta), keep_probabilities=keep_probabilities)

    def predict_path(self, path: str | Path, **load_kwargs: Any) -> Prediction:
        """Load a scan (file or DICOM series folder) and segment it."""
        t0 = time.perf_counter()
        image = load_image(path, **load_kwargs)
        t1 = time.perf_counter()
        result = self.predict(image)
        result.seconds["load"] = t1 - t0
        return result

    def predict_to_file(self, path: str | Path, out_path: str | Path, **load_kwargs: Any) -> Prediction:
        """Segment a scan and write its label map on the scan's own grid (atomically)."""
        result = self.predict_path(path, **load_kwargs)
        t0 = time.perf_counter()
        write_label_map(result.labels, result.affine, out_path)
        result.seconds["write"] = time.perf_counter() - t0
        return result
