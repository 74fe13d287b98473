"""Benchmark medseg's ``nnunet`` model source against nnU-Net's own prediction command.

Two scenarios, each on one real nnU-Net model folder made by nnU-Net's tools (plan, preprocess, a
few training iterations of nnU-Net's trainer, so the checkpoints are what nnU-Net writes):

* ``ct``: a synthetic CT data set planned by nnU-Net with its default (CT-scale) architecture; one
  scan of at most 256 x 256 x 160 voxels; mirroring off.
* ``hippocampus``: the hippocampus plan (../shared/data/hippocampus, a few training cases), several
  unseen real scans; mirroring on.

Each side runs in its own process, one after the other, on the same scans and model folder:

* ``nnunet``: ``nnUNetv2_predict_from_modelfolder -device cpu`` with its defaults (3 preprocessing
  and 3 export workers), through a small wrapper that times nnU-Net's network calls (its
  ``_internal_maybe_mirror_and_predict``) and, where torchvision cannot be imported, gives nnU-Net
  the trainer class instead of its search through every trainer module;
* ``medseg``: the ``nnunet`` model source, scan by scan, label maps written as NIfTI.

Peak memory is the largest sum of resident sets over the process and all its descendants, sampled
every 20 ms from ``/proc`` (nnU-Net forks workers). ``label_agreement`` is the fraction of voxels
whose labels agree over all scans; ``label_agreement_confident`` the same over the voxels where
nnU-Net's top-2 probability margin is at least 0.02 (from one more, untimed nnU-Net run that keeps
its probabilities).

Printed: one JSON line per scenario with ``nnunet_s``, ``medseg_s``, ``time_ratio``
(medseg / nnU-Net), ``nnunet_peak_mb``, ``medseg_peak_mb``, ``mem_ratio``, ``label_agreement``,
``label_agreement_confident``,
``nnunet_network_share`` and ``medseg_network_share`` (the network's share of each side's time).

Examples:
    Full size (the CT scenario plans and trains on five 256 x 256 x 160 volumes first)::

        python benchmarks/bench_foreign.py

    Smoke run (tiny volumes, narrow networks)::

        python benchmarks/bench_foreign.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nnunet_models import (
    RawCase,
    anisotropic_ct_case,
    build_model_folder,
    nnunet_env,
    write_case_images,
    write_raw_dataset,
)

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"

_NNUNET = """
import json, os, sys, time
from nnunetv2.inference import predict_from_raw_data as module
try:
    import torchvision  # noqa: F401
except Exception:  # a torchvision that does not match torch: nnU-Net's trainer search would fail
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    module.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainer
inner = module.nnUNetPredictor._internal_maybe_mirror_and_predict
spent = [0.0]
def timed(self, x):
    t0 = time.perf_counter()
    out = inner(self, x)
    spent[0] += time.perf_counter() - t0
    return out
module.nnUNetPredictor._internal_maybe_mirror_and_predict = timed
sys.argv = ["nnUNetv2_predict_from_modelfolder", *sys.argv[2:]]
try:
    module.predict_entry_point_modelfolder()
finally:
    json.dump({"network_s": spent[0]}, open(os.environ["BENCH_TIMES"], "w"))
"""

_MEDSEG = """
import json, os, sys, time
from pathlib import Path
from medseg.io import write_label_map
from medseg.sources import load_model
folder, scans, out, folds, mirroring = sys.argv[1:6]
model = load_model([f"nnunet:{folder}"], options={"folds": folds, "mirroring": mirroring})
network = 0.0
for scan in sorted(Path(scans).glob("*_0000.nii.gz")):
    pred = model.predict_files([scan])
    network += pred.seconds["network"]
    write_label_map(pred.labels, pred.affine, Path(out) / scan.name.replace("_0000", ""))
json.dump({"network_s": network}, open(os.environ["BENCH_TIMES"], "w"))
"""


def _tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and every descendant (MiB), from ``/proc``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _run_measured(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a command; its wall time, the peak RSS of its process tree, and the times it wrote."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        times = Path(fh.name)
    env = {**env, "BENCH_TIMES": str(times)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{output[-3000:]}")
    network = json.loads(times.read_text())["network_s"]
    times.unlink()
    return {"seconds": seconds, "peak_mb": peak[0], "network_s": network}


def _agreement(a: Path, b: Path, probabilities: Path) -> tuple[float, float]:
    """Label agreement over every voxel, and over the voxels where nnU-Net's top-2 margin >= 0.02."""
    import SimpleITK as sitk

    same = total = same_sure = sure = 0
    for file in sorted(a.glob("*.nii.gz")):
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(b / file.name)))
        probs = np.load(probabilities / file.name.replace(".nii.gz", ".npz"))["probabilities"]
        top = np.sort(probs, axis=0)
        confident = (top[-1] - top[-2]) >= 0.02
        same += int((x == y).sum())
        total += x.size
        same_sure += int((x == y)[confident].sum())
        sure += int(confident.sum())
    return same / total, same_sure / max(sure, 1)


