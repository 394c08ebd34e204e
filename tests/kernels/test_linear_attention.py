"""linear_attention: every form against the recurrent ground truth, and the recurrence against the formula."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqvision.kernels import linear_attention
from seqvision.kernels.check import relative_error

DECAYS = ("none", "head", "scalar", "key")
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def make_inputs(B, H, L, Dk, Dv, decay, dtype=torch.float64, strength=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, Dk, dtype=dtype, generator=g) for _ in range(2))
    v = torch.randn(B, H, L, Dv, dtype=dtype, generator=g)
    shapes = {"none": None, "head": (H,), "scalar": (B, H, L), "key": (B, H, L, Dk)}
    shape = shapes[decay]
    log_decay = None if shape is None else -strength * torch.rand(shape, dtype=dtype, generator=g)
    return q, k, v, log_decay


def formula(q, k, v, log_decay, causal, scale, initial_state=None):
    """o_t = scale * sum_s w(t, s) (q_t . k_s) v_s with w the product of the gates between s and t,
    written as a double loop straight from the definition (slow; tiny inputs only)."""
    B, H, L, Dk = q.shape
    if log_decay is None:
        gates = torch.zeros(B, H, L, Dk, dtype=q.dtype)
    elif log_decay.dim() == 1:
        gates = log_decay.view(1, H, 1, 1).expand(B, H, L, Dk)
    elif log_decay.dim() == 3:
        gates = log_decay[..., None].expand(B, H, L, Dk)
    else:
        gates = log_decay
    o = torch.zeros(B, H, L, v.shape[-1], dtype=q.dtype)
    for t in range(L):
        for s in range(L):
            if causal and s > t:
                continue
            lo, hi = min(s, t), max(s, t)
            w = gates[:, :, lo + 1 : hi + 1].sum(2).exp()  # (B, H, Dk)
            o[:, :, t] += ((q[:, :, t] * k[:, :, s] * w).sum(-1))[..., None] * v[:, :, s]
        if initial_state is not None:
            w = gates[:, :, : t + 1].sum(2).exp()
            o[:, :, t] += torch.einsum("bhk,bhkv->bhv", q[:, :, t] * w, initial_state)
    return scale * o


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("causal", [True, False])
def test_recurrent_form_is_the_formula(decay, causal):
    q, k, v, log_decay = make_inputs(2, 2, 9, 3, 4, decay)
    out = linear_attention(q, k, v, log_decay, causal=causal, form="recurrent")
    expected = formula(q, k, v, log_decay, causal, 3**-0.5)
    assert relative_error(out, expected) < 1e-12


@pytest.mark.parametrize("decay", DECAYS)
def test_recurrent_form_with_initial_state_is_the_formula(decay):
    q, k, v, log_decay = make_inputs(2, 2, 9, 3, 4, decay)
    state = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    out = linear_attention(q, k, v, log_decay, form="recurrent", initial_state=state, scale=0.7)
    assert relative_error(out, formula(q, k, v, log_decay, True, 0.7, state)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["parallel", "chunk"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("L", [1, 7, 65, 130])
def test_forms_match_recurrent(L, B, decay, causal, form, dtype):
    q, k, v, log_decay = make_inputs(B, 2, L, 5, 3, decay, dtype)
    expected = linear_attention(q, k, v, log_decay, causal=causal, form="recurrent")
    out = linear_attention(q, k, v, log_decay, causal=causal, form=form, chunk_size=16)
    assert out.shape == (B, 2, L, 3) and out.dtype == dtype
    assert relative_error(out, expected) < TOL[dtype]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 64, 200])
@pytest.mark.parametrize("decay", DECAYS)
def test_chunk_size_does_not_change_the_result(chunk_size, decay):
    q, k, v, log_decay = make_inputs(2, 2, 65, 4, 6, decay)
    expected = linear_attention(q, k, v, log_decay, form="recurrent")
    out = linear_attention(q, k, v, log_decay, chunk_size=chunk_size)
    assert relative_error(out, expected) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decay", ["head", "scalar", "key"])
@pytest.mark.parametrize("causal", [True, False])
def test_strong_decay_stays_exact(decay, causal, dtype):
    # log-gates down to -80 per step: over a chunk of 64 the cumulative sum reaches about -5000, so
    # exp(-cumsum) factorisations overflow even in float64. Every form must stay finite and exact.
    q, k, v, log_decay = make_inputs(2, 2, 130, 5, 3, decay, dtype, strength=80.0)
    expected = linear_attention(q, k, v, log_decay, causal=causal, form="recurrent")
    for form in ("parallel", "chunk"):
        out = linear_attention(q, k, v, log_decay, causal=causal, form=form, chunk_size=64)
        assert torch.isfinite(out).all()
        assert relative_error(out, expected) < TOL[dtype]


@pytest.mark.parametrize("form", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize("decay", DECAYS)
def test_final_state_and_initial_state(form, decay):
    q, k, v, log_decay = make_inputs(3, 2, 65, 5, 3, decay)
    state = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    expected, expected_state = linear_attention(
        q, k, v, log_decay, form="recurrent", initial_state=state, output_final_state=True
    )
    out, final = linear_attention(
        q, k, v, log_decay, form=form, chunk_size=16, initial_state=state, output_final_state=True
    )
    assert final.shape == (3, 2, 5, 3)
    assert relative_error(out, expected) < 1e-9
    assert relative_error(final, expected_state) < 1e-9


@pytest.mark.parametrize("form", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize("decay", DECAYS)
def test_streaming_in_uneven_pieces_equals_the_whole(form, decay):
    q, k, v, log_decay = make_inputs(2, 3, 130, 4, 5, decay)
    whole, whole_state = linear_attention(q, k, v, log_decay, form="recurrent", output_final_state=True)
    outputs, state = [], None
    for piece in (slice(0, 11), slice(11, 94), slice(94, 130)):
        decay_piece = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, :, piece]
        o, state = linear_attention(
            q[:, :, piece],
            k[:, :, piece],
            v[:, :, piece],
            decay_piece,
            form=form,
            chunk_size=16,
            initial_state=state,
            output_final_state=True,
        )
        outputs.append(o)
    assert relative_error(torch.cat(outputs, dim=2), whole) < 1e-9
    assert relative_error(state, whole_state) < 1e-9


def test_scale_defaults_to_inverse_sqrt_dk():
    q, k, v, log_decay = make_inputs(1, 2, 7, 9, 3, "head")
    default = linear_attention(q, k, v, log_decay)
    explicit = linear_attention(q, k, v, log_decay, scale=1 / 3)
    unscaled = linear_attention(q / 3, k, v, log_decay, scale=1.0)
    assert torch.allclose(default, explicit, rtol=0, atol=1e-14)
    assert torch.allclose(default, unscaled, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_their_dtype_and_accept_float32_decay(dtype):
    q, k, v, log_decay = make_inputs(2, 2, 33, 8, 4, "key", torch.float32)
    expected = linear_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), log_decay)
    out, state = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), log_decay, output_final_state=True)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert relative_error(out.float(), expected) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("form", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize("decay", DECAYS)
def test_gradcheck_causal_with_state(form, decay):
    q, k, v, log_decay = make_inputs(1, 2, 9, 3, 2, decay)
    if log_decay is not None:
        log_decay = log_decay.clamp(max=-0.05)  # keep finite-difference steps inside log_decay <= 0
    state = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, log_decay, state) if x is not None]

    def fn(*xs):
        q, k, v, *rest = xs
        log_decay = rest[0] if decay != "none" else None
        state = rest[-1]
        o, final = linear_attention(
            q, k, v, log_decay, form=form, chunk_size=4, initial_state=state, output_final_state=True
        )
        return o, final

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("form", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize("decay", DECAYS)
def test_gradcheck_noncausal(form, decay):
    q, k, v, log_decay = make_inputs(1, 2, 9, 3, 2, decay, seed=1)
    if log_decay is not None:
        log_decay = log_decay.clamp(max=-0.05)
    inputs = [x.requires_grad_() for x in (q, k, v, log_decay) if x is not None]

    def fn(*xs):
        return linear_attention(
            *xs[:3], xs[3] if len(xs) > 3 else None, causal=False, form=form, chunk_size=4
        )

    assert torch.autograd.gradcheck(fn, inputs)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    L=st.integers(1, 80),
    Dk=st.integers(1, 9),
    Dv=st.integers(1, 9),
    chunk_size=st.integers(1, 40),
    decay=st.sampled_from(DECAYS),
    causal=st.booleans(),
    strength=st.sampled_from([0.01, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_property_chunk_and_parallel_equal_recurrent(
    B, H, L, Dk, Dv, chunk_size, decay, causal, strength, seed
):
    q, k, v, log_decay = make_inputs(B, H, L, Dk, Dv, decay, strength=strength, seed=seed)
    expected = linear_attention(q, k, v, log_decay, causal=causal, form="recurrent")
    for form in ("chunk", "parallel"):
        out = linear_attention(q, k, v, log_decay, causal=causal, form=form, chunk_size=chunk_size)
        assert relative_error(out, expected) < 1e-9


def test_zero_log_decay_is_no_decay():
    q, k, v, _ = make_inputs(2, 2, 20, 3, 3, "none")
    zeros = torch.zeros(2, 2, 20, 3, dtype=torch.float64)
    assert torch.allclose(linear_attention(q, k, v, zeros), linear_attention(q, k, v, None), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def _good():
    return make_inputs(2, 2, 5, 3, 4, "none", torch.float32)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {"q": a["q"].numpy()}, TypeError, "q must be a torch.Tensor"),
        (lambda a: {"q": a["q"][0]}, ValueError, "q must be 4-D"),
        (lambda a: {"k": a["k"][:, :, :4]}, ValueError, "k must have shape"),
        (lambda a: {"k": a["k"][..., :2]}, ValueError, "k must have shape"),
        (lambda a: {"v": a["v"][:1]}, ValueError, "v must have shape"),
        (lambda a: {"k": a["k"].double()}, TypeError, "q, k, v must share one dtype"),
        (lambda a: {"v": a["v"].long()}, TypeError, "v must be a floating-point tensor"),
        (lambda a: {"log_decay": torch.full((2,), 0.1)}, ValueError, "log_decay must be <= 0"),
        (lambda a: {"log_decay": torch.full((2,), math.nan)}, ValueError, "log_decay must be <= 0"),
        (lambda a: {"log_decay": -torch.ones(3)}, ValueError, "log_decay must have shape"),
        (lambda a: {"log_decay": -torch.ones(2, 2, 5, 4)}, ValueError, "log_decay must have shape"),
        (
            lambda a: {"log_decay": -torch.ones(2, dtype=torch.float64)},
            TypeError,
            "log_decay must have dtype",
        ),
        (lambda a: {"form": "fast"}, ValueError, "form must be one of"),
        (lambda a: {"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        (lambda a: {"chunk_size": 2.5}, ValueError, "chunk_size must be a positive int"),
        (lambda a: {"causal": 1}, TypeError, "causal must be a bool"),
        (lambda a: {"scale": "big"}, TypeError, "scale must be a float"),
        (lambda a: {"initial_state": torch.zeros(2, 2, 4, 3)}, ValueError, "initial_state must have shape"),
        (
            lambda a: {"initial_state": torch.zeros(2, 2, 3, 4), "causal": False},
            ValueError,
            "need causal=True",
        ),
        (lambda a: {"output_final_state": True, "causal": False}, ValueError, "need causal=True"),
        (lambda a: {"backend": "cuda"}, ValueError, "backend must be one of"),
        (
            lambda a: {"backend": "triton", **{name: a[name].double() for name in "qkv"}},
            ValueError,
            r"backend='triton' computes linear_attention in float32 .* got float64",
        ),
    ],
)
def test_bad_arguments_name_the_argument(change, error, match):
    q, k, v, _ = _good()
    args = {"q": q, "k": k, "v": v, "log_decay": None}
    args.update(change(args))
    with pytest.raises(error, match=match):
        linear_attention(**args)


@pytest.mark.parametrize("shape", [(2,), (1, 2, 7), (1, 2, 7, 4)])
def test_decays_off_the_cpu_are_checked_only_when_asked(shape, monkeypatch):
    # A meta tensor has no data: any read-back raises. So a call that passes proves the decay was not
    # read (no host sync on CUDA); with SEQVISION_CHECK_DECAYS=1 the check reads it, and fails here.
    q = torch.randn(1, 2, 7, 4, device="meta")
    positive = torch.full(shape, 0.5, device="meta")
    monkeypatch.delenv("SEQVISION_CHECK_DECAYS", raising=False)
    assert linear_attention(q, q, q, positive, backend="torch").shape == q.shape
    monkeypatch.setenv("SEQVISION_CHECK_DECAYS", "0")
    assert linear_attention(q, q, q, positive, backend="torch").shape == q.shape
    monkeypatch.setenv("SEQVISION_CHECK_DECAYS", "1")
    with pytest.raises(RuntimeError, match="meta tensors"):
        linear_attention(q, q, q, positive, backend="torch")
    monkeypatch.setenv("SEQVISION_CHECK_DECAYS", "yes")
    with pytest.raises(ValueError, match="SEQVISION_CHECK_DECAYS must be '0' or '1'"):
        linear_attention(q, q, q, positive, backend="torch")
    # CPU tensors are always checked, whatever the variable says
    monkeypatch.setenv("SEQVISION_CHECK_DECAYS", "0")
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        linear_attention(q, k, v, torch.full(shape[:1] if len(shape) == 1 else (2, 2, 5), 0.5))
