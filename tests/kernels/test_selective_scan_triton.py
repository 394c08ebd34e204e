"""The Triton selective_scan kernels (the chunked scan, forward and backward), through Triton's
interpreter on the CPU, against the PyTorch reference run in float64: every B / C layout and group
count, optional terms on and off, one chunk, several and many chunks, lengths that are not a multiple
of the chunk, channel counts that are not a multiple of the block, N not a power of 2, float32 and
16-bit inputs, strong decays across chunk boundaries, output and chunk-state buffers poisoned so that
an unwritten element shows up as NaN."""

import importlib

import pytest
import torch

from seqvision.kernels import selective_scan
from seqvision.kernels.check import relative_error
from seqvision.kernels.selective_scan import triton as module

# The pass over chunk states lives beside linear_recurrence's kernels (the package exports the
# function under the module's name, so fetch the module itself).
recurrence = importlib.import_module("seqvision.kernels.linear_recurrence")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OPTIONAL = ("D", "z", "delta_bias")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(
        module, "_new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype)
    )
    monkeypatch.setattr(recurrence, "_new_output", lambda like: torch.full_like(like, float("nan")))


def make_inputs(batch, dim, L, N, b_kind, c_kind, *, groups=2, a_scale=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    layouts = {"fixed": (dim, N), "input": (batch, N, L), "grouped": (batch, groups, N, L)}
    return dict(
        u=randn(batch, dim, L),
        delta=torch.rand(batch, dim, L, generator=g) - 0.3,
        A=-a_scale * torch.rand(dim, N, generator=g),
        B=randn(*layouts[b_kind]),
        C=randn(*layouts[c_kind]),
        D=randn(dim),
        z=randn(batch, dim, L),
        delta_bias=0.5 * randn(dim),
    )


def outputs_and_grads(inputs, backend, return_last_state=True, upstream_seed=1, **options):
    """y, the last state (if asked for) and the gradient of every present input, by name."""
    leaves = {n: x.detach().requires_grad_() for n, x in inputs.items() if x is not None}
    args = {n: leaves.get(n) for n in NAMES}
    out = selective_scan(**args, return_last_state=return_last_state, backend=backend, **options)
    out = out if return_last_state else (out,)
    g = torch.Generator().manual_seed(upstream_seed)
    # Upstream gradients rounded to bfloat16, which every dtype here holds exactly.
    upstream = [torch.randn(o.shape, generator=g).bfloat16().to(o.dtype) for o in out]
    # allow_unused: with L = 1 the torch forms never read A (the first step has no gate).
    grads = torch.autograd.grad(out, list(leaves.values()), upstream, allow_unused=True)
    grads = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves.values(), grads, strict=True)]
    named = {"y": out[0], **({"last_state": out[1]} if return_last_state else {})}
    return {**named, **dict(zip(leaves, grads, strict=True))}


def assert_matches_reference(inputs, tol, return_last_state=True, **options):
    """The kernel's outputs and gradients against the torch forms on float64 copies of the same inputs."""
    ours = outputs_and_grads(inputs, "triton", return_last_state, **options)
    exact = {n: x.double() if x is not None else None for n, x in inputs.items()}
    reference = outputs_and_grads(exact, "torch", return_last_state, **options)
    assert ours.keys() == reference.keys()
    for name, x in ours.items():
        expected_dtype = torch.float32 if name == "last_state" else inputs[name if name != "y" else "u"].dtype
        assert x.dtype == expected_dtype, name
        assert not x.isnan().any(), name
        assert relative_error(x.double(), reference[name]) < tol, name


