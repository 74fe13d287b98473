"""The ``nnunet`` model source against nnU-Net v2 itself.

Model folders are made by nnU-Net's own tools (plan, preprocess, a few training iterations) once per
session; nnU-Net's ``nnUNetPredictor`` and medseg then segment the same scans. With nnU-Net's
window accumulators in float32, probabilities agree within 1e-4; against the stock predictor
(float16 accumulators), labels agree on >= 99.9 % of the voxels where nnU-Net's top-2 margin is at
least 0.02 and >= 99.5 % overall.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from geometry_helpers import shared
from nnunet_models import (
    RawCase,
    anisotropic_ct_case,
    build_models,
    copy_model_folder,
    nnunet_predict,
    nnunet_predictor,
    two_channel_regions_case,
    write_case_images,
    write_raw_dataset,
)

from medseg.errors import ConfigError, InputError
from medseg.sources import load_model

nnunetv2 = pytest.importorskip("nnunetv2", reason="agreement tests need nnunetv2 (the dev extra)")
pytest.importorskip("dynamic_network_architectures", reason="the nnunet source needs medseg[nnunet]")

HIPPO_TRAIN = 6


# --------------------------------------------------------------------------------------------------
# model folders, made once per session


def _hippo_case(path: Path) -> RawCase:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    label = sitk.ReadImage(str(path.parent.parent / "labelsTr" / path.name))
    return RawCase(
        path.name.removesuffix(".nii.gz"),
        (sitk.GetArrayFromImage(image).astype(np.float32),),
        sitk.GetArrayFromImage(label),
        image.GetSpacing(),
        image.GetDirection(),
    )


ANISO_SPACINGS = [(0.7, 0.7, 5.0), (0.75, 0.75, 4.5), (0.65, 0.65, 5.5), (0.7, 0.7, 5.0), (0.8, 0.8, 5.0)]
REGION_SPACINGS = [(1.0, 1.0, 1.0), (1.1, 1.0, 0.9), (0.9, 1.0, 1.1), (1.0, 1.1, 1.0), (1.0, 0.9, 1.0)]
HIPPO, CT, REGIONS = "Dataset004_Hippocampus", "Dataset101_AnisoCT", "Dataset102_Regions"


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every model folder the tests use, made by nnU-Net's tools in one pass (once per session)."""
    images = sorted(shared("hippocampus", "imagesTr").glob("*.nii.gz"))
    root = tmp_path_factory.mktemp("nnunet")
    write_raw_dataset(
        root,
        dataset=HIPPO,
        cases=[_hippo_case(p) for p in images[:HIPPO_TRAIN]],
        channel_names={"0": "MRI"},
        labels={"background": 0, "Anterior": 1, "Posterior": 2},
    )
    write_raw_dataset(
        root,
        dataset=CT,
        cases=[anisotropic_ct_case(f"ct_{i:03d}", i, s) for i, s in enumerate(ANISO_SPACINGS)],
        channel_names={"0": "CT"},
        labels={"background": 0, "organ": 1, "spot": 2},
    )
    write_raw_dataset(
        root,
        dataset=REGIONS,
        cases=[two_channel_regions_case(f"mr_{i:03d}", i, s) for i, s in enumerate(REGION_SPACINGS)],
        channel_names={"0": "T1", "1": "T2"},
        labels={"background": 0, "whole": [1, 2], "core": [2]},
        regions_class_order=[1, 2],
    )
    runs = [
        (HIPPO, "3d_fullres", "0"),
        (HIPPO, "3d_fullres", "1"),
        (HIPPO, "2d", "0"),
        (CT, "3d_fullres", "all"),
        (REGIONS, "3d_fullres", "all"),
    ]
    return build_models(root, datasets={4: HIPPO, 101: CT, 102: REGIONS}, runs=runs)


@pytest.fixture(scope="session")
def hippo_3d(model_folders: dict[tuple[str, str], Path]) -> Path:
    return model_folders[(HIPPO, "3d_fullres")]


