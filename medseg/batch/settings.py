"""How a batch prediction runs: one frozen value instead of a long list of keyword arguments.

Examples:
    >>> s = PredictionSettings(exports=["stats"], engine="ray", crf=False)
    >>> s.engine, s.exports
    (<Engine.RAY: 'ray'>, ('stats',))
    >>> s.load_options()
    {'crf': False}
    >>> PredictionSettings(parallel_scans=0)
    Traceback (most recent call last):
    ...
    medseg.errors.ConfigError: parallel_scans must be at least 1, got 0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from medseg.batch.ray_engine import RaySettings
from medseg.errors import ConfigError, choice_error
from medseg.sources.destinations import Destination
from medseg.sources.folder import ScanFilter


class Engine(str, Enum):
    """Where a batch's jobs run."""

    LOCAL = "local"
    RAY = "ray"

    @classmethod
    def parse(cls, engine: Engine | str) -> Engine:
        """Accept an engine or its name.

        Raises:
            ConfigError: For an unknown name, suggesting the nearest and listing the choices.

        Examples:
            >>> Engine.parse("ray")
            <Engine.RAY: 'ray'>
        """
        try:
            return cls(engine)
        except ValueError:
            raise ConfigError(choice_error("engine", str(engine), [e.value for e in cls])) from None


@dataclass(frozen=True)
class PredictionSettings:
    """Everything about a batch prediction but its input, output and models.

    Attributes:
        device: Where the network runs.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        experiment: MLflow experiment name.
        scan_filter: Which DICOM series to process.
        keep_probabilities: Also write class probabilities per scan.
        exports: Per-scan exports by name (see :mod:`medseg.export.registry`).
        overwrite: Allow an output folder made with another model.
        prefetch: Load the next scan and write the previous one's outputs while the current one is
            segmented (local engine).
        progress_bar: Show a progress bar (default: when stderr is a terminal).
        engine: ``local`` (this process) or ``ray`` (a pool of Ray actors; needs medseg[distributed]).
        ray: Cluster address and pool size for the Ray engine.
        crf: Switch the dense CRF on or off (``None``: as the model says); a model option.
        postprocess: Switch the post-processing chosen at training on or off (``None``: as stored);
            a model option.
        show_patient_info: Show patient identifiers on the review page (export ``report``).
        parallel_scans: Scans the local engine segments at once, sharing torch's threads equally
            (default: 2 on CPU with 2+ threads; on CPU at most one per thread). Needs ``prefetch``.
        model_options: Options for the model source (see :func:`medseg.sources.load_model`).
        source_options: Options for the scan source (see :func:`medseg.sources.open_scan_source`).
        destination: Where each finished scan's DICOM results are sent, its answer recorded in the
            manifest (see :func:`medseg.sources.destinations.open_destination`).

    Raises:
        ConfigError: An unknown engine or ``parallel_scans`` below 1.
    """

    device: str = "cpu"
    tracking_uri: str | None = None
    experiment: str = "medseg"
    scan_filter: ScanFilter | None = None
    keep_probabilities: bool = False
    exports: Sequence[str] = ()
    overwrite: bool = False
    prefetch: bool = True
    progress_bar: bool | None = None
    engine: Engine = Engine.LOCAL
    ray: RaySettings | None = None
    crf: bool | None = None
    postprocess: bool | None = None
    show_patient_info: bool = False
    parallel_scans: int | None = None
    model_options: Mapping[str, Any] = field(default_factory=dict)
    source_options: Mapping[str, Any] = field(default_factory=dict)
    destination: Destination | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", Engine.parse(self.engine))
        object.__setattr__(self, "exports", tuple(self.exports))
        if self.parallel_scans is not None and self.parallel_scans < 1:
            msg = f"parallel_scans must be at least 1, got {self.parallel_scans}"
            raise ConfigError(msg)

    def load_options(self) -> dict[str, Any]:
        """The model source's options: ``model_options`` plus the refinement switches that are set."""
        switches = {"crf": self.crf, "postprocess": self.postprocess}
        return {**self.model_options, **{k: v for k, v in switches.items() if v is not None}}
