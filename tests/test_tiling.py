"""Tiling and stitching: the plan alone, the merger alone, the engine end to end, the way back to source."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.config.pipeline import InferenceConfig
from medseg.config.spec import DatasetSpec
from medseg.errors import GeometryError, InputError
from medseg.preprocess import build_preprocess, invert_to_source
from medseg.tiling import (
    LabelSink,
    Merger,
    PatchPlan,
    ProbabilitySink,
    ProbabilityWriter,
    TilingSettings,
    argmax_channels,
    axis_starts,
    choose_memory_mode,
    importance_map,
    infer,
    plan_for,
    plan_patches,
    sliding_window_probabilities,
)
from medseg.tiling.to_source import SourceGridLabels, SourceMapping, resample_to_source, source_mapping
from medseg.tracking import flatten_params


class Scale(nn.Module):
    """``k * x``: every window answers its own input, scaled (equivariant to everything)."""

    def __init__(self, k: float = 2.0, spatial_dims: int = 3, divisor: int = 1) -> None:
        super().__init__()
        self.k, self.spatial_dims, self.size_divisor = k, spatial_dims, divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.size_divisor for s in x.shape[2:]):
            msg = f"window {tuple(x.shape[2:])} must be divisible by {self.size_divisor}"
            raise AssertionError(msg)
        return self.k * x


def _conv(dims: int, cin: int = 2, classes: int = 4, seed: int = 0, symmetric: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    layers = [conv(cin, 6, 3, padding=1), nn.Tanh(), conv(6, classes, 3, padding=1)]
    if symmetric:  # kernels symmetric under every flip: the network is flip-equivariant
        for layer in layers[::2]:
            w = layer.weight.data
            for axes in itertools.chain.from_iterable(
                itertools.combinations(range(2, w.ndim), r) for r in range(1, w.ndim - 1)
            ):
                w = w + layer.weight.data.flip(axes)
            layer.weight.data = w
    return nn.Sequential(*layers).eval()


SHAPES = [
    *[(7, 7), (33, 47), (16, 32)],  # 2D: tiny, odd, even
    *[(7, 7, 7), (33, 47, 29), (32, 32, 16), (3, 5, 2), (40, 37, 5), (20, 9, 61)],  # 3D, incl. anisotropic
]


# ---------------------------------------------------------------- the plan alone


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_plan_covers_every_voxel_with_the_requested_overlap(shape: tuple[int, ...], overlap: float) -> None:
    plan = plan_patches(shape, 16, overlap=overlap, divisor=8)
    assert plan.shape == shape
    assert plan.patch_size == (16,) * len(shape)
    axes = zip(shape, plan.patch_size, plan.padding, plan.starts, plan.padded_shape)
    for n, p, (before, after), starts, size in axes:
        assert (before + after == p - n) if n < p else (before == after == 0)
        assert before <= after <= before + 1  # centred, never shifted to one side
        assert starts[0] == 0
        assert starts[-1] + p == size
        assert all(b - a <= p * (1 - overlap) + 1e-9 for a, b in itertools.pairwise(starts))
        covered = np.zeros(size, int)
        for s in starts:
            covered[s : s + p] += 1
        assert covered.min() >= 1
    crop = plan.crop()
    assert tuple(s.stop - s.start for s in crop) == shape
    assert len(list(plan.locations())) == plan.num_windows == int(np.prod(plan.grid))


def test_plan_rounds_the_patch_up_to_what_the_network_accepts() -> None:
    assert plan_patches((64, 64, 64), (20, 30, 9), divisor=8).patch_size == (24, 32, 16)
    assert plan_patches((64, 64, 64), (20, 30, 9), divisor=(8, 8, 1)).patch_size == (24, 32, 9)
    assert plan_for(Scale(divisor=16), (40, 40, 40), TilingSettings((20, 20, 20))).patch_size == (32, 32, 32)
    # a 2D network on a volume: one slice per window along the slice axis, divisor in-plane only
    net2d = Scale(spatial_dims=2, divisor=8)
    plan = plan_for(net2d, (30, 20, 5), TilingSettings((12, 12, 12), slice_axis=1, context=2))
    assert plan.patch_size == (16, 1, 16)
    assert plan.starts[1] == tuple(range(20))
    assert (plan.slice_axis, plan.context) == (1, 2)


def test_plan_monai_placement_is_monais_grid() -> None:
    for size, patch, overlap in itertools.product((96, 97, 150, 300, 512), (16, 96), (0.0, 0.25, 0.5, 0.7)):
        if size < patch:
            continue
        step = max(int(patch * (1 - overlap)), 1) if size != patch else patch
        monai = sorted({s[0].start for s in dense_patch_slices((size,), (patch,), (step,))})
        assert list(axis_starts(size, patch, overlap, "monai")) == monai
    assert axis_starts(512, 96, 0.25) == (0, 69, 139, 208, 277, 347, 416)


def test_plan_is_a_small_frozen_value_that_prints_and_logs() -> None:
    plan = plan_patches((33, 47, 29), 16, divisor=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.overlap = 0.5  # type: ignore[misc]
    assert str(plan).startswith("PatchPlan(33x47x29: 36 windows 3x4x3 of 16x16x16")
    flat = flatten_params({"tiling": plan.as_dict()})
    assert flat["tiling.grid"] == "[3, 4, 3]"
    assert flat["tiling.padding"] == "[[0, 0], [0, 0], [0, 0]]"
    assert PatchPlan(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}) == plan
    first = next(plan.locations(outer_axis=2))
    assert first.slices == (slice(0, 16),) * 3
    assert [loc.index[2] for loc in itertools.islice(plan.locations(outer_axis=2), 13)][-2:] == [0, 1]


def test_plan_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"overlap must be >= 0 and < 1, got 1.0"):
        plan_patches((8, 8), 4, overlap=1.0)
    with pytest.raises(ValueError, match="patch_size must have 3 entries"):
        plan_patches((8, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="shape must be 2 or 3"):
        plan_patches((8, 8, 8, 8), 4)
    with pytest.raises(ValueError, match="slice_axis"):
        plan_patches((8, 8, 8), 4, slice_axis=3)
    with pytest.raises(ValueError, match="context"):
        plan_patches((8, 8, 8), 4, context=1)
    with pytest.raises(ValueError, match="must cover axis 0"):
        PatchPlan((10,), (4,), ((0, 0),), ((0, 4),), 0.0, (1,))
    with pytest.raises(InputError, match="spatial_dims=3"):
        plan_for(Scale(spatial_dims=3), (8, 8), TilingSettings((4, 4)))


# ---------------------------------------------------------------- the merger alone


def _feed(plan: PatchPlan, merger: Merger, values: torch.Tensor, batch: int = 3) -> None:
    padded = torch.nn.functional.pad(values, [v for b, a in reversed(plan.padding) for v in (b, a)])
    locs = list(plan.locations(merger.outer_axis))
    for i in range(0, len(locs), batch):
        chunk = locs[i : i + batch]
        merger.add(chunk, torch.stack([padded[(slice(None), *loc.slices)] for loc in chunk]))


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_merger_reconstructs_what_it_is_fed(bounded: bool, blend: str, channels_last: bool) -> None:
    plan = plan_patches((21, 13, 30), (8, 6, 10), overlap=0.4)
    values = torch.randn(3, 21, 13, 30)
    if channels_last:
        values = values.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    sinks = [ProbabilitySink("logits", plan.shape), LabelSink(plan.shape)]
    merger = Merger(plan, importance_map(plan.patch_size, blend), sinks, bounded=bounded)
    _feed(plan, merger, values)
    merger.finish()
    torch.testing.assert_close(sinks[0].result(), values, rtol=1e-5, atol=1e-5)
    assert torch.equal(sinks[1].result().long(), values.argmax(0))
    if bounded:  # only the cells being written are kept, not the volume
        assert merger.peak_buffer_bytes < 4 * 3 * np.prod(plan.shape)


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize(("blend", "sigma"), [("gaussian", 0.125), ("gaussian", 0.5), ("constant", 0.125)])
def test_foreground_entropy_from_a_sub_grid_of_slabs_equals_the_whole_volumes(
    bounded: bool, blend: str, sigma: float
) -> None:
    from medseg.pipeline import foreground_entropy
    from medseg.tiling.sinks import ForegroundEntropy

    plan = plan_patches((21, 13, 30), (8, 6, 10), overlap=0.4)
    weights = importance_map(plan.patch_size, blend, sigma)  # not separable, separable, constant
    values = 3 * torch.randn(3, 21, 13, 30)
    probs = ProbabilitySink("probabilities")
    merger = Merger(plan, weights, [probs])
    _feed(plan, merger, values)
    merger.finish()
    labels = probs.result().argmax(0).numpy()
    # every voxel, and every 3rd along each axis (not a multiple of a cell); beside a sink that
    # needs no weight sums (those at the sub-grid then come from the plan and the map) and beside
    # one that makes the merger keep them
    for max_voxels, other in itertools.product((10**6, 500), ("labels", "logits")):
        sink = ForegroundEntropy(plan.shape, max_voxels=max_voxels)
        beside = LabelSink(plan.shape) if other == "labels" else ProbabilitySink("logits", plan.shape)
        merger = Merger(plan, weights, [sink, beside], bounded=bounded)
        _feed(plan, merger, values)
        merger.finish()
        expected = foreground_entropy(probs.result(), labels, max_voxels=max_voxels)
        assert sink.step == (1 if max_voxels > 8190 else 3)
        assert sink.result() == pytest.approx(expected, rel=1e-5)
    assert ForegroundEntropy((4, 4)).result() is None


def test_bounded_memory_is_a_small_fraction_of_the_volume() -> None:
    image = torch.randn(3, 192, 160, 60)
    settings = TilingSettings((32, 32, 32), batch_size=8)
    full = infer(Scale(), image, dataclasses.replace(settings, memory="full"), output="labels")
    bounded = infer(Scale(), image, dataclasses.replace(settings, memory="bounded"), output="labels")
    assert torch.equal(full.labels, bounded.labels)
    assert bounded.buffer_mb < 0.2 * full.buffer_mb
    # a sink that needs whole planes gets slabs, one window row thick
    mapping = SourceMapping((192, 160, 60), (192, 160, 60), (0, 1, 2), (1.0,) * 3, (0.0,) * 3, (False,) * 3)
    sink = SourceGridLabels(mapping)
    slabs = infer(Scale(), image, dataclasses.replace(settings, memory="bounded"), output=None, sinks=[sink])
    assert torch.equal(sink.result(), full.labels)
    assert bounded.buffer_mb < slabs.buffer_mb < 0.5 * full.buffer_mb


def test_merger_refuses_windows_out_of_order_or_missing() -> None:
    plan = plan_patches((12, 12), (8, 8), overlap=0.5)
    merger = Merger(plan, importance_map((8, 8)), [LabelSink(plan.shape)])
    locs = list(plan.locations(merger.outer_axis))
    with pytest.raises(ValueError, match="plan order"):
        merger.add([locs[1]], torch.zeros(1, 2, 8, 8))
    merger = Merger(plan, importance_map((8, 8)), [LabelSink(plan.shape)])
    merger.add(locs[:2], torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="must keep the window size"):
        merger.add([locs[2]], torch.zeros(1, 2, 8, 7))
    with pytest.raises(ValueError, match="all 4 windows of the plan, got 2"):
        merger.finish()


def test_weights_are_monais_and_separable_when_the_floor_does_not_bite() -> None:
    from monai.data.utils import compute_importance_map

    for size, scale in [((96, 96, 96), 0.125), ((16, 8, 1), 0.25), ((9, 12), 0.5)]:
        ours = importance_map(size, "gaussian", scale)
        assert torch.equal(ours.tensor, compute_importance_map(size, "gaussian", scale))
        if ours.separable:
            outer = functools.reduce(lambda a, f: a.unsqueeze(-1) * f, ours.factors)
            assert torch.equal(outer, ours.tensor)
    assert not importance_map((96, 96, 96)).separable
    assert importance_map((9, 12), sigma_scale=0.5).separable
    with pytest.raises(ValueError, match="blend must be one of"):
        importance_map((4, 4), "cosine")  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [1 << 20, 24, 50])  # one chunk; one plane each; two planes each
def test_argmax_channels_matches_torch_in_both_layouts(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("medseg.tiling.slab._CHUNK", chunk)
    x = torch.randn(7, 5, 6, 4)
    x[3, 0, 0, 0] = x[1, 0, 0, 0]  # a tie goes to the first class, as torch does
    x[:, 1, 1, 1] = 0.0
    x[:, 4, 5, 3] = 1.0  # the last voxel of the last (partial) chunk
    for t in (x, x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)):
        assert torch.equal(argmax_channels(t), x.argmax(0))
        assert argmax_channels(t, torch.uint8).dtype == torch.uint8


@pytest.mark.parametrize("chunk", [1 << 20, 24])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("classes", [1, 3, 300])
def test_argmax_channels_refuses_scores_that_are_not_finite(
    chunk: int, bad: float, classes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN once came out as label K, outside the label table; now no label comes out at all."""
    monkeypatch.setattr("medseg.tiling.slab._CHUNK", chunk)
    x = torch.randn(classes, 5, 6, 4)
    x[-1, 3, 2, 1] = bad
    for t in (x, x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)):
        with pytest.raises(InputError, match="network output must be finite, got NaN or inf at 1 voxel"):
            argmax_channels(t)


