"""Tests of the refine stage: the permutohedral lattice, the dense CRF (against pydensecrf where it is
installed), bounded-memory planning, post-processing and its choice on validation data."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from medseg.config.base import dump_yaml, read_yaml, validate
from medseg.errors import ConfigError, InputError
from medseg.refine import (
    DenseCRFConfig,
    LabelPostprocess,
    PermutohedralLattice,
    PostprocessConfig,
    RefineConfig,
    choose_postprocessing,
    dense_crf,
    dense_crf_with_info,
    fill_holes,
    foreground_box,
    keep_largest_component,
    plan_blocks,
    postprocess,
    refine,
    remove_small_components,
)
from medseg.refine.blocks import cpu_threads, threads_for
from medseg.refine.gaussian import SeparableGaussian

# ----------------------------------------------------------------------------------------- helpers


def synthetic_case(
    shape: tuple[int, ...], spacing: tuple[float, ...], seed: int = 0, noise: float = 1.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy 3-label case: ``(probs (3, *shape), image (1, *shape), truth)``.

    An ellipsoid (label 1) holding a second one (label 2), sized in mm; the image separates the labels
    by 1 unit with noise 0.25; the unaries are the truth blurred by 2 mm plus strong voxel noise.
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    half = [n * s / 2 for n, s in zip(shape, spacing)]
    outer = sum((x / (0.7 * e)) ** 2 for x, e in zip(grids, half)) < 1
    inner = sum(((x - 0.25 * e) / (0.35 * e)) ** 2 for x, e in zip(grids, half)) < 1
    truth = np.zeros(shape, np.int64)
    truth[outer] = 1
    truth[outer & inner] = 2
    image = np.array([-1.0, 0.0, 1.2])[truth] + rng.normal(0.0, 0.25, shape)
    sigma = [2.0 / s for s in spacing]
    logits = np.stack([4.0 * ndi.gaussian_filter((truth == k).astype(float), sigma) for k in range(3)])
    logits += rng.normal(0.0, noise, logits.shape)
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    return probs.astype(np.float32), image[None].astype(np.float32), truth


def mean_dice(labels: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean(
            [
                2 * ((labels == k) & (truth == k)).sum() / ((labels == k).sum() + (truth == k).sum())
                for k in (1, 2)
            ]
        )
    )


def run_pydensecrf(
    probs: np.ndarray, image: np.ndarray, spacing: tuple[float, ...], cfg: DenseCRFConfig
) -> np.ndarray:
    """The reference: pydensecrf with the same kernels (features = position / (sigma / spacing))."""
    try:  # a missing package, or a build that fails to load
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian, unary_from_softmax
    except ImportError:
        pytest.skip("pydensecrf (PyPI: pydensecrf2) is a test-only dependency")

    shape = probs.shape[1:]
    crf = dcrf.DenseCRF(int(np.prod(shape)), probs.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=cfg.min_probability)))
    if cfg.spatial_weight > 0:
        feats = create_pairwise_gaussian([cfg.spatial_sigma_mm / s for s in spacing], shape)
        crf.addPairwiseEnergy(feats, compat=cfg.spatial_weight)
    if cfg.bilateral_weight > 0:
        schan = cfg.intensity_sigmas(image.shape[0])
        feats = create_pairwise_bilateral(
            [cfg.bilateral_sigma_mm / s for s in spacing],
            schan,
            np.moveaxis(image, 0, -1),
            chdim=image.ndim - 1,
        )
        crf.addPairwiseEnergy(np.ascontiguousarray(feats), compat=cfg.bilateral_weight)
    return np.asarray(crf.inference(cfg.iterations)).reshape(probs.shape)


def crf(probs: np.ndarray, image: np.ndarray, spacing: tuple[float, ...], cfg: DenseCRFConfig) -> np.ndarray:
    return dense_crf(torch.from_numpy(probs), torch.from_numpy(image), spacing, cfg).numpy()


WHOLE = {"roi_margin_mm": None}

# ------------------------------------------------------------------------------------------ config


def test_refine_config_round_trips_through_yaml(tmp_path) -> None:
    cfg = RefineConfig(
        crf=DenseCRFConfig(
            iterations=3, intensity_sigma=(0.4, 0.8), compatibility=((0, 1, 2), (1, 0, 1), (2, 1, 0))
        ),
        postprocess=PostprocessConfig(
            connectivity="face",
            labels={
                1: LabelPostprocess(keep_largest=True, fill_holes=True),
                2: LabelPostprocess(min_component_mm3=12.5),
            },
        ),
    )
    path = tmp_path / "refine.yaml"
    dump_yaml(cfg, path)
    assert validate(RefineConfig, read_yaml(path), str(path)) == cfg


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"crf": {"compatibility": [[0, 1], [1]]}}, "compatibility"),
        ({"crf": {"compatibility": "pots"}}, "compatibility"),
        ({"crf": {"halo_widths": 2.0}}, "halo_widths"),
        ({"crf": {"intensity_sigma": []}}, "intensity_sigma"),
        ({"crf": {"iterations": -1}}, "iterations"),
        ({"postprocess": {"labels": {"0": {"keep_largest": True}}}}, "labels"),
        ({"postprocess": {"labels": {"1": {"keep_larges": True}}}}, "keep_larges"),
    ],
)
def test_refine_config_rejects_bad_values(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        validate(RefineConfig, data, "pipeline.yaml")


# ----------------------------------------------------------------------------------------- lattice


def test_lattice_filter_approximates_a_gaussian() -> None:
    """Normalised lattice filtering is close to exact Gaussian filtering of scattered points."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(3, 600, generator=gen) * 6.0
    values = torch.rand(600, 2, generator=gen)
    lattice = PermutohedralLattice(feats)
    approx = lattice.filter(values) / lattice.filter(torch.ones(600, 1))
    dist2 = ((feats.T[:, None, :] - feats.T[None, :, :]) ** 2).sum(-1)
    k = torch.exp(-0.5 * dist2)
    exact = (k @ values) / k.sum(1, keepdim=True)
    assert float((approx - exact).abs().max()) < 0.08
    assert lattice.n_vertices < 600 * 4


