"""MONAI bundles as a model source: agreement with MONAI's own ``monai.bundle run``, and refusals.

The tests build a real bundle folder as the MONAI Model Zoo lays one out (a small seeded
``monai.networks.nets.UNet`` saved to ``models/model.pt``, an ``inference.json`` in the Zoo's shape
with ``$``-expressions in the sections medseg ignores), run it with MONAI's own runner in a
subprocess, and run medseg on the same synthetic NIfTI scans.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.errors import ConfigError, InputError
from medseg.io import load_image
from medseg.sources import load_model
from medseg.synth import make_phantom, write_nifti

LABELS = {"0": "background", "1": "liver", "2": "kidney"}
NETWORK = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
    "norm": "batch",
}
PREPROCESSING = [
    {"_target_": "LoadImaged", "keys": "image"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
    {
        "_target_": "ScaleIntensityRanged",
        "keys": "image",
        "a_min": -150,
        "a_max": 250,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    },
    {"_target_": "EnsureTyped", "keys": "image"},
]
POSTPROCESSING = [
    {"_target_": "Activationsd", "keys": "pred", "softmax": True},
    {
        "_target_": "Invertd",
        "keys": "pred",
        "transform": "@preprocessing",
        "orig_keys": "image",
        "meta_key_postfix": "meta_dict",
        "nearest_interp": False,
        "to_tensor": True,
    },
    # the probabilities as MONAI has them on the source grid, saved next to the labels
    {"_target_": "CopyItemsd", "keys": "pred", "times": 1, "names": "prob"},
    {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": "@output_dir",
        "output_postfix": "seg",
        "resample": False,
        "separate_folder": False,
    },
    {
        "_target_": "SaveImaged",
        "keys": "prob",
        "output_dir": "@output_dir",
        "output_postfix": "prob",
        "resample": False,
        "separate_folder": False,
        "output_dtype": "$np.float32",
    },
]


def inference_config() -> dict[str, Any]:
    """An inference config in the Model Zoo's shape (spleen_ct_segmentation's layout)."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cpu')",
        "network_def": copy.deepcopy(NETWORK),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": copy.deepcopy(PREPROCESSING)},
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [16, 16, 16],
            "sw_batch_size": 3,
            "overlap": 0.4,
            "mode": "gaussian",
            "sigma_scale": 0.2,
            "padding_mode": "constant",
            "cval": 0.1,
        },
        "postprocessing": {"_target_": "Compose", "transforms": copy.deepcopy(POSTPROCESSING)},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(in_channels: int = 1, labels: dict[str, str] = LABELS) -> dict[str, Any]:
    """``configs/metadata.json`` with the Zoo's ``network_data_format``."""
    image = {
        "type": "image",
        "format": "hounsfield",
        "modality": "CT",
        "num_channels": in_channels,
        "spatial_shape": [16, 16, 16],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
        "channel_def": {str(i): f"ct{i}" for i in range(in_channels)},
    }
    pred = {
        "type": "image",
        "format": "segmentation",
        "num_channels": len(labels),
        "spatial_shape": [16, 16, 16],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
        "channel_def": labels,
    }
    return {
        "version": "0.1.0",
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "name": "Tiny phantom segmentation",
        "task": "Liver and kidney segmentation of synthetic CT phantoms",
        "description": "A seeded UNet for tests",
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
    }


@functools.cache
def _calibrated_state(classes: int = 3) -> dict[str, torch.Tensor]:
    """Seeded weights whose batch norms are calibrated on a phantom and whose classes are balanced.

    Not trained: one forward pass sets the batch-norm statistics from a phantom scaled as the
    bundle scales it, and the output biases are shifted so that the classes share the voxels about
    equally, so labels vary in space and there are many near-ties, where disagreement would show.
    """
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(**{**{k: v for k, v in NETWORK.items() if k != "_target_"}, "out_channels": classes})
    image, _, _ = make_phantom(shape=(32, 32, 16), seed=3)
    x = ((torch.as_tensor(image, dtype=torch.float32).clamp(-150, 250) + 150) / 400)[None, None]
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = 1.0
    with torch.no_grad():
        net.train()
        net(x)
        net.eval()
        last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        last.bias -= net(x).mean(dim=(0, 2, 3, 4))
    return {k: v.clone() for k, v in net.state_dict().items()}


