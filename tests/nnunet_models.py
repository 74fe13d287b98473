"""Real nnU-Net v2 model folders for tests, made with nnU-Net's own tools.

A raw data set is written (NIfTI through SimpleITK, ``_0000`` channel suffixes), nnU-Net plans and
preprocesses it (``nnUNetv2_extract_fingerprint``, ``nnUNetv2_plan_experiment``,
``nnUNetv2_preprocess``), the plans' networks are made narrow so CPU training takes seconds, and
nnU-Net's own trainer (``nnUNetTrainer_1epoch``, with a handful of iterations set on the instance)
writes the checkpoints, exactly as it writes them for a real model. Everything runs in subprocesses
with their own ``nnUNet_*`` environment, so the test process never depends on nnU-Net's globals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
TRAINER = "nnUNetTrainer_1epoch"

_TRAIN = """
import json, os, sys, torch
torch.set_num_threads(1)
# the trainer class is imported directly: nnU-Net's search by name imports every trainer module,
# some of which need torchvision
from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import {trainer}
for job in sys.argv[1:]:
    dataset, configuration, fold = job.split(":")
    fold = fold if fold == "all" else int(fold)
    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    plans = json.load(open(os.path.join(base, "nnUNetPlans.json")))
    plans["continue_training"] = False
    dataset_json = json.load(open(os.path.join(base, "dataset.json")))
    trainer = {trainer}(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                        device=torch.device("cpu"))
    trainer.num_iterations_per_epoch = {iterations}
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
"""


@dataclass(frozen=True)
class RawCase:
    """One raw case: an array per channel in SimpleITK's ``(z, y, x)`` order, and its labels."""

    case_id: str
    channels: tuple[np.ndarray, ...]
    label: np.ndarray
    spacing: tuple[float, float, float]  # SimpleITK's (x, y, z)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def nnunet_env(root: Path) -> dict[str, str]:
    """The environment nnU-Net's tools need, all under ``root`` (planning needs n_proc_DA > 0)."""
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_compile="false",
        nnUNet_def_n_proc="1",
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
    )
    return env