@pytest.fixture(scope="session")
def hippo_2d(model_folders: dict[tuple[str, str], Path]) -> Path:
    return model_folders[(HIPPO, "2d")]


@pytest.fixture(scope="session")
def aniso_ct(model_folders: dict[tuple[str, str], Path]) -> Path:
    return model_folders[(CT, "3d_fullres")]


@pytest.fixture(scope="session")
def regions_2ch(model_folders: dict[tuple[str, str], Path]) -> Path:
    return model_folders[(REGIONS, "3d_fullres")]


@pytest.fixture(scope="session")
def hippo_scans(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """Two unseen real cases; the second re-written with another spacing and a permuted direction."""
    images = sorted(shared("hippocampus", "imagesTr").glob("*.nii.gz"))
    folder = tmp_path_factory.mktemp("hippo-scans")
    first = _hippo_case(images[HIPPO_TRAIN + 1])
    second = _hippo_case(images[HIPPO_TRAIN + 2])
    moved = RawCase(
        "moved",
        second.channels,
        second.label,
        (1.25, 0.9, 1.1),
        (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    )
    return [write_case_images(first, folder), write_case_images(moved, folder)]


# --------------------------------------------------------------------------------------------------
# the comparison


def _margin(probs: np.ndarray, regions: bool) -> np.ndarray:
    if regions:
        return np.min(np.abs(probs - 0.5), axis=0) * 2
    top = np.sort(probs, axis=0)
    return top[-1] - top[-2]


def _agree(
    folder: Path,
    files: list[Path],
    *,
    folds: list[str],
    mirroring: bool = True,
    checkpoint: str = "final",
    stock: bool = False,
    regions: bool = False,
) -> None:
    """medseg vs nnU-Net (float32 accumulators: probabilities; stock: labels) on one case."""
    model = load_model(
        [f"nnunet:{folder}"],
        options={"folds": ",".join(folds), "mirroring": mirroring, "checkpoint": checkpoint},
    )
    pred = model.predict_files(files, keep_probabilities=True)
    labels = pred.labels.transpose(2, 1, 0)  # medseg (X, Y, Z) -> SimpleITK (z, y, x)
    probs = pred.probabilities.numpy().transpose(0, 3, 2, 1)
    predictor = nnunet_predictor(
        folder, folds=folds, mirroring=mirroring, checkpoint=f"checkpoint_{checkpoint}.pth"
    )
    seg32, probs32 = nnunet_predict(predictor, files, float32=True)
    assert probs.shape == probs32.shape
    assert np.abs(probs - probs32).max() < 1e-4
    assert (labels == seg32).mean() >= 0.999
    if stock:
        seg16, probs16 = nnunet_predict(predictor, files)
        confident = _margin(probs16, regions) >= 0.02
        assert confident.mean() > 0.5  # the check below is about most of the volume
        assert (labels == seg16)[confident].mean() >= 0.999
        assert (labels == seg16).mean() >= 0.995


@pytest.mark.slow
def test_3d_fullres_two_folds_mirrored_matches_nnunet(hippo_3d: Path, hippo_scans: list[list[Path]]) -> None:
    _agree(hippo_3d, hippo_scans[1], folds=["0", "1"], stock=True)


@pytest.mark.slow
def test_3d_fullres_without_mirroring_best_checkpoint_matches_nnunet(
    hippo_3d: Path, hippo_scans: list[list[Path]]
) -> None:
    _agree(hippo_3d, hippo_scans[0], folds=["1"], mirroring=False, checkpoint="best")


@pytest.mark.slow
def test_2d_configuration_matches_nnunet(hippo_2d: Path, hippo_scans: list[list[Path]]) -> None:
    _agree(hippo_2d, hippo_scans[1], folds=["0"])


@pytest.mark.slow
def test_anisotropic_ct_plan_matches_nnunet(aniso_ct: Path, tmp_path: Path) -> None:
    plans = json.loads((aniso_ct / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["normalization_schemes"] == ["CTNormalization"]
    # a scan on another anisotropic grid: resampled with the separate out-of-plane axis, both ways
    files = write_case_images(anisotropic_ct_case("scan", 99, (0.9, 0.9, 3.6)), tmp_path)
    _agree(aniso_ct, files, folds=["all"], mirroring=False)


@pytest.mark.slow
def test_two_channel_region_model_matches_nnunet(regions_2ch: Path, tmp_path: Path) -> None:
    config = json.loads((regions_2ch / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert config["use_mask_for_norm"] == [True, True]  # the zero border is cropped, z-scores masked
    files = write_case_images(two_channel_regions_case("scan", 42, (1.05, 0.95, 1.0)), tmp_path)
    _agree(regions_2ch, files, folds=["all"], regions=True, stock=True)
    model = load_model([f"nnunet:{regions_2ch}"])
    assert model.spec.labels == {"background": 0, "whole": 1, "core": 2}
    assert [c.name for c in model.spec.channels] == ["T1", "T2"]
    # one file of the case names the others by their _XXXX suffix
    from medseg.io import load_image

    expected = model.predict_files(files).labels
    assert np.array_equal(model.predict_files([files[1]]).labels, expected)
    assert np.array_equal(model.predict(load_image(files[0])).labels, expected)  # as a batch loads it
    with pytest.raises(InputError, match=r"scan_0001\.nii\.gz: is channel 1 of case 'scan'"):
        model.predict(load_image(files[1]))


# --------------------------------------------------------------------------------------------------
# identity, tracking and the imported bundle


@pytest.mark.slow
def test_description_names_what_ran(hippo_3d: Path) -> None:
    model = load_model([f"nnunet:{hippo_3d}"], options={"folds": "1,0", "mirroring": "off"})
    desc = model.describe()
    assert desc.kind == "nnunet"
    assert desc.params["folds"] == "1,0"
    assert desc.params["mirroring"] == "off"
    assert desc.params["configuration"] == "3d_fullres"
    assert desc.params["postprocessing"] == "not applied"
    assert len(desc.sha256.split("+")) == 2
    assert len(desc.params["plans_sha256"]) == 64


@pytest.mark.slow
def test_imported_bundle_runs_and_registers(
    hippo_3d: Path, hippo_scans: list[list[Path]], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app

    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        app,
        ["import", "nnunet", str(hippo_3d), "--out", str(out), "--folds", "0", "--register", "hippo-nnunet"],
    )
    assert result.exit_code == 0, result.output
    assert "models:/hippo-nnunet/1" in result.output
    folder_model = load_model([f"nnunet:{hippo_3d}"], options={"folds": "0"})
    expected = folder_model.predict_files(hippo_scans[0]).labels
    for ref in (str(out), "models:/hippo-nnunet/1"):
        model = load_model([ref])
        assert model.describe().kind == "nnunet"
        assert np.array_equal(model.predict_files(hippo_scans[0]).labels, expected)
    # a changed file is refused by its hash
    with (out / "plans.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(ConfigError, match=r"plans\.json must have SHA-256"):
        load_model([str(out)])


# --------------------------------------------------------------------------------------------------
# bad input: one clear line naming the file


@pytest.mark.slow
def test_folder_without_plans_is_refused(hippo_3d: Path, tmp_path: Path) -> None:
    folder = copy_model_folder(hippo_3d, tmp_path / hippo_3d.name)
    (folder / "plans.json").unlink()
    with pytest.raises(ConfigError, match=r"plans\.json must exist"):
        load_model([f"nnunet:{folder}"])


@pytest.mark.slow
def test_missing_fold_is_refused(hippo_3d: Path) -> None:
    with pytest.raises(ConfigError, match=r"fold_3.checkpoint_final\.pth must exist for fold 3"):
        load_model([f"nnunet:{hippo_3d}"], options={"folds": "0,3"})


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused(
    hippo_3d: Path, aniso_ct: Path, tmp_path: Path
) -> None:
    folder = copy_model_folder(hippo_3d, tmp_path / hippo_3d.name)
    shutil.copy(aniso_ct / "fold_all" / "checkpoint_final.pth", folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(
        ConfigError, match=r"fold_0.checkpoint_final\.pth must hold weights for the plans' PlainConvUNet"
    ):
        load_model([f"nnunet:{folder}"], options={"folds": "0"})


@pytest.mark.slow
def test_wrong_channel_count_is_refused(
    regions_2ch: Path, hippo_scans: list[list[Path]], tmp_path: Path
) -> None:
    from medseg.io import load_image

    model = load_model([f"nnunet:{regions_2ch}"])
    plain = tmp_path / "plain.nii.gz"
    shutil.copy(hippo_scans[1][0], plain)
    with pytest.raises(InputError, match=r"plain\.nii\.gz: image must have 2 channel\(s\) \['T1', 'T2'\]"):
        model.predict(load_image(plain))
    with pytest.raises(InputError, match=r"moved_0000\.nii\.gz: case 'moved' must have 2 channel file\(s\)"):
        model.predict(load_image(hippo_scans[1][0]))


@pytest.mark.slow
def test_untrusted_checkpoint_contents_are_refused(hippo_3d: Path, tmp_path: Path) -> None:
    folder = copy_model_folder(hippo_3d, tmp_path / hippo_3d.name)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    data = torch.load(ckpt, weights_only=False)
    torch.save({**data, "trainer_name": "MyOwnTrainer"}, ckpt)
    with pytest.raises(ConfigError, match="got 'MyOwnTrainer'"):
        load_model([f"nnunet:{folder}"], options={"folds": "0"})
    # the same trainer, accepted by name, loads (its network is the plans' own here)
    load_model([f"nnunet:{folder}"], options={"folds": "0", "trainers": "MyOwnTrainer"})
    torch.save({**data, "extra": Path("/etc")}, ckpt)  # any object outside the allow-list
    with pytest.raises(ConfigError, match=r"checkpoint_final\.pth must be an nnU-Net checkpoint of tensors"):
        load_model([f"nnunet:{folder}"], options={"folds": "0"})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"previous_stage": "3d_lowres"}, "cascade stage after '3d_lowres'"),
        ({"architecture": None, "UNet_class_name": "PlainConvUNet"}, r"nnU-Net >= 2.4 plans"),
        ({"normalization_schemes": ["MyNormalization"]}, "normalization scheme must be one of"),
        ({"resampling_fn_data": "resample_torch_fornnunet"}, "resampling_fn_data must be one of"),
    ],
)
def test_plans_medseg_cannot_reproduce_are_refused_by_name(
    hippo_3d: Path, tmp_path: Path, change: dict[str, object], match: str
) -> None:
    folder = copy_model_folder(hippo_3d, tmp_path / hippo_3d.name)
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    config.update(change)
    if config.get("architecture", 1) is None:
        del config["architecture"]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ConfigError, match=match):
        load_model([f"nnunet:{folder}"], options={"folds": "0"})


# --------------------------------------------------------------------------------------------------
# pieces against nnU-Net's own functions (no model folder needed)


def test_resampling_matches_nnunet() -> None:
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    from medseg.sources.nnunet.resample import resample_to_shape

    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 9, 14, 12)).astype(np.float32)
    cases = [
        ((12, 10, 15), (1.0, 1.0, 1.0), (0.75, 1.4, 0.8), 3),  # isotropic: all axes at once
        ((20, 16, 15), (5.0, 0.7, 0.7), (2.2, 0.6, 0.56), 3),  # anisotropic: separate axis 0
        ((9, 20, 17), (0.8, 0.8, 4.0), (0.8, 0.56, 0.56), 1),  # anisotropic target, order 1
    ]
    for shape, spacing, target, order in cases:
        ours = resample_to_shape(data, shape, spacing, target, order=order, order_z=0)
        theirs = resample_data_or_seg_to_shape(
            data, shape, spacing, target, is_seg=False, order=order, order_z=0, force_separate_z=None
        )
        assert ours.dtype == theirs.dtype
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_windows_and_gaussian_match_nnunet() -> None:
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    from medseg.sources.nnunet.sliding import gaussian_weights, window_starts

    for size, patch in [((110, 40, 56), (64, 40, 32)), ((33, 200), (32, 64)), ((7, 7, 7), (7, 7, 7))]:
        assert window_starts(size, patch, 0.5) == compute_steps_for_sliding_window(size, patch, 0.5)
    theirs = compute_gaussian((20, 24, 12), 1 / 8, 10, device=torch.device("cpu")).float()
    assert torch.equal(gaussian_weights((20, 24, 12)), theirs)


@pytest.mark.parametrize(
    ("scheme", "use_mask"),
    [
        ("ZScoreNormalization", False),
        ("ZScoreNormalization", True),
        ("CTNormalization", False),
        ("NoNormalization", False),
        ("RescaleTo01Normalization", False),
        ("RGBTo01Normalization", False),
    ],
)
def test_normalisation_matches_nnunet(scheme: str, use_mask: bool) -> None:
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

    from medseg.sources.nnunet.preprocess import normalize_channel

    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, size=(6, 7, 8)).astype(np.float32)
    image[:2] = 0
    inside = image != 0
    props = {"mean": 80.0, "std": 30.0, "percentile_00_5": 10.0, "percentile_99_5": 200.0}
    cls = getattr(schemes, scheme)
    theirs = cls(use_mask_for_norm=use_mask, intensityproperties=props).run(
        image.copy(), np.where(inside, 0, -1)
    )
    ours = normalize_channel(image.copy(), scheme=scheme, use_mask=use_mask, inside=inside, properties=props)
    np.testing.assert_array_equal(ours, theirs)