def seeded_unet(classes: int = 3) -> torch.nn.Module:
    """The bundle's network with the weights :func:`_calibrated_state` gives."""
    from monai.networks.nets import UNet

    net = UNet(**{**{k: v for k, v in NETWORK.items() if k != "_target_"}, "out_channels": classes})
    net.load_state_dict(_calibrated_state(classes))
    return net


def write_bundle(
    root: Path,
    config: dict[str, Any] | None = None,
    *,
    meta: dict[str, Any] | None = None,
    yaml_name: bool = False,
    labels: dict[str, str] = LABELS,
) -> Path:
    """A bundle folder: ``configs/metadata.json``, ``configs/inference.json`` and ``models/model.pt``."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    torch.save(seeded_unet(len(labels)).state_dict(), root / "models" / "model.pt")
    (root / "configs" / "metadata.json").write_text(json.dumps(meta or metadata(labels=labels), indent=2))
    cfg = config if config is not None else inference_config()
    cfg["network_def"]["out_channels"] = len(labels)
    if yaml_name:
        import yaml

        (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(cfg))
    else:
        (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    return root


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CT phantoms with oblique affines; the last is thinner than a window after resampling."""
    folder = tmp_path_factory.mktemp("scans")
    for i, shape in enumerate([(30, 26, 14), (26, 22, 10), (20, 18, 5)]):
        image, _, affine = make_phantom(shape=shape, seed=10 + i)
        write_nifti(image, affine, folder / f"case{i}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The literal bundle (no ``$`` in the sections medseg reads)."""
    return write_bundle(tmp_path_factory.mktemp("bundle") / "tiny_phantom")


@pytest.fixture(scope="module")
def monai_outputs(bundle: Path, scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``python -m monai.bundle run`` writes for the scans: ``<case>_seg`` and ``<case>_prob``."""
    pytest.importorskip("ignite", reason="MONAI's bundle runner needs pytorch-ignite (medseg[dev])")
    pytest.importorskip("fire", reason="MONAI's bundle command line needs fire (medseg[dev])")
    out = tmp_path_factory.mktemp("monai_out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--meta_file",
        str(bundle / "configs" / "metadata.json"),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(scans),
        "--output_dir",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _monai_result(out: Path, case: str, what: str) -> np.ndarray:
    return np.asarray(nib.load(out / f"{case}_{what}.nii.gz").dataobj)


@pytest.mark.slow
def test_labels_and_probabilities_agree_with_monai_bundle_run(
    bundle: Path, scans: Path, monai_outputs: Path
) -> None:
    model = load_model([f"monai-bundle:{bundle}"])
    assert model.spec.labels == {"background": 0, "liver": 1, "kidney": 2}
    for path in sorted(scans.glob("*.nii.gz")):
        case = path.name.removesuffix(".nii.gz")
        image = load_image(path)
        pred = model.predict(image, keep_probabilities=True)
        theirs = _monai_result(monai_outputs, case, "seg").astype(np.int64)
        # MONAI's SaveImaged writes the labels on the scan's grid (resample=False after Invertd)
        assert pred.labels.shape == theirs.shape == tuple(image.shape[1:])
        np.testing.assert_allclose(pred.affine, nib.load(path).affine, atol=1e-5)
        # medseg's engine adds the windows in another order than MONAI's loop, so the blended
        # logits may differ in the last bits (float32 sums, about 1e-7); a label could flip only
        # at a near-tie that close, hence 99.9 % rather than every voxel
        agreement = float((pred.labels == theirs).mean())
        assert agreement >= 0.999, (case, agreement)
        assert np.bincount(theirs.ravel(), minlength=3).min() > 0.05 * theirs.size  # every class, widely
        probs = _monai_result(monai_outputs, case, "prob")  # (X, Y, Z, K) as SaveImaged writes channels
        probs = np.moveaxis(probs.reshape(*theirs.shape, -1), -1, 0)
        assert pred.probabilities is not None
        np.testing.assert_allclose(pred.probabilities.numpy(), probs, atol=1e-5)
        assert 0.0 < pred.quality["foreground_entropy"] < np.log(3)


def test_engine_windows_match_monai_sliding_window_inference() -> None:
    """The inferer's settings through medseg's engine give MONAI's blended output (also padded)."""
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    from medseg.sources.monai_bundle.inferer import window_setup

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.Tanh()).eval()
    image = torch.randn(2, 37, 21, 11)
    cases = [
        {"roi_size": [16, 16, 16], "overlap": 0.4, "mode": "gaussian", "sigma_scale": 0.2, "cval": -1.0},
        {"roi_size": [12, -1, 8], "overlap": 0.25, "mode": "constant", "sw_batch_size": 4},
        {"roi_size": 10, "overlap": 0.7, "mode": "gaussian"},
        {"roi_size": [48, 16, 16], "padding_mode": "replicate", "mode": "gaussian"},
        {"roi_size": [16, 24, 16], "padding_mode": "reflect", "overlap": 0.5},
        {"roi_size": [16, 16, 20], "padding_mode": "circular", "sw_batch_size": 2},
    ]
    for kwargs in cases:
        inferer = SlidingWindowInferer(**kwargs)
        ours = window_setup(inferer).run(net, image).logits
        with torch.no_grad():
            theirs = inferer(image[None], net)[0]
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5, err_msg=str(kwargs))
    whole = window_setup(SimpleInferer())
    plan = whole.plan(image.shape[1:])
    assert plan.num_windows == 1
    assert plan.patch_size == tuple(image.shape[1:])
    with torch.no_grad():
        np.testing.assert_allclose(
            whole.run(net, image).logits.numpy(), net(image[None])[0].numpy(), atol=1e-6
        )


