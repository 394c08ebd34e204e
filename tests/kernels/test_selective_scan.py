"""selective_scan: the chunk form and the recurrent form against mamba-ssm's semantics written as a loop."""

import pytest
import torch
import torch.nn.functional as F

from seqvision.kernels import selective_scan
from seqvision.kernels.check import relative_error
from seqvision.kernels.selective_scan import reference

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def mamba_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's selective_scan_ref semantics, per step, with B/C repeated to one row per channel."""
    batch, dim, L = u.shape
    N = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def per_channel(X):  # -> (batch, D, N, L)
        if X.dim() == 2:
            return X[None, :, :, None].expand(batch, dim, N, L)
        if X.dim() == 3:
            return X[:, None].expand(batch, dim, N, L)
        return X.repeat_interleave(dim // X.shape[1], dim=1)

    B, C = per_channel(B), per_channel(C)
    h = torch.zeros(batch, dim, N, dtype=u.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def make_inputs(batch, dim, L, N, b_kind, c_kind, dtype=torch.float64, a_scale=5.0, seed=0, groups=2):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=g)

    kinds = {"fixed": (dim, N), "input": (batch, N, L), "grouped": (batch, groups, N, L)}
    return dict(
        u=randn(batch, dim, L),
        delta=torch.rand(batch, dim, L, dtype=dtype, generator=g),
        A=-a_scale * torch.rand(dim, N, dtype=dtype, generator=g),
        B=randn(*kinds[b_kind]),
        C=randn(*kinds[c_kind]),
        D=randn(dim),
        z=randn(batch, dim, L),
        delta_bias=randn(dim) * 0.5,
    )


BC_KINDS = [
    ("fixed", "fixed"),
    ("input", "input"),
    ("grouped", "grouped"),
    ("fixed", "input"),
    ("input", "grouped"),
]


@pytest.fixture(params=["log-depth", "stepwise"])
def chunk_path(request, monkeypatch):
    """Run the chunk form through both of its in-chunk paths: the log-depth scan (small states) and
    the step-by-step update (states of at least _STEPWISE_SLAB numbers, lowered here to 1)."""
    if request.param == "stepwise":
        monkeypatch.setattr(reference, "_STEPWISE_SLAB", 1)
    return request.param


@pytest.mark.usefixtures("chunk_path")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize(("b_kind", "c_kind"), BC_KINDS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("L", [1, 7, 65, 130])
def test_forms_match_mamba_semantics(L, batch, b_kind, c_kind, form, dtype):
    x = make_inputs(batch, 4, L, 3, b_kind, c_kind, dtype)
    expected, expected_state = mamba_loop(**x, delta_softplus=True)
    out, state = selective_scan(**x, delta_softplus=True, return_last_state=True, form=form, chunk_size=16)
    assert out.shape == (batch, 4, L) and out.dtype == dtype
    assert state.shape == (batch, 4, 3)
    assert relative_error(out, expected) < TOL[dtype]
    assert relative_error(state, expected_state) < TOL[dtype]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"D": True},
        {"z": True},
        {"delta_bias": True},
        {"delta_softplus": True},
        {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
    ],
)
def test_optional_terms(options):
    x = make_inputs(2, 4, 33, 3, "input", "input")
    for name in ("D", "z", "delta_bias"):
        if name not in options:
            x[name] = None
    softplus = options.get("delta_softplus", False)
    expected, _ = mamba_loop(**x, delta_softplus=softplus)
    for form in ("chunk", "recurrent"):
        out = selective_scan(**x, delta_softplus=softplus, form=form, chunk_size=8)
        assert relative_error(out, expected) < 1e-9


@pytest.mark.usefixtures("chunk_path")
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16, 64, 500])
def test_chunk_size_does_not_change_the_result(chunk_size):
    x = make_inputs(2, 6, 65, 4, "grouped", "input")
    expected = selective_scan(**x, form="recurrent")
    assert relative_error(selective_scan(**x, chunk_size=chunk_size), expected) < 1e-9


@pytest.mark.usefixtures("chunk_path")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strong_decay_stays_exact(dtype):
    # delta * A down to -2000 per step: exp of a cumulative sum over a chunk would overflow.
    x = make_inputs(2, 4, 130, 3, "input", "input", dtype, a_scale=2000.0)
    expected = selective_scan(**x, delta_softplus=True, form="recurrent")
    out = selective_scan(**x, delta_softplus=True, chunk_size=64)
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) < TOL[dtype]


@pytest.mark.usefixtures("chunk_path")
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize(("b_kind", "c_kind"), [("fixed", "input"), ("grouped", "grouped")])
def test_gradcheck(form, b_kind, c_kind):
    x = make_inputs(1, 4, 9, 2, b_kind, c_kind, seed=3)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    inputs = [x[n].requires_grad_() for n in names]

    def fn(*xs):
        y, last = selective_scan(
            *xs[:5], *xs[5:], delta_softplus=True, return_last_state=True, form=form, chunk_size=4
        )
        return y, last

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    x = make_inputs(2, 4, 20, 3, "input", "input", torch.float32)
    half = {n: (t.to(dtype) if n in ("u", "delta", "z", "B", "C") else t) for n, t in x.items()}
    expected = selective_scan(**{n: t.float() for n, t in half.items()}, delta_softplus=True)
    out, state = selective_scan(**half, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert relative_error(out.float(), expected) < 1e-2


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda x: {"u": x["u"][0]}, ValueError, "u must be 3-D"),
        (lambda x: {"delta": x["delta"][:, :, :5]}, ValueError, "delta must have shape"),
        (lambda x: {"delta": x["delta"].float()}, TypeError, "u, delta must share one dtype"),
        (lambda x: {"A": x["A"][:3]}, ValueError, "A must have shape"),
        (lambda x: {"A": torch.complex(x["A"], x["A"])}, TypeError, "complex A is not supported"),
        (lambda x: {"B": x["B"][:, :2]}, ValueError, "B must have shape"),
        (lambda x: {"C": torch.randn(2, 4, 3, 7, dtype=torch.float64)}, ValueError, "C must have shape"),
        (lambda x: {"D": torch.randn(5, dtype=torch.float64)}, ValueError, "D must have shape"),
        (lambda x: {"z": x["z"][:1]}, ValueError, "z must have shape"),
        (lambda x: {"delta_bias": torch.randn(6)}, TypeError, "delta_bias must have dtype"),
        (lambda x: {"form": "parallel"}, ValueError, "form must be one of"),
        (lambda x: {"chunk_size": -1}, ValueError, "chunk_size must be a positive int"),
        (lambda x: {"backend": "triton"}, ValueError, r"backend='triton'.*float64"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, match):
    x = make_inputs(2, 6, 7, 3, "input", "input")
    x.update(change(x))
    with pytest.raises(error, match=match):
        selective_scan(**x)


def test_grouped_b_and_c_must_agree_on_groups():
    x = make_inputs(2, 6, 7, 3, "grouped", "input", groups=2)
    x["C"] = torch.randn(2, 3, 3, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="B and C must have the same number of groups"):
        selective_scan(**x)
