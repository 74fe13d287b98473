"""Tests for medseg.preprocess: geometry rules, intensity schemes, and the inverse round trip."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd, LoadImaged
from scipy.spatial.transform import Rotation

from medseg.config.spec import DatasetSpec, IntensitySpec
from medseg.errors import GeometryError, InputError
from medseg.preprocess import (
    NormalizeChannelsd,
    ResampleStep,
    ResampleToSpacingd,
    build_preprocess,
    invert_to_source,
    is_anisotropic,
    normalize_channel,
    plan_resampling,
    separate_slice_axis,
    slice_axis,
    spacing_from_affine,
)

SHAPE = (20, 18, 8)


def make_affine(
    spacing: tuple[float, float, float],
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0),
    flips: tuple[int, int, int] = (1, 1, 1),
    perm: tuple[int, int, int] = (0, 1, 2),
    origin: tuple[float, float, float] = (-12.0, 7.5, 30.0),
) -> np.ndarray:
    """Voxel-to-world (RAS) affine: scale, flip, permute the voxel axes, then rotate."""
    direction = np.eye(3)[:, list(perm)] * np.asarray(flips, dtype=float)
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot @ direction @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "identity": make_affine((1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)),
    "oblique": make_affine((0.9, 1.1, 1.6), angles=(20.0, -10.0, 35.0)),
    "flipped": make_affine((0.8, 1.0, 1.5), flips=(-1, 1, -1), perm=(1, 0, 2)),
    "anisotropic": make_affine((0.7, 0.7, 5.0), angles=(8.0, 5.0, -12.0), flips=(1, -1, 1)),
}


def make_spec(
    modalities: tuple[str, ...] = ("CT",),
    target_spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    intensity: list[dict[str, Any] | None] | None = None,
    anisotropy_threshold: float = 3.0,
) -> DatasetSpec:
    intensity = intensity or [None] * len(modalities)
    channels = [
        {"name": f"c{i}", "modality": m, **({"intensity": s} if s else {})}
        for i, (m, s) in enumerate(zip(modalities, intensity, strict=True))
    ]
    return DatasetSpec.model_validate(
        {
            "name": "demo",
            "channels": channels,
            "labels": {"background": 0, "organ": 1, "tumour": 2},
            "cases": [{"id": "c1", "images": [f"c1_{i}.nii.gz" for i in range(len(modalities))]}],
            "target_spacing": target_spacing,
            "anisotropy_threshold": anisotropy_threshold,
        }
    )


def blob_labels(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """An ellipsoid of 1 with a smaller core of 2, off centre."""
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    centre, radii = (9.0, 8.0, 3.5), (6.5, 5.5, 2.8)
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    return np.where(r2 <= 0.35, 2, np.where(r2 <= 1.0, 1, 0)).astype(np.uint8)


def volume(channels: int, affine: np.ndarray, seed: int = 0) -> MetaTensor:
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 40.0, size=(channels, *SHAPE)).astype(np.float32)
    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(affine))


def label_tensor(affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(blob_labels()[None]), affine=torch.as_tensor(affine))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


# --- pure geometry --------------------------------------------------------------------------


def test_spacing_from_oblique_flipped_affine() -> None:
    affine = make_affine((0.7, 0.8, 5.0), angles=(30.0, 10.0, -50.0), flips=(-1, 1, -1), perm=(2, 0, 1))
    assert spacing_from_affine(affine) == pytest.approx((0.7, 0.8, 5.0))


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [((0.7, 0.7, 5.0), True), ((1.0, 1.0, 3.0), False), ((1.0, 1.0, 3.01), True), ((4.0, 1.0, 1.0), True)],
)
def test_is_anisotropic(spacing: tuple[float, ...], expected: bool) -> None:
    assert is_anisotropic(spacing, 3.0) is expected


def test_slice_axis_unique_or_none() -> None:
    assert slice_axis((5.0, 0.7, 0.7)) == 0
    assert slice_axis((0.25, 1.25, 1.25)) is None
    assert slice_axis((2.0, 2.0, 2.0)) is None


def test_separate_slice_axis_follows_source_then_target() -> None:
    assert separate_slice_axis((0.7, 0.7, 5.0), (1.0, 1.0, 1.0)) == 2
    assert separate_slice_axis((1.0, 1.0, 1.0), (1.0, 1.0, 5.0)) == 2
    assert separate_slice_axis((0.7, 0.7, 5.0), (1.0, 1.0, 1.0), threshold=10.0) is None
    assert separate_slice_axis((0.25, 1.25, 1.25), (1.0, 1.0, 1.0)) is None


def test_plan_resampling_splits_anisotropic() -> None:
    assert plan_resampling((0.7, 0.7, 5.0), (1.0, 1.0, 1.0)) == (
        ResampleStep(pixdim=(1.0, 1.0, 5.0), smooth=True),
        ResampleStep(pixdim=(1.0, 1.0, 1.0), smooth=False),
    )
    assert plan_resampling((0.7, 0.7, 5.0), (0.7, 0.7, 5.0)) == ()
    assert plan_resampling((1.2, 0.9, 1.1), (1.0, 1.0, 1.0)) == (ResampleStep((1.0, 1.0, 1.0), True),)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: is_anisotropic((1.0, 1.0, 1.0), 0.0), "threshold must be > 0"),
        (lambda: slice_axis((1.0, -1.0, 1.0)), "spacing must be"),
        (lambda: plan_resampling((1.0, 1.0, 1.0), (1.0, 1.0)), "target spacing must have 3"),
        (lambda: spacing_from_affine(np.eye(3)[:2]), "affine must be a square"),
    ],
)
def test_geometry_errors(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("module", ["geometry", "spacing", "intensity", "pipeline"])
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(f"medseg.preprocess.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# --- builder --------------------------------------------------------------------------------


def test_build_preprocess_stages() -> None:
    names = [type(t).__name__ for t in build_preprocess(make_spec()).transforms]
    assert names == ["Orientationd", "ResampleToSpacingd", "NormalizeChannelsd"]
    names = [type(t).__name__ for t in build_preprocess(make_spec(target_spacing=None)).transforms]
    assert names == ["Orientationd", "NormalizeChannelsd"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keys": ()}, "keys must name"),
        ({"label_key": "image"}, "label_key must differ"),
        ({"image_mode": "nearest"}, "image_mode must be"),
        ({"image_mode": "cubic"}, "image_mode must be one of"),
    ],
)
def test_build_preprocess_rejects(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_preprocess(make_spec(), **kwargs)


def test_resample_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pixdim must be three"):
        ResampleToSpacingd("image", pixdim=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="anisotropy_threshold must be > 0"):
        ResampleToSpacingd("image", pixdim=(1.0, 1.0, 1.0), anisotropy_threshold=0.0)
    with pytest.raises(ValueError, match="mode must give one mode per key"):
        ResampleToSpacingd(["image", "label"], pixdim=(1.0, 1.0, 1.0), mode=["bilinear"])
    with pytest.raises(InputError, match="must be a MetaTensor"):
        ResampleToSpacingd("image", pixdim=(1.0, 1.0, 1.0))({"image": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(InputError, match=r"shape \(C, X, Y, Z\)"):
        ResampleToSpacingd("image", pixdim=(1.0, 1.0, 1.0))({"image": MetaTensor(torch.zeros(4, 4, 4))})


# --- round trip: back on exactly the input's voxel grid --------------------------------------


@pytest.mark.parametrize("kind", sorted(AFFINES))
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("target", [None, (1.0, 1.0, 1.0), (0.8, 0.8, 3.0)], ids=["keep", "iso", "aniso"])
def test_round_trip_restores_grid(kind: str, channels: int, target: tuple[float, ...] | None) -> None:
    affine = AFFINES[kind]
    spec = make_spec(("MR",) * channels, target_spacing=target)
    transform = build_preprocess(spec)
    image, label = volume(channels, affine), label_tensor(affine)
    out = transform({"image": image, "label": label})
    assert out["image"].shape[1:] == out["label"].shape[1:]
    assert np.allclose(out["image"].affine.numpy(), out["label"].affine.numpy())
    if target is not None:
        assert spacing_from_affine(out["image"].affine.numpy()) == pytest.approx(target, rel=1e-5)

    probs = torch.softmax(torch.randn(3, *out["image"].shape[1:]), dim=0)
    back = invert_to_source(probs, out, transform, mode="bilinear")
    assert tuple(back.shape) == (3, *SHAPE)
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-5)
    np.testing.assert_allclose(back.sum(0).numpy(), 1.0, atol=1e-5)  # linear: convex combinations
    assert float(back.min()) >= 0.0

    # MONAI's own machinery inverts the whole chain too (orientation, spacing, intensity).
    inv = Invertd(keys=["image", "label"], transform=transform, nearest_interp=False)(out)
    for key, src in (("image", image), ("label", label)):
        assert inv[key].shape == src.shape
        np.testing.assert_allclose(inv[key].affine.numpy(), affine, atol=1e-5)
    if target is None:  # orientation and z-score only: the values come back too
        np.testing.assert_allclose(inv["image"].numpy(), image.numpy(), rtol=1e-4, atol=1e-3)
        assert torch.equal(inv["label"].as_tensor(), label.as_tensor())


@pytest.mark.parametrize("channels", [1, 2])
def test_round_trip_through_nifti(tmp_path: Path, channels: int) -> None:
    affine = AFFINES["oblique"]
    data = np.random.default_rng(1).normal(size=(*SHAPE, channels)).astype(np.float32)
    nib.save(nib.Nifti1Image(data if channels > 1 else data[..., 0], affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(blob_labels(), affine), tmp_path / "seg.nii.gz")
    loaded = LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True)(
        {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "seg.nii.gz")}
    )
    assert tuple(loaded["image"].shape) == (channels, *SHAPE)
    transform = build_preprocess(make_spec(("MR",) * channels, target_spacing=(1.2, 1.2, 1.2)))
    out = transform(loaded)
    back = invert_to_source(out["label"], out, transform, mode="nearest")
    assert tuple(back.shape) == (1, *SHAPE)
    np.testing.assert_allclose(back.affine.numpy(), loaded["label"].affine.numpy(), atol=1e-5)
    assert dice(back.numpy()[0] > 0, blob_labels() > 0) > 0.9


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_pure_orientation_round_trip_is_exact(kind: str) -> None:
    affine = AFFINES[kind]
    label = label_tensor(affine)
    oriented = build_preprocess(make_spec(target_spacing=None), label_key=None)({"image": volume(1, affine)})
    ras_spacing = spacing_from_affine(oriented["image"].affine.numpy())
    # Orientation only, or a target spacing equal to the source's once its axes are in RAS order.
    for target in (None, ras_spacing):
        transform = build_preprocess(make_spec(target_spacing=target))
        out = transform({"image": volume(1, affine), "label": label_tensor(affine)})
        back = invert_to_source(out["label"].to(torch.uint8), out, transform, mode="nearest")
        assert back.dtype == torch.uint8
        assert torch.equal(back.as_tensor(), label.as_tensor())
        np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "target"),
    [("oblique", (1.0, 1.0, 1.0)), ("flipped", (0.7, 0.7, 0.9)), ("anisotropic", (0.6, 0.6, 2.0))],
)
def test_resampled_label_round_trip_dice(kind: str, target: tuple[float, float, float]) -> None:
    affine = AFFINES[kind]
    transform = build_preprocess(make_spec(target_spacing=target))
    out = transform({"image": volume(1, affine), "label": label_tensor(affine)})
    assert tuple(out["label"].shape) != (1, *SHAPE)  # really resampled
    back = invert_to_source(out["label"], out, transform, mode="nearest").numpy()[0]
    source = blob_labels()
    assert set(np.unique(back)) <= {0, 1, 2}
    assert dice(back >= 1, source >= 1) > 0.95
    assert dice(back == 2, source == 2) > 0.9


# --- anisotropic data: nearest along the slice axis ------------------------------------------


def plane_volume(affine: np.ndarray) -> MetaTensor:
    """Every slice (along voxel axis 2) is constant: 100 * slice index."""
    data = np.broadcast_to(100.0 * np.arange(SHAPE[2], dtype=np.float32), SHAPE).copy()
    return MetaTensor(torch.from_numpy(data[None]), affine=torch.as_tensor(affine))


@pytest.mark.parametrize("flips", [(1, 1, 1), (1, -1, -1)])
def test_anisotropic_slice_axis_uses_nearest(flips: tuple[int, int, int]) -> None:
    affine = make_affine((0.7, 0.7, 5.0), flips=flips)
    none = [{"scheme": "none"}]
    transform = build_preprocess(make_spec(("MR",), (1.0, 1.0, 1.0), none), label_key=None)
    out = transform({"image": plane_volume(affine)})["image"].numpy()[0]
    assert out.shape[2] > 4 * SHAPE[2]  # upsampled along the slice axis
    source_values = 100.0 * np.arange(SHAPE[2])
    for k in range(out.shape[2]):
        plane = out[:, :, k]
        np.testing.assert_allclose(plane, plane.flat[0], atol=1e-3)  # planes stay constant
        assert np.min(np.abs(source_values - plane.flat[0])) < 1e-3  # and copy a source plane
    assert len(np.unique(np.round(out))) == SHAPE[2]

    # With the split switched off (threshold above the ratio), linear blends the planes.
    blended = build_preprocess(
        make_spec(("MR",), (1.0, 1.0, 1.0), none, anisotropy_threshold=10.0), label_key=None
    )
    values = np.unique(np.round(blended({"image": plane_volume(affine)})["image"].numpy()))
    assert len(values) > SHAPE[2]


def test_anisotropic_probabilities_invert_exactly_on_planes() -> None:
    affine = make_affine((0.7, 0.7, 5.0))
    none = [{"scheme": "none"}]
    transform = build_preprocess(make_spec(("MR",), (1.0, 1.0, 1.0), none), label_key=None)
    source = plane_volume(affine)
    out = transform({"image": source})
    back = invert_to_source(out["image"], out, transform, mode="bilinear")
    np.testing.assert_allclose(back.numpy(), source.numpy(), atol=1e-3)


# --- intensity ------------------------------------------------------------------------------


def test_ct_clip_and_normalise() -> None:
    ct = IntensitySpec(scheme="ct", clip=(-100.0, 300.0), mean=50.0, std=25.0)
    y, norm = normalize_channel(torch.tensor([-1000.0, -100.0, 50.0, 100.0, 2000.0]), ct)
    np.testing.assert_allclose(y.numpy(), [-6.0, -6.0, 0.0, 2.0, 10.0])
    assert (norm.mean, norm.std, norm.clip) == (50.0, 25.0, (-100.0, 300.0))


def test_ct_default_maps_window_to_unit_range() -> None:
    y, _ = normalize_channel(
        torch.tensor([-5000.0, -1000.0, 0.0, 500.0, 3000.0]), make_spec().channels[0].effective_intensity()
    )
    np.testing.assert_allclose(y.numpy(), [-1.0, -1.0, 0.0, 0.5, 1.0])
    y, _ = normalize_channel(torch.tensor([0.0, 100.0, 200.0]), IntensitySpec(scheme="ct", clip=(0.0, 200.0)))
    np.testing.assert_allclose(y.numpy(), [-1.0, 0.0, 1.0])


def test_mr_zscore_per_channel() -> None:
    rng = np.random.default_rng(3)
    data = np.stack([rng.normal(500, 80, SHAPE), rng.normal(-20, 3, SHAPE)]).astype(np.float32)
    t = NormalizeChannelsd("image", [c.effective_intensity() for c in make_spec(("MR", "MR")).channels])
    out = t({"image": MetaTensor(torch.from_numpy(data))})["image"].numpy()
    for c in range(2):
        assert out[c].mean() == pytest.approx(0.0, abs=1e-4)
        assert out[c].std() == pytest.approx(1.0, abs=1e-4)


def test_mr_zscore_nonzero_uses_foreground_only() -> None:
    data = np.zeros(SHAPE, dtype=np.float32)
    fg = blob_labels() > 0
    data[fg] = np.random.default_rng(4).normal(300, 50, int(fg.sum()))
    spec = make_spec(("MR",), intensity=[{"scheme": "zscore", "nonzero": True}])
    out = build_preprocess(spec, label_key=None)(
        {"image": MetaTensor(torch.from_numpy(data[None]), affine=torch.eye(4))}
    )["image"].numpy()[0]
    assert out[fg].mean() == pytest.approx(0.0, abs=1e-4)
    assert out[fg].std() == pytest.approx(1.0, abs=1e-4)
    assert np.all(out[~fg] == 0.0)


def test_mixed_channels_and_inverse() -> None:
    spec = make_spec(("CT", "MR"), target_spacing=None)
    t = NormalizeChannelsd("image", [c.effective_intensity() for c in spec.channels])
    data = torch.stack(
        [torch.linspace(-1500, 1500, 2880).reshape(SHAPE), torch.linspace(1, 9, 2880).reshape(SHAPE)]
    )
    out = t({"image": MetaTensor(data)})["image"]
    assert float(out[0].min()) == -1.0
    assert float(out[0].max()) == 1.0
    assert float(out[1].mean()) == pytest.approx(0.0, abs=1e-5)
    recorded = out.applied_operations[-1]["extra_info"]["channels"]
    assert [r["scheme"] for r in recorded] == ["ct", "zscore"]
    back = t.inverse({"image": out})["image"]
    np.testing.assert_allclose(back[1].numpy(), data[1].numpy(), rtol=1e-5)  # z-score inverts
    np.testing.assert_allclose(
        back[0].numpy(), data[0].clamp(-1000, 1000).numpy(), atol=1e-3
    )  # clip does not


def test_scheme_none_and_constant_image() -> None:
    y, _ = normalize_channel(torch.tensor([3.0, -7.0]), IntensitySpec(scheme="none"))
    assert y.tolist() == [3.0, -7.0]
    y, norm = normalize_channel(torch.full((4, 4), 5.0), IntensitySpec(scheme="zscore"))
    assert torch.isfinite(y).all()
    assert float(y.abs().max()) == 0.0
    assert norm.std > 0


def test_channel_count_must_match_spec() -> None:
    transform = build_preprocess(make_spec(("CT", "MR")), label_key=None)
    with pytest.raises(InputError, match=r"must have 2 channel\(s\)"):
        transform({"image": volume(1, AFFINES["identity"])})


def test_channels_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="channels must hold"):
        NormalizeChannelsd("image", [])


# --- invert_to_source -----------------------------------------------------------------------


def test_invert_to_source_skips_intensity_and_accepts_tensor() -> None:
    affine = AFFINES["flipped"]
    transform = build_preprocess(make_spec(("CT",), (1.0, 1.0, 1.0)), label_key=None)
    out = transform({"image": volume(1, affine)})
    pred = torch.full((2, *out["image"].shape[1:]), 0.5)
    back = invert_to_source(pred, out["image"], transform)
    np.testing.assert_allclose(back.numpy(), 0.5, atol=1e-6)  # no "* std + mean" on predictions
    assert isinstance(back, MetaTensor)
    assert back.applied_operations == []


def test_invert_to_source_errors() -> None:
    affine = AFFINES["oblique"]
    transform = build_preprocess(make_spec(), label_key=None)
    out = transform({"image": volume(1, affine)})
    with pytest.raises(GeometryError, match="spatial shape"):
        invert_to_source(torch.zeros(1, 3, 3, 3), out, transform)
    with pytest.raises(InputError, match="must hold the key 'image'"):
        invert_to_source(out["image"], {"img": out["image"]}, transform)
    with pytest.raises(InputError, match="must be a MetaTensor"):
        invert_to_source(out["image"], out["image"].as_tensor(), transform)
    with pytest.raises(ValueError, match="mode must be"):
        invert_to_source(out["image"], out, transform, mode="cubic")  # type: ignore[arg-type]
    other = build_preprocess(make_spec(), label_key=None)
    with pytest.raises(InputError, match="applied operations"):
        invert_to_source(out["image"], out, other)


def test_spline_image_mode_inverts_linearly() -> None:
    affine = AFFINES["anisotropic"]
    transform = build_preprocess(make_spec(("MR",), (1.0, 1.0, 1.0)), image_mode=3)
    out = transform({"image": volume(1, affine), "label": label_tensor(affine)})
    probs = torch.softmax(torch.randn(2, *out["image"].shape[1:]), dim=0)
    back = invert_to_source(probs, out, transform)
    assert tuple(back.shape) == (2, *SHAPE)
    np.testing.assert_allclose(back.sum(0).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-5)
