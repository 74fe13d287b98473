"""The model contract every registered model must pass, plus the registry, DeepLab patch checks,
slice-wise application, deep supervision and the shipped pipelines."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.losses import DiceCELoss

import medseg.models as m
from medseg.config.pipeline import load_pipeline
from medseg.errors import ConfigError
from medseg.models.registry import check_input_size
from medseg.models.slicewise import SliceWise
from medseg.models.supervision import downsample_labels

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
NO_GRADIENTS = {"passthrough"}  # no weights: geometry checks only

UNET = {"channels": [4, 8, 16]}
DEEPLAB = {
    "channels": [4, 8, 8, 16],
    "blocks_per_stage": 1,
    "aspp_rates": [1, 2],
    "aspp_channels": 8,
    "low_level_channels": 4,
    "decoder_channels": 8,
}
# tiny hyper-parameters of every registered model (a new model must add its own here)
TINY: dict[str, dict[str, Any]] = {
    "passthrough": {},
    "resunet2d": {"channels": [4, 8, 16]},
    "resunet3d": {"channels": [4, 8, 16]},
    "unet2d": UNET,
    "unet3d": UNET,
    "unet2d_slices": {**UNET, "context": 1},
    "deeplabv3plus2d": DEEPLAB,
    "deeplabv3plus3d": DEEPLAB,
    "deeplabv3plus2d_slices": {**DEEPLAB, "axis": 0, "context": 1},
}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("unet3d", {**UNET, "upsample": "resize", "interp": "linear", "deep_supervision": True}),
    ("unet3d", {**UNET, "upsample": "resize", "interp": "nearest", "num_res_units": 0, "norm": "batch"}),
    ("unet2d", {"channels": [4, 8, 8, 16], "deep_supervision": True, "num_res_units": 2, "dropout": 0.1}),
    ("unet2d_slices", {**UNET, "axis": 1, "deep_supervision": True}),
    (
        "deeplabv3plus3d",
        {**DEEPLAB, "output_stride": 16, "channels": [4, 8, 8, 8, 16], "separable_encoder": True},
    ),
    ("deeplabv3plus2d", {**DEEPLAB, "norm": "batch", "act": "leakyrelu", "output_stride": 16}),
]
CASES = [(name, TINY[name]) for name in m.available_models() if name in TINY] + VARIANTS
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]
GRAD_CASES = [(c, i) for c, i in zip(CASES, IDS) if c[0] not in NO_GRADIENTS]
CLASSES = 3


def _sizes(divisors: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Accepted sizes: cubic (2 d per axis) and non-cubic (2, 3, 4 d), at least 2 per axis."""
    multiples = [(2,) * len(divisors), (2, 3, 4)[: len(divisors)], (4, 2, 3)[: len(divisors)]]
    return [tuple(k * max(d, 2) for k, d in zip(ks, divisors)) for ks in multiples]