class _NanAfter(nn.Module):
    """Scores with one NaN voxel, as a diverged network gives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([x, -x], dim=1)
        out[(slice(None), 1, *(0,) * (x.ndim - 2))] = float("nan")
        return out


@pytest.mark.parametrize("memory", ["full", "bounded"])
def test_a_network_giving_nan_fails_with_a_clear_error(memory: str) -> None:
    image = torch.randn(1, 20, 18, 9)
    settings = TilingSettings((8, 8, 8), overlap=0.25, batch_size=2, memory=memory)
    with pytest.raises(InputError, match="network output must be finite, got NaN"):
        infer(_NanAfter(), image, settings, output="labels")


# ---------------------------------------------------------------- the engine end to end


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("memory", ["full", "bounded"])
def test_scaled_identity_comes_back_at_exactly_the_input_size(shape: tuple[int, ...], memory: str) -> None:
    """The seed's problem (odd or tiny volumes cropped or shifted) cannot happen."""
    image = torch.randn(2, *shape)
    dims = len(shape)
    for blend in ("gaussian", "constant"):
        settings = TilingSettings((16,) * dims, blend=blend, batch_size=3, memory=memory)
        labels = infer(Scale(2.0, dims, divisor=8), image, settings, output="labels")
        assert labels.labels is not None
        assert tuple(labels.labels.shape) == shape
        assert torch.equal(labels.labels.long(), image.argmax(0))
        if memory == "full":
            result = infer(Scale(2.0, dims, divisor=8), image, settings, output="logits")
            assert result.probabilities is not None
            assert tuple(result.probabilities.shape) == (2, *shape)
            torch.testing.assert_close(result.probabilities, 2 * image, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "patch", "sigma"),
    [((40, 33, 29), (16, 16, 16), 0.125), ((12, 50, 7), (16, 16, 8), 0.25), ((45, 38), (16, 24), 0.125)],
)
def test_gaussian_blending_matches_monai_sliding_window_inference(
    shape: tuple[int, ...], patch: tuple[int, ...], sigma: float
) -> None:
    net = _conv(len(shape), classes=5)
    image = torch.randn(2, *shape)
    settings = TilingSettings(patch, blend="gaussian", sigma_scale=sigma, placement="monai", batch_size=3)
    ours = infer(net, image, settings, output="logits")
    with torch.inference_mode():
        ref = sliding_window_inference(
            image[None], patch, 4, net, overlap=0.25, mode="gaussian", sigma_scale=sigma
        )
    assert ours.probabilities is not None
    assert float((ours.probabilities - ref[0]).abs().max()) <= 1e-5
    probs = infer(net, image, settings).probabilities
    assert probs is not None
    assert float((probs - ref[0].softmax(0)).abs().max()) <= 1e-5