def compare(
    name: str, folder: Path, scans: Path, work: Path, *, folds: str, mirroring: bool, env: dict[str, str]
) -> dict[str, Any]:
    """Run both sides on ``scans`` with ``folder``; the JSON record of the scenario."""
    out_nn, out_ms = work / f"{name}-nnunet", work / f"{name}-medseg"
    out_nn.mkdir()
    out_ms.mkdir()
    nn_args = [sys.executable, "-c", _NNUNET, "-", "-i", str(scans), "-o", str(out_nn), "-m", str(folder)]
    nn_args += ["-f", *folds.split(","), "-device", "cpu", "--disable_progress_bar"]
    if not mirroring:
        nn_args.append("--disable_tta")
    nnunet = _run_measured(nn_args, env)
    medseg = _run_measured(
        [sys.executable, "-c", _MEDSEG, str(folder), str(scans), str(out_ms), folds, str(mirroring).lower()],
        env,
    )
    # untimed: nnU-Net once more, keeping its probabilities, for the agreement where it is confident
    out_pr = work / f"{name}-nnunet-probabilities"
    out_pr.mkdir()
    _run_measured([*nn_args[:7], str(out_pr), *nn_args[8:], "--save_probabilities"], env)
    overall, confident = _agreement(out_nn, out_ms, out_pr)
    return {
        "scenario": name,
        "nnunet_s": round(nnunet["seconds"], 2),
        "medseg_s": round(medseg["seconds"], 2),
        "time_ratio": round(medseg["seconds"] / nnunet["seconds"], 3),
        "nnunet_peak_mb": round(nnunet["peak_mb"], 1),
        "medseg_peak_mb": round(medseg["peak_mb"], 1),
        "mem_ratio": round(medseg["peak_mb"] / max(nnunet["peak_mb"], 1e-9), 3),
        "label_agreement": round(overall, 6),
        "label_agreement_confident": round(confident, 6),
        "nnunet_network_share": round(nnunet["network_s"] / nnunet["seconds"], 3),
        "medseg_network_share": round(medseg["network_s"] / medseg["seconds"], 3),
    }


def ct_scenario(work: Path, *, quick: bool) -> dict[str, Any]:
    """A CT-scale plan (nnU-Net's default architecture) on one large synthetic CT scan, no mirroring."""
    root = work / "ct"
    shape = (32, 64, 64) if quick else (160, 256, 256)  # (z, y, x)
    spacing = (0.8, 0.8, 2.0)

    def case(case_id: str, seed: int) -> RawCase:
        small = anisotropic_ct_case(case_id, seed, spacing)
        zoom = [n / s for n, s in zip(shape, small.label.shape)]
        from scipy import ndimage

        image = ndimage.zoom(small.channels[0], zoom, order=1).astype(np.float32)
        label = ndimage.zoom(small.label, zoom, order=0)
        return RawCase(case_id, (image,), label, spacing)

    cases = [case(f"ct_{i:03d}", i) for i in range(5)]
    write_raw_dataset(
        root,
        dataset="Dataset201_BenchCT",
        cases=cases,
        channel_names={"0": "CT"},
        labels={"background": 0, "organ": 1, "spot": 2},
    )
    folder = build_model_folder(
        root,
        dataset_id=201,
        dataset="Dataset201_BenchCT",
        configuration="3d_fullres",
        folds=["all"],
        width=4 if quick else None,
        iterations=1,
    )
    scans = work / "ct-scans"
    write_case_images(case("scan", 99), scans)
    return compare("ct", folder, scans, work, folds="all", mirroring=False, env=nnunet_env(root))


def hippocampus_scenario(work: Path, *, quick: bool) -> dict[str, Any]:
    """The hippocampus plan on unseen real scans, mirroring on."""
    import SimpleITK as sitk

    root = work / "hippo"
    images = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))
    if not images:
        raise SystemExit(f"needs {HIPPOCAMPUS}")

    def case(path: Path) -> RawCase:
        image = sitk.ReadImage(str(path))
        label = sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / path.name))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        return RawCase(
            path.name[:-7], (array,), sitk.GetArrayFromImage(label), image.GetSpacing(), image.GetDirection()
        )

    write_raw_dataset(
        root,
        dataset="Dataset004_Hippocampus",
        cases=[case(p) for p in images[:6]],
        channel_names={"0": "MRI"},
        labels={"background": 0, "Anterior": 1, "Posterior": 2},
    )
    folder = build_model_folder(
        root,
        dataset_id=4,
        dataset="Dataset004_Hippocampus",
        configuration="3d_fullres",
        folds=["0"],
        width=4 if quick else None,
        iterations=2,
    )
    scans = work / "hippo-scans"
    for path in images[6 : 8 if quick else 26]:
        write_case_images(case(path), scans)
    return compare("hippocampus", folder, scans, work, folds="0", mirroring=True, env=nnunet_env(root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny volumes and networks (a smoke run)")
    parser.add_argument("--scenario", choices=["ct", "hippocampus", "both"], default="both")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-foreign-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.scenario in ("ct", "both"):
            print(json.dumps(ct_scenario(work, quick=args.quick)), flush=True)
        if args.scenario in ("hippocampus", "both"):
            print(json.dumps(hippocampus_scenario(work, quick=args.quick)), flush=True)


if __name__ == "__main__":
    main()
