"""Benchmark the review order: does the QC risk score put the worst segmentations first?

For each cross-validation fold given (``--fold K=BUNDLE``), the fold's held-out cases (the splits
stored beside the spec by ``medseg train --fold``) are segmented by that fold's model with
``medseg predict``'s runner (exports ``nifti,stats``: the label map, ``case.json`` with the
prediction's quality measures, volumes), scored against their reference labels with
``medseg evaluate``'s scorer (mean Dice over the labels), and ranked by
:func:`medseg.export.risk.risk_scores` exactly as the review page ranks them, one batch per fold.

Pooled over folds, it reports the Spearman correlation between the risk score and ``1 - Dice`` and
the share of the worst 10 % of cases (by Dice) that land in the top 10 % of the order; as references
in the same run, the same for each measure alone (entropy, volume distance, CRF change).

Examples:
    The hippocampus five-fold cross-validation (models from docs/benchmarks.md)::

        python benchmarks/bench_review_risk.py --spec data_specs/hippocampus.yaml \\
            --fold 0=hippo/f0/bundle --fold 1=hippo/f1/bundle --fold 2=hippo/f2/bundle \\
            --fold 3=hippo/f3/bundle --fold 4=hippo/f4/bundle --out risk-out

    Smoke run: any spec with stored splits and one small model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from medseg.batch.manifest import batch_cases
from medseg.batch.runner import run_prediction
from medseg.batch.settings import PredictionSettings
from medseg.config.spec import load_spec
from medseg.evaluation import evaluate_folder
from medseg.export.review_page import collect_rows
from medseg.export.risk import WEIGHTS, risk_scores
from medseg.training.splits import splits_path


def _fold_cases(spec_path: Path, out: Path, fold: int) -> list[str]:
    loaded = load_spec(spec_path)
    path = splits_path(loaded.source, out)
    if not path.is_file():
        msg = f"splits must be stored beside the spec (medseg train --fold), got none at {path}"
        raise SystemExit(msg)
    return list(json.loads(path.read_text())[fold]["val"])


def _one_fold(spec_path: Path, fold: int, bundle: Path, out: Path) -> list[dict[str, float | str]]:
    loaded = load_spec(spec_path)
    val = set(_fold_cases(spec_path, out, fold))
    inputs = out / f"f{fold}" / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    for case in loaded.resolve_cases(require_labels=True):
        link = inputs / f"{case.id}.nii.gz"
        if case.id in val and not link.exists():
            link.symlink_to(Path(case.images[0]).resolve())
    pred = out / f"f{fold}" / "pred"
    settings = PredictionSettings(exports=("nifti", "stats"), progress_bar=False)
    run_prediction(inputs, pred, models=[bundle], settings=settings)
    ev = evaluate_folder(loaded, pred, cases=sorted(val))
    rows = collect_rows(pred, batch_cases(pred))
    ids, outcomes = [r.case_id for r in rows], [r.outcome for r in rows]
    scores = dict(zip(ids, risk_scores(outcomes), strict=True))
    alone = {  # each measure alone, as a reference
        m: dict(zip(ids, risk_scores(outcomes, weights={m: 1.0}), strict=True)) for m in WEIGHTS
    }
    records: list[dict[str, float | str]] = []
    for case_id, per_label in ev.scores.items():
        dice = float(np.mean([s.dice for s in per_label]))
        record: dict[str, float | str] = {
            "fold": fold,
            "case_id": case_id,
            "dice": dice,
            "risk": scores[case_id],
        }
        record.update({f"risk_{m}": alone[m][case_id] for m in WEIGHTS})
        records.append(record)
    return records


def _capture(risk: np.ndarray, error: np.ndarray, share: float = 0.1) -> float:
    n = max(1, math.ceil(share * len(risk)))
    worst = set(np.argsort(-error, kind="stable")[:n].tolist())
    top = set(np.argsort(-risk, kind="stable")[:n].tolist())
    return len(worst & top) / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--fold", action="append", required=True, help="K=BUNDLE, one per fold")
    parser.add_argument("--out", type=Path, required=True, help="working folder (predictions)")
    args = parser.parse_args()
    records = []
    for item in args.fold:
        k, bundle = item.split("=", 1)
        records += _one_fold(args.spec, int(k), Path(bundle), args.out)
    error = np.array([1.0 - float(r["dice"]) for r in records])
    result: dict[str, object] = {"cases": len(records), "folds": len(args.fold)}
    for key in ["risk", *(f"risk_{m}" for m in WEIGHTS)]:
        risk = np.array([float(r[key]) for r in records])
        rho = spearmanr(risk, error).statistic if len(records) > 2 else float("nan")
        result[key] = {"spearman": round(float(rho), 3), "top10_capture": round(_capture(risk, error), 3)}
    (args.out / "risk_records.json").write_text(json.dumps(records, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
