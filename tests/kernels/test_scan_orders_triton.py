"""The Triton cross_scan / cross_merge kernels, run through Triton's interpreter on the CPU, against
the PyTorch reference: forward and backward, 2-D and 3-D odd grids, float32 and float16, with output
buffers poisoned so that an element a kernel fails to write shows up as NaN."""

import pytest
import torch

from seqvision.kernels import resolve_backend, scan_orders, triton_interpreted
from seqvision.kernels.scan_orders import cross_merge, cross_scan


def test_the_session_runs_triton_through_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton (a dependency on Linux).
    assert triton_interpreted()
    assert scan_orders._triton is not None


GRIDS = [(1, 1), (3, 5), (7, 2), (2, 3, 4), (3, 1, 5), (17, 9)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def poisoned(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(scan_orders, "_new_output", poisoned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grid", GRIDS)
def test_cross_scan_and_merge_match_the_reference(grid, dtype):
    x = torch.randn(2, 3, *grid).to(dtype)
    y = torch.randn(2, 2 * len(grid), 3, x[0, 0].numel()).to(dtype)
    scanned = cross_scan(x, backend="triton")
    assert not scanned.isnan().any()
    assert torch.equal(scanned, cross_scan(x, backend="torch"))  # a pure copy: bit for bit
    merged = cross_merge(y, grid, backend="triton")
    expected = cross_merge(y.float(), grid, backend="torch")
    assert not merged.isnan().any() and merged.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 3e-3
    assert torch.allclose(merged.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("grid", [(3, 5), (2, 3, 4)])
def test_gradients_match_the_reference(grid):
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
        assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6)


def test_float64_merge_accumulates_in_float64():
    y = torch.randn(1, 4, 2, 35, dtype=torch.float64)
    merged = cross_merge(y, (5, 7), backend="triton")
    assert torch.allclose(merged, cross_merge(y, (5, 7), backend="torch"), rtol=1e-14, atol=1e-14)


def test_auto_keeps_cpu_tensors_on_the_reference_and_the_env_override(monkeypatch):
    x = torch.zeros(2)
    assert resolve_backend("auto", x, has_triton=True) == "torch"
    monkeypatch.setenv("SEQVISION_BACKEND", "triton")
    assert resolve_backend("auto", x, has_triton=True) == "triton"
    assert resolve_backend("auto", x, has_triton=False) == "torch"  # no kernel yet: the reference
    launches = []
    gather = scan_orders._gather_routes
    monkeypatch.setattr(scan_orders, "_gather_routes", lambda x: launches.append(x.shape) or gather(x))
    x4 = torch.randn(1, 2, 3, 4)
    assert torch.equal(cross_scan(x4), cross_scan(x4, backend="torch"))  # auto, overridden to Triton
    assert launches == [x4.shape]
    monkeypatch.setenv("SEQVISION_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SEQVISION_BACKEND must be 'torch' or 'triton'"):
        resolve_backend("auto", x)