def _config_with(change: dict[str, Any]) -> dict[str, Any]:
    """The Zoo-shaped config with items replaced by ``::`` key paths."""
    config = inference_config()
    for key, value in change.items():
        *parents, last = key.split("::")
        node: Any = config
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return config


def test_dollar_expressions_refused_naming_the_keys_then_run_with_trust(
    tmp_path: Path, bundle: Path, scans: Path
) -> None:
    config = _config_with(
        {
            "preprocessing::transforms::4::a_min": "$-300.0 / 2",
            "inferer::overlap": "$0.2 * 2",
        }
    )
    folder = write_bundle(tmp_path / "expr", config)
    with pytest.raises(ConfigError) as err:
        load_model([f"monai-bundle:{folder}"])
    message = str(err.value)
    assert "\n" not in message
    assert str(folder / "configs" / "inference.json") in message
    assert "--trust-model-code" in message
    assert "preprocessing::transforms::4::a_min" in message
    assert "inferer::overlap" in message
    # the ignored sections' expressions (datalist, device, handlers, evaluator) are not named
    assert "datalist" not in message
    assert "evaluator" not in message
    trusted = load_model([f"monai-bundle:{folder}"], options={"trust_model_code": True})
    literal = load_model([f"monai-bundle:{bundle}"])
    assert trusted.describe().params["trusted_code"] == "true"
    image = load_image(scans / "case1.nii.gz")
    np.testing.assert_array_equal(trusted.predict(image).labels, literal.predict(image).labels)


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        ({"network_def::_target_": "os.system"}, "network_def::_target_", "is not a class of"),
        (
            {"preprocessing::transforms::2": {"_target_": "monai.bundle.scripts.run", "run_id": "x"}},
            "preprocessing::transforms::2::_target_",
            "monai.networks.nets",
        ),
        (
            {"postprocessing::transforms::0": {"_target_": "torch.nn.Identity"}},
            "postprocessing::transforms::0::_target_",
            "is not a class of",
        ),
        (
            {"inferer::_requires_": "@handlers"},
            "inferer::_requires_",
            "changes what is built",
        ),
        (
            {"preprocessing::transforms::3::_disabled_": True},
            "preprocessing::transforms::3::_disabled_",
            "changes what is built",
        ),
        ({"network_def::_mode_": "callable"}, "network_def::_mode_", "_mode_"),
        ({"inferer::roi_size": "@datalist"}, "datalist", "$-expression"),
        ({"inferer::roi_size": "%configs/other.json::roi"}, "inferer::roi_size", "%-macro"),
        (
            {"postprocessing::transforms::1::transform": "@preprocessing::transforms::0"},
            "postprocessing::transforms::1::transform",
            "a reader or writer medseg leaves out",
        ),
    ],
)
def test_code_outside_the_allowed_subset_refused(
    tmp_path: Path, change: dict[str, Any], key: str, reason: str
) -> None:
    folder = write_bundle(tmp_path / "bad", _config_with(change))
    with pytest.raises(ConfigError, match="trust-model-code") as err:
        load_model([f"monai-bundle:{folder}"])
    message = str(err.value)
    assert f"{key} (" in message, message
    assert reason in message, message
    assert "inference.json" in message
    assert "\n" not in message


