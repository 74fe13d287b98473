"""A permutohedral lattice in vectorised PyTorch: Gaussian filtering in a high-dimensional feature space.

This is the lattice of Adams, Baek & Davis (2010), "Fast high-dimensional filtering using the
permutohedral lattice", as used by Krähenbühl & Koltun's dense CRF (and so by pydensecrf), written
with whole-tensor operations so that it runs on the CPU (multi-threaded) and on CUDA alike:

* **build** (once per volume and kernel): every point's ``d`` features are lifted onto the plane
  ``H_d`` of ``R^(d+1)``, the enclosing simplex is found by rounding and ranking (ties broken as the
  C++ code does), and its ``d+1`` barycentric weights are kept. The C++ hash table becomes sorting:
  each point's simplex is packed into one ``int64`` key, points are grouped by key within blocks of
  consecutive points (cache-sized sorts; a simplex's run of points in one block is a *piece*), and
  the simplices' vertices are deduplicated by a much smaller sort. Blur neighbours are found by
  binary search among the sorted vertex keys.
* **filter** (every mean-field iteration): *splat* the values onto the vertices (gather them into
  piece order, sum each piece's run per remainder, then sum the pieces per vertex), *blur* with
  ``[1/2, 1, 1/2]`` along each of the ``d+1`` lattice directions, and *slice* back with the same
  weights. All of these are sparse (CSR) matrix products built once, ``d+1`` entries per point.

Cost and memory are linear in the number of points (times ``d+1``); nothing is ``O(N^2)``. The filter
approximates ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (the point itself included) up to a
global scale, which the dense CRF's kernel normalisation removes.

Examples:
    >>> feats = torch.arange(10.0)[None] / 2.0  # 10 points on a line, sigma = 2
    >>> lattice = PermutohedralLattice(feats)
    >>> out = lattice.filter(torch.ones(10, 1))
    >>> bool(out[5, 0] > out[0, 0])  # the middle has more neighbours than the end
    True
"""

from __future__ import annotations

import math
import warnings

import torch

_MAX_PACKED_BITS = 62


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix with int32 indices where they fit (half the index traffic of int64)."""
    dtype = torch.int32 if max(col.numel(), *size) < 2**31 - 1 else torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow.to(dtype), col.to(dtype), val, size=size, check_invariants=False)


def _pack_with(
    rows: torch.Tensor | list[torch.Tensor],
    low: torch.Tensor,
    radix: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixed-radix packing of integer rows (``row - low`` in ``[0, radix)``) into one int64 per column.

    Order-preserving (lexicographic by row); the caller checks that the radices fit in 62 bits.
    """
    radix_list, low_list = [int(r) for r in radix], [int(v) for v in low]
    place, offset = 1, 0
    places = []
    for j in range(len(radix_list) - 1, -1, -1):
        places.append(place)
        offset += low_list[j] * place
        place *= radix_list[j]
    places.reverse()
    keys = torch.empty(rows[0].shape[0], dtype=torch.int64, device=rows[0].device) if out is None else out
    keys.fill_(-offset)
    for row, p in zip(rows, places):
        keys.add_(row, alpha=p)
    return keys