# (L, D, N, B layout, C layout, groups, optional terms, delta_softplus, chunk_size): each row varies a
# few things at once. Chunks: one (L = 1, and L <= chunk_size: the rescan alone), two with a last
# chunk of one step, and 3 to 7 with a shorter last one. The interpreter runs the scans one element at
# a time, so the chunk sizes keep the tiles of steps mostly full.
CASES = [
    (1, 6, 5, "fixed", "fixed", 2, OPTIONAL, True, 16),
    (17, 6, 5, "input", "input", 2, OPTIONAL, True, 4),
    (17, 4, 16, "grouped", "grouped", 2, OPTIONAL, True, 6),
    (17, 6, 4, "fixed", "grouped", 3, (), False, 16),
    (17, 9, 8, "grouped", "input", 3, ("z",), True, 64),
    (17, 7, 5, "input", "fixed", 1, ("D", "delta_bias"), False, 5),
    (100, 4, 5, "input", "fixed", 1, OPTIONAL, True, 16),
]


@pytest.mark.parametrize(("L", "dim", "N", "b_kind", "c_kind", "groups", "terms", "softplus", "chunk"), CASES)
def test_forward_and_backward_match_the_reference(L, dim, N, b_kind, c_kind, groups, terms, softplus, chunk):
    x = make_inputs(2, dim, L, N, b_kind, c_kind, groups=groups)
    x.update({name: None for name in OPTIONAL if name not in terms})
    assert_matches_reference(x, TOL[torch.float32], delta_softplus=softplus, chunk_size=chunk)


def test_many_chunks(monkeypatch):
    # chunk_size above the kernel's largest chunk (8 here) takes chunks of 8: 40 steps are 5 chunks,
    # and a pass over chunk states two boundaries at a time takes the 4 boundaries in 2 blocks, in
    # both directions (forward states, backward state gradients).
    monkeypatch.setattr(module, "_MAX_CHUNK", 8)
    monkeypatch.setattr(recurrence, "_MAX_CARRY_SLOTS", 2)
    x = make_inputs(2, 4, 40, 3, "input", "grouped", groups=2)
    assert_matches_reference(x, TOL[torch.float32], delta_softplus=True, chunk_size=64)


def test_without_the_last_state():
    # The unused last state still leaves the Function: its (zero) gradient must not disturb the others.
    x = make_inputs(2, 6, 17, 5, "input", "input")
    assert_matches_reference(
        x, TOL[torch.float32], return_last_state=False, delta_softplus=True, chunk_size=4
    )


