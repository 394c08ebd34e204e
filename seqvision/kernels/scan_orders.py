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
``"auto"`` on CUDA tensors): one fused gather each, driven by per-route index tables read off the
PyTorch reference, the merge summing the K routes in registers; each one's backward is the other.
On the CPU it runs only through Triton's interpreter (TRITON_INTERPRET=1).

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
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (one fused gather; its backward is the
            fused merge).

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
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (one fused gather-and-sum; its backward is
            the fused cross_scan).

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
# Triton: cross_scan and cross_merge as one fused gather each, driven by per-route index tables
# ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _route_tables(grid: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, L) int32 tables: ``source[k, l]`` is the grid cell (raster index) at step l of route k,
    ``inverse[k, p]`` the step of route k that visits cell p. Read off the PyTorch reference, so the
    kernels cannot disagree with it about the routes."""
    with torch.inference_mode(False):
        cells = torch.arange(math.prod(grid), dtype=torch.float64).reshape(1, 1, *grid)
        source = _cross_scan_torch(cells)[0, :, 0].to(torch.int64)
        inverse = torch.argsort(source, dim=-1)
        return source.to(device, torch.int32), inverse.to(device, torch.int32)


def _new_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Output buffers of the Triton kernels (a seam for tests, which poison them)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _block(length: int) -> int:
    return min(1024, _triton.next_power_of_2(length))


def _gather_routes(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, K, C, L) with one Triton launch."""
    x = x.contiguous()
    grid = tuple(x.shape[2:])
    batch, channels, length = x.shape[0], x.shape[1], math.prod(grid)
    source, _ = _route_tables(grid, x.device)
    k = source.shape[0]
    out = _new_output((batch, k, channels, length), x)
    block = _block(length)
    launch = (batch * channels, k, _triton.cdiv(length, block))
    _gather_routes_kernel[launch](x, source, out, channels, length, k, BLOCK=block)
    return out


def _merge_routes(y: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(B, K, C, L) -> (B, C, *grid), the K routes summed in registers, with one Triton launch."""
    y = y.contiguous()
    batch, k, channels, length = y.shape
    _, inverse = _route_tables(grid, y.device)
    out = _new_output((batch, channels, *grid), y)
    block = _block(length)
    launch = (batch * channels, _triton.cdiv(length, block))
    _merge_routes_kernel[launch](
        y, inverse, out, channels, length, K=k, BLOCK=block, ACC_FP64=y.dtype == torch.float64
    )
    return out


class _CrossScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.grid = tuple(x.shape[2:])
        return _gather_routes(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _merge_routes(grad, ctx.grid)  # the adjoint of the gather


class _CrossMergeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        return _merge_routes(y, grid)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_routes(grad), None


if _triton is not None:

    @_triton.jit
    def _gather_routes_kernel(x_ptr, source_ptr, out_ptr, C, L, K, BLOCK: tl.constexpr):
        # out[b, k, c, l] = x[b, c, source[k, l]]; one program per (b * C + c, k, block of l).
        row = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        steps = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        mask = steps < L
        cells = tl.load(source_ptr + k * L + steps, mask=mask, other=0)
        values = tl.load(x_ptr + row * L + cells, mask=mask)
        b, c = row // C, row % C
        tl.store(out_ptr + ((b * K + k) * C + c) * L + steps, values, mask=mask)

    @_triton.jit
    def _merge_routes_kernel(
        y_ptr, inverse_ptr, out_ptr, C, L, K: tl.constexpr, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr
    ):
        # out[b, c, p] = sum_k y[b, k, c, inverse[k, p]]; one program per (b * C + c, block of p).
        row = tl.program_id(0).to(tl.int64)
        cells = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cells < L
        b, c = row // C, row % C
        acc = tl.zeros([BLOCK], dtype=tl.float64 if ACC_FP64 else tl.float32)
        for k in tl.static_range(K):
            steps = tl.load(inverse_ptr + k * L + cells, mask=mask, other=0)
            acc += tl.load(y_ptr + ((b * K + k) * C + c) * L + steps, mask=mask, other=0.0).to(acc.dtype)
        tl.store(out_ptr + row * L + cells, acc.to(out_ptr.dtype.element_ty), mask=mask)
