"""Dense (fully connected) CRF refinement of segmentation probabilities, 2D and 3D, CPU and CUDA.

Mean-field inference for the CRF of Krähenbühl & Koltun (2011), "Efficient inference in fully
connected CRFs with Gaussian edge potentials", as DeepLab used it, matching the kernel definitions of
their reference implementation (pydensecrf): unary ``-log p`` from the stitched softmax, a Gaussian
smoothness kernel on position and a bilateral appearance kernel on position and intensity (any number
of channels), each normalised symmetrically, with Potts or a configurable label compatibility.

Message passing over all voxel pairs is never ``O(N^2)``:

* the smoothness kernel is separable, so it is applied as one matrix product per axis
  (:class:`~medseg.refine.gaussian.SeparableGaussian`, at reduced resolution for wide kernels), and
  its normalisation is an outer product of per-axis sums;
* the bilateral kernel uses a :class:`~medseg.refine.lattice.PermutohedralLattice` built once per
  volume: splat, blur and slice cost ``O(N (d+1))`` per iteration.

Both kernels use only ``K - 1`` label channels: the filtered last label follows from the sum
``sum_l Q_l = 1``, precomputed once.

Full scans are refined with bounded memory (:mod:`~medseg.refine.blocks`): only the box around the
predicted foreground (grown by a margin) is refined, and a box larger than ``max_block_voxels`` is cut
into slabs along one axis, each refined with a halo of at least three kernel widths and only its core
kept.

Performance notes (CPU): the work is many short whole-array operations, so on a shared machine whose
cores are taken, OpenMP threads that spin-wait for a descheduled partner make it many times slower;
``DenseCRFConfig.threads = 0`` therefore refines on one thread when the load average says the cores
are busy (and for small blocks). Large volumes allocate several GB of working memory, which glibc
would map and zero afresh on every allocation: while blocks are refined, freed memory is kept for
reuse (:func:`~medseg.refine.memory.reuse_freed_memory`) and given back afterwards.

Examples:
    >>> probs = torch.tensor([[0.9, 0.6, 0.2, 0.1], [0.1, 0.4, 0.8, 0.9]])[:, :, None].expand(2, 4, 3)
    >>> image = torch.tensor([0.0, 0.0, 1.0, 1.0])[None, :, None].expand(1, 4, 3)
    >>> q = dense_crf(probs, image, (1.0, 1.0), DenseCRFConfig(roi_margin_mm=None))
    >>> q.argmax(0)[:, 0].tolist()
    [0, 0, 1, 1]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator, Sequence

import numpy as np
import torch

from medseg.config.refine import DenseCRFConfig
from medseg.errors import InputError
from medseg.refine.blocks import CRFInfo, cpu_threads, foreground_box, plan_blocks, threads_for
from medseg.refine.gaussian import SeparableGaussian, outer
from medseg.refine.lattice import PermutohedralLattice
from medseg.refine.memory import reuse_freed_memory

_EPS = 1e-20


def _check_inputs(probs: torch.Tensor, image: torch.Tensor, spacing: Sequence[float]) -> None:
    if probs.ndim not in (3, 4) or probs.shape[0] < 2:
        msg = f"probs must be (K, X, Y) or (K, X, Y, Z) with K >= 2 labels, got shape {tuple(probs.shape)}"
        raise InputError(msg)
    if image.ndim != probs.ndim or image.shape[1:] != probs.shape[1:]:
        msg = (
            f"image must be (C, *spatial) on the grid of probs {tuple(probs.shape[1:])}, "
            f"got shape {tuple(image.shape)}"
        )
        raise InputError(msg)
    if len(spacing) != probs.ndim - 1 or not all(math.isfinite(s) and s > 0 for s in spacing):
        msg = f"spacing must give {probs.ndim - 1} positive values in mm, got {tuple(spacing)}"
        raise InputError(msg)


def _compatibility(cfg: DenseCRFConfig, k: int, device: torch.device) -> torch.Tensor | None:
    """The symmetrised ``K x K`` compatibility matrix, or ``None`` for Potts."""
    if cfg.compatibility == "potts":
        return None
    mu = torch.tensor(cfg.compatibility, dtype=torch.float32, device=device)
    if mu.shape != (k, k):
        msg = f"compatibility must be a {k} x {k} matrix for {k} labels, got {tuple(mu.shape)}"
        raise InputError(msg)
    return 0.5 * (mu + mu.T)


def _bilateral_features(
    image: torch.Tensor, spacing: Sequence[float], sigma_mm: float, sigmas: Sequence[float]
) -> torch.Tensor:
    """``(ndim + C, N)`` features: position in mm over ``sigma_mm``, intensity over its width."""
    shape = image.shape[1:]
    n = math.prod(shape)
    feats = torch.empty(len(shape) + image.shape[0], n, device=image.device)
    for axis, (size, sp) in enumerate(zip(shape, spacing)):
        pos = torch.arange(size, dtype=torch.float32, device=image.device) * (sp / sigma_mm)
        view = [1] * len(shape)
        view[axis] = size
        feats[axis].view(shape).copy_(pos.view(view).expand(shape))
    for c, s in enumerate(sigmas):
        torch.div(image[c].reshape(-1).float(), s, out=feats[len(shape) + c])
    return feats


def _softmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Softmax over the label axis (0), written into ``out`` (no new allocation where supported)."""
    try:
        return torch.ops.aten._softmax.out(x, 0, False, out=out)
    except (AttributeError, RuntimeError):  # pragma: no cover - a build without the out= variant
        return out.copy_(torch.softmax(x, 0))


