"""Experiment tracking: every medseg run (train, predict, evaluate, plan) is an MLflow run.

Examples:
    >>> from medseg.tracking import flatten_params
    >>> flatten_params({"tiling": {"patch_size": [64, 64, 32], "overlap": 0.25}})
    {'tiling.patch_size': '[64, 64, 32]', 'tiling.overlap': '0.25'}

Open a run with :func:`tracked_run`; look runs up with :func:`find_runs`. MLflow itself is imported
only when a run is opened, so importing this package is cheap.
"""

from medseg.tracking.models import is_mlflow_uri, register_bundle, resolve_bundle_uri
from medseg.tracking.params import flatten_params, sanitize_key, to_jsonable
from medseg.tracking.runs import TAG_ERROR, TAG_GIT_COMMIT, TAG_VERSION, RunLog, Stopwatch, tracked_run
from medseg.tracking.store import TAG_KIND, TAG_PARENT, RunKind, find_runs, tracking_uri

__all__ = [
    "TAG_ERROR",
    "TAG_GIT_COMMIT",
    "TAG_KIND",
    "TAG_PARENT",
    "TAG_VERSION",
    "RunKind",
    "RunLog",
    "Stopwatch",
    "find_runs",
    "flatten_params",
    "is_mlflow_uri",
    "register_bundle",
    "resolve_bundle_uri",
    "sanitize_key",
    "to_jsonable",
    "tracked_run",
    "tracking_uri",
]
