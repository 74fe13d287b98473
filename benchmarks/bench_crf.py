"""Benchmark medseg's dense CRF against pydensecrf (Krähenbühl's reference implementation).

A synthetic 3-label case (a body-like ellipsoid with an inner lesion on a normalised image with noise;
noisy unaries whose argmax is blurred at the edges and speckled) is written once per size, then each
implementation refines it in its own process, so that import costs, thread pools and peak memory do not
mix. Both use the same CRF (5 mean-field iterations, Potts, a Gaussian smoothness kernel and a bilateral
appearance kernel, widths in mm converted with the spacing, symmetric kernel normalisation):

* ``medseg``: :func:`medseg.refine.dense_crf` on the whole volume (no ROI, one block);
* ``pydensecrf``: ``DenseCRF`` with ``create_pairwise_gaussian`` / ``create_pairwise_bilateral`` and
  ``unary_from_softmax``, single-threaded C++.

Each worker first refines a small case untimed (warm-up: imports, thread pools, first-call set-up),
then times one refinement from probabilities in to marginals out. Rounds alternate between the two
implementations and the fastest round of each is kept (the machine may be shared). medseg runs with
torch's default threads (one per core) and, for reference, on one thread (``medseg_1thread_s``): on a
loaded machine OpenMP threads wait on each other, which one thread avoids. The peak resident memory of
each worker process is reported, and the part of it the refinement itself added; ``load_average``
is the machine's 1-minute load before and after. medseg keeps freed memory for reuse while it refines
(:mod:`medseg.refine.memory`); with ``--tune-malloc`` both workers run with glibc's mmap and trim
thresholds raised through the environment (``worker_env``), which gives pydensecrf the same (and makes
medseg's own setting step aside).

One JSON line is printed, with ``medseg_s``, ``pydensecrf_s`` and ``time_ratio`` at 128^3, ``scaling``
(medseg at 256^3 over medseg at 128^3; linear cost gives about 8), ``changed_iou`` (the voxels each
implementation changed against the unary argmax), the mean absolute difference of the marginals, and
the Dice against the ground truth before and after refinement. The exit status is 1 when a target is
missed (``time_ratio <= 0.5``, ``scaling <= 10``, ``changed_iou >= 0.8``).

Examples:
    Full run (128^3 and 256^3, 3 rounds at 128^3)::

        python benchmarks/bench_crf.py

    Smoke run (48^3 and 64^3)::

        python benchmarks/bench_crf.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_facts  # benchmarks/ is on sys.path when a benchmark runs as a script

N_LABELS = 3
ITERATIONS = 5
SPACING = (1.0, 1.0, 1.0)
CRF = {
    "iterations": ITERATIONS,
    "spatial_sigma_mm": 3.0,
    "spatial_weight": 3.0,
    "bilateral_sigma_mm": 10.0,
    "intensity_sigma": 0.5,
    "bilateral_weight": 5.0,
}
SEED = 1234
TARGETS = {"time_ratio": 0.5, "scaling": 10.0, "changed_iou": 0.8}


def make_case(n: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """A synthetic 3-label ``n^3`` case: image, ground truth and noisy softmax probabilities.

    Args:
        n: Edge length in voxels.
        seed: Random seed.

    Returns:
        ``image`` ``(1, n, n, n)`` float32 (normalised units), ``truth`` ``(n, n, n)`` uint8 and
        ``probs`` ``(3, n, n, n)`` float32.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for _ in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 0.7) ** 2 < 1.0
    lesion = ((x - 0.25) / 0.3) ** 2 + ((y + 0.1) / 0.25) ** 2 + ((z - 0.1) / 0.35) ** 2 < 1.0
    truth = np.zeros((n, n, n), np.uint8)
    truth[body] = 1
    truth[body & lesion] = 2
    image = np.array([-1.0, 0.0, 1.2], np.float32)[truth] + rng.normal(0.0, 0.25, truth.shape).astype(
        np.float32
    )
    # Unaries: the one-hot truth blurred (uncertain, shifted edges), plus correlated and speckle noise.
    logits = np.empty((N_LABELS, n, n, n), np.float32)
    sigma = max(1.0, n / 64)
    for label in range(N_LABELS):
        smooth = ndi.gaussian_filter((truth == label).astype(np.float32), sigma * 2.0)
        blobs = ndi.gaussian_filter(rng.normal(0.0, 1.0, truth.shape).astype(np.float32), sigma * 1.5)
        logits[label] = 4.0 * smooth + 2.0 * blobs * sigma + rng.normal(0.0, 0.9, truth.shape)
    logits -= logits.max(0, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(0, keepdims=True)
    return {"image": image[None], "truth": truth, "probs": probs.astype(np.float32)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_medseg(probs: np.ndarray, image: np.ndarray) -> np.ndarray:
    import torch

    from medseg.refine import DenseCRFConfig, dense_crf

    cfg = DenseCRFConfig(**CRF, roi_margin_mm=None, max_block_voxels=2**31 - 1)
    return dense_crf(torch.from_numpy(probs), torch.from_numpy(image), SPACING, cfg).numpy()


def _run_pydensecrf(probs: np.ndarray, image: np.ndarray) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian, unary_from_softmax

    shape = probs.shape[1:]
    crf = dcrf.DenseCRF(int(np.prod(shape)), probs.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=1e-5)))
    gauss = create_pairwise_gaussian([CRF["spatial_sigma_mm"] / s for s in SPACING], shape)
    crf.addPairwiseEnergy(gauss, compat=CRF["spatial_weight"])
    del gauss
    bilateral = create_pairwise_bilateral(
        [CRF["bilateral_sigma_mm"] / s for s in SPACING], (CRF["intensity_sigma"],), image[0], chdim=-1
    )
    crf.addPairwiseEnergy(bilateral, compat=CRF["bilateral_weight"])
    del bilateral
    return np.asarray(crf.inference(ITERATIONS), dtype=np.float32).reshape(probs.shape)


