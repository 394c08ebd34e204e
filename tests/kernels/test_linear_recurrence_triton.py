"""The Triton linear_recurrence kernel (forward and backward), through Triton's interpreter on the
CPU, against the PyTorch reference: every axis, both directions, constant and per-step gates, odd
lengths, float32 and float16, output buffers poisoned so an unwritten element shows up as NaN."""

import importlib

import pytest
import torch

from seqvision.kernels import linear_recurrence
from seqvision.kernels.check import relative_error

# The package exports the function under the module's name, so fetch the module itself.
module = importlib.import_module("seqvision.kernels.linear_recurrence")

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(module, "_new_output", lambda like: torch.full_like(like, float("nan")))


def gates(shape, dim, kind, dtype=torch.float32):
    if kind == "per step":
        return -2 * torch.rand(shape, dtype=dtype) - 0.01
    size = [1] * len(shape)
    size[-1 if dim != len(shape) - 1 else 0] = shape[-1 if dim != len(shape) - 1 else 0]
    return -2 * torch.rand(size, dtype=dtype) - 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["constant", "per step"])
@pytest.mark.parametrize(("length", "dim"), [(1, 1), (17, 1), (100, 2), (17, 0), (33, 3)])
def test_forward_matches_the_reference(length, dim, kind, reverse, dtype):
    shape = [2, 3, 4, 5]
    shape[dim] = length
    x = torch.randn(shape).to(dtype)
    log_a = gates(shape, dim, kind)  # float32 gates beside float16 inputs, as the operator allows
    out = linear_recurrence(x, log_a, dim, reverse, backend="triton")
    expected = linear_recurrence(x.float(), log_a, dim, reverse, backend="torch")
    assert out.dtype == dtype and not out.isnan().any()
    assert relative_error(out.float(), expected) < TOL[dtype]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["constant", "per step"])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_backward_matches_the_reference(dim, kind, reverse):
    shape = [3, 17, 6]
    x = torch.randn(shape, requires_grad=True)
    log_a = gates(shape, dim, kind).requires_grad_()
    upstream = torch.randn(shape)
    grads = {}
    for backend in ("torch", "triton"):
        out = linear_recurrence(x, log_a, dim, reverse, backend=backend)
        grads[backend] = torch.autograd.grad(out, (x, log_a), upstream)
    for ours, reference in zip(grads["triton"], grads["torch"], strict=True):
        assert not ours.isnan().any()
        assert relative_error(ours, reference) < 1e-5


def test_non_contiguous_input_and_strong_decay():
    x = torch.randn(6, 40, 5).transpose(0, 2)  # (5, 40, 6), not contiguous
    log_a = -300 * torch.rand(5, 40, 6)
    out = linear_recurrence(x, log_a, 1, backend="triton")
    assert relative_error(out, linear_recurrence(x, log_a, 1, backend="torch")) < 1e-5


def test_lightnet_forward_under_seqvision_backend_triton(monkeypatch):
    # The environment override reaches the operators inside a model: MD-TPE's scans run the Triton
    # kernel (and the token mixer's linear_attention runs its own); the logits agree.
    import timm

    import seqvision  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("lightnet_tiny_patch16_224", img_size=48, depth=2).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
        launches = []
        kernel = module._LinearRecurrenceTriton.apply
        monkeypatch.setattr(
            module._LinearRecurrenceTriton, "apply", lambda *a: launches.append(1) or kernel(*a)
        )
        monkeypatch.setenv("SEQVISION_BACKEND", "triton")
        out = model(x)
    assert len(launches) == 4  # two axes, forward and reverse
    assert relative_error(out, expected) < 1e-5