def _unpack(keys: torch.Tensor, low: torch.Tensor, radix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_with`: ``(m, n)`` int64 rows from ``n`` packed keys."""
    rows = torch.empty(len(radix), keys.numel(), dtype=torch.int64, device=keys.device)
    rest = keys.clone()
    for j in range(len(radix) - 1, -1, -1):
        rows[j] = rest % radix[j] + low[j]
        rest = torch.div(rest, radix[j], rounding_mode="floor")
    return rows


class PermutohedralLattice:
    """A permutohedral lattice built once over ``N`` points with ``d`` features, then used to filter.

    Args:
        features: ``(d, N)`` float features (one row per feature, as pydensecrf), already divided by
            the kernel widths so that the kernel is a unit Gaussian in feature space.
        chunk: Points processed at a time while lifting them (bounds the temporaries).
        block: Consecutive points grouped by one sort (cache-sized sorts are much faster).

    Raises:
        ValueError: If ``features`` is not a non-empty 2D tensor, or spans too wide a range.

    Attributes:
        n_points: ``N``.
        dim: ``d``.
        n_simplices: Occupied simplices.
        n_vertices: Occupied lattice vertices.
    """

    def __init__(self, features: torch.Tensor, chunk: int = 1 << 17, block: int = 1 << 20) -> None:
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            msg = f"features must be a non-empty (d, N) tensor, got shape {tuple(features.shape)}"
            raise ValueError(msg)
        device = features.device
        d, n = features.shape
        self.n_points, self.dim = n, d
        alpha = 1.0 / (1.0 + 2.0 ** (-d))  # Adams et al.'s constant (cancels in a normalised kernel)

        # Simplex keys: a point's simplex is its remainder-0 corner (first d coordinates, divided by
        # d+1) and the ranks of its first d coordinates, packed into one int64 with ranges bounded
        # from the features' ranges. Its barycentric weights are kept too.
        low, radix = _corner_bounds(features, d)
        if float(torch.log2(radix.double()).sum()) > _MAX_PACKED_BITS:
            msg = f"lattice keys must fit in 62 bits, got feature ranges {radix.tolist()}"
            raise ValueError(msg)
        keys = torch.empty(n, dtype=torch.int64, device=device)
        weights = torch.empty(d + 1, n, device=device)
        slice_val = torch.empty(n, d + 1, device=device)  # the same, point-major, times alpha
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            corner, rank, weights[:, a:b] = _enclosing_simplex(features[:, a:b].float())
            _pack_with([*corner, *rank], low, radix, out=keys[a:b])
            torch.mul(weights[:, a:b].T, alpha, out=slice_val[a:b])
        del corner, rank

        # Group the points by simplex within blocks of consecutive points (the hash table of the C++
        # code; sorting blocks that fit in cache is several times faster than one global sort): a
        # "piece" is a simplex's run of points in one block, contiguous in ``order``.
        order = torch.empty(n, dtype=torch.int64, device=device)
        new = torch.ones(n, dtype=torch.bool, device=device)
        for a in range(0, n, block):
            b = min(n, a + block)
            sorted_keys, _ = torch.sort(keys[a:b], stable=True, out=(torch.empty_like(keys[a:b]), order[a:b]))
            keys[a:b] = sorted_keys  # a block-sized temporary, reused by the allocator
            order[a:b].add_(a)
            torch.ne(keys[a + 1 : b], keys[a : b - 1], out=new[a + 1 : b])
        del sorted_keys
        starts = new.nonzero().squeeze(1)
        n_pieces = int(starts.numel())
        counts = torch.diff(starts, append=torch.tensor([n], device=device))
        piece_of = torch.empty(n, dtype=torch.int32, device=device)
        piece_of[order] = torch.cumsum(new, 0, dtype=torch.int32) - 1
        del new
        simplex_keys, simplex_of_piece = torch.unique(keys[starts], return_inverse=True)
        first_point = order[starts]  # a piece's first point is its lowest index (stable sort)
        del keys, starts
        s = int(simplex_keys.numel())
        self.n_simplices = s

        # The simplices' vertices: key_r = corner * (d+1) + canonical[r, rank] (first d coordinates),
        # canonical[r, k] = r if k <= d - r else r - (d+1), so each coordinate is within d of the corner's.
        rows = _unpack(simplex_keys, low, radix)  # (2d, S): corner, then ranks
        del simplex_keys
        v_low = low[:d] * (d + 1) - d
        v_radix = (radix[:d] - 1) * (d + 1) + 2 * d + 1
        if float(torch.log2(v_radix.double()).sum()) > _MAX_PACKED_BITS:
            msg = "lattice vertex keys must fit in 62 bits, got features spanning too wide a range"
            raise ValueError(msg)
        vertex_keys = torch.empty(d + 1, s, dtype=torch.int64, device=device)  # [r, s]
        for r in range(d + 1):
            coords = [rows[j] * (d + 1) + torch.where(rows[d + j] <= d - r, r, r - (d + 1)) for j in range(d)]
            vertex_keys[r] = _pack_with(coords, v_low, v_radix)
        del rows, coords
        vertex_keys, vertex_of = torch.unique(vertex_keys.view(-1), return_inverse=True)  # vertex_of: r*S + s
        m = int(vertex_keys.numel())
        self.n_vertices = m
        piece_vertices = vertex_of.reshape(d + 1, s)[:, simplex_of_piece]  # (d+1, pieces)
        del vertex_of, simplex_of_piece
        # Number the vertices in the order the points first touch them: neighbouring points then
        # share nearby vertex ids, which keeps the slice's reads in cache on big volumes.
        first = torch.full((m,), n, dtype=torch.int64, device=device)
        first.scatter_reduce_(0, piece_vertices.reshape(-1), first_point.repeat(d + 1), "amin")
        by_first = torch.argsort(first)
        del first, first_point
        new_id = torch.empty(m, dtype=torch.int32, device=device)
        new_id[by_first] = torch.arange(m, dtype=torch.int32, device=device)
        piece_vertices = new_id[piece_vertices]
        del new_id
        self._blur = self._blur_matrices(_unpack(vertex_keys, v_low, v_radix)[:, by_first])
        del vertex_keys, by_first

        # Slice: rows points, d+1 entries each (vertex id, weight * alpha).
        slice_col = piece_vertices.T.contiguous().index_select(0, piece_of)
        del piece_of
        s_crow = torch.arange(0, n * (d + 1) + 1, d + 1, device=device)
        self._slice = _csr(s_crow, slice_col.view(-1), slice_val.view(-1), (n, m))
        del slice_val
        del slice_col

        # Splat in two sparse products over the values gathered into ``order``: first, for each
        # remainder r, the weighted sum over each piece's contiguous run of points (one matrix per r,
        # sharing its structure), then per vertex, the sum over the (r, piece) pairs it is a corner of.
        crow = torch.zeros(n_pieces + 1, dtype=torch.int64, device=device)
        crow[1:] = counts.cumsum(0)
        cols = torch.arange(n, dtype=torch.int32, device=device)
        grouped_weights = weights.index_select(1, order)  # piece order
        self._splat_pieces = [_csr(crow, cols, grouped_weights[r], (n_pieces, n)) for r in range(d + 1)]
        del crow, cols, counts, weights
        self._order = order.int()
        del order
        self._cache: tuple[tuple[int, bool], torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._grid_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        pair_vertex = piece_vertices.view(-1).long()  # pair r * pieces + piece
        del piece_vertices
        v_crow = torch.zeros(m + 1, dtype=torch.int64, device=device)
        v_crow[1:] = torch.bincount(pair_vertex, minlength=m).cumsum(0)
        ones = torch.ones(pair_vertex.numel(), device=device)
        self._splat_vertices = _csr(v_crow, torch.argsort(pair_vertex), ones, (m, (d + 1) * n_pieces))

    def _blur_matrices(self, coords: torch.Tensor) -> list[torch.Tensor]:
        """Per lattice direction, ``I + (N_-1 + N_+1) / 2`` as a CSR matrix over the ``M`` vertices.

        The neighbours along direction ``j`` of a vertex with key ``k`` are ``k -+ 1`` with coordinate
        ``j`` replaced by ``k_j +- d`` (for ``j = d``, the implied last coordinate, ``k -+ 1`` only).
        Absent neighbours hold zero and are left out.
        """
        d, m = coords.shape
        low = coords.amin(1) - d
        radix = coords.amax(1) + d - low + 1
        keys, key_order = torch.sort(_pack_with(coords, low, radix))
        rows = torch.arange(m, device=coords.device)
        out = []
        for j in range(d + 1):
            cols, vals, owners = [rows], [torch.ones(m, device=coords.device)], [rows]
            for sign in (-1, 1):
                nb = coords + sign
                if j < d:
                    nb[j] = coords[j] - sign * d
                nb_keys = _pack_with(nb, low, radix)
                pos = torch.searchsorted(keys, nb_keys).clamp_(max=m - 1)
                found = keys[pos] == nb_keys
                owners.append(rows[found])
                cols.append(key_order[pos[found]])
                vals.append(torch.full((int(found.sum()),), 0.5, device=coords.device))
            owner, col, val = torch.cat(owners), torch.cat(cols), torch.cat(vals)
            order = torch.argsort(owner, stable=True)
            crow = torch.zeros(m + 1, dtype=torch.int64, device=coords.device)
            crow[1:] = torch.bincount(owner, minlength=m).cumsum(0)
            out.append(_csr(crow, col[order], val[order], (m, m)))
        return out

    def _buffers(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The values' storage as a flat vector, the gather index into it, and the work buffers.

        Row-major ``(N, c)`` values and transposed ``(c, N)`` ones (``x.T`` of a contiguous tensor) are
        read in place; anything else is copied first. Buffers are kept for the latest layout only.
        """
        c = values.shape[1]
        transposed = c > 1 and values.T.is_contiguous()
        flat = values.T.reshape(-1) if transposed else values.contiguous().view(-1)
        key = (c, transposed)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old buffers first
            device = values.device
            index = torch.empty(self.n_points, c, dtype=torch.int32, device=device)
            for ch in range(c):
                if transposed:  # element (p, ch) at ch * N + p
                    torch.add(self._order, ch * self.n_points, out=index[:, ch])
                else:  # element (p, ch) at p * c + ch
                    torch.add(self._order * c, ch, out=index[:, ch])
            grouped = torch.empty(self.n_points, c, dtype=values.dtype, device=device)
            n_pieces = self._splat_pieces[0].shape[0]
            pieces = torch.empty(len(self._splat_pieces), n_pieces, c, dtype=values.dtype, device=device)
            self._cache = (key, index.view(-1), grouped, pieces)
        return flat, self._cache[1], self._cache[2], self._cache[3]

    def scale_(self, factors: torch.Tensor) -> PermutohedralLattice:
        """Scale the kernel by per-point factors on both sides: ``filter`` becomes ``diag(f) K diag(f)``.

        This folds a symmetric kernel normalisation into the splat and slice weights.

        Args:
            factors: ``(N,)`` positive factors.

        Returns:
            The lattice itself.
        """
        self._slice.values().view(self.n_points, -1).mul_(factors[:, None])
        grouped = factors.index_select(0, self._order)
        for splat in self._splat_pieces:
            splat.values().mul_(grouped)
        return self

    def filter(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Approximate Gaussian filtering of per-point values in feature space.

        Not thread-safe: work buffers are reused between calls.

        Args:
            values: ``(N, c)`` float32 values, one row per point (a transposed ``(c, N)`` tensor is read
                in place).
            out: Optional contiguous ``(N, c)`` float32 tensor to write the result into.

        Returns:
            ``(N, c)`` filtered values (each point's own value included); ``out`` if given.
        """
        flat, index, grouped, pieces = self._buffers(values)
        # Splat: gather the values into piece order, then sum per (r, piece) and per vertex.
        torch.index_select(flat, 0, index, out=grouped.view(-1))
        return self._splat_blur_slice(grouped, pieces, out)

    def _grids(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two ``(n_vertices, c)`` work buffers for the blur, kept for the latest ``c`` only."""
        c = like.shape[1]
        pair = self._grid_pair
        if pair is None or pair[0].shape[1] != c or pair[0].dtype != like.dtype:
            self._grid_pair = None  # free the old pair first
            pair = (
                torch.empty(self.n_vertices, c, dtype=like.dtype, device=like.device),
                torch.empty(self.n_vertices, c, dtype=like.dtype, device=like.device),
            )
            self._grid_pair = pair
        return pair[0], pair[1]

    def filter_ones(self) -> torch.Tensor:
        """``filter`` of all-ones values, ``(N,)`` (no gather needed: ones in any order are ones)."""
        ones = torch.ones(self.n_points, 1, device=self._order.device)
        n_pieces = self._splat_pieces[0].shape[0]
        pieces = torch.empty(len(self._splat_pieces), n_pieces, 1, device=ones.device)
        return self._splat_blur_slice(ones, pieces, None)[:, 0]

    def _splat_blur_slice(
        self, grouped: torch.Tensor, pieces: torch.Tensor, out: torch.Tensor | None
    ) -> torch.Tensor:
        # addmm with beta=0 writes straight into its destination (no zero-fill, no copy).
        for r, splat in enumerate(self._splat_pieces):
            torch.addmm(pieces[r], splat, grouped, beta=0.0, out=pieces[r])
        grid, spare = self._grids(grouped)
        torch.addmm(grid, self._splat_vertices, pieces.view(-1, grouped.shape[1]), beta=0.0, out=grid)
        # Blur along each lattice direction with [1/2, 1, 1/2], between two kept buffers: fresh
        # lattice-sized tensors every call would be mapped and zeroed by the kernel each time, which
        # made the cost grow faster than the volume.
        for blur in self._blur:
            torch.addmm(spare, blur, grid, beta=0.0, out=spare)
            grid, spare = spare, grid
        # Slice.
        if out is None:
            out = torch.empty(self.n_points, grouped.shape[1], dtype=grouped.dtype, device=grouped.device)
        return torch.addmm(out, self._slice, grid, beta=0.0, out=out)


def _corner_bounds(features: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets and radices to pack (corner, ranks) keys, from the features' ranges.

    The elevated coordinate ``el_j = sum_{i >= j} cf_i - j cf_(j-1)`` (``cf`` the scaled features) is
    bounded by the features' ranges; the corner is ``el_j / (d+1)`` rounded and shifted by at most one
    (the wrap), so its range is known before any point is visited (with a margin for rounding).
    """
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = [inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)]
    lo = [float(v) * s for v, s in zip(features.amin(1).tolist(), scale)]
    hi = [float(v) * s for v, s in zip(features.amax(1).tolist(), scale)]
    low, radix = [], []
    for j in range(d):
        if j == 0:
            el_lo, el_hi = sum(lo), sum(hi)
        else:
            el_lo = sum(lo[j:]) - j * hi[j - 1]
            el_hi = sum(hi[j:]) - j * lo[j - 1]
        c_lo = math.floor(el_lo / (d + 1)) - 2
        c_hi = math.ceil(el_hi / (d + 1)) + 2
        low.append(c_lo)
        radix.append(c_hi - c_lo + 1)
    low += [0] * d
    radix += [d + 1] * d
    device = features.device
    return torch.tensor(low, dtype=torch.int64, device=device), torch.tensor(
        radix, dtype=torch.int64, device=device
    )


def _enclosing_simplex(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lift ``(d, n)`` features onto ``H_d`` and find each point's enclosing simplex.

    Returns:
        The remainder-0 corner divided by ``d+1`` (first ``d`` coordinates, ``(d, n)`` int32), the ranks
        of the first ``d`` coordinates (``(d, n)`` int8) and the barycentric weights (``(d+1, n)``).
    """
    d, n = feats.shape
    device = feats.device
    # Elevate (E in Adams et al., scaled so that the blur has unit standard deviation):
    # el_j = sum_{i >= j} cf_i - j cf_{j-1}.
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)], device=device)
    cf = feats * scale[:, None]
    el = torch.empty(d + 1, n, device=device)
    suffix = torch.zeros(n, device=device)
    for j in range(d, 0, -1):
        torch.sub(suffix, cf[j - 1], alpha=j, out=el[j])
        suffix += cf[j - 1]
    el[0] = suffix
    del cf, suffix
    # Nearest remainder-0 point; each coordinate's rank by residual, ties to the lower index (as the
    # C++ code): rank_i = total + #{j < i: diff_j >= diff_i} + #{j > i: diff_j > diff_i}; then the
    # correction that brings the point back onto the plane.
    rem0 = torch.round(el * (1.0 / (d + 1))).mul_(d + 1)
    diff = el.sub_(rem0)
    rank = torch.add(
        torch.arange(d + 1, dtype=torch.float32, device=device)[:, None],
        torch.round(rem0.sum(0) * (1.0 / (d + 1))),
    )
    later = torch.empty(n, device=device)
    for i in range(d + 1):
        for j in range(i + 1, d + 1):
            torch.gt(diff[j], diff[i], out=later)
            rank[i].add_(later)
            rank[j].sub_(later)
    # Ranks outside 0..d wrap around (they are within one period): shift by -(d+1) floor(rank / (d+1)).
    wrap = torch.floor(rank * (1.0 / (d + 1))).mul_(-(d + 1))
    rank += wrap
    rem0 += wrap
    diff -= wrap
    # Barycentric weights (Adams et al. p.10): with u the residuals / (d+1) placed at d - rank,
    # b_0 = 1 + u_0 - u_d and b_k = u_k - u_(k-1).
    u = torch.empty(d + 1, n, device=device).scatter_(0, (d - rank).long(), diff.mul_(1.0 / (d + 1)))
    bary = torch.empty(d + 1, n, device=device)
    torch.sub(u[1:], u[:-1], out=bary[1:])
    torch.sub(u[0], u[d], out=bary[0]).add_(1.0)
    corner = torch.round(rem0[:d] * (1.0 / (d + 1))).to(torch.int32)
    return corner, rank[:d].to(torch.int8), bary