@pytest.mark.parametrize("shape", [(37, 30, 23), (50, 41), (9, 70, 20)])
def test_bounded_mode_gives_the_full_modes_labels(shape: tuple[int, ...]) -> None:
    net = _conv(len(shape), classes=6, seed=3)
    image = torch.randn(2, *shape)
    settings = TilingSettings((16,) * len(shape), overlap=0.5, batch_size=4)
    full = infer(net, image, dataclasses.replace(settings, memory="full"), output="labels")
    bounded = infer(net, image, dataclasses.replace(settings, memory="bounded"), output="labels")
    assert (full.mode, bounded.mode) == ("full", "bounded")
    assert bounded.buffer_mb < full.buffer_mb
    assert torch.equal(full.labels, bounded.labels)
    probs = infer(net, image, settings, output="probabilities").probabilities
    assert torch.equal(probs.argmax(0).to(full.labels.dtype), full.labels)


def test_auto_memory_mode_follows_the_volume_size() -> None:
    plan = plan_patches((512, 512, 300), 96, divisor=16)
    assert choose_memory_mode(TilingSettings((96,) * 3), plan, 14) == "bounded"
    assert choose_memory_mode(TilingSettings((96,) * 3), plan_patches((128, 128, 64), 96), 14) == "full"
    assert choose_memory_mode(TilingSettings((96,) * 3, memory="full"), plan, 14) == "full"
    small = TilingSettings((8, 8, 8), memory_limit_mb=0.01)
    assert infer(_conv(3), torch.randn(2, 20, 20, 20), small, output="labels").mode == "bounded"
    with pytest.raises(ValueError, match="output must be 'labels' or None in bounded memory mode"):
        infer(_conv(3), torch.randn(2, 8, 8, 8), TilingSettings((8, 8, 8), memory="bounded"))