def _crf_threads(probs: np.ndarray) -> int:
    """The CPU threads the CRF will use: its automatic choice (one on a loaded machine) or torch's."""
    import torch

    from medseg.refine.blocks import threads_for

    return threads_for(probs[0].size, 0, torch.device("cpu")) or torch.get_num_threads()


def worker(impl: str, case: Path, out: Path, threads: int = 0) -> None:
    """Refine one case with one implementation and write the marginals and measurements.

    Args:
        impl: ``"medseg"`` or ``"pydensecrf"``.
        case: The ``.npz`` case.
        out: Where to write ``marginals`` (``.npy``) and ``out.with_suffix(".json")``.
        threads: CPU threads for torch (0: torch's default, one per core).
    """
    if impl == "medseg" and threads:
        import torch

        torch.set_num_threads(threads)
    run = _run_medseg if impl == "medseg" else _run_pydensecrf
    warm = make_case(24, seed=SEED + 1)
    run(warm["probs"], warm["image"])
    data = np.load(case)
    probs, image = data["probs"], data["image"]
    threads = _crf_threads(probs) if impl == "medseg" else 1
    before = _rss_mb()
    t0 = time.perf_counter()
    marginals = run(probs, image)
    seconds = time.perf_counter() - t0
    peak = _peak_mb()
    info: dict[str, Any] = {"seconds": seconds, "peak_mb": peak, "work_mb": max(0.0, peak - before)}
    info["threads"] = threads
    np.save(out.with_suffix(".npy"), marginals)
    out.with_suffix(".json").write_text(json.dumps(info))


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**33)}
"""glibc settings that keep freed memory for reuse instead of mapping fresh, zeroed pages each time."""

_WORKER_ENV: dict[str, str] = {}


def _spawn(impl: str, case: Path, out: Path, threads: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", impl, "--case", str(case), "--out", str(out)]
    cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True, env={**os.environ, **_WORKER_ENV})
    return json.loads(out.with_suffix(".json").read_text())


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    scores = []
    for label in range(1, N_LABELS):
        p, t = pred == label, truth == label
        denom = p.sum() + t.sum()
        scores.append(2.0 * (p & t).sum() / denom if denom else 1.0)
    return float(np.mean(scores))


