"""linear_recurrence: both forms against the closed-form sum, along every axis, both directions."""

import pytest
import torch

from seqvision.kernels import linear_recurrence
from seqvision.kernels.check import relative_error


def formula(x, log_a, dim, reverse):
    """h_t = sum_{s <= t} (prod_{j = s+1..t} a_j) x_s, a double loop over the moved axis."""
    x_, g = x.movedim(dim, 0), torch.broadcast_to(log_a, x.shape).movedim(dim, 0)
    if reverse:
        x_, g = x_.flip(0), g.flip(0)
    h = torch.zeros_like(x_)
    for t in range(x_.shape[0]):
        for s in range(t + 1):
            h[t] += g[s + 1 : t + 1].sum(0).exp() * x_[s]
    if reverse:
        h = h.flip(0)
    return h.movedim(0, dim)


def gate_shape(shape, dim, kind):
    if kind == "per step":
        return shape
    out = [1] * len(shape)
    out[-1] = shape[-1]  # e.g. one gate per channel, constant along the scanned axis
    out[dim] = 1
    return tuple(out)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["constant", "per step"])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("length", [1, 7, 65, 130])
def test_matches_formula(length, dim, kind, reverse, form):
    shape = [2, 3, 4, 5]
    shape[dim] = length
    x = torch.randn(shape, dtype=torch.float64)
    log_a = -2 * torch.rand(gate_shape(shape, dim, kind), dtype=torch.float64)
    if length > 20:  # the double-loop formula is quadratic: check long axes against the recurrent form
        expected = linear_recurrence(x, log_a, dim, reverse, form="recurrent")
        assert relative_error(expected, formula(x[:2], log_a[:2], dim, reverse) if dim else expected) < 1e-12
    else:
        expected = formula(x, log_a, dim, reverse)
    out = linear_recurrence(x, log_a, dim, reverse, form=form, chunk_size=16)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert relative_error(out, expected) < 1e-9


def test_toeplitz_kernel_with_a_scalar_gate():
    x = torch.randn(3, 40, dtype=torch.float64)
    a = 0.9
    out = linear_recurrence(x, torch.tensor(a, dtype=torch.float64).log(), dim=1)
    t = torch.arange(40)
    toeplitz = (a ** (t[:, None] - t[None, :]).clamp(min=0).double()) * (t[:, None] >= t[None, :])
    assert relative_error(out, x @ toeplitz.T) < 1e-12


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 16, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_form_equals_recurrent(chunk_size, dtype):
    x = torch.randn(2, 130, 6, dtype=dtype)
    log_a = -3 * torch.rand(2, 130, 6, dtype=dtype)
    expected = linear_recurrence(x, log_a, 1, form="recurrent")
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert relative_error(linear_recurrence(x, log_a, 1, chunk_size=chunk_size), expected) < tol


def test_strong_decay_stays_exact():
    x = torch.randn(4, 200, dtype=torch.float32)
    log_a = -500 * torch.rand(4, 200)
    expected = linear_recurrence(x, log_a, 1, form="recurrent")
    out = linear_recurrence(x, log_a, 1, chunk_size=64)
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) < 1e-6


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("kind", ["constant", "per step"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(form, kind, reverse):
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    log_a = (-0.1 - torch.rand(gate_shape((2, 9, 3), 1, kind), dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, g: linear_recurrence(x, g, 1, reverse, form=form, chunk_size=4), (x, log_a)
    )


def test_float16_input_keeps_dtype():
    x = torch.randn(2, 30, 4).half()
    out = linear_recurrence(x, torch.full((4,), -0.2), dim=1)
    expected = linear_recurrence(x.float(), torch.full((4,), -0.2), dim=1)
    assert out.dtype == torch.float16
    assert relative_error(out.float(), expected) < 2e-3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": [1.0, 2.0]}, TypeError, "x must be a torch.Tensor"),
        ({"dim": 3}, ValueError, "dim must be an int in"),
        ({"dim": 1.0}, ValueError, "dim must be an int in"),
        ({"log_a": torch.zeros(5, 1, 1, 1)}, ValueError, "log_a must broadcast to x"),
        ({"log_a": torch.zeros(1, 4, 1)}, ValueError, "log_a must broadcast to x"),
        ({"log_a": torch.zeros(1, 2, 1)}, ValueError, "log_a must broadcast to x"),
        ({"log_a": torch.full((1, 1, 1), 0.5)}, ValueError, "log_a must be <= 0"),
        ({"log_a": torch.zeros(1, 1, 1, dtype=torch.float64)}, TypeError, "log_a must have dtype"),
        ({"reverse": "yes"}, TypeError, "reverse must be a bool"),
        ({"form": "parallel"}, ValueError, "form must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"backend": "gpu"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = {"x": torch.randn(2, 7, 3), "log_a": -torch.rand(3), "dim": 1}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        linear_recurrence(**args)


def test_gates_off_the_cpu_are_checked_only_when_asked(monkeypatch):
    # A meta tensor has no data: any read-back raises. So a call that passes proves log_a was not read
    # (no host sync on CUDA); with SEQVISION_CHECK_DECAYS=1 the check reads it, and fails here.
    x = torch.randn(3, 7, device="meta")
    positive = torch.full((3, 1), 0.5, device="meta")
    monkeypatch.delenv("SEQVISION_CHECK_DECAYS", raising=False)
    assert linear_recurrence(x, positive, 1, backend="torch").shape == x.shape
    monkeypatch.setenv("SEQVISION_CHECK_DECAYS", "1")
    with pytest.raises(RuntimeError, match="meta tensors"):
        linear_recurrence(x, positive, 1, backend="torch")
    monkeypatch.setenv("SEQVISION_CHECK_DECAYS", "0")  # CPU tensors are always checked
    with pytest.raises(ValueError, match="log_a must be <= 0"):
        linear_recurrence(torch.randn(3, 7), torch.full((3, 1), 0.5), 1)