def test_transforms_that_import_by_name_are_refused_and_nothing_runs(tmp_path: Path) -> None:
    """``LoadImaged(reader="a.dotted.path")`` would make MONAI import and call anything."""
    marker = tmp_path / "ran"
    reader = {
        "_target_": "LoadImaged",
        "keys": "image",
        "reader": "subprocess.run",
        "args": ["touch", str(marker)],
    }
    folder = write_bundle(
        tmp_path / "reader", _config_with({"postprocessing::transforms::1::transform": reader})
    )
    with pytest.raises(ConfigError) as err:
        load_model([f"monai-bundle:{folder}"])
    message = str(err.value)
    assert "postprocessing::transforms::1::transform::_target_ (reads or writes files" in message
    assert "postprocessing::transforms::1::transform::reader (a dotted path" in message
    assert not marker.exists()


def test_references_and_dotted_targets_inside_the_namespaces_are_built(tmp_path: Path) -> None:
    """``@`` references (absolute, ``#`` and relative) and dotted class paths need no trust."""
    config = _config_with(
        {
            "network_def::_target_": "monai.networks.nets.unet.UNet",
            "inferer::roi_size": "@windows::roi",
            "inferer::sw_batch_size": "@windows#batch",
            "preprocessing::transforms::3::pixdim": "@spacing",
        }
    )
    config["windows"] = {"batch": 2, "roi": "@::size", "size": [16, 16, 16]}
    config["spacing"] = [1.5, 1.5, 2.0]
    folder = write_bundle(tmp_path / "refs", config)
    model = load_model([f"monai-bundle:{folder}"])
    assert model.windows.settings.batch_size == 2
    assert model.describe().params["roi_size"] == "16x16x16"


def test_inference_yaml_and_description(tmp_path: Path, scans: Path) -> None:
    folder = write_bundle(tmp_path / "yaml_bundle", yaml_name=True)
    model = load_model([f"monai-bundle:{folder}"])
    weights = hashlib.sha256((folder / "models" / "model.pt").read_bytes()).hexdigest()
    config_hash = hashlib.sha256((folder / "configs" / "inference.yaml").read_bytes()).hexdigest()
    d = model.describe()
    assert (d.kind, d.location, d.sha256, model.sha256) == ("monai-bundle", str(folder), weights, weights)
    assert d.params["config"] == "configs/inference.yaml"
    assert d.params["config_sha256"] == config_hash
    assert d.params["inferer"] == "SlidingWindowInferer"
    assert d.params["blend"] == "gaussian"
    assert "SaveImaged" not in d.params["postprocessing"]
    pred = model.predict(load_image(scans / "case2.nii.gz"))
    assert [r.name for r in pred.provenance] == ["preprocess", "model", "to_source"]
    assert pred.provenance[1].changed["padding"] == [[0, 0], [0, 0], [4, 5]]  # 7 slices, 16-slice windows
    assert pred.labels.shape == (20, 18, 5)
    assert pred.labels.dtype == np.uint8
    assert pred.probabilities is None


