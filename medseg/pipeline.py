"""The prediction pipeline, step by step: load → preprocess → plan → tile/model/stitch → back to
source → labels → refine → write.

:meth:`Predictor.predict` checks the scan, preprocesses it for every ensemble member, decides the
scan's plan (:mod:`medseg.predict.plan`: memory mode, the route back to the source grid, where the
CRF runs), then runs the stages of :mod:`medseg.predict.stages`, each returning a record. The
records are the prediction's provenance. Clinician exports follow in the batch runner.

Examples:
    >>> from medseg.pipeline import Predictor  # doctest: +SKIP
    >>> pred = Predictor.from_path("demo_out/model/bundle")  # doctest: +SKIP
    >>> result = pred.predict_path("scan.nii.gz")  # doctest: +SKIP
    >>> result.labels.shape  # on the scan's own voxel grid  # doctest: +SKIP
    >>> [r.name for r in result.provenance]  # doctest: +SKIP
    ['input', 'preprocess', 'plan', 'model', 'labels', 'postprocess']
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.bundle import Bundle, load_bundle
from medseg.config.spec import DatasetSpec
from medseg.errors import InputError
from medseg.geometry import spacing_from_affine
from medseg.io import load_image, write_label_map
from medseg.predict import stages
from medseg.predict.plan import ScanPlan, as_label_dtype, plan_scan
from medseg.predict.records import ModelDescription, Prediction, Preprocessed, StageRecord, seconds_by_stage
from medseg.predict.stages import foreground_entropy
from medseg.preprocess import build_preprocess
from medseg.preprocess.intensity import NormalizeChannelsd
from medseg.refine import RefineConfig, RefineReport
from medseg.tiling.runtime import BundleRuntime, InferenceOptions

__all__ = ["Prediction", "Predictor", "foreground_entropy"]

MEDSEG_SCHEME = "medseg"
"""The scheme of medseg bundle references (``medseg:PATH``; see :mod:`medseg.sources.models`)."""


class Predictor:
    """Runs one or more model bundles (an ensemble averages probabilities) over whole volumes.

    Args:
        bundles: The loaded bundle(s); all must share labels and channels.
        device: Where the network runs.
        refine: Refinement settings replacing the first bundle's ``refine:`` section (whose
            post-processing was chosen at training).
        inference: Precision and window layout replacing the bundles' ``inference:`` values
            (see :mod:`medseg.tiling.runtime`).
    """

    def __init__(
        self,
        bundles: Bundle | list[Bundle],
        device: str | torch.device = "cpu",
        refine: RefineConfig | None = None,
        inference: InferenceOptions | None = None,
    ) -> None:
        self.bundles = list(bundles) if isinstance(bundles, list) else [bundles]
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
        self.runtime = BundleRuntime(self.bundles, inference or InferenceOptions(), device=self.device)
        self.bundles = self.runtime.bundles

    @classmethod
    def load_bundles(
        cls,
        *paths: str | Path,
        device: str | torch.device = "cpu",
        refine: RefineConfig | None = None,
        inference: InferenceOptions | None = None,
    ) -> Predictor:
        """Load bundles (folders, or MLflow ``runs:/``/``models:/`` URIs) and build a predictor."""
        from medseg.tracking.models import is_mlflow_uri, resolve_bundle_uri

        local = [resolve_bundle_uri(str(p)) if is_mlflow_uri(str(p)) else Path(p) for p in paths]
        bundles = [load_bundle(p, device=device) for p in local]
        return cls(bundles, device=device, refine=refine, inference=inference)

    @classmethod
    def from_path(
        cls,
        *refs: str | Path,
        device: str | torch.device = "cpu",
        refine: RefineConfig | None = None,
        inference: InferenceOptions | None = None,
    ) -> Predictor:
        """Load medseg bundles: folders, MLflow ``runs:/``/``models:/`` URIs or ``medseg:PATH``.

        Other model sources' ``SCHEME:PATH`` references load with :func:`medseg.sources.load_model`
        (which returns this class for medseg bundles).

        Args:
            *refs: The bundles (several: an ensemble).
            device: Where the network runs.
            refine: Refinement settings replacing the bundle's.
            inference: Precision and window layout replacing the bundles' (see
                :class:`~medseg.tiling.runtime.InferenceOptions`).

        Returns:
            The predictor.
        """
        paths = [str(r).removeprefix(f"{MEDSEG_SCHEME}:") if isinstance(r, str) else r for r in refs]
        return cls.load_bundles(*paths, device=device, refine=refine, inference=inference)

    def switched(self, *, crf: bool | None = None, postprocess: bool | None = None) -> Predictor:
        """This predictor with the CRF and the post-processing switched on or off (``None``: as is)."""
        self.refine = self.refine.switched(crf=crf, postprocess=postprocess)
        return self

    def to(self, device: str | torch.device) -> Predictor:
        """Move the networks to ``device`` (a Ray worker's), in evaluation mode."""
        self.device = torch.device(device)
        for b in self.bundles:
            b.network.to(self.device).eval()
        self.runtime = self.runtime.for_device(self.device)  # the precision this device computes
        self.bundles = self.runtime.bundles
        return self

    @property
    def networks(self) -> tuple[torch.nn.Module, ...]:
        """The members' networks (the batch runner shares torch's threads before each forward)."""
        return tuple(b.network for b in self.bundles)

    @property
    def spec(self) -> DatasetSpec:
        """The (shared) data spec of the bundles."""
        return self.bundles[0].spec

    @property
    def sha256(self) -> str:
        """The weights' SHA-256 of every bundle, ``+``-joined (an ensemble's identity)."""
        return "+".join(b.sha256 for b in self.bundles)

    def describe(self) -> ModelDescription:
        """What this model is, for tracking (kind ``medseg``): the first bundle's pipeline and the
        refinement settings, as JSON, among its parameters."""
        import json

        return ModelDescription(
            kind="medseg",
            location=",".join(str(b.info.get("path", "")) for b in self.bundles),
            sha256=self.sha256,
            params={
                "model": self.bundles[0].pipeline.model.name,
                "members": str(len(self.bundles)),
                "pipeline": json.dumps(self.bundles[0].pipeline.model_dump(mode="json"), sort_keys=True),
                "refine": json.dumps(self.refine.model_dump(mode="json"), sort_keys=True),
            },
        )

    def predict(self, image: MetaTensor, *, keep_probabilities: bool = False) -> Prediction:
        """Segment one loaded image: the pipeline's stages, in order, as the scan's plan says.

        Args:
            image: ``(C, X, Y, Z)`` MetaTensor as loaded (RAS affine of the source grid).
            keep_probabilities: Also return the probabilities on the source grid.

        Returns:
            The :class:`Prediction` on the image's own grid, with its provenance.

        Raises:
            InputError: Wrong channel count or dimensionality, or non-finite voxels.
        """
        self.bundles = self.runtime.tuned()  # batch size and memory format: measured once
        source, checked = stages.check_input(image, channels=len(self.spec.channels))
        records: list[StageRecord] = [checked]
        prepared = []
        for member, transform in enumerate(self._preprocess):
            grid, record = stages.preprocess(source, transform, member=member)
            prepared.append(grid)
            records.append(record)
        plan, planned = plan_scan(
            self.bundles, prepared, source=source, refine=self.refine, keep_probabilities=keep_probabilities
        )
        records.append(planned)
        labels, probs, report, quality = self._run_members(plan, prepared, records)
        spacing = spacing_from_affine(np.asarray(image.affine, dtype=np.float64))
        if labels is None:
            assert probs is not None
            probs, labels, entropy, record = stages.labels_from_probabilities(
                probs, members=len(self.bundles), plan=plan
            )
            records.append(record)
            if entropy is not None:
                quality["foreground_entropy"] = entropy
            if plan.crf == "source_grid":
                labels, report, record = stages.refine_on_source(
                    probs, self._normalized(source), spacing=spacing, settings=self.refine
                )
                records.append(record)
        if plan.postprocess:
            labels, report, record = stages.postprocess(
                labels, self.refine.postprocess, spacing=spacing, crf=report
            )
            records.append(record)
        return self._prediction(image, plan, labels, probs, report, quality, records)

    def _run_members(
        self, plan: ScanPlan, prepared: list[Preprocessed], records: list[StageRecord]
    ) -> tuple[np.ndarray | None, torch.Tensor | None, RefineReport | None, dict[str, float]]:
        """Each member's network over its grid, by its route; probabilities are summed."""
        labels, total, report, quality = None, None, None, {}
        for member in plan.members:
            run = stages.ROUTES[member.route]
            out = run(
                self.bundles[member.member].network,
                prepared[member.member],
                plan=member,
                device=self.device,
                crf=self.refine,
            )
            records.extend(out.records)
            labels, report = out.labels, out.refine
            if out.entropy is not None:
                quality["foreground_entropy"] = out.entropy
            if out.probabilities is not None:
                total = out.probabilities if total is None else total + out.probabilities
        return labels, total, report, quality

    def _prediction(
        self,
        image: MetaTensor,
        plan: ScanPlan,
        labels: np.ndarray,
        probs: torch.Tensor | None,
        report: RefineReport | None,
        quality: dict[str, float],
        records: list[StageRecord],
    ) -> Prediction:
        """The prediction record: labels in the plan's dtype, seconds per stage, provenance."""
        seconds = seconds_by_stage(records)
        seconds["network"] = sum(r.timings.get("forward", 0.0) for r in records if r.name == "model")
        if any(m.route == "labels_to_source" for m in plan.members):
            seconds["to_source"] = sum(r.timings.get("finalize", 0.0) for r in records if r.name == "model")
        return Prediction(
            as_label_dtype(labels, plan),
            np.asarray(image.affine, dtype=np.float64),
            probs if plan.keep_probabilities else None,
            seconds,
            refine=report,
            quality=quality,
            provenance=tuple(records),
        )

    def _normalized(self, source: MetaTensor) -> torch.Tensor:
        """The source image normalised as the (first) bundle's preprocessing does (for the CRF)."""
        norm = next(t for t in self._preprocess[0].transforms if isinstance(t, NormalizeChannelsd))
        out = norm.normalize(source.as_tensor())
        return out.as_tensor() if isinstance(out, MetaTensor) else out

    def predict_array(
        self,
        array: np.ndarray | torch.Tensor,
        affine: np.ndarray,
        *,
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
