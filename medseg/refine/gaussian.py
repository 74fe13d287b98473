"""A separable Gaussian filter on a grid, as one matrix product per axis, at reduced resolution.

The smoothness kernel of the dense CRF is a Gaussian in position only, so it separates into one
filter per axis. Each is applied as a dense matrix product along its axis (the banded Toeplitz matrix
of the Gaussian, zero outside the grid, built once per volume); along axes where the width is at least
3 voxels the values are mean-pooled first and the matrix also upsamples them back, which makes the
products cheap. Everything is linear in the number of voxels for a given axis length.

Examples:
    >>> g = SeparableGaussian((5,), (1.0,), torch.device("cpu"))
    >>> round(float(g.apply(torch.ones(1, 5))[0, 2]), 4)  # 1 + 2 exp(-1/2) + 2 exp(-2)
    2.4837
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Variance (in fine voxels^2) that mean-pooling by f and linear upsampling by f add to a kernel.
_RESAMPLE_VARIANCE = {1: 0.0, 2: 0.75, 3: 4.0 / 3.0, 4: 2.75}


class SeparableGaussian:
    """A Gaussian filter on a grid, zero outside it: one matrix product per axis, at reduced resolution.

    Along an axis where the width is at least 3 voxels, the values are first mean-pooled by a factor
    ``f`` (2 to 4, about width / 1.5); each axis is then filtered and linearly upsampled back in one
    matrix product, with a Gaussian narrowed so that pooling, filtering and upsampling together have
    the requested variance. Widths under 0.16 voxels are the identity.

    Args:
        shape: The grid's spatial shape.
        sigmas: The width per axis, in voxels.
        device: Where to build the per-axis matrices.

    Examples:
        >>> g = SeparableGaussian((5,), (1.0,), torch.device("cpu"))
        >>> round(float(g.apply(torch.ones(1, 5))[0, 2]), 4)  # 1 + 2 exp(-1/2) + 2 exp(-2)
        2.4837
    """

    def __init__(self, shape: Sequence[int], sigmas: Sequence[float], device: torch.device) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.factors = tuple(
            max(1, min(4, int(s / 1.5), n // 2)) if s >= 3.0 else 1 for n, s in zip(self.shape, sigmas)
        )
        self.coarse = tuple(-(-n // f) for n, f in zip(self.shape, self.factors))
        self._buffers: dict[int, torch.Tensor] = {}
        self.matrices: list[torch.Tensor | None] = []  # per axis (fine, coarse): filter, then upsample
        self.axis_ops: list[torch.Tensor] = []  # per axis (fine, fine): the whole operator
        for n, nc, f, sigma in zip(self.shape, self.coarse, self.factors, sigmas):
            if sigma < 0.16:
                self.matrices.append(None)
                self.axis_ops.append(torch.eye(n, device=device))
                continue
            sc = math.sqrt(sigma**2 - _RESAMPLE_VARIANCE[f]) / f
            i = torch.arange(nc, dtype=torch.float32, device=device)
            g = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / sc) ** 2) * f  # the fine kernel's mass
            up = _upsample_matrix(n, nc, f, device) @ g
            self.matrices.append(up)
            self.axis_ops.append(up @ _pool_matrix(n, nc, f, device))

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Filter ``(c, *shape)`` values along every axis.

        Not thread-safe: intermediate buffers are reused between calls.

        Args:
            x: The values.
            out: Optional contiguous ``(c, *shape)`` tensor for the result.

        Returns:
            The filtered values (``out`` if given).
        """
        c, ndim = x.shape[0], len(self.shape)
        sizes = list(self.shape)
        if any(f > 1 for f in self.factors):
            padded = [nc * f for nc, f in zip(self.coarse, self.factors)]
            x = x.reshape(1, c, *self.shape)
            if padded != sizes:
                x = F.pad(x, [p for n, pn in zip(reversed(sizes), reversed(padded)) for p in (0, pn - n)])
            pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
            x = pool(x, self.factors, self.factors)[0]
            sizes = list(self.coarse)
        steps = [axis for axis, up in enumerate(self.matrices) if up is not None]
        if not steps:
            return x.reshape(c, *self.shape) if out is None else out.copy_(x.reshape(c, *self.shape))
        for i, axis in enumerate(steps):
            up = self.matrices[axis]
            assert up is not None  # steps holds the axes that have a matrix
            before = c * math.prod(sizes[:axis])
            after = math.prod(sizes[axis + 1 :])
            sizes[axis] = self.shape[axis]
            if i < len(steps) - 1:
                dest = self._buffer(i, c * math.prod(sizes), x)
            else:
                dest = torch.empty(c, *self.shape, dtype=x.dtype, device=x.device) if out is None else out
            if after == 1:
                torch.mm(x.reshape(-1, up.shape[1]), up.T, out=dest.view(-1, sizes[axis]))
            else:
                torch.matmul(
                    up, x.reshape(before, up.shape[1], after), out=dest.view(before, sizes[axis], after)
                )
            x = dest
        return x.view(c, *self.shape)

    def _buffer(self, step: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(step)
        if buf is None or buf.numel() != numel or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[step] = buf
        return buf

    def scale_outputs_(self, factors: Sequence[torch.Tensor]) -> None:
        """Multiply the output along each axis by per-axis factors (folded into the matrices).

        Axes without a matrix (the identity) must have unit factors.
        """
        for axis, (up, f) in enumerate(zip(self.matrices, factors)):
            if up is None:
                if not torch.allclose(f, torch.ones_like(f)):
                    msg = f"factors for axis {axis} must be ones (the axis is not filtered), got {f.tolist()}"
                    raise ValueError(msg)
                continue
            up.mul_(f[:, None])


def _pool_matrix(n: int, nc: int, f: int, device: torch.device) -> torch.Tensor:
    """``(nc, n)``: mean over each group of ``f`` voxels, the grid zero-padded to ``nc * f``."""
    i = torch.arange(n, device=device)
    m = torch.zeros(nc, n, device=device)
    m[i // f, i] = 1.0 / f
    return m


def _upsample_matrix(n: int, nc: int, f: int, device: torch.device) -> torch.Tensor:
    """``(n, nc)``: linear interpolation by ``f``, as ``F.interpolate(align_corners=False)``."""
    if f == 1:
        return torch.eye(n, device=device)
    src = ((torch.arange(n, dtype=torch.float64, device=device) + 0.5) / f - 0.5).clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=nc - 1)
    i1 = (i0 + 1).clamp_(max=nc - 1)
    lam = (src - i0).float()
    m = torch.zeros(n, nc, device=device)
    rows = torch.arange(n, device=device)
    m.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    m.index_put_((rows, i1), lam, accumulate=True)
    return m


def outer(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Outer product of per-axis vectors, as a grid."""
    out = vectors[0]
    for v in vectors[1:]:
        out = out[..., None] * v
    return out
