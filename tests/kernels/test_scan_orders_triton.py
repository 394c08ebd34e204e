"""The Triton cross_scan / cross_merge kernels, run through Triton's interpreter on the CPU, against
the PyTorch reference: forward and backward (each the other's adjoint), 2-D and 3-D odd grids,
float32, float16 and float64, one tile and several partial tiles in every axis (the channel blocks
included), with output buffers poisoned so that an element a kernel fails to write shows up as NaN."""

import os
import subprocess
import sys

import pytest
import torch

from seqvision.kernels import resolve_backend, scan_orders, triton_interpreted
from seqvision.kernels.scan_orders import cross_merge, cross_scan


def test_the_session_runs_triton_through_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton (a dependency on Linux).
    assert triton_interpreted()
    assert scan_orders._triton is not None


# One tile each with the default tile budget, except (70, 3) and (3, 70, 2), whose 70 spans two tiles
# of _MAX_SIDE = 64 (the second partial).
GRIDS = [(1, 1), (3, 5), (7, 2), (17, 9), (70, 3), (2, 3, 4), (3, 1, 5), (5, 6, 7), (3, 70, 2)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def poisoned(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(scan_orders, "_new_output", poisoned)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 float32 elements, sides <= 4: small odd grids then span several partial tiles."""
    monkeypatch.setattr(scan_orders, "_TILE_BYTES", 256)
    monkeypatch.setattr(scan_orders, "_MAX_SIDE", 4)


def _check_both(grid, dtype, channels=3):
    x = torch.randn(2, channels, *grid, dtype=torch.float64).to(dtype)
    y = torch.randn(2, 2 * len(grid), channels, x[0, 0].numel(), dtype=torch.float64).to(dtype)
    scanned = cross_scan(x, backend="triton")
    assert not scanned.isnan().any()
    assert torch.equal(scanned, cross_scan(x, backend="torch"))  # a pure copy: bit for bit
    merged = cross_merge(y, grid, backend="triton")
    assert not merged.isnan().any() and merged.dtype == dtype and merged.shape == x.shape
    if dtype == torch.float16:  # the kernel sums in float32, the reference in float16
        expected = cross_merge(y.float(), grid, backend="torch")
        assert torch.allclose(merged.float(), expected, rtol=1e-3, atol=1e-3)
    else:  # the reference's order of summation: equal bit for bit
        assert torch.equal(merged, cross_merge(y, grid, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grid", GRIDS)
def test_cross_scan_and_merge_match_the_reference(grid, dtype):
    _check_both(grid, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("grid", "tiles"), [((9, 7), (2, 3, 2)), ((5, 6, 7), (2, 2, 2))])
def test_several_partial_tiles_in_every_axis(small_tiles, grid, tiles, dtype):
    # 5 channels: 2-D grids take float32 channel blocks of 4 (the second partial); 3-D grids block
    # the depth. The tile counts are float32's; float16 tiles hold twice the elements.
    ta, th, tw = scan_orders._tile_shape(grid, 5, 4)
    sizes = (5 if len(grid) == 2 else grid[0], *grid[-2:])
    assert tuple(-(-n // t) for n, t in zip(sizes, (ta, th, tw), strict=True)) == tiles
    assert all(n % t for n, t in zip(sizes, (ta, th, tw), strict=True))  # every axis ends partial
    _check_both(grid, dtype, channels=5)


def test_float64_copies_and_sums_in_float64():
    _check_both((5, 7), torch.float64)


@pytest.mark.parametrize("grid", [(3, 5), (2, 3, 4)])
def test_gradients_are_the_adjoints(grid):
    x = torch.randn(2, 3, *grid, requires_grad=True)
    y = torch.randn(2, 2 * len(grid), 3, x[0, 0].numel(), requires_grad=True)
    g_scan = torch.randn(2, 2 * len(grid), 3, x[0, 0].numel())
    g_merge = torch.randn(2, 3, *grid)
    grads = {}
    for backend in ("torch", "triton"):
        (cross_scan(x, backend=backend) * g_scan).sum().backward()
        (cross_merge(y, grid, backend=backend) * g_merge).sum().backward()
        grads[backend] = (x.grad.clone(), y.grad.clone())
        x.grad = y.grad = None
    for ours, reference in zip(grads["triton"], grads["torch"], strict=True):
        assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6)  # autograd sums in its own order
    # <cross_scan(x), y> == <x, cross_merge(y)>, with both kernels
    x64, y64 = x.detach().double(), y.detach().double()
    lhs = (cross_scan(x64, backend="triton") * y64).sum()
    rhs = (x64 * cross_merge(y64, grid, backend="triton")).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_tile_shapes_stay_within_the_budget():
    # 2-D: one channel block fills the 16 KiB budget on small maps; 3-D: balanced sides.
    assert scan_orders._tile_shape((14, 14), 384, 4) == (16, 16, 16)
    assert scan_orders._tile_shape((14, 14), 384, 2) == (32, 16, 16)
    assert scan_orders._tile_shape((128, 128), 96, 4) == (1, 64, 64)
    assert scan_orders._tile_shape((7, 7), 3, 4) == (4, 8, 8)
    assert scan_orders._tile_shape((16, 40, 40), 1, 4) == (16, 16, 16)
    assert scan_orders._tile_shape((2, 3, 300), 1, 4) == (2, 4, 64)


def test_auto_keeps_cpu_tensors_on_the_reference_and_the_env_override(monkeypatch):
    x = torch.zeros(2)
    assert resolve_backend("auto", x, has_triton=True) == "torch"
    monkeypatch.setenv("SEQVISION_BACKEND", "triton")
    assert resolve_backend("auto", x, has_triton=True) == "triton"
    assert resolve_backend("auto", x, has_triton=False) == "torch"  # no kernel yet: the reference
    launches = []
    scan = scan_orders._scan_routes
    monkeypatch.setattr(scan_orders, "_scan_routes", lambda x: launches.append(x.shape) or scan(x))
    x4 = torch.randn(1, 2, 3, 4)
    assert torch.equal(cross_scan(x4), cross_scan(x4, backend="torch"))  # auto, overridden to Triton
    assert launches == [x4.shape]
    monkeypatch.setenv("SEQVISION_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SEQVISION_BACKEND must be 'torch' or 'triton'"):
        resolve_backend("auto", x)


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from seqvision.kernels import scan_orders as so

for kernel in (so._cross_scan_kernel, so._cross_merge_kernel):
    for dtype, tile, volume in (("fp32", (1, 64, 64), False), ("bf16", (16, 16, 16), True)):
        source = "x_ptr" if kernel is so._cross_scan_kernel else "y_ptr"
        signature = {source: "*" + dtype, "out_ptr": "*" + dtype}
        signature.update(dict.fromkeys(("C", "D", "H", "W", "n_a", "n_h", "n_w"), "i32"))
        constants = dict(zip(("TA", "TH", "TW"), tile), K=6 if volume else 4, VOLUME=volume, ACC_FP64=False)
        signature.update(dict.fromkeys(constants, "constexpr"))
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        ptx = compiled.asm["ptx"]
        assert "st.global" in ptx and "ld.global" in ptx and compiled.metadata.shared > 0
        print(kernel.__name__, dtype, "compiled", len(compiled.asm["cubin"]), "bytes")
"""


def test_the_kernels_compile_for_sm90_without_a_device():
    # The interpreter runs no layouts: lowering to PTX and a cubin for Hopper (ptxas ships with
    # triton) proves the permutes and layout changes compile where they will run.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("compiled") == 4
