"""The Triton linear_recurrence kernels (the chunked scan, forward and backward), through Triton's
interpreter on the CPU, against the PyTorch reference: every axis, both directions, constant,
per-step and broadcast gates, odd lengths cut into many chunks (chunks of 16 here, the last one
shorter) and one chunk, float32 and float16, strong decays across chunk boundaries, output and
chunk-carry buffers poisoned so an unwritten element shows up as NaN."""

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


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch):
    # Chunks of 16 steps, and a pass over chunk carries that takes 2 chunk boundaries per block: 17,
    # 33 and 100 steps become 2, 3 and 7 chunks (the last of 1, 1 and 4 steps) and the pass 1 to 3
    # blocks.
    monkeypatch.setattr(module, "_MAX_CHUNK", 16)
    monkeypatch.setattr(module, "_MAX_CARRY_SLOTS", 2)


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


def test_non_contiguous_input_strong_decay_and_broadcast_gradient():
    # Log-gates down to -300 per step, across chunk boundaries; x read in place through its strides;
    # the gradient of a sum reaches the backward kernel with stride 0.
    x = torch.randn(6, 40, 5).transpose(0, 2).requires_grad_()  # (5, 40, 6), not contiguous
    log_a = (-300 * torch.rand(5, 40, 6)).requires_grad_()
    grads = {}
    for backend in ("torch", "triton"):
        out = linear_recurrence(x, log_a, 1, backend=backend)
        grads[backend] = (out, *torch.autograd.grad(out.sum(), (x, log_a)))
    for ours, reference in zip(grads["triton"], grads["torch"], strict=True):
        assert torch.isfinite(ours).all()
        assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize(("log_a_shape", "reverse"), [((17, 1), False), ((1, 3, 1, 1), True)])
def test_gates_broadcast_over_other_axes(log_a_shape, reverse):
    # A gate per step shared by every line (fewer dims than x, stride 0 across lines) and a gate
    # constant along the axis that varies along another: the gate gradient is summed back to its
    # shape.
    x = torch.randn(2, 3, 17, 4, requires_grad=True)
    log_a = (-torch.rand(log_a_shape) - 0.01).requires_grad_()
    upstream = torch.randn(x.shape)
    grads = {}
    for backend in ("torch", "triton"):
        out = linear_recurrence(x, log_a, 2, reverse, backend=backend)
        grads[backend] = (out, *torch.autograd.grad(out, (x, log_a), upstream))
    for ours, reference in zip(grads["triton"], grads["torch"], strict=True):
        assert ours.shape == reference.shape and not ours.isnan().any()
        assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("kind", ["constant", "per step"])
def test_one_chunk_at_the_default_chunk_size(monkeypatch, kind):
    # At the default chunk size 100 steps are one chunk: the rescan alone, forward and backward.
    monkeypatch.setattr(module, "_MAX_CHUNK", 256)
    shape = (2, 100, 3)
    x = torch.randn(shape, requires_grad=True)
    log_a = gates(shape, 1, kind).requires_grad_()
    upstream = torch.randn(shape)
    grads = {}
    for backend in ("torch", "triton"):
        out = linear_recurrence(x, log_a, 1, backend=backend)
        grads[backend] = (out, *torch.autograd.grad(out, (x, log_a), upstream))
    for ours, reference in zip(grads["triton"], grads["torch"], strict=True):
        assert not ours.isnan().any()
        assert relative_error(ours, reference) < 1e-5


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