def test_postprocessing_pickle_is_read_without_running_code(tmp_path: Path) -> None:
    from nnunetv2.postprocessing.remove_connected_components import (
        apply_postprocessing,
        remove_all_but_largest_component_from_segmentation,
    )

    from medseg.sources.nnunet.postprocess import read_postprocessing

    seg = np.zeros((12, 12, 12), dtype=np.uint8)
    seg[1:5, 1:5, 1:5] = 1
    seg[8:10, 8:10, 8:10] = 1
    seg[6:8, 1:3, 9:11] = 2
    seg[1:4, 8:11, 1:3] = 2
    fns = [remove_all_but_largest_component_from_segmentation] * 2
    kwargs = [
        {"labels_or_regions": 1, "background_label": 0},
        {"labels_or_regions": [2], "background_label": 0},
    ]
    path = tmp_path / "postprocessing.pkl"
    path.write_bytes(pickle.dumps((fns, kwargs)))
    ours = read_postprocessing(path).apply(seg)
    assert np.array_equal(ours, apply_postprocessing(seg, fns, kwargs))
    assert ours.sum() < seg.sum()
    path.write_bytes(pickle.dumps(([print], [{"labels_or_regions": 1}])))
    with pytest.raises(ConfigError, match=r"postprocessing\.pkl may name only .*got builtins\.print"):
        read_postprocessing(path)


