"""Scan orders: flatten an N-D grid of feature vectors into a 1-D sequence and put it back.

Vision backbones with a recurrent token mixer (Mamba, LightNet, ...) run a 1-D scan over a 2-D image or a
3-D video volume. The order in which grid cells are visited decides which cells the recurrence connects
cheaply, so backbones scan the same grid along several routes and merge the results.

Layout: ``x`` is ``(B, C, *grid)`` with ``grid = (H, W)`` or ``(D, H, W)``; a sequence is ``(B, C, L)``
with ``L = prod(grid)``. Below, position ``l`` of a sequence holds grid cell ``pi(l)``.

Orders (``ORDERS``), used by :func:`flatten` / :func:`unflatten`:

* ``"raster"``: row-major, the last grid axis fastest, i.e. ``x.flatten(2)``.
  2-D: ``pi(h * W + w) = (h, w)``; 3-D: ``pi((d * H + h) * W + w) = (d, h, w)``.
* ``"reversed"``: the raster sequence read backwards, ``pi(l) = pi_raster(L - 1 - l)``.
* ``"transposed"``: the grid axes in reverse order, the first grid axis fastest.
  2-D: column-major, ``pi(w * H + h) = (h, w)``; 3-D: ``pi((w * H + h) * D + d) = (d, h, w)``
  (D fastest, then H, W slowest).
* ``"snake"``: a boustrophedon path on which consecutive positions are grid neighbours (Manhattan
  distance 1). 2-D: rows top to bottom, even rows left to right, odd rows right to left. 3-D: slice ``d``
  is walked along the 2-D snake of an ``(H, W)`` grid, forwards for even ``d`` and backwards for odd
  ``d``; so odd slices visit rows bottom to top and the W direction keeps alternating with the global
  row count, and each slice starts on the cell where the previous one ended. Both follow one rule: the
  snake over ``(n0, *rest)`` visits index ``i`` of the first axis in order and walks the snake over
  ``rest`` forwards for even ``i``, backwards for odd ``i``.

Routes, used by :func:`cross_scan` / :func:`cross_merge` (``y[:, k]`` is route ``k``):

* 2-D, ``K = 4`` (the four routes of VMamba's cross-scan):
  ``k=0`` raster (W fastest), ``k=1`` transposed (column-major, H fastest), ``k=2`` raster reversed,
  ``k=3`` transposed reversed.
* 3-D, ``K = 6`` (3 orientations x 2 directions), each orientation given as the axis order from slowest
  to fastest: ``k=0`` (D, H, W), W fastest (raster); ``k=1`` (D, W, H), H fastest; ``k=2`` (H, W, D),
  D fastest; ``k=3, 4, 5`` are ``k=0, 1, 2`` read backwards.

``cross_merge`` is the adjoint of ``cross_scan``: it puts each route back in grid layout and sums over
``K``, so ``<cross_scan(x), y> == <x, cross_merge(y, grid)>`` and ``cross_merge(cross_scan(x)) == K * x``.

Backends: ``cross_scan`` and ``cross_merge`` also have a Triton path (``backend="triton"``, or
``"auto"`` on CUDA tensors): tiled copies that read the map once and write every route once (the
merge: read every route once, sum in registers, write once), coalesced on both sides through a tile
transpose in registers for the transposed routes (see the comment above the kernels); each one's
backward is the other. On the CPU it runs only through Triton's interpreter (TRITON_INTERPRET=1).

Dtypes: ``flatten`` / ``unflatten`` only move elements, so they accept any dtype (integer and bool
included, handy for carrying masks or token ids along the same path). ``cross_scan`` / ``cross_merge``
are the differentiable pair used inside the mixer and, like every other operator in
``seqvision.kernels``, require floating-point tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from ._common import check_tensor, resolve_backend
from ._triton import tl
from ._triton import triton as _triton

__all__ = ["ORDERS", "cross_merge", "cross_scan", "flatten", "num_routes", "unflatten"]

ORDERS = ("raster", "reversed", "transposed", "snake")

# Axis orders (slowest to fastest, as indices into ``grid``) of the forward routes; the backward routes
# are the same sequences flipped, so K = 2 * len(orientations).
_ORIENTATIONS: dict[int, tuple[tuple[int, ...], ...]] = {
    2: ((0, 1), (1, 0)),
    3: ((0, 1, 2), (0, 2, 1), (1, 2, 0)),
}


def num_routes(grid_ndim: int) -> int:
    """Number of routes ``K`` that :func:`cross_scan` produces for a grid with ``grid_ndim`` axes (2 or 3)."""
    if grid_ndim not in _ORIENTATIONS:
        raise ValueError(f"grid_ndim must be 2 or 3, got {grid_ndim!r}")
    return 2 * len(_ORIENTATIONS[grid_ndim])


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def _check_grid(grid: object) -> tuple[int, ...]:
    ok = isinstance(grid, Sequence) and len(grid) in (2, 3)
    ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid)
    if not ok:
        raise ValueError(f"grid must be 2 or 3 positive ints, (H, W) or (D, H, W), got {grid!r}")
    return tuple(grid)


def _check_x(x: object, floating: bool) -> torch.Tensor:
    if floating:
        check_tensor("x", x)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    # An empty grid axis would flatten fine but could never be unflattened (grid must be positive).
    if min(x.shape[2:]) < 1:
        raise ValueError(f"x must have a non-empty grid (every grid size >= 1), got shape {tuple(x.shape)}")
    return x


@lru_cache(maxsize=64)
def _snake_indices(grid: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(path, inverse)``: ``path[l]`` is the raster index of snake position ``l``; ``inverse`` undoes it."""
    # Cached tensors outlive the call; built inside inference mode they would be inference tensors that
    # later autograd-recording calls could not save for backward.
    with torch.inference_mode(False), torch.no_grad():
        # Grow the path from the fastest axis outwards: with ``path`` the snake over the trailing axes
        # (m cells), the snake over one more leading axis of size n is n copies of it, odd copies reversed.
        path = torch.arange(grid[-1], dtype=torch.long)
        for n in reversed(grid[:-1]):
            m = path.numel()
            block = torch.arange(n, dtype=torch.long).unsqueeze(1) * m + path
            block[1::2] = block[1::2].flip(-1)
            path = block.flatten()
        inverse = torch.empty_like(path)
        inverse[path] = torch.arange(path.numel(), dtype=torch.long)
    return path.to(device), inverse.to(device)


