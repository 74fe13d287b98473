"""Inference precision: selection per device and CPU, autocast with float32 blending, the guard, layouts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from medseg.bundle import build_network, load_bundle, save_bundle
from medseg.config.pipeline import InferenceConfig, PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.errors import ConfigError
from medseg.hardware import CpuCapabilities, cpu_capabilities
from medseg.tiling import TilingSettings, infer
from medseg.tiling import engine as tiling_engine
from medseg.tiling.merge import Merger
from medseg.tiling.precision import resolve_precision
from medseg.tiling.runtime import BundleRuntime, InferenceOptions, resolve_inference
from medseg.tiling.tuning import LayoutCache, WindowLayout, choose_layout, tuning_key
from medseg.training.precision import autocast_dtype
from medseg.training.precision_guard import check_precision, guard_bundle, store_check

AVX512_BF16 = CpuCapabilities(
    model="AMD EPYC (simulated)", flags=frozenset({"avx2", "avx512f", "avx512_bf16"})
)
AMX = CpuCapabilities(model="Xeon (simulated)", flags=frozenset({"avx512f", "amx_tile", "amx_bf16"}))
PLAIN = CpuCapabilities(model="old (simulated)", flags=frozenset({"avx2"}))
LABELS = {"background": 0, "a": 1}


@pytest.mark.parametrize(
    ("requested", "device", "cpu", "expected"),
    [
        ("auto", "cpu", AVX512_BF16, "bfloat16"),
        ("auto", "cpu", AMX, "bfloat16"),
        ("auto", "cpu", PLAIN, "float32"),
        ("auto", "cuda", PLAIN, "float16"),
        ("auto", "meta", AMX, "float32"),
        ("float32", "cpu", AMX, "float32"),
        ("bfloat16", "cpu", PLAIN, "bfloat16"),
        ("float16", "cuda", PLAIN, "float16"),
    ],
)
def test_precision_selection_per_device_and_cpu(requested, device, cpu, expected) -> None:
    choice = resolve_precision(requested, device=device, cpu=cpu)
    assert choice.dtype == expected
    assert choice.requested == requested


def test_precision_names_are_checked_once_everywhere() -> None:
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("bf16", device="cpu", cpu=PLAIN)
    with pytest.raises(ValidationError, match="precision"):
        InferenceConfig.model_validate({"precision": "half"})
    with pytest.raises(ValueError, match="precision"):
        TilingSettings(patch_size=(8, 8, 8), precision="half")
    with pytest.raises(ConfigError, match="memory_format"):
        InferenceOptions(memory_format="nhwc")
    assert InferenceConfig().precision == "auto"


def test_training_reads_the_same_cpu_detection() -> None:
    expected = torch.bfloat16 if cpu_capabilities().native_bf16 else None
    assert autocast_dtype("cpu", True) == expected


def test_guard_failure_keeps_auto_at_float32_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    info = {"precision_check": {"bfloat16": {"passed": False, "agreement": 0.98}}}
    with caplog.at_level(logging.WARNING, logger="medseg.tiling.runtime"):
        for _ in range(2):
            cfg, choice = resolve_inference(
                InferenceConfig(), InferenceOptions(), device="cpu", info=info, cpu=AVX512_BF16, name="m-once"
            )
            assert cfg.precision == "float32"
            assert "failed its precision check" in choice.reason
    assert sum("m-once runs in float32" in r.message for r in caplog.records) == 1
    passed = {"precision_check": {"bfloat16": {"passed": True}}}
    cfg, _ = resolve_inference(
        InferenceConfig(), InferenceOptions(), device="cpu", info=passed, cpu=AVX512_BF16
    )
    assert cfg.precision == "bfloat16"
    # an explicit type is honoured whatever the check said
    cfg, _ = resolve_inference(
        InferenceConfig(), InferenceOptions(precision="bfloat16"), device="cpu", info=info, cpu=AVX512_BF16
    )
    assert cfg.precision == "bfloat16"


class _AutocastProbe(nn.Module):
    """Two-class logits ``(x, -x)``; records the autocast type and the dtype of its answer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1))
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), y.dtype))
        return y


