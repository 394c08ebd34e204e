"""The Triton linear_attention kernels (forward and backward), through Triton's interpreter on the CPU,
against the PyTorch reference: every decay shape, causal and non-causal, initial and final states,
odd lengths that are not a multiple of the chunk, Dk != Dv, head dims from 16 to 256, float32,
float16 and bfloat16, output buffers poisoned so an unwritten element shows up as NaN."""

import pytest
import torch

from seqvision.kernels import linear_attention
from seqvision.kernels.check import relative_error
from seqvision.kernels.linear_attention import triton as module

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
DECAYS = ["none", "per head", "per step", "per key"]
# Launch sizes the tests force to reach more chunks and blocks with short sequences.
SMALL_BLOCKS = {"CHUNK": 16, "ROWS": 16, "BLOCK_K": 16, "BLOCK_V": 16}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def poisoned(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(module, "_new_output", poisoned)


def make_inputs(decay, B=1, H=2, L=17, Dk=16, Dv=24, dtype=torch.float32, strength=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, Dk, generator=generator).to(dtype) for _ in range(2))
    v = torch.randn(B, H, L, Dv, generator=generator).to(dtype)
    shapes = {"none": None, "per head": (H,), "per step": (B, H, L), "per key": (B, H, L, Dk)}
    shape = shapes[decay]
    log_decay = None if shape is None else -strength * torch.rand(shape, generator=generator) - 0.01
    return q, k, v, log_decay