def _transpose_dims(n: int) -> list[int]:
    # (B, C, a0, ..., a_{n-1}) -> (B, C, a_{n-1}, ..., a0); this permutation is its own inverse.
    return [0, 1, *range(n + 1, 1, -1)]


def flatten(x: torch.Tensor, order: str = "raster") -> torch.Tensor:
    """Flatten a grid into a sequence along ``order`` (see the module docstring for each order).

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``, any dtype.
        order: one of ``ORDERS``.

    Returns:
        ``(B, C, L)`` with ``L = prod(x.shape[2:])``; ``out[..., l]`` is ``x`` at grid cell ``pi(l)``.
    """
    _check_x(x, floating=False)
    _check_order(order)
    if order == "raster":
        return x.flatten(2)
    if order == "reversed":
        return x.flatten(2).flip(-1)
    if order == "transposed":
        return x.permute(_transpose_dims(x.dim() - 2)).flatten(2)
    path, _ = _snake_indices(tuple(x.shape[2:]), x.device)
    return x.flatten(2).index_select(-1, path)


def unflatten(seq: torch.Tensor, grid: Sequence[int], order: str = "raster") -> torch.Tensor:
    """Inverse of :func:`flatten`: ``unflatten(flatten(x, order), x.shape[2:], order) == x`` exactly.

    Args:
        seq: ``(B, C, L)`` with ``L = prod(grid)``, any dtype.
        grid: ``(H, W)`` or ``(D, H, W)``, positive ints.
        order: one of ``ORDERS``, the order ``seq`` was flattened in.

    Returns:
        ``(B, C, *grid)``, contiguous.
    """
    if not isinstance(seq, torch.Tensor):
        raise TypeError(f"seq must be a torch.Tensor, got {type(seq).__name__}")
    grid = _check_grid(grid)
    _check_order(order)
    length = math.prod(grid)
    if seq.dim() != 3 or seq.shape[-1] != length:
        raise ValueError(
            f"seq must be (B, C, L) with L = prod(grid) = {length} for grid {grid}, "
            f"got shape {tuple(seq.shape)}"
        )
    batch, channels = seq.shape[:2]
    if order == "raster":
        out = seq.reshape(batch, channels, *grid)
    elif order == "reversed":
        out = seq.flip(-1).reshape(batch, channels, *grid)
    elif order == "transposed":
        out = seq.reshape(batch, channels, *grid[::-1]).permute(_transpose_dims(len(grid)))
    else:
        _, inverse = _snake_indices(grid, seq.device)
        out = seq.index_select(-1, inverse).reshape(batch, channels, *grid)
    return out.contiguous()