def test_forward_in_bfloat16_blending_and_argmax_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    merged: list[torch.dtype] = []

    class RecordingMerger(Merger):
        def add(self, locations, pred):
            merged.append(pred.dtype)
            super().add(locations, pred)

    monkeypatch.setattr(tiling_engine, "Merger", RecordingMerger)
    image = torch.linspace(-3, 3, 20 * 18 * 10).reshape(1, 20, 18, 10)
    results = {}
    for precision in ("float32", "bfloat16"):
        net = _AutocastProbe()
        settings = TilingSettings(patch_size=(8, 8, 8), batch_size=2, precision=precision, tta_axes=(0,))
        results[precision] = infer(net, image, settings, output="probabilities")
        reduced = precision == "bfloat16"
        assert set(net.seen) == {(reduced, torch.bfloat16 if reduced else torch.float32)}
    assert set(merged) == {torch.float32}
    for result in results.values():
        assert result.probabilities is not None
        assert result.probabilities.dtype == torch.float32
    labels = {
        p: infer(_AutocastProbe(), image, TilingSettings(patch_size=(8, 8, 8), precision=p), output="labels")
        for p in ("float32", "bfloat16")
    }
    assert torch.equal(labels["float32"].labels, labels["bfloat16"].labels)
    assert torch.allclose(results["float32"].probabilities, results["bfloat16"].probabilities, atol=2e-2)


def _spec() -> DatasetSpec:
    return DatasetSpec.model_validate(
        {
            "name": "p",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": LABELS,
            "cases": [],
        }
    )


def _pipeline(**inference: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "p",
            "model": {"name": "unet3d", "params": {"channels": [4, 8]}},
            "train": {"patch_size": [16, 16, 16]},
            "inference": inference,
        }
    )