def run(backend, q, k, v, log_decay, upstream=None, **kwargs):
    """Outputs, and with ``upstream`` also the gradients of every input that has one."""
    inputs = [x for x in (q, k, v, log_decay, kwargs.get("initial_state")) if x is not None]
    inputs = [x.detach().requires_grad_(upstream is not None) for x in inputs]
    q, k, v = inputs[:3]
    log_decay = inputs[3] if log_decay is not None else None
    if "initial_state" in kwargs:
        kwargs["initial_state"] = inputs[-1]
    if backend == "torch" and q.dtype != torch.float64:  # in float32, from the same rounded inputs
        q, k, v = q.float(), k.float(), v.float()
    out = linear_attention(q, k, v, log_decay, backend=backend, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    if upstream is None:
        return outs
    loss = sum((o.float() * u).sum() for o, u in zip(outs, upstream, strict=True))
    return outs + torch.autograd.grad(loss, inputs)


def assert_close(ours, reference, tol):
    for x, ref in zip(ours, reference, strict=True):
        assert not x.isnan().any(), "an output element was never written"
        assert relative_error(x.float(), ref.float()) < tol


def assert_gradients_match(inputs, upstream, tol, **kwargs):
    """Outputs and every gradient of the kernel against the float32 reference.

    One gate per head (log_decay of shape (H,)) sums the gradient of every step: q dq - k dk summed
    over the sequence cancels, so its error grows with L; it is checked against the float64
    reference, to 1e-3."""
    ours = run("triton", *inputs, upstream, **kwargs)
    reference = run("torch", *inputs, upstream, **kwargs)
    log_decay = inputs[3]
    if log_decay is not None and log_decay.dim() == 1:
        exact_kwargs = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        exact = run("torch", *(x.double() for x in inputs), [u.double() for u in upstream], **exact_kwargs)
        gate = 3 + len(upstream)  # outputs, then the gradients of q, k, v, log_decay
        assert relative_error(ours[gate], exact[gate]) < 1e-3
        ours, reference = ours[:gate] + ours[gate + 1 :], reference[:gate] + reference[gate + 1 :]
    assert_close(ours, reference, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("L", [1, 17, 100])
def test_forward_matches_the_reference(L, decay, causal, dtype):
    inputs = make_inputs(decay, L=L, H=1 if L == 100 else 2, dtype=dtype)
    ours = run("triton", *inputs, causal=causal)
    assert ours[0].dtype == dtype
    assert_close(ours, run("torch", *inputs, causal=causal), TOL[dtype])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("L", [17, 100])
def test_backward_matches_the_reference(L, decay, causal):
    inputs = make_inputs(decay, L=L, H=1, Dk=24, Dv=16)
    upstream = (torch.randn(1, 1, L, 16, generator=torch.Generator().manual_seed(1)),)
    assert_gradients_match(inputs, upstream, TOL[torch.float32], causal=causal)


@pytest.mark.parametrize("decay", DECAYS)
def test_states_in_and_out_with_gradients(decay):
    # Initial and final state, both differentiable, with a batch of 2 and the per-head gate shared.
    q, k, v, log_decay = make_inputs(decay, B=2, L=70)
    initial_state = torch.randn(2, 2, 16, 24)
    upstream = (torch.randn(2, 2, 70, 24), torch.randn(2, 2, 16, 24))
    kwargs = {"initial_state": initial_state, "output_final_state": True}
    assert_gradients_match((q, k, v, log_decay), upstream, TOL[torch.float32], **kwargs)


@pytest.mark.parametrize("decay", ["per step", "per key"])
def test_float16_gradients(decay):
    inputs = make_inputs(decay, L=40, H=1, dtype=torch.float16)
    upstream = (torch.randn(1, 1, 40, 24),)
    ours = run("triton", *inputs, upstream)
    assert all(x.dtype == torch.float16 for x in ours[:4])
    assert_close(ours, run("torch", *inputs, upstream), TOL[torch.float16])


def test_bfloat16_inputs_with_float32_gates():
    inputs = make_inputs("per key", L=33, dtype=torch.bfloat16)
    ours = run("triton", *inputs)
    assert ours[0].dtype == torch.bfloat16
    assert_close(ours, run("torch", *inputs), TOL[torch.bfloat16])


@pytest.mark.parametrize(("Dk", "Dv"), [(16, 16), (256, 130), (20, 200)])
def test_head_dims_over_several_blocks(Dk, Dv):
    inputs = make_inputs("per step", L=20, H=1, Dk=Dk, Dv=Dv)
    upstream = (torch.randn(1, 1, 20, Dv),)
    assert_close(run("triton", *inputs, upstream), run("torch", *inputs, upstream), TOL[torch.float32])


@pytest.mark.parametrize("decay", ["per head", "per step", "per key"])
def test_strong_decay_stays_finite_and_as_exact_as_the_reference(decay, monkeypatch):
    # Gates down to exp(-2000) per step (a chunk's cumulative log-gate reaches about -32000, so any
    # positive exponent would overflow), over two chunks of 32 in row blocks of 16, make some results
    # ill-conditioned in float32 (the true gate gradient is ~1e-16 at most steps), so the kernel is
    # held to the float64 reference: outputs and q, k, v gradients no further from it than twice the
    # float32 reference is, plus 1e-6.
    monkeypatch.setattr(module, "_launch_sizes", lambda *args: {**SMALL_BLOCKS, "CHUNK": 32})
    inputs = make_inputs(decay, L=40, H=1, strength=2000.0)
    upstream = (torch.randn(1, 1, 40, 24, generator=torch.Generator().manual_seed(1)),)
    ours = run("triton", *inputs, upstream)
    assert all(x.isfinite().all() for x in ours)
    reference = run("torch", *inputs, upstream)
    exact = run("torch", *(x.double() for x in inputs), (upstream[0].double(),))
    for x, ref, truth in zip(ours[:4], reference[:4], exact[:4], strict=True):
        assert relative_error(x.double(), truth) <= 2 * relative_error(ref.double(), truth) + 1e-6
    # The gate gradient is a sum of q dq and k dk terms: its error is held to their float32 rounding
    # (or to the float32 reference's, where that is larger).
    terms = max((x * dx).abs().max().item() for x, dx in zip(inputs[:2], exact[1:3], strict=True))
    reference_error = (reference[4].double() - exact[4]).abs().max().item()
    assert (ours[4].double() - exact[4]).abs().max().item() <= 2 * reference_error + 1e-5 * terms


@pytest.mark.parametrize("decay", DECAYS)
def test_many_chunks_and_blocks(decay, monkeypatch):
    # Head dims of 24 in blocks of 16, row blocks of 16 and chunks of 32 over 70 steps (per-key
    # decay: 16 over 40 steps), the last one partial: the passes over chunk states walk three chunks
    # from an initial state and from the final state's gradient, over 24 x 24 state entries in three
    # blocks of 256 (the last partial); no and scalar decays take the dq/dk kernel's path with two
    # row blocks in a chunk, scalar ones their gate-gradient sums from two key blocks; per-key decay
    # the path whose row block is the whole chunk.
    chunk, L = (16, 40) if decay == "per key" else (32, 70)
    monkeypatch.setattr(module, "_launch_sizes", lambda *args: {**SMALL_BLOCKS, "CHUNK": chunk})
    # Weak decays (about exp(-2) over a chunk), so the carried states weigh in every output.
    q, k, v, log_decay = make_inputs(decay, H=1, L=L, Dk=24, Dv=24, strength=0.1)
    upstream = (torch.randn(1, 1, L, 24), torch.randn(1, 1, 24, 24))
    kwargs = {"initial_state": torch.randn(1, 1, 24, 24), "output_final_state": True}
    assert_gradients_match((q, k, v, log_decay), upstream, TOL[torch.float32], **kwargs)


def test_streaming_in_pieces_equals_the_whole_sequence():
    q, k, v, log_decay = make_inputs("per key", L=45, H=1)
    whole = linear_attention(q, k, v, log_decay, backend="triton")
    state, pieces = None, []
    for piece in (slice(0, 20), slice(20, 21), slice(21, 45)):
        out, state = linear_attention(
            q[:, :, piece], k[:, :, piece], v[:, :, piece], log_decay[:, :, piece],
            initial_state=state, output_final_state=True, backend="triton",
        )  # fmt: skip
        pieces.append(out)
    assert relative_error(torch.cat(pieces, dim=2), whole) < 1e-5


@pytest.mark.parametrize("decay", ["per step", "per key"])
def test_non_contiguous_inputs(decay):
    # (B, L, H, D) tensors seen as (B, H, L, D), as a model's fused projection produces them; the
    # log-gates too (read through their strides by the first kernel).
    q, k, v = (torch.randn(2, 30, 2, 16).transpose(1, 2) for _ in range(3))
    log_decay = -torch.rand(2, 30, 2, *((16,) if decay == "per key" else ())).transpose(1, 2)
    out = linear_attention(q, k, v, log_decay, backend="triton")
    assert relative_error(out, linear_attention(q, k, v, log_decay, backend="torch")) < 1e-5


def test_float64_is_refused_by_the_kernel_and_auto_keeps_the_reference(monkeypatch):
    q, k, v, _ = make_inputs("none", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"backend='triton' .* got float64"):
        linear_attention(q, k, v, backend="triton")
    monkeypatch.setenv("SEQVISION_BACKEND", "triton")
    out = linear_attention(q, k, v)
    assert out.dtype == torch.float64
    assert relative_error(out, linear_attention(q, k, v, form="recurrent", backend="torch")) < 1e-12


def test_vir_forward_under_seqvision_backend_triton(monkeypatch):
    # The environment override reaches the retention inside a model: the logits agree.
    import timm

    import seqvision  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("vir_tiny_patch16_224", img_size=64, depth=2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        launches = []
        kernel = module._LinearAttentionTriton.apply
        monkeypatch.setattr(
            module._LinearAttentionTriton, "apply", lambda *a: launches.append(1) or kernel(*a)
        )
        monkeypatch.setenv("SEQVISION_BACKEND", "triton")
        out = model(x)
    assert launches
    assert relative_error(out, expected) < 1e-5