def cross_scan(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Flatten ``x`` along every route and stack the sequences (see the module docstring for the routes).

    2-D routes (K = 4): 0 raster (H, W), 1 transposed (W, H), 2 = 0 reversed, 3 = 1 reversed.
    3-D routes (K = 6): 0 (D, H, W) W fastest, 1 (D, W, H) H fastest, 2 (H, W, D) D fastest,
    3..5 = 0..2 reversed. Axis orders are listed slowest to fastest.

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``, floating point.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (one tiled copy that reads ``x`` once and
            writes the K routes once; its backward is the Triton merge).

    Returns:
        ``(B, K, C, L)`` with ``L = prod(x.shape[2:])``.
    """
    _check_x(x, floating=True)
    if (
        resolve_backend(backend, x, op="cross_scan", has_triton=_triton is not None, takes_float64=True)
        == "triton"
    ):
        return _CrossScanTriton.apply(x)
    return _cross_scan_torch(x)


def _cross_scan_torch(x: torch.Tensor) -> torch.Tensor:
    n = x.dim() - 2
    forward = torch.stack(
        [x.permute(0, 1, *(2 + a for a in axes)).flatten(2) for axes in _ORIENTATIONS[n]], dim=1
    )
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, grid: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """Put every route of ``y`` back in grid layout and sum over routes; the adjoint of :func:`cross_scan`.

    Args:
        y: ``(B, K, C, L)`` with ``K = 4`` for a 2-D grid, ``6`` for a 3-D grid, and ``L = prod(grid)``;
            floating point. ``y[:, k]`` is read along route ``k`` of :func:`cross_scan`.
        grid: ``(H, W)`` or ``(D, H, W)``, positive ints.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (one tiled pass that reads each route once
            and writes the sum once; its backward is the Triton cross_scan).

    Returns:
        ``(B, C, *grid)``, ``sum_k`` of route ``k`` of ``y`` unflattened.
    """
    check_tensor("y", y)
    grid = _check_grid(grid)
    n = len(grid)
    k = num_routes(n)
    length = math.prod(grid)
    if y.dim() != 4 or y.shape[1] != k or y.shape[-1] != length:
        raise ValueError(
            f"y must be (B, K, C, L) with K = {k} routes for a {n}-D grid and L = prod(grid) = {length} "
            f"for grid {grid}, got shape {tuple(y.shape)}"
        )
    if (
        resolve_backend(backend, y, op="cross_merge", has_triton=_triton is not None, takes_float64=True)
        == "triton"
    ):
        return _CrossMergeTriton.apply(y, grid)
    return _cross_merge_torch(y, grid)


def _cross_merge_torch(y: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    n = len(grid)
    k = num_routes(n)
    batch, _, channels, _ = y.shape
    # Fold each backward route onto its forward twin first: one flip and add instead of K/2 more
    # permutes back to grid layout.
    half = k // 2
    folded = y[:, :half] + y[:, half:].flip(-1)
    out = None
    for i, axes in enumerate(_ORIENTATIONS[n]):
        # Route i is x permuted to ``axes``; undo that permutation to get back to (D, H, W) order.
        inverse_axes = sorted(range(n), key=axes.__getitem__)
        part = folded[:, i].reshape(batch, channels, *(grid[a] for a in axes))
        part = part.permute(0, 1, *(2 + a for a in inverse_axes))
        out = part if out is None else out + part
    return out.contiguous()


# ------------------------------------------------------------------------------------------------
# Triton: cross_scan and cross_merge as tiled copies, coalesced on both sides
# ------------------------------------------------------------------------------------------------
#
# Every route is the raster order or a transpose of the grid, read forwards or backwards. With L the
# sequence length, the position of grid cell (h, w) or (d, h, w) on route k is:
#
#   2-D  routes 0 / 2   h W + w              raster               (route 2 = L - 1 - route 0's)
#        routes 1 / 3   w H + h              an (H, W) transpose  (route 3 = L - 1 - route 1's)
#   3-D  routes 0 / 3   d H W + h W + w      raster
#        routes 1 / 4   d H W + w H + h      an (H, W) transpose in every d slice
#        routes 2 / 5   (h W + w) D + d      a (D, H W) transpose
#
# One program owns one 3-D tile [TA, TH, TW] of a (batch, ...) map, W fastest, so its load from x
# (B, C, *grid) is coalesced. cross_scan stores that tile on every route; cross_merge loads every
# route's copy of it and stores their sum. Each route's store (load) is laid out with the axis that
# is contiguous on that route last: the raster routes use the tile as loaded, a transposed route a
# tl.permute of it, [TA, TW, TH] with H fastest or [TH, TW, TA] with D fastest (the compiler moves
# the tile through shared memory), so in every route a warp's lanes touch consecutive addresses. A
# reversed route writes the same contiguous runs with descending addresses, which the compiler cannot
# vectorise: it gives those stores one element per lane, 32 lanes on consecutive addresses (whole
# 128-byte lines per warp instruction), after another shared-memory layout change. Compiled for sm_90
# (triton.compile without a device), an 8-warp fp32 64 x 64 tile loads with 16-byte vectors, stores
# routes 0 and 1 with 16-byte vectors and the reversed routes one word per lane, in 80 registers and
# 16 KiB of shared memory. The leading axis A is a block of channels for 2-D grids (so a small map
# still gives each program about 16 KiB to move) and the depth axis for 3-D grids (one channel per
# program).
#
# HBM traffic is the minimum a gather can have: cross_scan reads x once and writes the K routes once
# (1 + K passes of the map's size), cross_merge reads the K routes once and writes their sum once
# (K + 1 passes), with no index tables, so both should run at the copy bandwidth. Launch: one program
# per (batch, channel block, h tile, w tile) for 2-D grids, per (batch x channel, d tile, h tile,
# w tile) for 3-D grids, flattened on grid axis 0. The merge sums in float32 (float64 for float64
# inputs) in the PyTorch reference's order (each route with its reversed twin first, then the
# orientations in turn), so float32 merges equal the reference bit for bit. Positions inside a
# sequence are int32 (a sequence is shorter than 2**31); the bases of the (batch, route, channel)
# sequences are int64, so outputs of any size are addressed.

# A tile holds about this many bytes of the map (4096 float32 or 8192 16-bit elements), each side at
# most _MAX_SIDE; the tests shrink both so that small odd grids span several partial tiles.
_TILE_BYTES = 16384
_MAX_SIDE = 64


def _new_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Output buffers of the Triton kernels (a seam for tests, which poison them)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tile_shape(grid: tuple[int, ...], channels: int, itemsize: int) -> tuple[int, int, int]:
    """(TA, TH, TW), powers of two: A is a block of channels (2-D grids) or the depth axis (3-D)."""
    budget = max(1, _TILE_BYTES // itemsize)
    sides = [min(_pow2(n), _MAX_SIDE) for n in grid]
    if len(grid) == 2:
        while sides[0] * sides[1] > budget:  # only below _MAX_SIDE ** 2 elements (tests, float64)
            sides[sides.index(max(sides))] //= 2
        return min(_pow2(channels), max(1, budget // (sides[0] * sides[1]))), sides[0], sides[1]
    # 3-D: each side is the length of one route's contiguous runs, so shrink the longest first.
    while sides[0] * sides[1] * sides[2] > budget:
        sides[sides.index(max(sides))] //= 2
    return sides[0], sides[1], sides[2]


def _launch(kernel, src: torch.Tensor, out: torch.Tensor, grid: tuple[int, ...], channels: int) -> None:
    """Launch ``kernel`` (scan or merge) over ``src`` -> ``out`` for a map of ``grid`` and ``channels``."""
    volume = len(grid) == 3
    depth, height, width = grid if volume else (1, *grid)
    ta, th, tw = _tile_shape(grid, channels, src.element_size())
    n_a = _triton.cdiv(depth if volume else channels, ta)
    n_h, n_w = _triton.cdiv(height, th), _triton.cdiv(width, tw)
    rest = src.shape[0] * (channels if volume else 1)  # the programs' outer index: b (2-D), b * C + c
    elements = ta * th * tw
    kernel[(rest * n_a * n_h * n_w,)](
        src, out, channels, depth, height, width, n_a, n_h, n_w,
        TA=ta, TH=th, TW=tw, K=num_routes(len(grid)), VOLUME=volume, ACC_FP64=src.dtype == torch.float64,
        num_warps=max(1, min(8, elements // 512)),
    )  # fmt: skip


def _scan_routes(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, K, C, L), one Triton launch."""
    x = x.contiguous()
    grid = tuple(x.shape[2:])
    out = _new_output((x.shape[0], num_routes(len(grid)), x.shape[1], math.prod(grid)), x)
    _launch(_cross_scan_kernel, x, out, grid, x.shape[1])
    return out


def _merge_routes(y: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(B, K, C, L) -> (B, C, *grid), the K routes summed in registers, one Triton launch."""
    y = y.contiguous()
    out = _new_output((y.shape[0], y.shape[2], *grid), y)
    _launch(_cross_merge_kernel, y, out, grid, y.shape[2])
    return out


class _CrossScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.grid = tuple(x.shape[2:])
        return _scan_routes(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _merge_routes(grad, ctx.grid)  # the adjoint of the scan


class _CrossMergeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        return _merge_routes(y, grid)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _scan_routes(grad), None


if _triton is not None:

    @_triton.jit
    def _tile_positions(pid, C, D, H, W, n_a, n_h, n_w, TA: tl.constexpr, TH: tl.constexpr,
                        TW: tl.constexpr, VOLUME: tl.constexpr):  # fmt: skip
        """This program's tile: its index vectors a, h, w (a = channel for 2-D grids, depth for 3-D)
        and ``rest``, the int64 index of its sequences' block (b for 2-D, b * C + c for 3-D)."""
        i_w = pid % n_w
        pid = pid // n_w
        i_h = pid % n_h
        pid = pid // n_h
        i_a = pid % n_a
        rest = (pid // n_a).to(tl.int64)
        a = i_a * TA + tl.arange(0, TA)
        h = i_h * TH + tl.arange(0, TH)
        w = i_w * TW + tl.arange(0, TW)
        return a, h, w, rest

    @_triton.jit
    def _cross_scan_kernel(
        x_ptr, out_ptr, C, D, H, W, n_a, n_h, n_w,
        TA: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, K: tl.constexpr, VOLUME: tl.constexpr,
        ACC_FP64: tl.constexpr,
    ):  # fmt: skip
        # x (B, C, *grid) -> out (B, K, C, L): one tile of x loaded once, stored on all K routes.
        a, h, w, rest = _tile_positions(tl.program_id(0), C, D, H, W, n_a, n_h, n_w, TA, TH, TW, VOLUME)
        L = D * H * W
        a3, h3, w3 = a[:, None, None], h[None, :, None], w[None, None, :]
        # Index grids of the (H, W)-transposed routes' tiles, [TA, TW, TH] with H fastest.
        at, ht, wt = a[:, None, None], h[None, None, :], w[None, :, None]
        if VOLUME:  # a = d; this program's sequences are (b, k, c) for one (b, c) = divmod(rest, C)
            b, c = rest // C, rest % C
            x_seq = x_ptr + rest * L
            seq = ((b * K) * C + c) * L  # route k starts k * C * L further on
            route = (0 * rest + C) * L  # C * L as int64, like every sequence base
            raster = (a3 * H + h3) * W + w3
            column = (at * W + wt) * H + ht
            in_a, in_at = a3 < D, at < D
        else:  # a = channel; this program's sequences are (b, k, a) for b = rest
            x_seq = x_ptr + (rest * C + a3) * L
            seq = ((rest * K) * C + a3) * L
            route = (0 * rest + C) * L
            raster = h3 * W + w3
            column = wt * H + ht
            in_a, in_at = a3 < C, at < C
        mask = in_a & (h3 < H) & (w3 < W)
        tile = tl.load(x_seq + raster, mask=mask)
        half = K // 2  # route k + half is route k read backwards
        tl.store(out_ptr + seq + raster, tile, mask=mask)
        tl.store(out_ptr + seq + half * route + (L - 1 - raster), tile, mask=mask)
        tile_t = tl.permute(tile, (0, 2, 1))
        mask_t = in_at & (ht < H) & (wt < W)
        tl.store(out_ptr + seq + route + column, tile_t, mask=mask_t)
        tl.store(out_ptr + seq + (half + 1) * route + (L - 1 - column), tile_t, mask=mask_t)
        if VOLUME:  # routes 2 / 5: (H, W, D), the tile as [TH, TW, TA] with D fastest
            hd, wd, ad = h[:, None, None], w[None, :, None], a[None, None, :]
            depth = (hd * W + wd) * D + ad
            mask_d = (ad < D) & (hd < H) & (wd < W)
            tile_d = tl.permute(tile, (1, 2, 0))
            tl.store(out_ptr + seq + 2 * route + depth, tile_d, mask=mask_d)
            tl.store(out_ptr + seq + 5 * route + (L - 1 - depth), tile_d, mask=mask_d)

    @_triton.jit
    def _cross_merge_kernel(
        y_ptr, out_ptr, C, D, H, W, n_a, n_h, n_w,
        TA: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, K: tl.constexpr, VOLUME: tl.constexpr,
        ACC_FP64: tl.constexpr,
    ):  # fmt: skip
        # y (B, K, C, L) -> out (B, C, *grid): every route's copy of one tile loaded once, summed,
        # stored once. Each route is added to its reversed twin in its own layout, then permuted.
        a, h, w, rest = _tile_positions(tl.program_id(0), C, D, H, W, n_a, n_h, n_w, TA, TH, TW, VOLUME)
        acc_type = tl.float64 if ACC_FP64 else tl.float32
        L = D * H * W
        a3, h3, w3 = a[:, None, None], h[None, :, None], w[None, None, :]
        at, ht, wt = a[:, None, None], h[None, None, :], w[None, :, None]
        if VOLUME:
            b, c = rest // C, rest % C
            out_seq = out_ptr + rest * L
            seq = ((b * K) * C + c) * L
            route = (0 * rest + C) * L
            raster = (a3 * H + h3) * W + w3
            column = (at * W + wt) * H + ht
            in_a, in_at = a3 < D, at < D
        else:
            out_seq = out_ptr + (rest * C + a3) * L
            seq = ((rest * K) * C + a3) * L
            route = (0 * rest + C) * L
            raster = h3 * W + w3
            column = wt * H + ht
            in_a, in_at = a3 < C, at < C
        half = K // 2
        mask = in_a & (h3 < H) & (w3 < W)
        acc = tl.load(y_ptr + seq + raster, mask=mask, other=0.0).to(acc_type)
        acc += tl.load(y_ptr + seq + half * route + (L - 1 - raster), mask=mask, other=0.0).to(acc_type)
        mask_t = in_at & (ht < H) & (wt < W)
        part = tl.load(y_ptr + seq + route + column, mask=mask_t, other=0.0).to(acc_type)
        part += tl.load(y_ptr + seq + (half + 1) * route + (L - 1 - column), mask=mask_t, other=0.0).to(
            acc_type
        )
        acc += tl.permute(part, (0, 2, 1))
        if VOLUME:
            hd, wd, ad = h[:, None, None], w[None, :, None], a[None, None, :]
            depth = (hd * W + wd) * D + ad
            mask_d = (ad < D) & (hd < H) & (wd < W)
            part = tl.load(y_ptr + seq + 2 * route + depth, mask=mask_d, other=0.0).to(acc_type)
            part += tl.load(y_ptr + seq + 5 * route + (L - 1 - depth), mask=mask_d, other=0.0).to(acc_type)
            acc += tl.permute(part, (2, 0, 1))
        tl.store(out_seq + raster, acc.to(out_ptr.dtype.element_ty), mask=mask)