class _NearTie(nn.Module):
    """Logits ``(x, x * (1 + 2**-10))``: float32 says 1 where ``x > 0``; bfloat16 cannot tell them apart."""

    spatial_dims = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 1.0 + 2**-10]).view(2, 1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_guard_fails_a_network_whose_labels_flip_and_auto_falls_back(tmp_path: Path) -> None:
    image = torch.rand(1, 16, 16, 16) + 0.5
    volumes = [{"image": image, "label": torch.ones(1, 16, 16, 16)}]
    check = check_precision(_NearTie(), volumes, _pipeline(), labels=[1], dtype="bfloat16")
    assert not check.passed
    assert check.agreement < 0.999
    assert check.dice_change["1"] > 0.002
    folder = save_bundle(tmp_path / "b", _pipeline(), _spec(), build_network(_pipeline(), _spec()))
    store_check(folder, check)
    stored = json.loads((folder / "bundle.json").read_text())["info"]["precision_check"]["bfloat16"]
    assert stored["passed"] is False
    assert stored["min_agreement"] == 0.999
    bundle = load_bundle(folder)
    runtime = BundleRuntime([bundle], InferenceOptions(), device="cpu", cpu=AVX512_BF16)
    assert runtime.bundles[0].pipeline.inference.precision == "float32"
    assert runtime.facts()[0]["precision_reason"] == "the bundle failed its precision check"


def _phantom(seed: int, shape=(16, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy bright ellipsoid on a dark background: image and label."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = torch.rand(3, 1, 1, 1, generator=gen) * 0.4 - 0.2
    label = (((grid - centre) / 0.55) ** 2).sum(0) < 1
    image = label.float() * 2 - 1 + 0.3 * torch.randn(shape, generator=gen)
    return image[None], label[None].float()


@pytest.fixture(scope="module")
def phantom_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net (seeded) trained for a few steps on two phantoms, saved as a bundle."""
    torch.manual_seed(0)
    pipeline = _pipeline(batch_size=2)
    net = build_network(pipeline, _spec())
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    images, labels = zip(*[_phantom(s) for s in range(2)], strict=True)
    x, y = torch.stack(images), torch.stack(labels).long()[:, 0]
    net.train()
    for _ in range(25):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    return save_bundle(tmp_path_factory.mktemp("phantom") / "b", pipeline, _spec(), net)


def test_agreement_on_phantoms_with_a_tiny_trained_network(phantom_bundle: Path) -> None:
    image, label = _phantom(2)
    check = guard_bundle(phantom_bundle, [{"image": image, "label": label}], dtype="bfloat16")
    assert check.dice_float32["1"] > 0.9  # the network learned the phantom
    assert check.agreement >= 0.999
    assert check.dice_change["1"] <= 0.002
    assert check.passed
    info = load_bundle(phantom_bundle).info["precision_check"]["bfloat16"]
    assert info["agreement"] == pytest.approx(check.agreement)


def test_reduced_precision_prediction_matches_float32_end_to_end(phantom_bundle: Path) -> None:
    from monai.data import MetaTensor

    from medseg.pipeline import Predictor

    image, _ = _phantom(3)
    scan = MetaTensor(image, affine=torch.eye(4))
    out = {}
    for precision in ("float32", "bfloat16"):
        options = InferenceOptions(precision=precision, tuning="pinned")
        predictor = Predictor.from_path(phantom_bundle, inference=options)
        assert predictor.runtime.facts()[0]["precision"] == precision
        out[precision] = predictor.predict(scan, keep_probabilities=True)
        assert out[precision].probabilities.dtype == torch.float32
    a, b = out["float32"].labels, out["bfloat16"].labels
    union = (a != 0) | (b != 0)
    assert union.sum() > 50
    assert (a[union] == b[union]).mean() >= 0.99  # the guard judges 99.9 % on validation cases


def test_window_layout_is_measured_once_cached_and_pinnable(tmp_path: Path) -> None:
    net = nn.Conv3d(1, 2, 3, padding=1).eval()
    cache = LayoutCache(tmp_path / "layouts.json")
    key = tuning_key(model="abc", device="cpu", threads=torch.get_num_threads(), precision="float32")
    start = WindowLayout(2, "contiguous")
    first = choose_layout(
        net,
        key=key,
        in_channels=1,
        window=(8, 8, 8),
        precision="float32",
        device="cpu",
        start=start,
        cache=cache,
    )
    assert first.source == "measured"
    assert first.seconds_per_window is not None
    again = LayoutCache(tmp_path / "layouts.json").get(key)  # a later run reads the file
    assert again is not None
    assert (again.batch_size, again.memory_format) == (
        first.batch_size,
        first.memory_format,
    )
    assert again.source == "cached"
    folder = save_bundle(tmp_path / "b", _pipeline(), _spec(), build_network(_pipeline(), _spec()))
    pinned = InferenceOptions(batch_size=3, memory_format="channels_last")
    runtime = BundleRuntime([load_bundle(folder)], pinned, device="cpu", cpu=PLAIN, cache=cache)
    (bundle,) = runtime.tuned()
    assert (bundle.pipeline.inference.batch_size, bundle.pipeline.inference.memory_format) == (
        3,
        "channels_last",
    )
    assert runtime.facts()[0]["layout_source"] == "pinned"
    measured = BundleRuntime([load_bundle(folder)], InferenceOptions(), device="cpu", cpu=PLAIN, cache=cache)
    measured.tuned()
    assert measured.facts()[0]["layout_source"] == "measured"
    assert measured.facts()[0]["batch_size"] >= 1


def test_cli_predict_pins_precision_and_layout_and_records_them(tmp_path: Path, phantom_bundle: Path) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.synth import write_nifti

    image, _ = _phantom(4)
    write_nifti(image[0].numpy(), np.eye(4), tmp_path / "scans" / "p4.nii.gz")
    pins = ["--precision", "float32", "--batch-size", "3", "--memory-format", "channels_last"]
    args = ["predict", str(tmp_path / "scans"), str(tmp_path / "out"), "--model", str(phantom_bundle)]
    result = CliRunner().invoke(app, [*args, "--export", "none", *pins])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "p4" / "result.json").read_text())
    text = json.dumps(record)
    plan = next(s for s in record["details"]["provenance"] if s["name"] == "plan")
    member = plan["params"]["members"][0]
    assert (member["precision"], member["batch_size"], member["memory_format"]) == (
        "float32",
        3,
        "channels_last",
    ), text[:500]
    bad = CliRunner().invoke(app, [*args, "--precision", "bf16"])
    assert bad.exit_code == 2
    assert "precision" in bad.output


def test_a_predictor_moved_or_shipped_keeps_its_settings(phantom_bundle: Path) -> None:
    import pickle

    from medseg.pipeline import Predictor

    predictor = Predictor.load_bundles(phantom_bundle, inference=InferenceOptions(precision="float32"))
    shipped = pickle.loads(pickle.dumps(predictor))  # as a Ray worker receives it
    moved = shipped.to("cpu")
    assert moved.runtime.facts()[0]["precision"] == "float32"
    assert moved.bundles[0].pipeline.inference.precision == "float32"
    assert moved.runtime.tuned()[0].pipeline.inference.batch_size >= 1