def _softmax_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Softmax over the label axis (0) of ``(k, n)`` values, in place, with ``(n,)`` scratch."""
    torch.amax(x, 0, out=tmp)
    x.sub_(tmp).exp_()
    torch.sum(x, 0, out=tmp)
    return x.div_(tmp)


def mean_field(
    probs: torch.Tensor, image: torch.Tensor, spacing: Sequence[float], cfg: DenseCRFConfig
) -> torch.Tensor:
    """Mean-field inference of the dense CRF on a whole (small enough) grid.

    Args:
        probs: ``(K, *spatial)`` probabilities (2D or 3D).
        image: ``(C, *spatial)`` normalised image.
        spacing: Voxel spacing in mm, one per spatial axis.
        cfg: The CRF settings (``roi_margin_mm`` and ``max_block_voxels`` are not used here).

    Returns:
        ``(K, *spatial)`` float32 marginals, on the device of ``probs``.
    """
    k, shape = probs.shape[0], tuple(probs.shape[1:])
    n = math.prod(shape)
    device = probs.device
    mu = _compatibility(cfg, k, device)
    # a fresh row-major copy whatever the input's strides (a permuted tensor reshapes to a strided
    # view, and ``to(copy=True)`` would keep those strides; the in-place steps below assume rows)
    log_p = torch.empty(k, n, device=device)
    log_p.copy_(probs.reshape(k, n)).clamp_(min=cfg.min_probability).log_()
    tmp = torch.empty(n, device=device)  # one label's worth of scratch
    q = _softmax_(log_p.clone(), tmp)
    if cfg.iterations == 0 or (cfg.spatial_weight == 0 and cfg.bilateral_weight == 0):
        return q.reshape(k, *shape)

    # Each kernel filters the first k-1 labels' Q, normalised (out: (k-1, n), a view), and knows the
    # filtered sum over all labels (the normalised filter of sum_l Q_l = 1), which gives the last.
    kernels: list[tuple[float, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = []
    if cfg.spatial_weight > 0:
        gauss = SeparableGaussian(shape, [cfg.spatial_sigma_mm / s for s in spacing], device)
        inv_sqrt = [torch.rsqrt(op.sum(1) + _EPS) for op in gauss.axis_ops]
        norm_s = outer(inv_sqrt).reshape(n)
        total_s = norm_s * outer([op @ u for op, u in zip(gauss.axis_ops, inv_sqrt)]).reshape(n)
        gauss.scale_outputs_(inv_sqrt)  # the output side of the normalisation, folded in
        s_in = torch.empty(k - 1, n, device=device)
        s_out = torch.empty(k - 1, *shape, device=device)

        def spatial(values: torch.Tensor, gauss=gauss, norm_s=norm_s, bufs=(s_in, s_out)) -> torch.Tensor:
            torch.mul(values, norm_s, out=bufs[0])
            return gauss.apply(bufs[0].view(-1, *shape), out=bufs[1]).view(-1, n)

        kernels.append((cfg.spatial_weight, spatial, total_s))
    if cfg.bilateral_weight > 0:
        sigmas = cfg.intensity_sigmas(image.shape[0])
        feats = _bilateral_features(image.to(device), spacing, cfg.bilateral_sigma_mm, sigmas)
        lattice = PermutohedralLattice(feats)
        del feats
        lattice.scale_(lattice.filter_ones().add_(_EPS).rsqrt_())  # normalised symmetrically
        total_b = lattice.filter_ones()
        b_out = torch.empty(n, k - 1, device=device)

        def bilateral(values: torch.Tensor, lattice=lattice, out=b_out) -> torch.Tensor:
            return lattice.filter(values.T, out=out).T

        kernels.append((cfg.bilateral_weight, bilateral, total_b))

    # Potts (pydensecrf's sign convention): logits_l = log p_l + sum_m w_m filtered_m(Q)_l, and for
    # the last label filtered_m(Q)_(k-1) = total_m - sum_(l < k-1) filtered_m(Q)_l, so
    # logits_(k-1) = const - sum_(l < k-1) logits_l with const = sum_l log p_l + sum_m w_m total_m.
    # A matrix compatibility mu costs mu @ filtered instead.
    logits = torch.empty(k, n, device=device)
    if mu is None:
        const = log_p.sum(0)
        for weight, _, total in kernels:
            const.add_(total, alpha=weight)
    for _ in range(cfg.iterations):
        for i, (weight, apply, total) in enumerate(kernels):
            filtered = apply(q[: k - 1])
            if i == 0:
                torch.mul(filtered, weight, out=logits[: k - 1])
            else:
                logits[: k - 1].add_(filtered, alpha=weight)
            if mu is not None:  # the last label's message too
                torch.sum(filtered, 0, out=tmp)
                torch.sub(total, tmp, out=tmp)
                if i == 0:
                    torch.mul(tmp, weight, out=logits[k - 1])
                else:
                    logits[k - 1].add_(tmp, alpha=weight)
        if mu is None:
            logits[: k - 1].add_(log_p[: k - 1])
            torch.sum(logits[: k - 1], 0, out=tmp)
            torch.sub(const, tmp, out=logits[k - 1])
        else:
            logits = torch.sub(log_p, mu @ logits)
        _softmax_into(logits, q)
    return q.reshape(k, *shape)


def as_plain_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A plain tensor without copying: MONAI's MetaTensor loses its metadata, and a NumPy array (say a
    memory-mapped ``.npy`` of stitched probabilities) is wrapped, read-only ones included."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(x)
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def plan_crf(
    probs: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    cfg: DenseCRFConfig,
) -> CRFInfo:
    """Check the inputs and plan the CRF: the refined box and its blocks (none if it does not run).

    Raises:
        InputError: If the shapes, the spacing, the intensity widths or the compatibility matrix do not
            fit together.
    """
    probs, image = as_plain_tensor(probs), as_plain_tensor(image)
    _check_inputs(probs, image, spacing)
    try:
        cfg.intensity_sigmas(image.shape[0])
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    _compatibility(cfg, probs.shape[0], torch.device("cpu"))
    if not cfg.enabled:
        return CRFInfo(None, ())
    spacing = tuple(float(s) for s in spacing)
    if cfg.roi_margin_mm is None:
        roi: tuple[tuple[int, int], ...] | None = tuple((0, n) for n in probs.shape[1:])
    else:
        roi = foreground_box(as_plain_tensor(probs), spacing, cfg.roi_margin_mm)
    if roi is None:
        return CRFInfo(None, ())
    return CRFInfo(roi, plan_blocks(roi, spacing, cfg))


def iter_blocks(
    probs: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    cfg: DenseCRFConfig,
    info: CRFInfo,
) -> Generator[tuple[tuple[slice, ...], torch.Tensor], None, None]:
    """Refine block by block; yield each block's core (as slices of the grid) and its marginals."""
    probs, image = as_plain_tensor(probs), as_plain_tensor(image)
    spacing = tuple(float(s) for s in spacing)
    with reuse_freed_memory():  # until the last block is taken (or the generator is closed)
        for block in info.blocks:
            read = (slice(None), *(slice(a, b) for a, b in block.padded))
            with cpu_threads(threads_for(block.voxels, cfg.threads, probs.device)):
                q = mean_field(probs[read], image[read].to(probs.device), spacing, cfg)
            keep = (
                slice(None),
                *(slice(c0 - p0, c1 - p0) for (c0, c1), (p0, _) in zip(block.core, block.padded)),
            )
            yield tuple(slice(a, b) for a, b in block.core), q[keep]