def compare(n: int, workdir: Path, rounds: int, reference_rounds: int, single_thread: bool) -> dict[str, Any]:
    """Run both implementations on an ``n^3`` case and compare them.

    Args:
        n: Edge length.
        workdir: Scratch folder.
        rounds: Rounds of medseg (the fastest is kept, the median reported too).
        reference_rounds: Rounds of pydensecrf, alternating with medseg's (0: not run).
        single_thread: Also run medseg on one thread each round.

    Returns:
        Timings, memory, agreement and Dice for this size.
    """
    case = make_case(n)
    path = workdir / f"case_{n}.npz"
    np.savez(path, **case)
    impls = ["medseg", "pydensecrf"] if reference_rounds else ["medseg"]
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    single: list[dict[str, Any]] = []
    for i in range(max(rounds, reference_rounds)):
        if i < rounds:
            runs["medseg"].append(_spawn("medseg", path, workdir / f"medseg_{n}"))
        if i < reference_rounds:
            runs["pydensecrf"].append(_spawn("pydensecrf", path, workdir / f"pydensecrf_{n}"))
        if single_thread and i < rounds:  # the shared machine's load hurts threads most
            single.append(_spawn("medseg", path, workdir / f"medseg1_{n}", threads=1))
    truth, probs = case["truth"], case["probs"]
    unary = probs.argmax(0)
    result: dict[str, Any] = {"voxels": n**3, "dice_unary": _dice(unary, truth)}
    labels = {}
    for impl in impls:
        marginals = np.load(workdir / f"{impl}_{n}.npy")
        labels[impl] = marginals.argmax(0)
        best = min(runs[impl], key=lambda r: r["seconds"])
        result[f"{impl}_s"] = best["seconds"]
        result[f"{impl}_median_s"] = statistics.median(r["seconds"] for r in runs[impl])
        result[f"{impl}_all_s"] = [round(r["seconds"], 3) for r in runs[impl]]
        result[f"{impl}_peak_mb"] = max(r["peak_mb"] for r in runs[impl])
        result[f"{impl}_work_mb"] = max(r["work_mb"] for r in runs[impl])
        result[f"{impl}_changed"] = float((labels[impl] != unary).mean())
        result[f"dice_{impl}"] = _dice(labels[impl], truth)
        result[f"{impl}_marginals"] = marginals
        if impl == "medseg":
            result["medseg_threads"] = best.get("threads")
    if single:
        result["medseg_1thread_s"] = min(r["seconds"] for r in single)
        result["medseg_1thread_all_s"] = [round(r["seconds"], 3) for r in single]
    if reference_rounds:
        ours, ref = labels["medseg"] != unary, labels["pydensecrf"] != unary
        union = (ours | ref).sum()
        result["changed_iou"] = float((ours & ref).sum() / union) if union else 1.0
        result["marginal_mad"] = float(
            np.abs(result["medseg_marginals"] - result["pydensecrf_marginals"]).mean()
        )
        result["label_agreement"] = float((labels["medseg"] == labels["pydensecrf"]).mean())
    for impl in impls:
        del result[f"{impl}_marginals"]
    return result


def run(small: int, large: int, workdir: Path, rounds: int, reference_large: bool) -> dict[str, Any]:
    """The whole benchmark: both sizes, then the summary line."""
    a = compare(small, workdir, rounds, rounds, single_thread=True)
    b = compare(large, workdir, rounds, 1 if reference_large else 0, single_thread=False)
    report: dict[str, Any] = {
        "benchmark": "dense_crf",
        "labels": N_LABELS,
        "iterations": ITERATIONS,
        "crf": CRF,
        "sizes": [small, large],
        "medseg_s": a["medseg_s"],
        "pydensecrf_s": a["pydensecrf_s"],
        "time_ratio": a["medseg_s"] / a["pydensecrf_s"],
        "medseg_1thread_s": a["medseg_1thread_s"],
        "time_ratio_1thread": a["medseg_1thread_s"] / a["pydensecrf_s"],
        "scaling": b["medseg_s"] / a["medseg_s"],
        "scaling_median": b["medseg_median_s"] / a["medseg_median_s"],
        "time_ratio_median": a["medseg_median_s"] / a["pydensecrf_median_s"],
        "changed_iou": a["changed_iou"],
        "marginal_mad": a["marginal_mad"],
        "medseg_peak_mb": a["medseg_peak_mb"],
        "pydensecrf_peak_mb": a["pydensecrf_peak_mb"],
        "dice_unary": a["dice_unary"],
        "dice_medseg": a["dice_medseg"],
        "dice_pydensecrf": a["dice_pydensecrf"],
        "cpu_count": os.cpu_count(),
        "medseg_threads": a.get("medseg_threads"),
        f"n{small}": a,
        f"n{large}": b,
    }
    report["targets_met"] = {
        "time_ratio": report["time_ratio"] <= TARGETS["time_ratio"],
        "scaling": report["scaling"] <= TARGETS["scaling"],
        "changed_iou": report["changed_iou"] >= TARGETS["changed_iou"],
    }
    return report


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark and print one JSON line.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when omitted).

    Returns:
        0 when every target is met, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48^3 and 64^3 for a smoke run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per size (pydensecrf: once at the large)"
    )
    parser.add_argument(
        "--no-reference-large", action="store_true", help="skip pydensecrf at the large size (saves a minute)"
    )
    parser.add_argument(
        "--tune-malloc",
        action="store_true",
        help="run both workers with glibc's mmap/trim thresholds raised (freed memory reused, not re-mapped)",
    )
    parser.add_argument("--worker", choices=["medseg", "pydensecrf"], help=argparse.SUPPRESS)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.case, args.out, args.threads)
        return 0
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    small, large = (48, 64) if args.quick else (128, 256)
    if args.tune_malloc:
        _WORKER_ENV.update(MALLOC_ENV)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_crf_") as tmp:
        report = run(small, large, Path(tmp), args.rounds, not args.no_reference_large)
    report["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    report["worker_env"] = dict(_WORKER_ENV)
    report.update(machine_facts())
    print(json.dumps(report))
    return 0 if all(report["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