def test_dicom_series_voxel_order_is_simpleitks(
    sitk_read_series: Callable[[Path], tuple[np.ndarray, np.ndarray]],
) -> None:
    """nnU-Net reads DICOM through SimpleITK: medseg's (X, Y, Z) must be SimpleITK's stacking, reversed."""
    from medseg.io import load_image

    folder = shared("mr_study", "13_HCropVolume")
    expected, _ = sitk_read_series(folder)
    image = load_image(folder)
    assert np.array_equal(image.as_tensor()[0].numpy(), expected)


@pytest.mark.slow
def test_label_codes_file_reaches_the_spec(hippo_3d: Path, tmp_path: Path) -> None:
    codes = tmp_path / "codes.yaml"
    codes.write_text(
        "Anterior:\n"
        "  category: {value: '91723000', meaning: Anatomical Structure}\n"
        "  property_type: {value: '5366008', meaning: Hippocampus}\n"
    )
    model = load_model([f"nnunet:{hippo_3d}"], options={"folds": "0", "label_codes": str(codes)})
    assert model.spec.label_codes["Anterior"].property_type.meaning == "Hippocampus"
    assert model.spec.label_names == {0: "background", 1: "Anterior", 2: "Posterior"}
    codes.write_text(
        "Left:\n  category: {value: '1', meaning: A}\n  property_type: {value: '2', meaning: B}\n"
    )
    with pytest.raises(ConfigError, match=r"codes\.yaml: .*label_codes must name foreground labels"):
        load_model([f"nnunet:{hippo_3d}"], options={"folds": "0", "label_codes": str(codes)})