def write_raw_dataset(
    root: Path,
    *,
    dataset: str,
    cases: Sequence[RawCase],
    channel_names: Mapping[str, str],
    labels: Mapping[str, int | list[int]],
    regions_class_order: Sequence[int] | None = None,
) -> Path:
    """Write ``raw/<dataset>/`` (imagesTr, labelsTr, dataset.json) as nnU-Net expects it."""
    import SimpleITK as sitk

    folder = root / "raw" / dataset
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)

    def write(array: np.ndarray, path: Path, case: RawCase) -> None:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(case.spacing)
        image.SetDirection(case.direction)
        image.SetOrigin((3.0, -7.0, 11.0))
        sitk.WriteImage(image, str(path))

    for case in cases:
        for c, array in enumerate(case.channels):
            write(array, folder / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz", case)
        write(case.label.astype(np.uint8), folder / "labelsTr" / f"{case.case_id}.nii.gz", case)
    meta: dict[str, object] = {
        "channel_names": dict(channel_names),
        "labels": dict(labels),
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    if regions_class_order is not None:
        meta["regions_class_order"] = list(regions_class_order)
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


def _run(args: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
    proc = subprocess.run(list(args), env=dict(env), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _narrow_plans(plans_file: Path, width: int, batch_size: int) -> None:
    """Make every configuration's network narrow (features ``width * 2**stage``) and batches small."""
    plans = json.loads(plans_file.read_text())
    for config in plans["configurations"].values():
        if "architecture" not in config:
            continue
        kwargs = config["architecture"]["arch_kwargs"]
        n = kwargs["n_stages"]
        kwargs["features_per_stage"] = [min(width * 2**i, 8 * width) for i in range(n)]
        config["batch_size"] = batch_size
    plans_file.write_text(json.dumps(plans, indent=1))


def build_models(
    root: Path,
    *,
    datasets: Mapping[int, str],
    runs: Sequence[tuple[str, str, str]],
    width: int | None = 4,
    iterations: int = 2,
) -> dict[tuple[str, str], Path]:
    """Plan, preprocess and train several data sets at once (one process per nnU-Net step).

    Args:
        root: Holds ``raw/`` (already written), ``preprocessed/`` and ``results/``.
        datasets: Data set number to folder name under ``raw/`` (``4: "Dataset004_X"``).
        runs: ``(dataset folder, configuration, fold)`` to train (``3d_fullres``/``2d``;
            ``"0"``, ``"1"``, ``"all"``).
        width: Features of the first stage (``None``: the networks as nnU-Net planned them).
        iterations: Training iterations (one epoch).

    Returns:
        ``(dataset, configuration)`` to ``results/<dataset>/<trainer>__nnUNetPlans__<configuration>``.
    """
    env = nnunet_env(root)
    ids = [str(i) for i in datasets]
    _run([str(BIN / "nnUNetv2_extract_fingerprint"), "-d", *ids, "-np", "1"], env, root)
    _run([str(BIN / "nnUNetv2_plan_experiment"), "-d", *ids], env, root)
    if width is not None:
        for name in datasets.values():
            _narrow_plans(root / "preprocessed" / name / "nnUNetPlans.json", width, batch_size=2)
    configurations = sorted({c for _, c, _ in runs})
    prep = [
        str(BIN / "nnUNetv2_preprocess"),
        "-d",
        *ids,
        "-c",
        *configurations,
        "-np",
        *["1"] * len(configurations),
    ]
    _run(prep, env, root)
    script = _TRAIN.format(trainer=TRAINER, iterations=iterations)
    train_env = {**env, "nnUNet_n_proc_DA": "0"}  # data augmentation in the training process itself
    _run([sys.executable, "-c", script, *(":".join(r) for r in runs)], train_env, root)
    return {(d, c): root / "results" / d / f"{TRAINER}__nnUNetPlans__{c}" for d, c, _ in runs}


def build_model_folder(
    root: Path,
    *,
    dataset_id: int,
    dataset: str,
    configuration: str,
    folds: Sequence[str],
    width: int | None = 4,
    iterations: int = 2,
) -> Path:
    """Plan, preprocess and train one configuration of one data set; return its model folder."""
    runs = [(dataset, configuration, f) for f in folds]
    folders = build_models(
        root, datasets={dataset_id: dataset}, runs=runs, width=width, iterations=iterations
    )
    return folders[(dataset, configuration)]


def copy_model_folder(folder: Path, dest: Path) -> Path:
    """A private copy of a model folder (for tests that break one)."""
    shutil.copytree(folder, dest)
    return dest


class _Float32Half:
    """``torch`` as nnU-Net's predictor module sees it, with ``torch.half`` meaning float32."""

    def __init__(self, torch_module: object) -> None:
        self._torch = torch_module
        self.half = torch_module.float32  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._torch, name)


def nnunet_predictor(
    folder: Path, *, folds: Sequence[str], mirroring: bool = True, checkpoint: str = "checkpoint_final.pth"
) -> object:
    """nnU-Net's own ``nnUNetPredictor`` on ``folder`` (CPU).

    nnU-Net finds the trainer class by importing every trainer module, some of which need
    torchvision; the trainer is given directly instead (its network building is nnU-Net's own).
    """
    import torch
    from nnunetv2.inference import predict_from_raw_data as module
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    module.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainer
    predictor = module.nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(folder), use_folds=tuple(folds), checkpoint_name=checkpoint
    )
    return predictor


def nnunet_predict(
    predictor: object, files: Sequence[Path], *, float32: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's labels and probabilities for one case (SimpleITK's ``(z, y, x)`` order).

    Args:
        predictor: From :func:`nnunet_predictor`.
        files: The case's channel files.
        float32: Accumulate window logits in float32 (nnU-Net's own code, with ``torch.half``
            meaning float32 in its module) instead of float16.
    """
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference import predict_from_raw_data as module

    data, props = SimpleITKIO().read_images([str(f) for f in files])
    module.torch = _Float32Half(torch) if float32 else torch
    try:
        seg, probs = predictor.predict_single_npy_array(data, props, None, None, True)  # type: ignore[attr-defined]
    finally:
        module.torch = torch
    return np.asarray(seg), np.asarray(probs)


def _ellipsoid(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def anisotropic_ct_case(case_id: str, seed: int, spacing: tuple[float, float, float]) -> RawCase:
    """A CT phantom on a 0.7 x 0.7 x 5 mm-like grid: body, an organ (1) and a dense spot (2)."""
    rng = np.random.default_rng(seed)
    shape = (12, 40, 40)  # (z, y, x)
    shift = rng.uniform(-2, 2, size=3)
    image = np.full(shape, -1000.0, dtype=np.float32)
    body = _ellipsoid(shape, (5.5, 20, 20), (9, 17, 15))
    organ = _ellipsoid(shape, (5.5 + shift[0] / 2, 18 + shift[1], 16 + shift[2]), (3.5, 8, 7))
    spot = _ellipsoid(shape, (6, 25 + shift[1], 26 - shift[2]), (1.5, 3.5, 3.5))
    image[body] = 40.0
    image[organ] = 120.0
    image[spot] = 400.0
    image += rng.normal(0, 25, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[spot] = 2
    return RawCase(case_id, (image.round().astype(np.int16).astype(np.float32),), label, spacing)


def two_channel_regions_case(case_id: str, seed: int, spacing: tuple[float, float, float]) -> RawCase:
    """Two MR-like channels, zero outside a central box (crop and masked z-scores), nested regions."""
    rng = np.random.default_rng(seed)
    shape = (24, 28, 28)
    inside = np.zeros(shape, dtype=bool)
    inside[5:19, 5:23, 6:22] = True
    shift = rng.uniform(-1.5, 1.5, size=3)
    whole = _ellipsoid(shape, (12 + shift[0], 14 + shift[1], 14 + shift[2]), (5, 6, 5)) & inside
    core = _ellipsoid(shape, (12 + shift[0], 14 + shift[1], 14 + shift[2]), (2.5, 3, 2.5)) & inside
    t1 = np.where(inside, 100.0, 0.0) + np.where(whole, 60.0, 0.0) + np.where(core, 80.0, 0.0)
    t2 = np.where(inside, 300.0, 0.0) - np.where(whole, 120.0, 0.0) + np.where(core, 40.0, 0.0)
    t1 = (t1 + inside * rng.normal(0, 10, size=shape)).astype(np.float32)
    t2 = (t2 + inside * rng.normal(0, 20, size=shape)).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[whole] = 1
    label[core] = 2
    return RawCase(case_id, (t1, t2), label, spacing)


def write_case_images(case: RawCase, folder: Path) -> list[Path]:
    """Write a case's channels as ``<case>_0000.nii.gz``, ... (a scan to segment); return the files."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for c, array in enumerate(case.channels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(case.spacing)
        image.SetDirection(case.direction)
        image.SetOrigin((-4.0, 9.0, 2.5))
        path = folder / f"{case.case_id}_{c:04d}.nii.gz"
        sitk.WriteImage(image, str(path))
        files.append(path)
    return files
