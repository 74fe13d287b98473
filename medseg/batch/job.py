"""One job per scan: load, segment, write every output into the case's folder, all or nothing.

A job is a small frozen value plus a function of it, so it runs unchanged in this process, in a
worker process or on another machine (e.g. a Ray worker): everything it needs is in the job, the
loaded predictor and the output root.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.batch.storage import storage_errno
from medseg.io.atomic import atomic_write_text, commit_folder
from medseg.io.limits import child_folder
from medseg.labelmap import LABEL_FILE
from medseg.predict.records import Fact, StageRecord
from medseg.sources.folder import Scan

if TYPE_CHECKING:
    from monai.data import MetaTensor

    from medseg.predict.records import Prediction
    from medseg.refine import RefineReport
    from medseg.sources import SegmentationModel

PROBABILITY_FILE = "probabilities.nii.gz"
RESULT_FILE = "result.json"
TMP_PREFIX = ".tmp-"


def input_fingerprint(paths: Sequence[Path]) -> str:
    """A cheap fingerprint of a scan's files: names, sizes, modification times and first 64 KiB.

    Args:
        paths: The scan's files.

    Returns:
        A hex digest; it changes when any file is replaced, grows, shrinks or is touched.
    """
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with p.open("rb") as f:
            h.update(f.read(65536))
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class ScanJob:
    """What one scan's job needs to know.

    Attributes:
        scan: The scan (case id, path, DICOM series files).
        fingerprint: Fingerprint of its input files.
        model_sha256: Hash(es) of the model bundle(s), recorded with the outputs.
        keep_probabilities: Also write the class probabilities (float32 NIfTI).
        exports: Names of the exports to run (see :mod:`medseg.export.registry`).
    """

    scan: Scan
    fingerprint: str
    model_sha256: str
    keep_probabilities: bool = False
    exports: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobDetails:
    """What a job found out about its scan (``details`` in ``result.json``).

    Attributes:
        shape: The label map's shape (on the scan's grid).
        voxels_per_label: Voxels of each label present.
        refine: What refinement changed, if it ran.
        quality: Facts for review (``foreground_entropy``).
        provenance: The prediction stages' records (see :mod:`medseg.predict.records`).
        traceback: The end of the traceback of a failed job.
        errno: The storage error that failed it (ENOSPC, EDQUOT, EIO; see :mod:`medseg.batch.storage`).
    """

    shape: tuple[int, ...] = ()
    voxels_per_label: Mapping[int, int] = field(default_factory=dict)
    refine: RefineReport | None = None
    quality: Mapping[str, float] = field(default_factory=dict)
    provenance: tuple[StageRecord, ...] = ()
    traceback: str | None = None
    errno: str | None = None

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps of it: ``refine`` and ``quality``, where present."""
        out: dict[str, Any] = {}
        if self.refine is not None:
            out["refine"] = self.refine.as_dict()
        if self.quality:
            out["quality"] = dict(self.quality)
        return out

    def provenance_dict(self) -> dict[str, Fact]:
        """The provenance as JSON-ready values."""
        return {"stages": [r.as_dict() for r in self.provenance]}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with only the fields that are set."""
        out: dict[str, Any] = {}
        if self.shape:
            out["shape"] = list(self.shape)
            out["voxels_per_label"] = {int(k): int(v) for k, v in self.voxels_per_label.items()}
        out.update(self.summary())
        if self.provenance:
            out["provenance"] = self.provenance_dict()["stages"]
        if self.traceback is not None:
            out["traceback"] = self.traceback
        if self.errno is not None:
            out["errno"] = self.errno
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobDetails:
        """Read back what :meth:`as_dict` wrote (``result.json`` of an earlier run)."""
        from medseg.refine import RefineReport

        refine = None
        if data.get("refine") is not None:
            values = dict(data["refine"])
            roi = values.get("crf_roi")
            values["crf_roi"] = tuple(tuple(r) for r in roi) if roi is not None else None
            refine = RefineReport(**values)
        stages = tuple(
            StageRecord(
                r["name"], r["seconds"], r.get("params", {}), r.get("changed", {}), r.get("timings", {})
            )
            for r in data.get("provenance", ())
        )
        return cls(
            shape=tuple(data.get("shape", ())),
            voxels_per_label={int(k): int(v) for k, v in data.get("voxels_per_label", {}).items()},
            refine=refine,
            quality=dict(data.get("quality", {})),
            provenance=stages,
            traceback=data.get("traceback"),
            errno=data.get("errno"),
        )


@dataclass
class JobResult:
    """The outcome of one job (also ``OUT/<case_id>/result.json`` when it succeeded)."""

    case_id: str
    status: str
    fingerprint: str
    model_sha256: str
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    details: JobDetails = field(default_factory=JobDetails)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "case_id": self.case_id,
            "status": self.status,
            "fingerprint": self.fingerprint,
            "model_sha256": self.model_sha256,
            "outputs": list(self.outputs),
            "error": self.error,
            "seconds": dict(self.seconds),
            "details": self.details.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobResult:
        """Read back what :meth:`to_dict` wrote."""
        values = dict(data)
        values["details"] = JobDetails.from_dict(values.get("details", {}))
        return cls(**values)


def case_dir(out_root: Path, case_id: str) -> Path:
    """The output folder of a case (a case id that would escape ``out_root`` is an InputError)."""
    return child_folder(out_root, case_id)


def completed(out_root: Path, job: ScanJob) -> JobResult | None:
    """The earlier result of this job if its outputs are complete and its input unchanged."""
    try:
        path = case_dir(out_root, job.scan.case_id) / RESULT_FILE
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: JSON, or a case id outside the output folder
        return None
    if data.get("status") != "ok" or data.get("fingerprint") != job.fingerprint:
        return None
    if data.get("model_sha256") != job.model_sha256:
        return None
    if not all((out_root / p).is_file() for p in data.get("outputs", [])):
        return None
    return JobResult.from_dict(data)


def describe_error(exc: BaseException, scan: Scan) -> str:
    """One sentence for the manifest: the error's own message, input paths replaced by ``<input>``."""
    from medseg.errors import MedsegError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, MedsegError):
        text = f"{type(exc).__name__}: {text}"
    for p in sorted({str(scan.path), *(str(f) for f in scan.files)}, key=len, reverse=True):
        text = text.replace(p, "<input>")
    return text