def dense_crf_with_info(
    probs: torch.Tensor, image: torch.Tensor, spacing: Sequence[float], cfg: DenseCRFConfig
) -> tuple[torch.Tensor, CRFInfo]:
    """:func:`dense_crf`, also saying which region was refined and in which blocks."""
    info = plan_crf(probs, image, spacing, cfg)
    if not info.blocks:
        return probs, info
    probs = as_plain_tensor(probs)
    whole = tuple((0, n) for n in probs.shape[1:])
    if len(info.blocks) == 1 and info.blocks[0].padded == whole:
        blocks = iter_blocks(probs, image, spacing, cfg, info)
        try:
            return next(blocks)[1], info
        finally:
            blocks.close()
    out = as_plain_tensor(probs).float().clone()
    for core, q in iter_blocks(probs, image, spacing, cfg, info):
        out[(slice(None), *core)] = q
    return out, info


def dense_crf(
    probs: torch.Tensor, image: torch.Tensor, spacing: Sequence[float], cfg: DenseCRFConfig
) -> torch.Tensor:
    """Refine class probabilities with a fully connected CRF.

    Args:
        probs: ``(K, X, Y)`` or ``(K, X, Y, Z)`` softmax probabilities (e.g. stitched), CPU or CUDA; a
            NumPy array (a memory-mapped file, float16 or float32) is read block by block.
        image: ``(C, *spatial)`` image on the same grid, normalised (intensity widths are in its units).
        spacing: Voxel spacing in mm per spatial axis (e.g. ``spacing_from_affine(affine)``).
        cfg: The CRF settings.

    Returns:
        ``(K, *spatial)`` float32 marginals on the device of ``probs``; outside the refined box (see
        ``cfg.roi_margin_mm``) they equal ``probs``. With ``cfg.enabled`` false, ``probs`` itself.

    Raises:
        InputError: If the shapes or the spacing do not fit together, or the compatibility matrix does
            not match the number of labels.
    """
    return dense_crf_with_info(probs, image, spacing, cfg)[0]