@pytest.mark.slow
def test_postprocessing_pkl_is_applied_when_asked_and_recorded(
    hippo_3d: Path, hippo_scans: list[list[Path]], tmp_path: Path
) -> None:
    from nnunetv2.postprocessing.remove_connected_components import (
        apply_postprocessing,
        remove_all_but_largest_component_from_segmentation,
    )

    folder = copy_model_folder(hippo_3d, tmp_path / hippo_3d.name)
    fns = [remove_all_but_largest_component_from_segmentation]
    kwargs = [{"labels_or_regions": [1, 2], "background_label": 0}]
    (folder / "postprocessing.pkl").write_bytes(pickle.dumps((fns, kwargs)))  # as nnU-Net saves it
    options = {"folds": "0", "mirroring": False}
    plain = load_model([f"nnunet:{folder}"], options=options)
    post = load_model([f"nnunet:{folder}"], options={**options, "postprocess": True})
    assert plain.describe().params["postprocessing"] == "not applied"
    assert post.describe().params["postprocessing"] == "keep largest [1, 2]"
    raw = plain.predict_files(hippo_scans[0]).labels
    result = post.predict_files(hippo_scans[0])
    assert np.array_equal(result.labels, apply_postprocessing(raw, fns, kwargs))
    records = {r.name: r for r in result.provenance}  # what ran, with its settings, is recorded
    assert list(records) == ["preprocess", "model", "to_source", "postprocess"]
    assert records["postprocess"].changed["voxels"] == int((raw != result.labels).sum())
    assert records["model"].params["mirror_axes"] == []


