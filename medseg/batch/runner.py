"""Run a model over every scan of a file or folder, one output folder per scan, one MLflow run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.batch.discover import Scan, discover_scans
from medseg.errors import InputError, MedsegError
from medseg.io.atomic import atomic_write_text

LABEL_FILE = "labels.nii.gz"


@dataclass
class BatchSummary:
    """Outcome of a prediction run.

    Attributes:
        ok: Scans segmented.
        failed: Scans that failed (each with its reason in ``entries``).
        entries: One record per scan: case id, input, status, error, outputs, seconds per step.
        run_id: The MLflow run id.
    """

    ok: int = 0
    failed: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""


def run_prediction(
    source: str | Path,
    out_dir: str | Path,
    models: Sequence[str | Path],
    *,
    device: str = "cpu",
    tracking_uri: str | None = None,
    experiment: str = "medseg",
    echo: Callable[[str], Any] | None = None,
) -> BatchSummary:
    """Segment every scan under ``source`` into ``out_dir/<case_id>/labels.nii.gz``.

    A scan that fails is recorded with its reason and the run goes on. MLflow gets counts and
    timings only (no input paths, which may name patients).

    Args:
        source: A scan file, a DICOM series folder or a folder of scans.
        out_dir: Output folder.
        models: Model bundle folder(s); several are an ensemble.
        device: Where the network runs.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        experiment: MLflow experiment name.
        echo: Where to print progress lines.

    Returns:
        The :class:`BatchSummary`; ``out_dir/summary.json`` holds the same records.

    Raises:
        InputError: If no scan is found.
        ConfigError: If a model bundle cannot be loaded.
    """
    from medseg.pipeline import Predictor
    from medseg.tracking import tracked_run

    say = echo or (lambda _msg: None)
    scans: list[Scan] = discover_scans(source)
    if not scans:
        msg = f"input must hold at least one scan (NIfTI, NRRD, MHA or DICOM series), got none in {source}"
        raise InputError(msg)
    predictor = Predictor.from_path(*models, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary()
    params = {
        "models": [b.info.get("path") for b in predictor.bundles],
        "model_sha256": [b.sha256 for b in predictor.bundles],
        "n_scans": len(scans),
        "device": device,
        "pipeline": predictor.bundles[0].pipeline.model_dump(mode="json"),
    }
    with tracked_run("predict", experiment=experiment, params=params, uri=tracking_uri) as run:
        summary.run_id = run.run_id
        for i, scan in enumerate(scans, 1):
            entry: dict[str, Any] = {"case_id": scan.case_id, "input": str(scan.path), "status": "failed"}
            t0 = time.perf_counter()
            try:
                dest = out / scan.case_id / LABEL_FILE
                result = predictor.predict_to_file(scan.path, dest, **scan.load_kwargs)
                entry.update(status="ok", outputs=[str(dest)], seconds=result.seconds)
                summary.ok += 1
            except MedsegError as exc:
                entry["error"] = str(exc)
                summary.failed += 1
            entry["total_s"] = time.perf_counter() - t0
            summary.entries.append(entry)
            reason = f" ({entry['error']})" if "error" in entry else ""
            say(f"[{i}/{len(scans)}] {scan.case_id}: {entry['status']}{reason}")
            run.log_metrics({"scans_done": i, "scans_failed": summary.failed}, step=i)
        atomic_write_text(out / "summary.json", json.dumps(summary.entries, indent=2))
        run.log_metrics(
            {
                "scans_ok": summary.ok,
                "scans_failed": summary.failed,
                "mean_scan_s": sum(e["total_s"] for e in summary.entries) / len(summary.entries),
            }
        )
    return summary