def test_labels_inverted_after_the_argmax(tmp_path: Path, scans: Path) -> None:
    """A bundle that argmaxes first and inverts labels (nearest) gives MONAI's own result."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    post = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": True,
        },
    ]
    config = _config_with({"postprocessing::transforms": post})
    folder = write_bundle(tmp_path / "argmax_first", config)
    model = load_model([f"monai-bundle:{folder}"])
    path = scans / "case0.nii.gz"
    pred = model.predict(load_image(path), keep_probabilities=True)
    # MONAI's own pieces in this process: its parser, transforms and inferer
    parser = ConfigParser(config)
    pre, post_t = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    net = seeded_unet().eval()
    sample = pre({"image": str(path)})
    with torch.no_grad():
        logits = parser.get_parsed_content("inferer")(sample["image"][None], net)[0]
    theirs = Compose(post_t.transforms)({**sample, "pred": logits})["pred"][0].numpy()
    assert (pred.labels == theirs).mean() >= 0.999
    assert pred.probabilities is not None
    assert pred.probabilities.shape == (3, *pred.labels.shape)
    np.testing.assert_allclose(pred.probabilities.sum(0).numpy(), 1.0, atol=1e-4)


def test_missing_weights_and_weights_of_another_network(tmp_path: Path) -> None:
    folder = write_bundle(tmp_path / "no_weights")
    (folder / "models" / "model.pt").unlink()
    (folder / "models" / "model.ts").write_bytes(b"torchscript")
    with pytest.raises(ConfigError, match=r"models/model\.pt") as err:
        load_model([f"monai-bundle:{folder}"])
    assert "model.ts" in str(err.value)
    other = write_bundle(tmp_path / "other", _config_with({"network_def::channels": [4, 8, 32]}))
    with pytest.raises(ConfigError, match=r"model\.pt: must hold the weights of network_def \(UNet\)"):
        load_model([f"monai-bundle:{other}"])
    with pytest.raises(ConfigError, match=r"options must be among \['trust_model_code'\], got \['crf'\]"):
        load_model([f"monai-bundle:{other}"], options={"crf": True})
    with pytest.raises(ConfigError, match="one bundle folder"):
        load_model([f"monai-bundle:{other}", f"monai-bundle:{folder}"])
    nothing = tmp_path / "empty"
    nothing.mkdir()
    with pytest.raises(ConfigError, match=r"configs/metadata\.json"):
        load_model([f"monai-bundle:{nothing}"])


def test_wrong_channel_count_names_the_scan_and_the_metadata(
    tmp_path: Path, bundle: Path, scans: Path
) -> None:
    model = load_model([f"monai-bundle:{bundle}"])
    image = load_image(scans / "case2.nii.gz")
    two = type(image)(torch.cat([image, image]), meta=dict(image.meta))
    with pytest.raises(InputError) as err:
        model.predict(two)
    message = str(err.value)
    assert "case2.nii.gz" in message
    assert "metadata.json" in message
    assert "must have 1 channel(s)" in message
    assert "got 2" in message


@pytest.mark.parametrize(
    ("inferer", "words"),
    [
        ({"padding_mode": "symmetric"}, "padding_mode must be one of"),
        ({"with_coord": True}, "with_coord must be false"),
        ({"overlap": [0.5, 0.5, 0.25]}, "overlap must be one value for every axis"),
        ({"_target_": "SliceInferer", "spatial_dim": 2}, "got SliceInferer"),
    ],
)
def test_inferer_settings_the_engine_cannot_reproduce_are_refused(
    tmp_path: Path, inferer: dict[str, Any], words: str
) -> None:
    config = inference_config()
    config["inferer"].update(inferer)
    folder = write_bundle(tmp_path / "inferer", config)
    with pytest.raises(ConfigError, match=words) as err:
        load_model([f"monai-bundle:{folder}"])
    assert "inference.json" in str(err.value)


def test_postprocessing_without_labels_is_refused(tmp_path: Path) -> None:
    post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]
    folder = write_bundle(tmp_path / "sigmoid", _config_with({"postprocessing::transforms": post}))
    with pytest.raises(ConfigError, match=r"AsDiscreted\(argmax=True\), got Activationsd"):
        load_model([f"monai-bundle:{folder}"])


@pytest.mark.slow
def test_batch_from_the_command_line_fails_the_bad_scan_and_goes_on(
    tmp_path: Path, bundle: Path, scans: Path
) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("case0.nii.gz", "case2.nii.gz"):
        (folder / name).write_bytes((scans / name).read_bytes())
    image, _, affine = make_phantom(shape=(20, 18, 6), seed=5)
    nib.save(nib.Nifti1Image(np.stack([image, image], axis=-1), affine), folder / "two_channels.nii.gz")
    out = tmp_path / "out"
    args = ["predict", str(folder), str(out), "--model", f"monai-bundle:{bundle}", "--export", "nifti"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    by_id = {e["case_id"]: e for e in manifest["scans"]}
    assert by_id["two_channels"]["status"] == "failed"
    error = by_id["two_channels"]["error"]
    assert by_id["two_channels"]["inputs"] == [str(folder / "two_channels.nii.gz")]
    assert "metadata.json" in error
    assert "\n" not in error
    model = load_model([f"monai-bundle:{bundle}"])
    for case in ("case0", "case2"):
        assert by_id[case]["status"] == "ok", by_id[case]
        written = load_image(out / by_id[case]["outputs"][0])
        np.testing.assert_array_equal(
            written[0].numpy(), model.predict(load_image(folder / f"{case}.nii.gz")).labels
        )
    # code in the bundle: refused before any scan without the flag, run with it
    expr = write_bundle(tmp_path / "expr", _config_with({"inferer::overlap": "$0.2 * 2"}))
    refused = CliRunner().invoke(
        app,
        ["predict", str(folder / "case2.nii.gz"), str(tmp_path / "o2"), "--model", f"monai-bundle:{expr}"],
    )
    assert refused.exit_code == 2
    assert "inferer::overlap" in refused.output
    assert "--trust-model-code" in refused.output
    trusted = CliRunner().invoke(
        app,
        [
            "predict",
            str(folder / "case2.nii.gz"),
            str(tmp_path / "o3"),
            "--model",
            f"monai-bundle:{expr}",
            "--trust-model-code",
        ],
    )
    assert trusted.exit_code == 0, trusted.output


@pytest.mark.slow
def test_evaluate_runs_a_bundle_and_records_what_it_is(tmp_path: Path) -> None:
    import mlflow
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.synth import LABELS as PHANTOM_LABELS
    from medseg.synth import generate_dataset

    spec = generate_dataset(tmp_path / "ds", 2, shape=(24, 20, 8), seed=4, dicom=False)
    labels = {str(v): k for k, v in PHANTOM_LABELS.items()}
    folder = write_bundle(tmp_path / "phantoms", labels=labels)
    out = tmp_path / "evaluation"
    args = ["evaluate", "--data", str(spec), "--model", f"monai-bundle:{folder}", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "per_case.json").read_text())) >= 2
    runs = mlflow.search_runs(experiment_names=["medseg"], output_format="list")
    params = runs[0].data.params
    weights = hashlib.sha256((folder / "models" / "model.pt").read_bytes()).hexdigest()
    assert weights in params["model_sha256"]
    assert params["model_kind"] == "monai-bundle"
    assert params["folder"] == str(folder)
    assert (
        params["config_sha256"]
        == hashlib.sha256((folder / "configs" / "inference.json").read_bytes()).hexdigest()
    )
