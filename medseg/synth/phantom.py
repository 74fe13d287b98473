"""Synthetic multi-label phantoms that a plain intensity threshold cannot segment.

A phantom is a body-like elliptic cylinder (soft tissue with a fat rim, air outside) holding
three labelled structures, each about 1.5 noise standard deviations from its surroundings:

* ``1`` organ: a large, deformed and bent ellipsoid, brighter than the tissue around it;
* ``2`` lesion: a small blob inside the organ, darker than the organ (about tissue intensity);
* ``3`` vessel: a winding tube beside the organ, darker than the tissue.

Edges are blurred (partial volume), a smooth bias field and Gaussian noise (Rician for MR) are
added, and the voxel grid gets anisotropic spacing and a partly oblique affine (a rotation of up
to 15 degrees about one or two axes, a random origin and, for some seeds, a flipped axis).
Everything is drawn from ``seed``.

Examples:
    >>> image, label, affine = make_phantom(shape=(24, 20, 10), seed=1)
    >>> image.shape, label.dtype.name, sorted(np.unique(label).tolist())
    ((24, 20, 10), 'uint8', [0, 1, 2, 3])
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LABELS: dict[str, int] = {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
"""Label names and values of every phantom."""

_CT = {"air": -1000.0, "fat": -100.0, "tissue": 40.0, "contrast": 46.0, "noise": 25.0, "bias": 10.0}
_MR = {"air": 0.0, "fat": 900.0, "tissue": 400.0, "contrast": 74.0, "noise": 40.0, "bias": 0.12}


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    a, b = (i for i in range(3) if i != axis)
    rot = np.eye(3)
    rot[a, a], rot[a, b], rot[b, a], rot[b, b] = c, -s, s, c
    return rot


def phantom_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Draw a partly oblique RAS+ affine: small rotation, random origin, sometimes a flipped axis.

    Args:
        shape: Grid shape ``(X, Y, Z)``.
        spacing: Voxel size in mm.
        rng: Random generator.

    Returns:
        The 4x4 affine; its columns are orthogonal with norms equal to ``spacing``.
    """
    axes = rng.choice(3, size=int(rng.integers(1, 3)), replace=False)
    rot = np.eye(3)
    for axis in axes:
        rot = rot @ _rotation(int(axis), float(rng.uniform(-15.0, 15.0)))
    flips = np.ones(3)
    if rng.random() < 1 / 3:
        flips[int(rng.integers(0, 2))] = -1.0
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(np.asarray(spacing, dtype=np.float64) * flips)
    centre = rng.uniform(-60.0, 60.0, size=3)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def _smooth_field(coords: tuple[np.ndarray, ...], half: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth field in [-1, 1]-ish built from a few low-frequency cosines."""
    field = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)))
    for _ in range(3):
        freq = rng.uniform(0.3, 1.0, size=3) * np.pi / (2.0 * half)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        field = field + np.cos(freq[0] * coords[0] + freq[1] * coords[1] + freq[2] * coords[2] + phase)
    return field / 3.0


def _organ_mask(
    coords: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A deformed, bent ellipsoid rotated about z."""
    x, y, z = (c - m for c, m in zip(coords, centre, strict=True))
    angle = rng.uniform(0.0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    u = (ca * x + sa * y) / radii[0]
    v = (-sa * x + ca * y) / radii[1]
    w = z / radii[2]
    u = u + rng.uniform(-0.3, 0.3) * w**2  # bend along the long axis
    dist = np.sqrt(u**2 + v**2 + w**2)
    theta = np.arctan2(v, u)
    lobes = rng.uniform(0.08, 0.2, size=2)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=3)
    limit = (
        1.0
        + lobes[0] * np.sin(2.0 * theta + phases[0] + 1.5 * w)
        + lobes[1] * np.sin(3.0 * theta + phases[1])
        + 0.1 * np.sin(np.pi * w + phases[2])
    )
    return dist <= limit


def make_phantom(
    shape: tuple[int, int, int] = (64, 64, 32),
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
    seed: int = 0,
    modality: str = "CT",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one synthetic case: an image, its label map and its affine.

    Args:
        shape: Grid shape ``(X, Y, Z)``; each side must be at least 16 (X, Y) and 4 (Z).
        spacing: Voxel size in mm (anisotropic by default).
        seed: Seed; the same seed gives the same case, different seeds different shapes,
            sizes, positions, intensities and affines.
        modality: ``"CT"`` (HU: tissue about 40, air -1000, noise std about 25) or ``"MR"``
            (arbitrary positive units with Rician noise).

    Returns:
        ``(image, label, affine)``: ``image`` float32 with integer values, ``label`` uint8 with
        the values of :data:`LABELS`, ``affine`` a 4x4 RAS+ float64 matrix.

    Raises:
        ValueError: If shape, spacing or modality is invalid.
    """
    name = str(getattr(modality, "value", modality)).upper()
    if name not in ("CT", "MR"):
        msg = f"modality must be one of ['CT', 'MR'], got {modality!r}"
        raise ValueError(msg)
    if len(shape) != 3 or shape[0] < 16 or shape[1] < 16 or shape[2] < 4:
        msg = f"shape must be (X, Y, Z) with X, Y >= 16 and Z >= 4, got {shape}"
        raise ValueError(msg)
    if len(spacing) != 3 or min(spacing) <= 0:
        msg = f"spacing must be three positive sizes in mm, got {spacing}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    params = _CT if name == "CT" else _MR
    sp = np.asarray(spacing, dtype=np.float64)
    half = (np.asarray(shape) - 1) / 2.0 * sp
    coords = tuple(
        ((np.arange(n) - (n - 1) / 2.0) * s).reshape([-1 if a == ax else 1 for a in range(3)])
        for ax, (n, s) in enumerate(zip(shape, sp, strict=True))
    )
    x, y, z = coords

    # Body: an elliptic cylinder that wobbles slightly along z, with a fat rim.
    body_ax = half[:2] * rng.uniform([0.8, 0.68], [0.93, 0.85])
    wobble = 1.0 + 0.05 * np.sin(np.pi * z / half[2] + rng.uniform(0, 2 * np.pi))
    body_r = np.sqrt((x / (body_ax[0] * wobble)) ** 2 + (y / (body_ax[1] * wobble)) ** 2)
    body = body_r <= 1.0
    fat = body & (body_r > 1.0 - rng.uniform(0.08, 0.14))
    inner = body_r < 1.0 - 0.14 - min(2.5 * sp[:2].max() / body_ax.min(), 0.06)  # structures keep off the fat

    # Organ: large deformed ellipsoid, well inside the body.
    radii = np.array([*(body_ax * rng.uniform(0.3, 0.42, size=2)), half[2] * rng.uniform(0.45, 0.75)])
    radii = np.maximum(radii, 2.5 * sp)
    room = np.maximum(body_ax * 0.72 - 1.3 * radii[:2], 0.0)
    o_centre = np.array([*(rng.uniform(-1, 1, size=2) * room), rng.uniform(-0.2, 0.2) * half[2]])
    organ = _organ_mask(coords, o_centre, radii, rng) & inner

    # Vessel: a winding tube beside the organ, over most of the z range.
    v_radius = max(rng.uniform(0.1, 0.15) * body_ax.min(), 0.8 * sp[:2].max())
    direction = rng.uniform(0.0, 2.0 * np.pi)
    reach = radii[:2].max() + v_radius * rng.uniform(1.0, 2.5)
    v_base = o_centre[:2] + reach * np.array([np.cos(direction), np.sin(direction)])
    v_base = v_base * min(1.0, 0.6 / float(np.hypot(*(v_base / body_ax))))
    amp, phase = rng.uniform(0.05, 0.15) * body_ax.min(), rng.uniform(0, 2 * np.pi)
    cx = v_base[0] + amp * np.sin(np.pi * z / half[2] + phase)
    cy = v_base[1] + amp * np.cos(np.pi * z / half[2] + phase)
    z_lo, z_hi = np.sort(rng.uniform(-1.0, 1.0, size=2) * 0.4 + np.array([-0.6, 0.6]))
    in_range = (z >= z_lo * half[2] - sp[2]) & (z <= z_hi * half[2] + sp[2])
    vessel = ((x - cx) ** 2 + (y - cy) ** 2 <= v_radius**2) & in_range & inner

    # Lesion: a small ellipsoidal blob deep inside the organ, centred on one of its voxels.
    depth = ndimage.distance_transform_edt(organ, sampling=sp)
    deep = np.argwhere(depth >= 0.6 * depth.max())
    pick = deep[rng.integers(len(deep))]
    l_centre = pick * sp - half
    l_radii = np.maximum(depth[tuple(pick)] * rng.uniform(0.5, 0.8) * rng.uniform(0.8, 1.2, size=3), 0.8 * sp)
    lesion = ((x - l_centre[0]) / l_radii[0]) ** 2 + ((y - l_centre[1]) / l_radii[1]) ** 2
    lesion = (lesion + ((z - l_centre[2]) / l_radii[2]) ** 2 <= 1.0) & inner

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = LABELS["organ"]
    label[vessel] = LABELS["vessel"]
    label[lesion] = LABELS["lesion"]

    # Intensities: organ above tissue, lesion back down to about tissue, vessel below tissue.
    jitter = rng.uniform(-0.1, 0.1, size=4)
    contrast = params["contrast"]
    tissue = params["tissue"] * (1.0 + 0.1 * jitter[0])
    organ_v = tissue + contrast * (1.0 + jitter[1])
    values = np.full(shape, params["air"], dtype=np.float64)
    values[body] = tissue
    values[fat] = params["fat"] * (1.0 + 0.1 * jitter[0])
    values[label == LABELS["organ"]] = organ_v
    values[label == LABELS["lesion"]] = organ_v - contrast * (1.0 + jitter[2])
    values[label == LABELS["vessel"]] = tissue - contrast * (1.0 + jitter[3])
    values = ndimage.gaussian_filter(values, sigma=0.6 / sp * sp.min(), mode="nearest")

    field = _smooth_field(coords, half, rng)
    noise_std = params["noise"] * rng.uniform(0.9, 1.1)
    if name == "CT":
        values = values + params["bias"] * field
        values = values + rng.normal(0.0, noise_std, size=shape)
    else:
        values = values * (1.0 + params["bias"] * field)
        real = values + rng.normal(0.0, noise_std, size=shape)
        values = np.hypot(real, rng.normal(0.0, noise_std, size=shape))
    image = np.rint(values).astype(np.float32)
    return image, label, phantom_affine(shape, spacing, rng)
