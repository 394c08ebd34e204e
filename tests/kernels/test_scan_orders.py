"""Tests for seqvision.kernels.scan_orders against slow by-definition references."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqvision.kernels.scan_orders import ORDERS, cross_merge, cross_scan, flatten, num_routes, unflatten

GRIDS = [(1, 1), (3, 5), (4, 4), (2, 3, 4), (5, 1, 7), (1, 1, 1), (3, 2, 3)]


def _grid_cells(grid):
    """All cells of ``grid`` in raster order (last axis fastest)."""
    return list(itertools.product(*(range(n) for n in grid)))


def _raster_index(cell, grid):
    index = 0
    for c, n in zip(cell, grid, strict=True):
        index = index * n + c
    return index


def _snake_cells(grid):
    """The snake path, written out as nested loops straight from the definition."""
    if len(grid) == 2:
        h_size, w_size = grid
        cells = []
        for h in range(h_size):
            ws = range(w_size) if h % 2 == 0 else range(w_size - 1, -1, -1)
            cells.extend((h, w) for w in ws)
        return cells
    d_size, h_size, w_size = grid
    cells = []
    row = 0  # rows visited so far over the whole volume: the W direction alternates with it
    for d in range(d_size):
        hs = range(h_size) if d % 2 == 0 else range(h_size - 1, -1, -1)
        for h in hs:
            ws = range(w_size) if row % 2 == 0 else range(w_size - 1, -1, -1)
            cells.extend((d, h, w) for w in ws)
            row += 1
    return cells


def _reference_cells(grid, order):
    """``cells[l]`` is the grid cell at sequence position ``l``."""
    raster = _grid_cells(grid)
    if order == "raster":
        return raster
    if order == "reversed":
        return raster[::-1]
    if order == "transposed":
        # First grid axis fastest: enumerate the reversed axes in raster order, then read cells back.
        return [cell[::-1] for cell in _grid_cells(grid[::-1])]
    if order == "snake":
        return _snake_cells(grid)
    raise AssertionError(order)


def _reference_flatten(x, grid, order):
    index = torch.tensor([_raster_index(cell, grid) for cell in _reference_cells(grid, order)])
    return x.flatten(2)[..., index]


def _route_axes(n):
    """Axis orders (slowest to fastest) of the forward routes, as the docstring states them."""
    return [(0, 1), (1, 0)] if n == 2 else [(0, 1, 2), (0, 2, 1), (1, 2, 0)]


def _reference_route(x, axes, reverse):
    grid = tuple(x.shape[2:])
    sub = tuple(grid[a] for a in axes)
    cells = []
    for sub_cell in itertools.product(*(range(n) for n in sub)):
        cell = [0] * len(grid)
        for a, c in zip(axes, sub_cell, strict=True):
            cell[a] = c
        cells.append(_raster_index(cell, grid))
    if reverse:
        cells = cells[::-1]
    return x.flatten(2)[..., torch.tensor(cells)]


def _rand(batch, channels, grid, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *grid, generator=g, dtype=dtype)


# --- flatten / unflatten --------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_round_trip(order, grid, batch):
    x = _rand(batch, 2, grid)
    seq = flatten(x, order)
    assert seq.shape == (batch, 2, math.prod(grid))
    assert torch.equal(unflatten(seq, x.shape[2:], order), x)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("grid", GRIDS)
def test_flatten_matches_definition(order, grid):
    x = _rand(2, 3, grid, seed=1)
    assert torch.equal(flatten(x, order), _reference_flatten(x, grid, order))


@pytest.mark.parametrize("order", ORDERS)
def test_integer_and_non_contiguous_inputs(order):
    x = torch.arange(2 * 3 * 4 * 5 * 6).reshape(2, 3, 6, 5, 4).transpose(2, 4)  # non-contiguous (.., 4, 5, 6)
    grid = tuple(x.shape[2:])
    seq = flatten(x, order)
    assert seq.dtype == torch.int64
    assert torch.equal(seq, _reference_flatten(x, grid, order))
    out = unflatten(seq, grid, order)
    assert out.is_contiguous() and torch.equal(out, x)
    mask = x % 3 == 0
    assert torch.equal(unflatten(flatten(mask, order), grid, order), mask)


def test_raster_is_plain_flatten():
    x = _rand(2, 3, (3, 5))
    assert torch.equal(flatten(x), x.flatten(2))
    assert torch.equal(flatten(x, "reversed"), x.flatten(2).flip(-1))
    assert torch.equal(flatten(x, "transposed"), x.transpose(2, 3).flatten(2))


def test_transposed_3d_axis_order():
    # D fastest, then H, W slowest.
    x = _rand(1, 1, (2, 3, 4))
    assert torch.equal(flatten(x, "transposed"), x.permute(0, 1, 4, 3, 2).flatten(2))


@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (2, 3, 4), (3, 2, 3), (2, 2, 5), (5, 1, 7), (1, 4, 3)])
def test_snake_is_a_neighbour_path(grid):
    # The snake's sequence of raster indices, read back as grid coordinates.
    index = torch.arange(math.prod(grid)).reshape(1, 1, *grid)
    path = flatten(index, "snake").flatten().tolist()
    assert sorted(path) == list(range(math.prod(grid)))
    coords = [_grid_cells(grid)[i] for i in path]
    for a, b in itertools.pairwise(coords):
        assert sum(abs(p - q) for p, q in zip(a, b, strict=True)) == 1, (a, b)


def test_snake_small_cases_spelled_out():
    index = torch.arange(6).reshape(1, 1, 2, 3)
    assert flatten(index, "snake").flatten().tolist() == [0, 1, 2, 5, 4, 3]
    index = torch.arange(12).reshape(1, 1, 2, 2, 3)
    # slice 0: rows 0, 1 (-> then <-); slice 1: rows 1, 0 (-> then <-), continuing the path.
    assert flatten(index, "snake").flatten().tolist() == [0, 1, 2, 5, 4, 3, 9, 10, 11, 8, 7, 6]


def test_snake_indices_survive_inference_mode():
    # The first call may happen under inference mode; the cached index must still work with autograd later.
    grid = (3, 7)
    with torch.inference_mode():
        flatten(torch.zeros(1, 1, *grid), "snake")
    x = torch.randn(1, 2, *grid, requires_grad=True)
    flatten(x, "snake").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# --- cross_scan / cross_merge ---------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_cross_scan_routes(grid):
    x = _rand(2, 3, grid, seed=2)
    ys = cross_scan(x)
    n = len(grid)
    k = num_routes(n)
    assert ys.shape == (2, k, 3, math.prod(grid))
    for i, axes in enumerate(_route_axes(n)):
        assert torch.equal(ys[:, i], _reference_route(x, axes, reverse=False))
        assert torch.equal(ys[:, i + k // 2], _reference_route(x, axes, reverse=True))
    # The routes that coincide with named flatten orders.
    assert torch.equal(ys[:, 0], flatten(x, "raster"))
    assert torch.equal(ys[:, k // 2], flatten(x, "reversed"))
    if n == 2:
        assert torch.equal(ys[:, 1], flatten(x, "transposed"))
        assert torch.equal(ys[:, 3], flatten(x, "transposed").flip(-1))


def test_num_routes():
    assert num_routes(2) == 4 and num_routes(3) == 6
    with pytest.raises(ValueError, match="grid_ndim must be 2 or 3"):
        num_routes(4)


@pytest.mark.parametrize("grid", GRIDS)
def test_cross_merge_of_cross_scan_is_k_times_x(grid):
    x = _rand(2, 3, grid, seed=3)
    out = cross_merge(cross_scan(x), grid)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, num_routes(len(grid)) * x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid", [(3, 5), (2, 3, 4)])
def test_cross_merge_float32_and_backend_torch(grid):
    x = _rand(1, 4, grid, dtype=torch.float32)
    ys = cross_scan(x, backend="torch")
    assert ys.dtype == torch.float32
    out = cross_merge(ys, grid, backend="torch")
    torch.testing.assert_close(out, num_routes(len(grid)) * x)


@settings(max_examples=40, deadline=None)
@given(
    grid=st.one_of(
        st.tuples(st.integers(1, 6), st.integers(1, 6)),
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    ),
    batch=st.integers(1, 3),
    channels=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_cross_merge_is_adjoint_of_cross_scan(grid, batch, channels, seed):
    g = torch.Generator().manual_seed(seed)
    k = num_routes(len(grid))
    x = torch.randn(batch, channels, *grid, generator=g, dtype=torch.float64)
    y = torch.randn(batch, k, channels, math.prod(grid), generator=g, dtype=torch.float64)
    lhs = (cross_scan(x) * y).sum()
    rhs = (x * cross_merge(y, grid)).sum()
    assert abs(lhs.item() - rhs.item()) <= 1e-10 * max(1.0, abs(lhs.item()))


@settings(max_examples=30, deadline=None)
@given(
    grid=st.one_of(
        st.tuples(st.integers(1, 6), st.integers(1, 6)),
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    ),
    order=st.sampled_from(ORDERS),
)
def test_flatten_round_trip_property(grid, order):
    x = torch.randn(2, 1, *grid, dtype=torch.float64)
    assert torch.equal(unflatten(flatten(x, order), grid, order), x)
    assert torch.equal(flatten(x, order), _reference_flatten(x, grid, order))


@pytest.mark.parametrize("grid", [(2, 3), (2, 2, 3)])
def test_gradcheck(grid):
    x = _rand(2, 2, grid, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(cross_scan, (x,))
    y = torch.randn(2, num_routes(len(grid)), 2, math.prod(grid), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, grid), (y,))


@pytest.mark.parametrize("order", ORDERS)
def test_flatten_gradcheck(order):
    grid = (2, 3, 2)
    x = _rand(1, 2, grid, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: flatten(t, order), (x,))
    seq = torch.randn(1, 2, math.prod(grid), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unflatten(t, grid, order), (seq,))


# --- validation -----------------------------------------------------------------------------------


def test_bad_x():
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        flatten([[1.0]])
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        cross_scan(None)
    expected = re.escape("x must be (B, C, H, W) or (B, C, D, H, W), got shape (2, 3, 4)")
    with pytest.raises(ValueError, match=expected):
        flatten(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="x must be"):
        cross_scan(torch.zeros(1, 1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="x must have a non-empty grid"):
        flatten(torch.zeros(1, 1, 0, 3))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        cross_scan(torch.zeros(1, 1, 2, 2, dtype=torch.long))


def test_bad_order():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=re.escape(f"order must be one of {ORDERS}, got 'zigzag'")):
        flatten(x, "zigzag")
    with pytest.raises(ValueError, match="order must be one of"):
        unflatten(torch.zeros(1, 1, 4), (2, 2), "hilbert")


def test_bad_seq_and_grid():
    with pytest.raises(TypeError, match=r"seq must be a torch\.Tensor"):
        unflatten("abc", (2, 2))
    with pytest.raises(ValueError, match=r"seq must be \(B, C, L\) with L = prod\(grid\) = 6"):
        unflatten(torch.zeros(1, 1, 5), (2, 3))
    with pytest.raises(ValueError, match="seq must be"):
        unflatten(torch.zeros(1, 6), (2, 3))
    for grid in [(6,), (1, 2, 3, 1), (2, 0), (2, -3), (2.0, 3), (True, 6), "ab", 6]:
        with pytest.raises(ValueError, match="grid must be 2 or 3 positive ints"):
            unflatten(torch.zeros(1, 1, 6), grid)
    with pytest.raises(ValueError, match="grid must be 2 or 3 positive ints"):
        cross_merge(torch.zeros(1, 4, 1, 6), (6,))


def test_bad_y():
    with pytest.raises(TypeError, match=r"y must be a torch\.Tensor"):
        cross_merge(None, (2, 3))
    with pytest.raises(ValueError, match=r"y must be \(B, K, C, L\) with K = 4 routes for a 2-D grid"):
        cross_merge(torch.zeros(1, 6, 2, 6), (2, 3))
    with pytest.raises(ValueError, match="K = 6 routes for a 3-D grid"):
        cross_merge(torch.zeros(1, 4, 2, 6), (1, 2, 3))
    with pytest.raises(ValueError, match=r"L = prod\(grid\) = 6"):
        cross_merge(torch.zeros(1, 4, 2, 7), (2, 3))
    with pytest.raises(ValueError, match="y must be"):
        cross_merge(torch.zeros(4, 2, 6), (2, 3))


@pytest.mark.parametrize("fn", ["cross_scan", "cross_merge"])
def test_backend(fn):
    x = torch.zeros(1, 1, 2, 3)
    call = {
        "cross_scan": lambda backend: cross_scan(x, backend=backend),
        "cross_merge": lambda backend: cross_merge(torch.zeros(1, 4, 1, 6), (2, 3), backend=backend),
    }[fn]
    with pytest.raises(ValueError, match="backend must be one of"):
        call("nope")
    assert call("auto").shape == call("torch").shape