def _build(name: str, params: dict[str, Any], in_channels: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return m.create_model(name, in_channels, CLASSES, **params)


def test_every_registered_model_has_tiny_params() -> None:
    assert set(m.available_models()) <= set(TINY), "add tiny hyper-parameters of the new model to TINY"


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_model_contract_shapes_and_sizes(name: str, params: dict[str, Any]) -> None:
    net = _build(name, params).eval()
    divisors = m.size_divisors(name, **params)
    assert net.size_divisors == divisors
    assert net.size_divisor == math.lcm(*divisors)
    assert net.spatial_dims == len(divisors) == m.model_entry(name).spatial_dims
    assert net.preferred_memory_format in ("contiguous", "channels_last")
    with torch.inference_mode():
        for size in _sizes(divisors):
            out = net(torch.randn(2, 2, *size))
            assert isinstance(out, torch.Tensor)
            assert out.shape == (2, CLASSES, *size)
            assert torch.isfinite(out).all()
        axis = next((a for a, d in enumerate(divisors) if d > 1), None)
        if axis is not None:
            bad = list(_sizes(divisors)[1])
            bad[axis] += divisors[axis] // 2
            with pytest.raises(ConfigError, match=rf"divisible by .*{divisors[axis]}.*got \({bad[0]}, "):
                net(torch.randn(1, 2, *bad))
            with pytest.raises(ConfigError, match="divisible by"):
                m.check_patch(name, bad, **params)


@pytest.mark.parametrize(("name", "params"), [c for c, _ in GRAD_CASES], ids=[i for _, i in GRAD_CASES])
def test_model_contract_gradients_reach_every_parameter(name: str, params: dict[str, Any]) -> None:
    net = _build(name, params).train()
    size = _sizes(m.size_divisors(name, **params))[1]
    target = torch.randint(0, CLASSES, (2, 1, *size))
    out = net(torch.randn(2, 2, *size))
    if params.get("deep_supervision"):
        assert isinstance(out, tuple)
        assert len(out) == len(params["channels"]) - 1
        assert out[0].shape == (2, CLASSES, *size)
    loss = m.deep_supervision_loss(DiceCELoss(to_onehot_y=True, softmax=True), out, target, weights=None)
    if isinstance(out, tuple):  # every head must train, so weigh the lowest one too
        loss = loss + sum(t.mean() for t in out[1:])
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", [n for n in m.available_models() if n not in NO_GRADIENTS])
def test_model_compiles_without_graph_breaks(name: str) -> None:
    torch._dynamo.reset()
    net = _build(name, TINY[name]).eval()
    size = _sizes(m.size_divisors(name, **TINY[name]))[1]
    x = torch.randn(1, 2, *size)
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), net(x))


def test_unknown_model_and_bad_params_list_the_choices() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model must be one of \[.*'deeplabv3plus3d'.*\], got 'unet3'; did you mean 'unet3d'\?",
    ):
        m.create_model("unet3", 1, 2)
    with pytest.raises(
        ConfigError, match=r"unknown key 'chanels'.*valid hyper-parameters: channels, num_res_units"
    ):
        m.create_model("unet3d", 1, 2, chanels=[4, 8])
    with pytest.raises(ConfigError, match=r"upsample.*'transpose' or 'resize'.*got 'bilinear'"):
        m.create_model("unet2d", 1, 2, upsample="bilinear")
    with pytest.raises(ConfigError, match=r"output_stride.*8 or 16"):
        m.create_model("deeplabv3plus3d", 1, 2, output_stride=32)
    with pytest.raises(ConfigError, match="aspp_rates must be distinct"):
        m.create_model("deeplabv3plus3d", 1, 2, aspp_rates=[1, 2, 2])
    with pytest.raises(ConfigError, match="at least 4 stages for output_stride 16"):
        m.create_model("deeplabv3plus2d", 1, 2, channels=[8, 16, 32], output_stride=16)
    with pytest.raises(ConfigError, match=r"unknown key 'context'.*valid hyper-parameters"):
        m.create_model("unet2d", 1, 2, context=1)
    with pytest.raises(ConfigError, match="axis"):
        m.create_model("unet2d_slices", 1, 2, axis=3)


def test_divisor_rules() -> None:
    assert m.size_divisor("unet3d", channels=[8, 16, 32, 64, 128]) == 16
    assert m.size_divisors("unet2d", channels=[8, 16]) == (2, 2)
    assert m.size_divisor("deeplabv3plus3d") == 8
    assert m.size_divisor("deeplabv3plus2d", output_stride=16) == 16
    assert m.size_divisors("deeplabv3plus2d_slices", axis=1) == (8, 1, 8)
    assert m.size_divisors("unet2d_slices", channels=[8, 16, 32]) == (4, 4, 1)
    assert m.size_divisor("unet2d_slices", channels=[8, 16, 32]) == 4
    assert m.size_divisor("passthrough") == 1