@pytest.mark.parametrize("dims", [2, 3])
def test_tta_with_an_equivariant_model_changes_nothing(dims: int) -> None:
    net = _conv(dims, symmetric=True)
    image = torch.randn(2, *((23, 18, 13)[:dims]))
    plain = TilingSettings((8,) * dims, overlap=0.5)
    base = infer(net, image, plain, output="logits").probabilities
    flipped = dataclasses.replace(plain, tta_axes=tuple(range(dims)))
    tta = infer(net, image, flipped, output="logits").probabilities
    torch.testing.assert_close(tta, base, rtol=1e-5, atol=1e-5)


def test_tta_averages_the_flipped_logits_before_the_argmax() -> None:
    net = _conv(3)
    image = torch.randn(2, 8, 8, 8)  # one window: the blend is the network's answer itself
    settings = TilingSettings((8, 8, 8), tta_axes=(0, 2))
    got = infer(net, image, settings, output="logits").probabilities
    with torch.inference_mode():
        x = image[None]
        flips = [(), (2,), (4,), (2, 4)]
        expected = sum(net(x.flip(f)).flip(f) if f else net(x) for f in flips)[0] / 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tta_axes must be axes of the 2D volume"):
        infer(_conv(2), torch.randn(2, 8, 8), TilingSettings((8, 8), tta_axes=(2,)))