@pytest.mark.parametrize(("b_kind", "c_kind", "groups"), [("input", "input", 1), ("grouped", "fixed", 2)])
def test_several_blocks_per_group(monkeypatch, b_kind, c_kind, groups):
    # With at most 4 channels per program, 10 channels in one group take blocks of 4, 4 and 2, and two
    # groups of 5 take 4 + 1 each: per-program shares of dB / dC are summed across blocks.
    monkeypatch.setattr(module, "_MAX_BLOCK_D", 4)
    x = make_inputs(2, 10, 17, 5, b_kind, c_kind, groups=groups)
    assert_matches_reference(x, TOL[torch.float32], delta_softplus=True, chunk_size=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    # 16-bit sequences and B / C beside float32 A, D and delta_bias, as the operator allows; the
    # kernel computes in float32, so only the rounding of its inputs and outputs shows.
    x = make_inputs(2, 6, 17, 5, "input", "grouped")
    x = {n: t.to(dtype) if n in ("u", "delta", "z", "B", "C") else t for n, t in x.items()}
    assert_matches_reference(x, TOL[dtype], delta_softplus=True, chunk_size=8)


@pytest.mark.parametrize("chunk", [64, 4])
def test_strong_decay_strided_inputs_and_broadcast_gradient(chunk):
    # delta * A down to about -2000 per step, inside one chunk and across chunk boundaries (the
    # chunk decays underflow to 0, nothing becomes inf or NaN); u, delta and B are read in place
    # through their strides (transposed views), and the gradient of a sum reaches the kernel with
    # stride 0.
    x = make_inputs(2, 6, 17, 5, "input", "fixed", a_scale=2000.0)
    x["u"], x["delta"] = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x["u"], x["delta"]))
    x["B"] = x["B"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not x["u"].is_contiguous() and not x["B"].is_contiguous()
    leaves = {n: t.detach().requires_grad_() for n, t in x.items()}
    options = dict(delta_softplus=True, return_last_state=True, chunk_size=chunk)
    y, last = selective_scan(**leaves, **options, backend="triton")
    grads = torch.autograd.grad(y.sum() + last.sum(), list(leaves.values()))
    exact = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    y_ref, last_ref = selective_scan(**exact, **options, backend="torch")
    expected = torch.autograd.grad(y_ref.sum() + last_ref.sum(), list(exact.values()))
    assert relative_error(y.double(), y_ref) < 1e-5 and relative_error(last.double(), last_ref) < 1e-5
    for name, ours, reference in zip(leaves, grads, expected, strict=True):
        assert torch.isfinite(ours).all(), name
        assert relative_error(ours.double(), reference) < 1e-5, name


@pytest.mark.parametrize(
    ("chunk", "buffers"),
    [(64, [(2, 6, 40), (2, 6, 5)]), (16, [(2, 6, 40), (2, 6, 5), (2, 2, 6, 5), (2, 2, 6)])],
)
def test_forward_buffers_and_nothing_kept_without_autograd(monkeypatch, chunk, buffers):
    # One chunk runs the rescan alone and allocates y and the last state only; three chunks add the
    # (batch, chunk boundaries, D, N) states and the chunks' summed step sizes. Without autograd
    # nothing is kept for a backward pass.
    shapes = []
    monkeypatch.setattr(
        module,
        "_new_output",
        lambda shape, dtype, device: shapes.append(shape) or torch.full(shape, float("nan")),
    )
    contexts, saved = [], []
    forward = module._SelectiveScanTriton.forward

    def spied_forward(ctx, *args):
        # Record what is saved for backward (ctx.saved_tensors itself cannot be read where nothing
        # was saved in every torch version: torch 2.11 raises there).
        contexts.append(ctx)
        save = ctx.save_for_backward
        ctx.save_for_backward = lambda *tensors: saved.append(tensors) or save(*tensors)
        return forward(ctx, *args)

    monkeypatch.setattr(module._SelectiveScanTriton, "forward", staticmethod(spied_forward))
    x = make_inputs(2, 6, 40, 5, "input", "input")
    with torch.no_grad():
        y, last = selective_scan(
            **x, delta_softplus=True, return_last_state=True, chunk_size=chunk, backend="triton"
        )
    expected, expected_last = selective_scan(
        **x, delta_softplus=True, return_last_state=True, backend="torch"
    )
    assert shapes == buffers
    assert len(contexts) == 1 and not hasattr(contexts[0], "chunk_size") and saved == []
    assert relative_error(y, expected) < 1e-5 and relative_error(last, expected_last) < 1e-5


def count_launches(monkeypatch) -> list:
    launches = []
    kernel = module._SelectiveScanTriton.apply
    monkeypatch.setattr(module._SelectiveScanTriton, "apply", lambda *a: launches.append(1) or kernel(*a))
    return launches


def test_seqvision_backend_triton_routes_through_the_kernel(monkeypatch):
    x = make_inputs(2, 6, 17, 5, "grouped", "input")
    expected = selective_scan(**x, delta_softplus=True)
    launches = count_launches(monkeypatch)
    monkeypatch.setenv("SEQVISION_BACKEND", "triton")
    out = selective_scan(**x, delta_softplus=True)  # backend="auto", CPU tensors
    assert len(launches) == 1
    assert relative_error(out, expected) < 1e-5


def test_float64_takes_the_torch_forms_under_auto_and_is_refused_by_name(monkeypatch):
    x = {n: t.double() for n, t in make_inputs(2, 6, 17, 5, "input", "input").items()}
    launches = count_launches(monkeypatch)
    monkeypatch.setenv("SEQVISION_BACKEND", "triton")
    assert selective_scan(**x).dtype == torch.float64
    assert not launches
    with pytest.raises(ValueError, match=r"backend='triton'.*float64"):
        selective_scan(**x, backend="triton")