@dataclass
class Segmented:
    """A scan segmented in memory whose outputs are not written yet: the first half of a job.

    Attributes:
        job: The job.
        result: Its result so far (``failed`` with the reason when loading or segmenting failed).
        image: The loaded scan, kept only when the job has exports (which read it).
        prediction: The :class:`~medseg.pipeline.Prediction` (``None`` when it failed).
        predictor: The predictor that segmented it (for the exports).
        started: ``time.perf_counter()`` when the job started.
    """

    job: ScanJob
    result: JobResult
    image: MetaTensor | None = None
    prediction: Prediction | None = None
    predictor: SegmentationModel | None = None
    started: float = 0.0


def _fail(result: JobResult, exc: BaseException, scan: Scan, started: float) -> JobResult:
    result.status = "failed"
    result.error = describe_error(exc, scan)
    result.details = JobDetails(traceback=traceback.format_exc(limit=3)[-2000:], errno=storage_errno(exc))
    result.seconds["total"] = time.perf_counter() - started
    return result


def segment_scan(job: ScanJob, predictor: SegmentationModel, *, image: Any = None) -> Segmented:
    """Load (unless given) and segment one scan in memory; never raises for a bad scan.

    Args:
        job: The job.
        predictor: A loaded model (any :class:`~medseg.sources.SegmentationModel`).
        image: The scan already loaded (by a prefetching thread; an exception if that failed), or
            ``None`` to load it here.

    Returns:
        The :class:`Segmented` scan, to be written by :func:`write_outputs`.
    """
    from medseg.io import load_image

    result = JobResult(job.scan.case_id, "failed", job.fingerprint, job.model_sha256)
    t0 = time.perf_counter()
    try:
        if image is None:
            image = load_image(
                list(job.scan.files) if job.scan.files else job.scan.path, series_uid=job.scan.series_uid
            )
            result.seconds["load"] = time.perf_counter() - t0
        if isinstance(image, BaseException):  # the prefetching thread failed to load it
            raise image
        prediction = predictor.predict(image, keep_probabilities=job.keep_probabilities)
        result.seconds.update(prediction.seconds)
    except Exception as exc:  # one bad scan must never stop the batch
        return Segmented(job, _fail(result, exc, job.scan, t0), started=t0)
    kept = image if job.exports else None  # only the exports read the scan again
    return Segmented(job, result, kept, prediction, predictor, t0)