# --------------------------------------------------------------------------------------------------
# through the batch: CLI, manifest, MLflow


@pytest.mark.slow
def test_batch_runs_nnunet_model_and_records_it(
    hippo_3d: Path, hippo_scans: list[list[Path]], tmp_path: Path
) -> None:
    import mlflow
    import nibabel as nib
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io import load_image

    scans = tmp_path / "in"
    scans.mkdir()
    shutil.copy(hippo_scans[0][0], scans / "good.nii.gz")
    two = np.stack([nib.load(hippo_scans[0][0]).get_fdata()] * 2, axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(two, np.eye(4)), scans / "two_channels.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    args = ["predict", str(scans), str(out), "--model", f"nnunet:{hippo_3d}", "--folds", "0"]
    args += ["--checkpoint", "final", "--model-option", "mirroring=false", "--export", "nifti"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # some scans failed, the others were segmented
    manifest = json.loads((out / "manifest.json").read_text())
    by_id = {e["case_id"]: e for e in manifest["scans"]}
    assert by_id["good"]["status"] == "ok"
    assert by_id["two_channels"]["status"] == "failed"
    assert "must have 1 channel(s) ['MRI']" in by_id["two_channels"]["error"]
    assert by_id["broken"]["status"] == "failed"
    model = load_model([f"nnunet:{hippo_3d}"], options={"folds": "0", "mirroring": False})
    expected = model.predict(load_image(scans / "good.nii.gz")).labels
    written = np.asarray(nib.load(out / "good" / "labels.nii.gz").dataobj)
    assert np.array_equal(written, expected)
    runs = mlflow.search_runs(experiment_names=["medseg"], order_by=["start_time DESC"], max_results=1)
    params = runs.iloc[0]
    assert params["params.model_kind"] == "nnunet"
    assert params["params.folds"] == "0"
    assert params["params.mirroring"] == "off"
    assert params["params.model_sha256"] == model.sha256
    assert params["params.plans_sha256"] == model.describe().params["plans_sha256"]