def test_check_input_size_messages() -> None:
    check_input_size((16, 32, 8), 8)
    check_input_size((16, 32, 5), (8, 8, 1))
    with pytest.raises(ConfigError, match=r"divisible by 8 at every axis, got \(16, 30, 8\)"):
        check_input_size((16, 30, 8), 8)
    with pytest.raises(ConfigError, match=r"divisible by \(8, 8, 1\) \(per axis\), got \(16, 30, 5\)"):
        check_input_size((16, 30, 5), (8, 8, 1))
    with pytest.raises(ConfigError, match=r"must have 3 spatial axes, got size \(16, 16\)"):
        check_input_size((16, 16), (8, 8, 1))


def test_deeplab_patch_check_refuses_rates_beyond_the_feature_map() -> None:
    m.check_patch("deeplabv3plus3d", (96, 96, 96), aspp_rates=[1, 2, 4, 6])  # map 12³
    m.check_patch("deeplabv3plus3d", (128, 128, 64), aspp_rates=[1, 2, 4, 6])  # map 16×16×8
    with pytest.raises(
        ConfigError,
        match=r"must be < 12 .*feature map \(12, 12, 12\) .*at output_stride 8.*refuse \[12, 18\]",
    ):
        m.check_patch("deeplabv3plus3d", (96, 96, 96), aspp_rates=[1, 6, 12, 18])
    with pytest.raises(ConfigError, match=r"must be < 6 .*feature map \(12, 12, 6\).*refuse \[6\]"):
        m.check_patch("deeplabv3plus3d", (96, 96, 48))
    with pytest.raises(
        ConfigError, match=r"at least 2 per side, got the feature map \(2, 2, 1\) of patch \(32, 32, 16\)"
    ):
        m.check_patch("deeplabv3plus3d", (32, 32, 16), output_stride=16, aspp_rates=[1])
    # slice-wise: only the in-plane axes count (the slice axis is 4 long here)
    m.check_patch("deeplabv3plus2d_slices", (96, 96, 4), aspp_rates=[1, 4, 8])
    with pytest.raises(ConfigError, match=r"feature map \(12, 12\) .*patch \(96, 96\)"):
        m.check_patch("deeplabv3plus2d_slices", (96, 4, 96), axis=1, aspp_rates=[1, 12])
    m.check_patch("unet3d", (96, 96, 64))  # models without a patch check: divisibility only


@pytest.mark.parametrize(("axis", "context"), list(itertools.product((0, 1, 2), (0, 1, 2))))
def test_slicewise_matches_a_loop_over_slices(axis: int, context: int) -> None:
    torch.manual_seed(0)
    inner = m.create_model("unet2d", 2 * (2 * context + 1), CLASSES, channels=[4, 8]).eval()
    net = SliceWise(inner, axis, context, divisor=2).eval()
    x = torch.randn(2, 2, 6, 4, 8)
    with torch.inference_mode():
        out = net(x)
        expected = []
        n = x.shape[2 + axis]
        for i in range(n):
            idx = [min(max(j, 0), n - 1) for j in range(i - context, i + context + 1)]
            slab = x.index_select(2 + axis, torch.tensor(idx)).movedim(2 + axis, 2)  # (B, C, W, P, Q)
            expected.append(inner(slab.reshape(2, -1, *slab.shape[3:])))
        expected = torch.stack(expected, dim=2).movedim(2, 2 + axis)
    assert out.shape == (2, CLASSES, 6, 4, 8)
    torch.testing.assert_close(out, expected)


def test_slicewise_exposes_its_2d_network_for_slice_tiling() -> None:
    net = m.create_model("deeplabv3plus2d_slices", 2, CLASSES, **{**DEEPLAB, "axis": 1, "context": 2})
    assert isinstance(net, SliceWise)
    assert (net.axis, net.context, net.size_divisors) == (1, 2, (8, 1, 8))
    inner = net.net
    assert (inner.spatial_dims, inner.size_divisors, inner.size_divisor) == (2, (8, 8), 8)
    assert inner.preferred_memory_format == m.model_entry("deeplabv3plus2d").memory_format
    assert next(inner.parameters()).shape[1] == 2 * 5  # channels × (2 * context + 1) slices