def test_lattice_matches_pydensecrf_exactly() -> None:
    """One bilateral kernel, three iterations: our lattice reproduces pydensecrf's marginals."""
    probs, image, _ = synthetic_case((30, 26, 12), (1.0, 1.0, 2.0), seed=3)
    cfg = DenseCRFConfig(iterations=3, spatial_weight=0.0, bilateral_sigma_mm=5.0, **WHOLE)
    ref = run_pydensecrf(probs, image, (1.0, 1.0, 2.0), cfg)
    ours = crf(probs, image, (1.0, 1.0, 2.0), cfg)
    assert np.abs(ours - ref).mean() < 1e-4


def test_lattice_scale_is_a_symmetric_diagonal_scaling() -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.rand(2, 300, generator=gen) * 4.0
    values = torch.rand(300, 2, generator=gen)
    factors = torch.rand(300, generator=gen) + 0.5
    plain = PermutohedralLattice(feats).filter(values * factors[:, None]) * factors[:, None]
    scaled = PermutohedralLattice(feats).scale_(factors).filter(values)
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-5)
    # A transposed (c, N) input is read in place and gives the same result.
    lattice = PermutohedralLattice(feats)
    torch.testing.assert_close(lattice.filter(values.T.contiguous().T), lattice.filter(values.contiguous()))


def test_lattice_rejects_bad_features() -> None:
    with pytest.raises(ValueError, match="features must be"):
        PermutohedralLattice(torch.zeros(3))


def test_separable_gaussian_matches_its_per_axis_operators_and_the_gaussian() -> None:
    shape, sigmas = (40, 23, 9), (4.0, 3.0, 0.6)
    gauss = SeparableGaussian(shape, sigmas, torch.device("cpu"))
    assert gauss.factors == (2, 2, 1)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    out = gauss.apply(x)
    explicit = x
    for axis, op in enumerate(gauss.axis_ops):
        explicit = torch.movedim(
            torch.tensordot(op, torch.movedim(explicit, axis + 1, 0), dims=1), 0, axis + 1
        )
    torch.testing.assert_close(out, explicit, rtol=1e-4, atol=1e-4)
    # Normalised, it is close to the exact Gaussian (the pooling is compensated for).
    exact = x
    for axis, (n, s) in enumerate(zip(shape, sigmas)):
        i = torch.arange(n, dtype=torch.float32)
        g = torch.exp(-0.5 * ((i[:, None] - i[None]) / s) ** 2)
        exact = torch.movedim(torch.tensordot(g, torch.movedim(exact, axis + 1, 0), dims=1), 0, axis + 1)
    ratio = out / gauss.apply(torch.ones(1, *shape))
    assert float((ratio - exact / _exact_mass(shape, sigmas)).abs().max()) < 0.03