def write_outputs(segmented: Segmented, out_root: Path) -> JobResult:
    """Write a segmented scan's outputs into ``out_root/<case_id>/``, all or nothing; never raises.

    Outputs are written into a temporary folder that is renamed into place only when everything,
    ``result.json`` last, is written: a job killed at any moment leaves no folder that looks complete.
    May run in another thread than :func:`segment_scan` (the local engine writes one scan while it
    segments the next).

    Args:
        segmented: What :func:`segment_scan` returned.
        out_root: The batch's output folder.

    Returns:
        The :class:`JobResult`: status ``ok`` or ``failed`` with a one-sentence error.
    """
    import numpy as np

    from medseg.io import write_label_map
    from medseg.io.write import write_probabilities

    job, result, prediction = segmented.job, segmented.result, segmented.prediction
    if prediction is None:
        return result
    case_id = job.scan.case_id
    try:
        final = case_dir(out_root, case_id)
        tmp = out_root / f"{TMP_PREFIX}{case_id}-{os.getpid()}"
    except Exception as exc:
        return _fail(result, exc, job.scan, segmented.started)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        t1 = time.perf_counter()
        written = [write_label_map(prediction.labels, prediction.affine, tmp / LABEL_FILE)]
        if job.keep_probabilities and prediction.probabilities is not None:
            written.append(
                write_probabilities(prediction.probabilities, prediction.affine, tmp / PROBABILITY_FILE)
            )
        if job.exports:  # one case record, every export, one case.json
            from medseg.export import case_from_prediction, export_case

            case = case_from_prediction(segmented.image, prediction, job.scan, segmented.predictor)
            written += export_case(case, tmp, job.exports, keep_going=True)
        result.seconds["write"] = time.perf_counter() - t1
        result.status = "ok"
        result.outputs = [str(Path(case_id) / p.relative_to(tmp)) for p in written]
        counts = np.bincount(np.asarray(prediction.labels).ravel())
        result.details = JobDetails(
            shape=tuple(prediction.labels.shape),
            voxels_per_label={int(v): int(n) for v, n in enumerate(counts) if n},
            refine=prediction.refine,
            quality=dict(prediction.quality),
            provenance=prediction.provenance,
        )
        result.seconds["total"] = time.perf_counter() - segmented.started
        atomic_write_text(tmp / RESULT_FILE, json.dumps(result.to_dict(), indent=1))
        if final.exists():
            shutil.rmtree(final)
        commit_folder(tmp, final)
    except Exception as exc:  # one bad scan must never stop the batch
        _fail(result, exc, job.scan, segmented.started)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def run_job(
    job: ScanJob,
    predictor: SegmentationModel,
    *,
    out_root: Path,
    image: Any = None,
) -> JobResult:
    """Segment one scan into ``out_root/<case_id>/``; never raises for a bad scan.

    :func:`segment_scan`, then :func:`write_outputs`: outputs are written into a temporary folder that
    is renamed into place only when everything, ``result.json`` last, is written, so a job killed at
    any moment leaves no folder that looks complete.

    Args:
        job: The job.
        predictor: A loaded :class:`~medseg.pipeline.Predictor`.
        out_root: The batch's output folder.
        image: The scan already loaded (by a prefetching thread), or ``None`` to load it here.

    Returns:
        The :class:`JobResult`: status ``ok`` or ``failed`` with a one-sentence error.
    """
    return write_outputs(segment_scan(job, predictor, image=image), out_root)
