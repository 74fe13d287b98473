"""``medseg demo``: synthetic data → training → prediction (NIfTI and DICOM) → MLflow, with a report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from monai.transforms import Orientation

from medseg.config.pipeline import PipelineConfig, load_pipeline
from medseg.config.spec import load_spec
from medseg.io import load_image
from medseg.io.atomic import atomic_write_text
from medseg.training.metrics import dice_per_label

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
TEST_CASES = 3


def demo_pipeline(minutes: float) -> PipelineConfig:
    """The demo's pipeline (``pipelines/demo.yaml`` when present), with its training time budget."""
    if PIPELINE_FILE.is_file():
        cfg = load_pipeline(PIPELINE_FILE)
    else:  # installed without the repository's pipelines/
        cfg = PipelineConfig.model_validate(
            {"name": "demo", "model": {"name": "resunet3d", "params": {"channels": [16, 32, 64, 128]}}}
        )
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_minutes": minutes})})


def _canonical(path: Path, **kwargs: Any) -> np.ndarray:
    """A label map or image reoriented to RAS, so grids of NIfTI and DICOM copies line up."""
    return Orientation("RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(load_image(path, **kwargs))[
        0
    ].numpy()


def run_demo(
    out: str | Path,
    *,
    cases: int = 20,
    minutes: float = 7.0,
    seed: int = 0,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run the walking skeleton end to end under ``out`` and print where everything went.

    Args:
        out: Folder for data, model, predictions and the MLflow store.
        cases: Synthetic cases in all; the last three are held out for testing.
        minutes: Training time budget.
        seed: Random seed.
        echo: Where to print.

    Returns:
        The report (also written to ``out/report.yaml``).
    """
    from medseg.batch.runner import PredictionSettings, run_prediction
    from medseg.export import DEFAULT_EXPORTS
    from medseg.synth import generate_dataset
    from medseg.training.baseline import ThresholdBaseline
    from medseg.training.loop import train

    start = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    echo(f"[1/5] writing {cases} synthetic CT phantoms (NIfTI + DICOM series) to {out / 'data'}")
    spec_path = generate_dataset(out / "data", cases, seed=seed)
    loaded = load_spec(spec_path)
    all_cases = loaded.resolve_cases(require_labels=True)
    train_cases, test_cases = all_cases[:-TEST_CASES], all_cases[-TEST_CASES:]
    raw = yaml.safe_load(spec_path.read_text())
    raw.pop("case_patterns")
    raw["cases"] = [
        {
            "id": c.id,
            "images": [str(p.relative_to(loaded.root)) for p in c.images],
            "label": str(c.label.relative_to(loaded.root)),
        }
        for c in train_cases
        if c.label is not None
    ]
    train_spec = out / "data" / "train_spec.yaml"
    atomic_write_text(train_spec, yaml.safe_dump(raw, sort_keys=False))

    cfg = demo_pipeline(minutes)
    echo(f"[2/5] training '{cfg.model.name}' on {len(train_cases)} cases for up to {minutes:g} min")

    def progress(epoch: int, total: int, metrics: dict[str, float]) -> None:
        if "val_dice_mean" in metrics:
            loss, dice = metrics["train_loss"], metrics["val_dice_mean"]
            echo(f"      epoch {epoch}: loss {loss:.3f}, validation Dice {dice:.3f}")

    result = train(
        cfg,
        load_spec(train_spec),
        out / "model",
        tracking_uri=uri,
        experiment="medseg-demo",
        progress=progress,
    )

    echo(f"[3/5] predicting {len(test_cases)} held-out cases from NIfTI and from DICOM")
    nifti_in = out / "test_input" / "nifti"
    nifti_in.mkdir(parents=True, exist_ok=True)
    for c in test_cases:
        link = nifti_in / c.images[0].name
        if not link.exists():
            link.symlink_to(c.images[0])
    pred_nifti = run_prediction(
        nifti_in,
        out / "predictions" / "nifti",
        models=[result.bundle],
        settings=PredictionSettings(tracking_uri=uri, experiment="medseg-demo", exports=DEFAULT_EXPORTS),
    )
    dicom_in = [out / "data" / "dicom" / c.id for c in test_cases]
    pred_dicom = [
        run_prediction(
            d,
            out / "predictions" / "dicom" / c.id,
            models=[result.bundle],
            settings=PredictionSettings(
                tracking_uri=uri, experiment="medseg-demo", exports=("dicom-seg", "stats")
            ),
        )
        for d, c in zip(dicom_in, test_cases)
    ]

    echo("[4/5] scoring in each scan's source geometry, against a threshold baseline")
    fg = [v for v in loaded.spec.label_values if v != 0]
    names = loaded.spec.label_names
    labelled = [(c.images[0], c.label) for c in train_cases if c.label is not None]  # all of them
    baseline = ThresholdBaseline.fit(
        [load_image(image)[0].numpy() for image, _ in labelled],
        [load_image(label)[0].numpy() for _, label in labelled],
    )
    scores: dict[str, list[dict[int, float]]] = {
        "model (NIfTI input)": [],
        "model (DICOM input)": [],
        "threshold baseline": [],
    }
    for c, entry, dsum in zip(test_cases, pred_nifti.entries, pred_dicom):
        assert c.label is not None  # the synthetic cases are all labelled
        truth = load_image(c.label)[0].numpy()
        pred = load_image(out / "predictions" / "nifti" / entry["outputs"][0])[0].numpy()
        scores["model (NIfTI input)"].append(dice_per_label(pred, truth, fg))
        dicom_pred = _canonical(out / "predictions" / "dicom" / c.id / dsum.entries[0]["outputs"][0])
        scores["model (DICOM input)"].append(dice_per_label(dicom_pred, _canonical(c.label), fg))
        scores["threshold baseline"].append(
            dice_per_label(baseline.predict(load_image(c.images[0])[0].numpy()), truth, fg)
        )
    table = {k: {names[v]: float(np.mean([s[v] for s in vals])) for v in fg} for k, vals in scores.items()}
    for row in table.values():
        row["mean"] = float(np.mean(list(row.values())))

    wall = time.perf_counter() - start
    report = {
        "wall_seconds": round(wall, 1),
        "train_seconds": round(result.seconds, 1),
        "dice": table,
        "data_spec": str(spec_path),
        "model_bundle": str(result.bundle),
        "predictions": str(out / "predictions"),
        "review_page": str(out / "predictions" / "nifti" / "report" / "index.html"),
        "mlflow_store": uri,
        "mlflow_runs": {
            "train": result.run_id,
            "predict": [pred_nifti.run_id] + [d.run_id for d in pred_dicom],
        },
    }
    atomic_write_text(out / "report.yaml", yaml.safe_dump(report, sort_keys=False))
    echo("[5/5] done")
    echo("")
    echo(f"Dice on {len(test_cases)} held-out cases, in source geometry:")
    header = "".join(f"{names[v]:>10}" for v in fg) + f"{'mean':>10}"
    echo(f"  {'':24}{header}")
    for k, row in table.items():
        echo(f"  {k:24}" + "".join(f"{row[names[v]]:10.3f}" for v in fg) + f"{row['mean']:10.3f}")
    echo("")
    echo(f"  data:         {out / 'data'}  (spec: {spec_path})")
    echo(f"  model bundle: {result.bundle}")
    echo(f"  predictions:  {out / 'predictions'}  (DICOM SEG beside each DICOM prediction)")
    echo(f"  review page:  {out / 'predictions' / 'nifti' / 'report' / 'index.html'}")
    echo(f"  MLflow store: {uri}  (runs in experiment 'medseg-demo')")
    echo(f"  browse it:    mlflow ui --backend-store-uri {uri}")
    echo(f"  report:       {out / 'report.yaml'}  (wall time {wall / 60:.1f} min)")
    return report