@pytest.mark.parametrize("context", [0, 1])
def test_2d_network_on_a_volume_runs_slice_by_slice_with_context(context: int) -> None:
    net = _conv(2, cin=2 * (2 * context + 1), classes=3)
    net.spatial_dims = 2
    image = torch.randn(2, 12, 5, 16)  # slices along axis 1
    settings = TilingSettings((16, 16, 16), slice_axis=1, context=context, overlap=0.0)
    got = infer(net, image, settings, output="logits").probabilities
    with torch.inference_mode():
        expected = []
        for i in range(5):
            idx = [min(max(j, 0), 4) for j in range(i - context, i + context + 1)]
            stack = image[:, :, idx, :].permute(0, 2, 1, 3).reshape(1, -1, 12, 16)  # (1, C * W, X, Z)
            padded = torch.nn.functional.pad(stack, (0, 0, 2, 2))  # X 12 -> 16, centred
            expected.append(net(padded)[0, :, 2:14, :])
        expected = torch.stack(expected, dim=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_channels_last_and_batching_give_the_same_answer() -> None:
    net = _conv(3, classes=5)
    image = torch.randn(2, 30, 20, 25)
    ref = infer(net, image, TilingSettings((16, 16, 16), batch_size=1), output="logits").probabilities
    for fmt, batch in [("channels_last", 4), ("contiguous", 7)]:
        settings = TilingSettings((16,) * 3, batch_size=batch, memory_format=fmt)
        got = infer(net, image, settings, output="logits")
        torch.testing.assert_close(got.probabilities, ref, rtol=1e-4, atol=1e-5)
    net.preferred_memory_format = "channels_last"
    labels = infer(net, image, TilingSettings((16,) * 3, memory="bounded"), output="labels").labels
    assert torch.equal(labels.long(), ref.argmax(0))


def test_stitch_threads_change_nothing_but_speed() -> None:
    net = _conv(3, classes=4)
    image = torch.randn(2, 30, 20, 25)
    before = torch.get_num_threads()
    results = [
        infer(net, image, TilingSettings((16,) * 3, memory="bounded", stitch_threads=n), output="labels")
        for n in (0, 1, 2)
    ]
    assert torch.get_num_threads() == before
    assert all(torch.equal(r.labels, results[0].labels) for r in results)
    with pytest.raises(ValueError, match="stitch_threads must be greater than or equal to 0, got -1"):
        TilingSettings((8, 8, 8), stitch_threads=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_network_on_the_gpu_stitching_on_the_cpu() -> None:
    net = _conv(3)
    image = torch.randn(2, 20, 20, 20)
    ref = infer(net, image, TilingSettings((16, 16, 16)), output="probabilities").probabilities
    got = infer(net.cuda(), image, TilingSettings((16, 16, 16)), device="cuda", stitch_device="cpu")
    assert got.probabilities.device.type == "cpu"
    torch.testing.assert_close(got.probabilities, ref, rtol=1e-4, atol=1e-4)


def test_probabilities_go_to_disk_slab_by_slab(tmp_path: Path) -> None:
    net = _conv(3, classes=4)
    image = torch.randn(2, 19, 26, 17)
    settings = TilingSettings((8, 8, 8), memory="bounded")
    writer = ProbabilityWriter(tmp_path / "p.npy", image.shape[1:], dtype="float32")
    result = infer(net, image, settings, output="labels", sinks=[writer])
    ref = infer(net, image, TilingSettings((8, 8, 8)), output="probabilities").probabilities
    on_disk = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(on_disk, ref.numpy(), atol=1e-6)
    assert torch.equal(result.labels.long(), ref.argmax(0))
    assert set(result.timings) == {"extract", "forward", "stitch", "finalize", "total"}


def test_settings_check_their_fields_and_read_a_config() -> None:
    with pytest.raises(ValueError, match=r"overlap must be less than 1, got 1.5"):
        TilingSettings((8, 8, 8), overlap=1.5)
    with pytest.raises(ValueError, match="memory must be 'auto', 'full' or 'bounded', got 'tiny'"):
        TilingSettings((8, 8, 8), memory="tiny")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tta_axes must be distinct spatial axes"):
        TilingSettings((8, 8, 8), tta_axes=(0, 0))
    cfg = InferenceConfig(overlap=0.5, batch_size=2, blend="constant")
    s = TilingSettings.from_config(cfg, (32, 32, 16), tta_axes=(0,))
    assert (s.patch_size, s.overlap, s.batch_size, s.blend, s.tta_axes, s.memory) == (
        (32, 32, 16),
        0.5,
        2,
        "constant",
        (0,),
        "auto",
    )
    mirrored = InferenceConfig.model_validate({"tta_axes": [0, 2]})  # as a pipeline YAML gives it
    assert TilingSettings.from_config(mirrored, (32, 32, 16)).tta_axes == (0, 2)
    for bad, why in (([0, 0], "distinct spatial axes"), ([3], "0, 1 or 2"), ([0, 1, 2, 0], "at most 3")):
        with pytest.raises(pydantic.ValidationError, match=why):
            InferenceConfig.model_validate({"tta_axes": bad})


def test_sliding_window_probabilities_goes_through_the_engine() -> None:
    net = _conv(3, classes=3)
    net.size_divisor = 8
    probs = sliding_window_probabilities(net, torch.randn(2, 13, 9, 11), (12, 12, 12), overlap=0.5)
    assert tuple(probs.shape) == (3, 13, 9, 11)
    torch.testing.assert_close(probs.sum(0), torch.ones(13, 9, 11))


# ---------------------------------------------------------------- back to the source grid


def _affine(perm: tuple[int, int, int], flips: tuple[float, float, float], spacing, angle: float = 17.0):
    a = np.radians(angle)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = (rot @ np.diag(flips))[:, list(perm)] @ np.diag(spacing)
    aff[:3, 3] = [12.0, -40.0, 7.5]
    return aff


GEOMETRIES = [  # source affine, target spacing
    (_affine((0, 1, 2), (1, 1, 1), (0.9, 1.1, 2.5)), [0.5, 0.5, 1.0]),
    (_affine((0, 1, 2), (1, -1, 1), (0.7, 0.7, 5.0)), [1.0, 1.0, 1.0]),  # anisotropic: slice axis nearest
    (_affine((2, 0, 1), (-1, 1, -1), (0.8, 3.0, 0.8)), [1.0, 1.0, 0.7]),  # permuted, flipped, anisotropic
    (_affine((1, 0, 2), (1, 1, 1), (0.9, 1.1, 2.5)), None),  # orientation only
]


def _preprocessed(affine: np.ndarray, target, shape=(21, 17, 9), seed: int = 0):
    spec = DatasetSpec.model_validate(
        {
            "name": "t",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": {"bg": 0, "a": 1, "b": 2, "c": 3},
            "cases": [],
            "target_spacing": target,
        }
    )
    pre = build_preprocess(spec, keys=("image",), label_key=None)
    torch.manual_seed(seed)
    source = MetaTensor(torch.randn(1, *shape), affine=torch.as_tensor(affine))
    sample = pre({"image": source})
    return source, sample, pre


@pytest.mark.parametrize(("affine", "target"), GEOMETRIES)
def test_resampling_to_source_matches_invert_to_source(affine: np.ndarray, target) -> None:
    source, sample, pre = _preprocessed(affine, target)
    grid = sample["image"]
    probs = torch.rand(4, *grid.shape[1:]).softmax(0)
    mapping = source_mapping(grid, source, pre)
    assert mapping.exact == (target is None)
    ref = invert_to_source(probs, sample, pre, mode="bilinear").as_tensor()
    ours = resample_to_source(probs, mapping)
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) < 1e-5


@pytest.mark.parametrize(("affine", "target"), GEOMETRIES)
def test_source_labels_slab_by_slab_equal_the_whole_volume_path(affine: np.ndarray, target) -> None:
    source, sample, pre = _preprocessed(affine, target, shape=(31, 27, 11))
    grid = sample["image"]
    net = _conv(3, cin=1, classes=4)
    mapping = source_mapping(grid, source, pre)
    full = infer(net, grid, TilingSettings((8, 8, 8)), output="probabilities").probabilities
    expected = resample_to_source(full, mapping).argmax(0)
    sink = SourceGridLabels(mapping)
    result = infer(net, grid, TilingSettings((8, 8, 8), memory="bounded"), output=None, sinks=[sink])
    assert result.mode == "bounded"
    assert torch.equal(sink.result().long(), expected)


def test_source_mapping_refuses_grids_that_are_not_axis_aligned() -> None:
    rot = _affine((0, 1, 2), (1, 1, 1), (1, 1, 1), angle=30.0)
    with pytest.raises(GeometryError, match="flips, permutations and scaling only"):
        SourceMapping.from_affines(rot, (4, 4, 4), np.eye(4), (4, 4, 4))


@pytest.mark.parametrize("target", [[0.5, 0.5, 1.0], [0.7, 0.7, 1.3]])
def test_predictor_bounded_mode_lands_on_the_same_labels(tmp_path: Path, target: list[float]) -> None:
    from medseg.bundle import build_network, save_bundle
    from medseg.config.pipeline import PipelineConfig
    from medseg.pipeline import Predictor
    from medseg.synth import write_nifti

    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "x", "modality": "OTHER", "intensity": {"scheme": "none"}}],
            "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
            "cases": [],
            "target_spacing": target,
        }
    )
    cfg = PipelineConfig.model_validate(
        {"name": "identity", "model": {"name": "passthrough"}, "train": {"patch_size": [16, 16, 8]}}
    )
    bundle = save_bundle(tmp_path / "bundle", cfg, spec, build_network(cfg, spec))
    vol = np.zeros((20, 18, 8), dtype=np.int16)
    vol[3:12, 2:9, 1:5], vol[8:17, 10:16, 3:8], vol[1:6, 12:17, 0:3] = 1, 2, 3
    src = write_nifti(vol, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "scan.nii.gz")
    predictor = Predictor.from_path(bundle)
    full = predictor.predict_path(src)
    # the same model with `inference: {memory: bounded}` in its pipeline config
    cfg_bounded = cfg.model_copy(update={"inference": InferenceConfig(memory="bounded")})
    bundle_bounded = save_bundle(tmp_path / "bounded", cfg_bounded, spec, build_network(cfg_bounded, spec))
    bounded = Predictor.from_path(bundle_bounded).predict_path(src)
    assert [r.params["memory"] for r in bounded.provenance if r.name == "model"] == ["bounded"]
    assert [r.params["memory"] for r in full.provenance if r.name == "model"] != ["bounded"]
    assert bounded.labels.shape == vol.shape == full.labels.shape
    assert (bounded.labels == full.labels).mean() > 0.999
    assert (bounded.labels == vol).mean() >= (full.labels == vol).mean() - 0.001