def _exact_mass(shape: tuple[int, ...], sigmas: tuple[float, ...]) -> torch.Tensor:
    mass = torch.ones(())
    for n, s in zip(shape, sigmas):
        i = torch.arange(n, dtype=torch.float32)
        mass = mass[..., None] * torch.exp(-0.5 * ((i[:, None] - i[None]) / s) ** 2).sum(1)
    return mass


# ------------------------------------------------------------------------------ CRF vs pydensecrf


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((96, 80), (1.0, 1.5)), ((40, 36, 20), (1.0, 1.0, 2.5)), ((48, 48, 16), (0.7, 0.7, 3.0))],
    ids=["2d", "3d", "3d-anisotropic-ct"],
)
def test_dense_crf_agrees_with_pydensecrf(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    """Done means: changed-voxel IoU >= 0.8, marginals within 0.05, the same Dice gain (to 0.01)."""
    probs, image, truth = synthetic_case(shape, spacing)
    cfg = DenseCRFConfig(bilateral_sigma_mm=8.0, **WHOLE)
    ref = run_pydensecrf(probs, image, spacing, cfg)
    ours = crf(probs, image, spacing, cfg)
    unary = probs.argmax(0)
    ours_changed, ref_changed = ours.argmax(0) != unary, ref.argmax(0) != unary
    assert ours_changed.mean() >= 0.05  # the case is hard enough to matter
    iou = (ours_changed & ref_changed).sum() / (ours_changed | ref_changed).sum()
    assert iou >= 0.8
    assert np.abs(ours - ref).mean() <= 0.05
    gain_ours = mean_dice(ours.argmax(0), truth) - mean_dice(unary, truth)
    gain_ref = mean_dice(ref.argmax(0), truth) - mean_dice(unary, truth)
    assert gain_ours > 0.05
    assert abs(gain_ours - gain_ref) <= 0.01


def test_dense_crf_agrees_with_pydensecrf_on_two_channels() -> None:
    probs, image, _ = synthetic_case((40, 32, 10), (1.0, 1.0, 2.0), seed=5)
    image = np.concatenate([image, -0.5 * image + 0.1])
    cfg = DenseCRFConfig(bilateral_sigma_mm=6.0, intensity_sigma=(0.5, 0.3), **WHOLE)
    ref = run_pydensecrf(probs, image, (1.0, 1.0, 2.0), cfg)
    ours = crf(probs, image, (1.0, 1.0, 2.0), cfg)
    assert np.abs(ours - ref).mean() < 0.01


# ------------------------------------------------------------------------------- CRF, hand-built


def test_bilateral_term_snaps_a_blurred_boundary_to_the_intensity_edge() -> None:
    """Unaries put a soft boundary at column 14; the image has its edge at column 10."""
    shape = (24, 28)
    cols = np.arange(shape[1])[None, :].repeat(shape[0], 0)
    p1 = 1.0 / (1.0 + np.exp(-(cols - 13.5) / 3.0))  # blurred, 4 columns off
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    image = (cols >= 10).astype(np.float32)[None] * 2.0
    cfg = DenseCRFConfig(
        spatial_weight=0.0, bilateral_sigma_mm=6.0, intensity_sigma=0.5, bilateral_weight=5.0, **WHOLE
    )
    labels = crf(probs, image, (1.0, 1.0), cfg).argmax(0)
    assert (probs.argmax(0)[:, 10:14] == 0).all()  # the unary boundary is off
    np.testing.assert_array_equal(labels, (cols >= 10).astype(np.int64))


def test_spatial_term_removes_isolated_speckle() -> None:
    shape = (20, 20, 12)
    rng = np.random.default_rng(0)
    p1 = np.full(shape, 0.1)
    p1[5:15, 5:15, 3:9] = 0.9  # an object
    speckle = np.zeros(shape, bool)
    speckle[::3, ::3, ::3] = rng.random(speckle[::3, ::3, ::3].shape) < 0.5  # isolated: 3 voxels apart
    speckle &= ndi.distance_transform_edt(p1 < 0.5) > 2  # and away from the object
    p1[speckle] = 0.7  # isolated voxels mildly for label 1
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    image = rng.normal(0.0, 1.0, (1, *shape)).astype(np.float32)
    cfg = DenseCRFConfig(bilateral_weight=0.0, spatial_sigma_mm=1.5, spatial_weight=3.0, **WHOLE)
    labels = crf(probs, image, (1.0, 1.0, 1.0), cfg).argmax(0)
    assert speckle.sum() > 20
    assert not labels[speckle].any()
    np.testing.assert_array_equal(labels[6:14, 6:14, 4:8], 1)  # the object's inside stays


def test_matrix_compatibility_one_minus_identity_equals_potts() -> None:
    probs, image, _ = synthetic_case((30, 24), (1.0, 1.0), seed=2)
    potts = crf(probs, image, (1.0, 1.0), DenseCRFConfig(**WHOLE))
    matrix = crf(
        probs, image, (1.0, 1.0), DenseCRFConfig(compatibility=((0, 1, 1), (1, 0, 1), (1, 1, 0)), **WHOLE)
    )
    np.testing.assert_allclose(potts, matrix, atol=1e-5)


def test_zero_iterations_return_the_clipped_unaries() -> None:
    probs, image, _ = synthetic_case((16, 12), (1.0, 1.0))
    out = crf(probs, image, (1.0, 1.0), DenseCRFConfig(iterations=0, **WHOLE))
    np.testing.assert_allclose(out, probs, atol=1e-4)


def test_kernel_widths_are_in_millimetres() -> None:
    """Coarser slices (5 mm) with the same physical widths: fewer voxels, same smoothing in mm."""
    fine_probs, fine_image, _ = synthetic_case((32, 32, 40), (1.0, 1.0, 1.0), seed=4, noise=1.0)
    coarse_probs = fine_probs[..., 2::5].copy()
    coarse_image = fine_image[..., 2::5].copy()
    cfg = DenseCRFConfig(bilateral_weight=0.0, spatial_sigma_mm=4.0, **WHOLE)
    ours = crf(coarse_probs, coarse_image, (1.0, 1.0, 5.0), cfg)
    ref = run_pydensecrf(coarse_probs, coarse_image, (1.0, 1.0, 5.0), cfg)
    assert np.abs(ours - ref).mean() < 0.01
    # Treating the 5 mm slices as 1 mm would smooth far more across slices.
    wrong = crf(coarse_probs, coarse_image, (1.0, 1.0, 1.0), cfg)
    assert np.abs(wrong - ref).mean() > 5 * np.abs(ours - ref).mean()


def test_dense_crf_checks_its_inputs() -> None:
    probs = torch.full((2, 8, 8), 0.5)
    with pytest.raises(InputError, match="image must"):
        dense_crf(probs, torch.zeros(1, 8, 7), (1.0, 1.0), DenseCRFConfig())
    with pytest.raises(InputError, match="spacing must"):
        dense_crf(probs, torch.zeros(1, 8, 8), (1.0,), DenseCRFConfig())
    with pytest.raises(InputError, match="compatibility must be a 2 x 2"):
        dense_crf(probs, torch.zeros(1, 8, 8), (1.0, 1.0), DenseCRFConfig(compatibility=((0, 1, 1),) * 3))
    with pytest.raises(InputError, match="intensity_sigma"):
        dense_crf(probs, torch.zeros(3, 8, 8), (1.0, 1.0), DenseCRFConfig(intensity_sigma=(1.0, 2.0)))
    with pytest.raises(InputError, match="probs must"):
        dense_crf(torch.full((1, 8, 8), 1.0), torch.zeros(1, 8, 8), (1.0, 1.0), DenseCRFConfig())


def test_two_labels_float64_and_metatensor_inputs() -> None:
    from monai.data import MetaTensor

    probs, image, _ = synthetic_case((24, 20, 8), (1.0, 1.0, 2.0), seed=6)
    binary = np.stack([probs[0], probs[1] + probs[2]])
    cfg = DenseCRFConfig(**WHOLE)
    ref = run_pydensecrf(binary, image, (1.0, 1.0, 2.0), cfg)
    ours = dense_crf(
        MetaTensor(torch.from_numpy(binary).double()),
        MetaTensor(torch.from_numpy(image)),
        (1.0, 1.0, 2.0),
        cfg,
    )
    assert ours.dtype == torch.float32
    assert np.abs(ours.numpy() - ref).mean() < 0.01


def test_disabled_crf_returns_probs_unchanged() -> None:
    probs = torch.rand(2, 6, 6)
    assert dense_crf(probs, torch.zeros(1, 6, 6), (1.0, 1.0), DenseCRFConfig(enabled=False)) is probs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_crf_on_cuda_matches_cpu() -> None:
    probs, image, _ = synthetic_case((32, 28, 12), (1.0, 1.0, 2.0))
    cfg = DenseCRFConfig(**WHOLE)
    cpu = crf(probs, image, (1.0, 1.0, 2.0), cfg)
    gpu = dense_crf(torch.from_numpy(probs).cuda(), torch.from_numpy(image).cuda(), (1.0, 1.0, 2.0), cfg)
    assert gpu.is_cuda
    assert np.abs(gpu.cpu().numpy() - cpu).mean() < 1e-4


# ------------------------------------------------------------------------------- bounded memory


def test_plan_blocks_partitions_the_box_with_halos() -> None:
    cfg = DenseCRFConfig(max_block_voxels=40_000, spatial_sigma_mm=2.0, bilateral_sigma_mm=3.0)
    roi = ((5, 45), (0, 40), (2, 62))
    spacing = (1.0, 1.0, 2.5)
    blocks = plan_blocks(roi, spacing, cfg)
    assert len(blocks) > 1
    axis = next(a for a in range(3) if blocks[0].core[a] != roi[a])
    halo = math.ceil(3 * 3.0 / spacing[axis])
    covered = np.zeros(roi[axis][1], int)
    for block in blocks:
        (c0, c1), (p0, p1) = block.core[axis], block.padded[axis]
        covered[c0:c1] += 1
        assert p0 == max(roi[axis][0], c0 - halo)
        assert p1 == min(roi[axis][1], c1 + halo)
        assert block.voxels <= cfg.max_block_voxels
        assert all(block.core[a] == roi[a] for a in range(3) if a != axis)
    np.testing.assert_array_equal(covered[roi[axis][0] :], 1)
    # The coarse axis makes the cheapest halo: 2.5 mm slices.
    assert axis == 2


def test_slabs_and_roi_match_the_whole_volume() -> None:
    spacing = (1.0, 1.0, 1.5)
    probs, image, _ = synthetic_case((40, 36, 44), spacing, seed=1, noise=1.0)
    far = np.ones(probs.shape[1:], bool)
    far[8:32, 6:30, 8:36] = False
    probs[:, far] = np.array([0.98, 0.01, 0.01], np.float32)[:, None]  # confident background around
    cfg = DenseCRFConfig(
        roi_margin_mm=4.0, max_block_voxels=20_000, spatial_sigma_mm=2.0, bilateral_sigma_mm=3.0
    )
    sliced, info = dense_crf_with_info(torch.from_numpy(probs), torch.from_numpy(image), spacing, cfg)
    assert info.roi is not None
    assert info.roi != tuple((0, n) for n in probs.shape[1:])
    assert len(info.blocks) > 1
    assert max(b.voxels for b in info.blocks) <= 20_000
    whole = crf(
        probs, image, spacing, cfg.model_copy(update={"roi_margin_mm": None, "max_block_voxels": 10**9})
    )
    inside = (slice(None), *(slice(a, b) for a, b in info.roi))
    assert (sliced.numpy()[inside].argmax(0) == whole[inside].argmax(0)).mean() > 0.995
    assert np.abs(sliced.numpy()[inside] - whole[inside]).mean() < 0.01
    outside = np.ones(probs.shape[1:], bool)
    outside[inside[1:]] = False
    np.testing.assert_array_equal(sliced.numpy()[:, outside], probs[:, outside])


def test_foreground_box_grows_by_the_margin_in_voxels() -> None:
    probs = torch.zeros(3, 30, 20, 10)
    probs[0] = 1.0
    probs[:, 10:12, 5:6, 4:5] = torch.tensor([0.2, 0.5, 0.3])[:, None, None, None]
    probs[:, 25, 15, 2] = torch.tensor([0.4, 0.2, 0.4])  # a tie 0.4/0.4: argmax is 0, not foreground
    assert foreground_box(probs, (1.0, 2.0, 5.0), margin_mm=4.0, chunk_voxels=400) == (
        (6, 16),
        (3, 8),
        (3, 6),
    )
    assert foreground_box(probs[:, :5], (1.0, 2.0, 5.0), margin_mm=4.0) is None


def test_cpu_threads_restores_the_setting() -> None:
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert threads_for(10, 0, torch.device("cpu")) == 1  # small blocks: one thread
    assert threads_for(10**9, 3, torch.device("cpu")) == 3  # pinned
    assert threads_for(10, 0, torch.device("meta")) is None  # not a CPU tensor


def test_roi_without_foreground_leaves_probs_alone() -> None:
    probs = torch.zeros(3, 10, 10, 4)
    probs[0] = 1.0
    out, info = dense_crf_with_info(probs, torch.zeros(1, 10, 10, 4), (1.0, 1.0, 1.0), DenseCRFConfig())
    assert info.roi is None
    assert info.blocks == ()
    assert out is probs


# -------------------------------------------------------------------------------- post-processing


def test_keep_largest_component_drops_only_the_smaller_ones() -> None:
    labels = np.zeros((10, 10), np.uint8)
    labels[1:4, 1:4] = 1  # 9 voxels
    labels[6:8, 6:8] = 1  # 4 voxels
    labels[8, 1] = 2
    out = keep_largest_component(labels, 1)
    expected = labels.copy()
    expected[6:8, 6:8] = 0
    np.testing.assert_array_equal(out, expected)
    assert labels[6, 6] == 1  # input untouched


def test_connectivity_decides_what_is_one_component() -> None:
    labels = np.zeros((6, 6), np.uint8)
    labels[1:3, 1:3] = 1
    labels[3, 3] = 1  # touches the block at a corner only
    assert keep_largest_component(labels, 1, connectivity="full")[3, 3] == 1
    assert keep_largest_component(labels, 1, connectivity="face")[3, 3] == 0


def test_remove_small_components_uses_millimetres() -> None:
    labels = np.zeros((12, 12, 3), np.uint8)
    labels[0, 0, 0] = 1  # 1 voxel = 2 mm^3
    labels[4:6, 4:6, 0] = 1  # 4 voxels = 8 mm^3
    labels[8:11, 8:11, 1] = 1  # 9 voxels = 18 mm^3
    labels[0, 11, 2] = 2  # another label, tiny: untouched
    out = remove_small_components(labels, 1, 10.0, spacing=(1.0, 1.0, 2.0))
    expected = labels.copy()
    expected[0, 0, 0] = 0
    expected[4:6, 4:6, 0] = 0
    np.testing.assert_array_equal(out, expected)


def test_fill_holes_fills_enclosed_background_only() -> None:
    labels = np.zeros((12, 16), np.uint8)
    labels[1:6, 1:6] = 1
    labels[3, 3] = 0  # a hole: filled
    labels[1:6, 8:13] = 1
    labels[2:5, 9:12] = 2  # another label inside: kept
    labels[3, 10] = 0  # background inside it, enclosed by label 1 through label 2: filled
    labels[8:11, 0:4] = 1
    labels[9, 0:3] = 0  # a bay open to the grid's border: not a hole
    out = fill_holes(labels, 1)
    expected = labels.copy()
    expected[3, 3] = 1
    expected[3, 10] = 1
    np.testing.assert_array_equal(out, expected)


def test_fill_holes_in_3d_at_the_grid_border() -> None:
    labels = np.ones((5, 5, 5), np.uint8)
    labels[2, 2, 2] = 0  # enclosed
    labels[0, 2, 2] = 0  # on the grid's face: open
    out = fill_holes(labels, 1)
    assert out[2, 2, 2] == 1
    assert out[0, 2, 2] == 0


def test_postprocess_applies_each_labels_steps_in_order() -> None:
    labels = np.zeros((12, 12), np.uint8)
    labels[1:6, 1:6] = 1
    labels[3, 3] = 0
    labels[9, 9] = 1
    labels[8:11, 0:2] = 2
    labels[0, 11] = 2
    cfg = PostprocessConfig(
        labels={
            1: LabelPostprocess(keep_largest=True, fill_holes=True),
            2: LabelPostprocess(min_component_mm3=2.0),
        }
    )
    out = postprocess(labels, cfg, spacing=(1.0, 1.0))
    expected = labels.copy()
    expected[3, 3] = 1
    expected[9, 9] = 0
    expected[0, 11] = 0
    np.testing.assert_array_equal(out, expected)
    untouched = postprocess(labels, cfg.model_copy(update={"enabled": False}))
    np.testing.assert_array_equal(untouched, labels)
    assert untouched is not labels


def test_postprocess_checks_its_input() -> None:
    with pytest.raises(InputError, match="integer"):
        postprocess(np.zeros((4, 4)), PostprocessConfig())
    with pytest.raises(InputError, match="spacing"):
        postprocess(np.zeros((4, 4), np.uint8), PostprocessConfig(), spacing=(1.0, 1.0, 1.0))


def _validation_cases() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Label 1: true organ with spurious islands in the predictions; label 2: truly ring-shaped."""
    preds, truths = [], []
    for shift in range(3):
        truth = np.zeros((30, 30), np.uint8)
        truth[5 + shift : 15 + shift, 5:15] = 1
        truth[18:27, 18:27] = 2
        truth[21:24, 21:24] = 0  # label 2 is a ring: filling it would be wrong
        pred = truth.copy()
        pred[1, 25 - shift] = 1  # islands
        pred[27, 2 + shift] = 1
        pred[6 + shift, 6] = 0  # a hole in label 1's prediction
        preds.append(pred)
        truths.append(truth)
    return preds, truths


def test_choose_postprocessing_keeps_only_what_improves_dice(tmp_path) -> None:
    preds, truths = _validation_cases()
    cfg = choose_postprocessing(preds, truths, labels=[1, 2], spacing=(1.0, 1.0))
    assert cfg.for_label(1).keep_largest or cfg.for_label(1).min_component_mm3
    assert cfg.for_label(1).fill_holes
    assert cfg.for_label(2).is_identity  # nothing helps the ring
    before = np.mean(
        [2 * ((p == 1) & (t == 1)).sum() / ((p == 1).sum() + (t == 1).sum()) for p, t in zip(preds, truths)]
    )
    after = [postprocess(p, cfg, (1.0, 1.0)) for p in preds]
    assert all((a == t).all() for a, t in zip(after, truths))
    assert before < 1.0
    # Serialisable, to be stored with the model.
    path = tmp_path / "postprocess.yaml"
    dump_yaml(cfg, path)
    assert validate(PostprocessConfig, read_yaml(path), str(path)) == cfg


def test_choose_postprocessing_checks_its_input() -> None:
    with pytest.raises(InputError, match="same length"):
        choose_postprocessing([np.zeros((3, 3), np.uint8)], [], labels=[1])
    with pytest.raises(InputError, match="same shape"):
        choose_postprocessing([np.zeros((3, 3), np.uint8)], [np.zeros((3, 4), np.uint8)], labels=[1])


# -------------------------------------------------------------------------------------- the stage


def test_refine_reports_what_the_crf_and_postprocessing_changed() -> None:
    probs, image, truth = synthetic_case((40, 36, 16), (1.0, 1.0, 2.0), seed=7)
    probs[:, 1, 1, 1] = np.array([0.01, 0.98, 0.01])  # a confident island far from the object
    post = PostprocessConfig(labels={1: LabelPostprocess(keep_largest=True)})
    crf_cfg = DenseCRFConfig(bilateral_sigma_mm=8.0)
    labels, report = refine(torch.from_numpy(probs), torch.from_numpy(image), (1.0, 1.0, 2.0), crf_cfg, post)
    assert labels.dtype == np.uint8
    assert labels.shape == truth.shape
    crf_labels = crf(probs, image, (1.0, 1.0, 2.0), crf_cfg).argmax(0)
    unary = probs.argmax(0)
    assert report.crf_changed_fraction == pytest.approx((crf_labels != unary).mean())
    assert report.crf_changed_fraction >= 0.05
    assert report.post_changed_fraction == pytest.approx((labels != crf_labels).mean())
    assert report.post_changed_fraction > 0
    assert report.changed_fraction == pytest.approx((labels != unary).mean())
    assert mean_dice(labels, truth) > mean_dice(unary, truth)
    metrics = report.metrics()
    assert metrics["refine/crf_changed_fraction"] == report.crf_changed_fraction
    assert report.as_dict()["crf_blocks"] == 1


def test_refine_reads_memory_mapped_float16_probabilities_block_by_block(tmp_path) -> None:
    """The bounded tiling mode leaves the stitched probabilities in a memory-mapped ``.npy``."""
    spacing = (1.0, 1.0, 2.0)
    probs, image, _ = synthetic_case((36, 32, 24), spacing, seed=8)
    path = tmp_path / "probs.npy"
    np.save(path, probs.astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    cfg = DenseCRFConfig(max_block_voxels=12_000, spatial_sigma_mm=2.0, bilateral_sigma_mm=3.0)
    labels, report = refine(mapped, image, spacing, cfg, PostprocessConfig())
    in_memory, _ = refine(
        torch.from_numpy(probs.astype(np.float16).astype(np.float32)),
        image,
        spacing,
        cfg,
        PostprocessConfig(),
    )
    assert report.crf_blocks > 1
    np.testing.assert_array_equal(labels, in_memory)


def test_refine_with_everything_off_is_the_argmax() -> None:
    probs, image, _ = synthetic_case((20, 18), (1.0, 1.0))
    labels, report = refine(
        torch.from_numpy(probs),
        torch.from_numpy(image),
        (1.0, 1.0),
        DenseCRFConfig(enabled=False),
        PostprocessConfig(enabled=False),
    )
    np.testing.assert_array_equal(labels, probs.argmax(0))
    assert report.crf_changed_fraction == 0.0
    assert report.post_changed_fraction == 0.0
    assert report.crf_roi is None
    assert report.crf_blocks == 0


def test_crf_reads_probabilities_in_any_memory_layout() -> None:
    """A permuted (channels-last) tensor must give the same marginals as a row-major one."""
    rng = np.random.default_rng(3)
    labels = torch.from_numpy(rng.integers(0, 3, (12, 10, 6)))
    channels_last = torch.nn.functional.one_hot(labels, 3).float().mul(0.9).add(0.1 / 3)
    probs = channels_last.permute(3, 0, 1, 2)
    assert not probs.is_contiguous()
    image = torch.from_numpy(rng.normal(size=(1, 12, 10, 6)).astype(np.float32))
    cfg = DenseCRFConfig(iterations=2, roi_margin_mm=None)
    a = dense_crf(probs, image, (1.0, 1.0, 2.0), cfg)
    b = dense_crf(probs.contiguous(), image, (1.0, 1.0, 2.0), cfg)
    assert torch.allclose(a, b, atol=1e-6)


_FAULTS_SCRIPT = """
import os, resource, sys
import torch
from medseg.refine import memory

def faults():  # minor page faults of allocating and filling a 64 MiB block, after freeing two alike
    for _ in range(2):
        torch.empty(16 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

if memory._glibc() is None:
    print("skip")
    sys.exit()
out = [faults()]
with memory.reuse_freed_memory():
    with memory.reuse_freed_memory():
        out.append(min(faults() for _ in range(3)))  # the best of three: the kernel may reclaim idle pages
    out += [memory._depth, min(faults() for _ in range(3)), rss_mb()]
out += [memory._depth, rss_mb()]
print(*out)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux only")
def test_refinement_reuses_freed_memory_and_gives_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from medseg.refine import memory

    # a fresh process: the heap of a long test session (other threads, earlier trims) must not decide
    run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    if run.stdout.strip() == "skip":
        pytest.skip("not glibc, or its malloc thresholds set through the environment")
    before, inner, depth_inner, outer, rss_inside, depth_after, rss_after = map(float, run.stdout.split())
    pages = (64 << 20) // 4096  # a 64 MiB block: above glibc's largest dynamic mmap threshold
    assert before > pages // 2  # mapped and zero-filled afresh
    assert inner < pages // 10  # reused from the heap
    assert (depth_inner, depth_after) == (1, 0)
    assert outer < pages // 10  # the outer use still holds after the inner one ended
    assert rss_inside - rss_after > 32  # the freed 64 MiB block's pages given back at the end
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own setting wins
    assert memory._glibc() is None