def test_slicewise_deep_supervision_heads_keep_the_slice_axis() -> None:
    net = m.create_model("unet2d_slices", 1, CLASSES, channels=[4, 8, 16, 32], deep_supervision=True, axis=0)
    outs = net.train()(torch.randn(1, 1, 5, 16, 24))
    assert [o.shape[2:] for o in outs] == [(5, 16, 24), (5, 8, 12), (5, 4, 6)]
    assert net.eval()(torch.randn(1, 1, 5, 16, 24)).shape == (1, CLASSES, 5, 16, 24)


def test_unet_upsampling_choice() -> None:
    def kinds(**params: Any) -> set[str]:
        return {type(mod).__name__ for mod in m.create_model("unet3d", 1, 2, **params).ups.modules()}

    assert "ConvTranspose3d" in kinds(channels=[4, 8, 16])
    resize = kinds(channels=[4, 8, 16], upsample="resize", interp="nearest")
    assert "ConvTranspose3d" not in resize
    assert {"Upsample", "Conv3d"} <= resize


def test_deep_supervision_loss_and_weights() -> None:
    assert m.deep_supervision_weights(1) == (1.0,)
    assert m.deep_supervision_weights(2) == (1.0, 0.0)
    assert m.deep_supervision_weights(4) == pytest.approx((4 / 7, 2 / 7, 1 / 7, 0.0))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    target = torch.randint(0, 3, (2, 1, 8, 8, 4))
    full, half = torch.randn(2, 3, 8, 8, 4), torch.randn(2, 3, 4, 4, 2)
    torch.testing.assert_close(m.deep_supervision_loss(loss_fn, full, target), loss_fn(full, target))
    expected = 0.5 * loss_fn(full, target) + 0.5 * loss_fn(half, downsample_labels(target, (4, 4, 2)))
    torch.testing.assert_close(m.deep_supervision_loss(loss_fn, (full, half), target, [0.5, 0.5]), expected)
    with pytest.raises(ConfigError, match=r"one entry per output \(2\), got 3"):
        m.deep_supervision_loss(loss_fn, (full, half), target, [0.5, 0.25, 0.25])
    labels = torch.arange(16).reshape(1, 1, 4, 4)
    assert downsample_labels(labels, (2, 2)).tolist() == [[[[0, 2], [8, 10]]]]


@pytest.mark.parametrize("name", ["unet3d", "deeplabv3plus2d_slices"])
def test_prepare_for_inference_keeps_outputs(name: str) -> None:
    net = _build(name, TINY[name]).eval()
    x = torch.randn(1, 2, *_sizes(m.size_divisors(name, **TINY[name]))[0])
    with torch.inference_mode():
        expected = net(x)
    net.preferred_memory_format = "channels_last"
    m.prepare_for_inference(net)
    assert not net.training
    conv = next(p for p in net.parameters() if p.dim() >= 4)
    fmt = torch.channels_last if conv.dim() == 4 else torch.channels_last_3d
    assert conv.is_contiguous(memory_format=fmt)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "pipeline", ["unet3d", "unet3d_resizeconv", "unet2d", "deeplab3d", "deeplab2d", "demo"]
)
def test_shipped_pipelines_load_validate_and_build(pipeline: str) -> None:
    cfg = load_pipeline(PIPELINES / f"{pipeline}.yaml")
    params = cfg.model.params
    m.check_patch(cfg.model.name, cfg.train.patch_size, **params)
    m.check_patch(cfg.model.name, cfg.window, **params)
    # the training loop still checks against the single int divisor
    check_input_size(cfg.train.patch_size, m.size_divisor(cfg.model.name, **params))
    net = m.create_model(cfg.model.name, 1, 3, **params)
    assert net.spatial_dims == 3
    assert sum(p.numel() for p in net.parameters()) > 0
