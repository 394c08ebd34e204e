r"""Decayed linear attention: retention, Mamba-2/SSD, GLA / LightNet and plain linear attention.

One operator covers the whole family. With ``q, k`` of shape (B, H, L, Dk) and ``v`` of shape
(B, H, L, Dv), a state ``S`` of shape (Dk, Dv) per (batch, head) evolves as

    S_t = diag(a_t) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t,

where ``a_t = exp(log_decay_t)`` is a gate in (0, 1]. The shape of ``log_decay`` selects the member:

==================  ===================================================================
``None``            no decay: plain linear attention (and LightNet's non-causal scan)
``(H,)``            one constant per head: retention (ViR, RetNet)
``(B, H, L)``       one data-dependent scalar per head and step: Mamba-2 / SSD
``(B, H, L, Dk)``   one data-dependent gate per key channel: GLA, LightNet's recurrence
==================  ===================================================================

Written out, ``o_t = scale * sum_s w(t, s) (q_t . k_s) v_s``. The gate ``a_j`` sits between
positions j-1 and j and ``w(t, s)`` is the product of the gates between s and t:

* causal: ``s <= t`` and ``w = prod_{j=s+1..t} a_j`` (``w = 1`` for ``s = t``);
* non-causal: every s, ``w = prod_{j=min(s,t)+1..max(s,t)} a_j``, a symmetric mask. It equals a
  forward scan plus a reversed scan with the diagonal counted once.

For per-key decay the product is elementwise over the key channels inside the dot product.

Three forms compute the same function:

``recurrent``  the loop above, one step at a time: O(L) time, constant memory, the ground truth.
``parallel``   the L x L weighted score matrix: O(L^2) memory.
``chunk``      exact scores inside chunks of ``chunk_size`` tokens and the state ``S`` carried
               between chunks: O(L * chunk_size). Only the chunk-to-chunk state update is a loop.

The chunk form never divides by a cumulative gate. Every exponent it evaluates is a (masked)
difference ``b_t - b_s`` with ``s <= t`` of the cumulative log-gate, so it is <= 0 and ``exp`` cannot
overflow however strong the decay; per-key decays route each pair through a reference position
between the two (``exp(b_t - b_r) * exp(b_r - b_s)``) to keep the matrix products.

``backend="triton"`` (or ``"auto"`` on CUDA tensors) runs the chunk form as fused Triton kernels,
forward and backward, for float32, float16 and bfloat16 inputs (float32 accumulation; see the
section at the end of this file). Their gate gradient is the reverse cumulative sum of
``q dq - k dk``, as in flash-linear-attention: exact in exact arithmetic, but for one constant gate
per head (shape ``(H,)``) it sums the whole sequence and float32 cancellation grows with L (about
1e-4 relative at L = 100). The models here keep such gates fixed.
"""

from __future__ import annotations

import math

import torch

from seqvision.utils.checks import check_positive_int

from ._common import (
    check_aux_dtype,
    check_form,
    check_nonpositive,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_backend,
)
from ._triton import DOT_IEEE, DOT_TF32, dot_mode, tl
from ._triton import triton as _triton

if _triton is not None:
    from ._triton import dot

FORMS = ("parallel", "chunk", "recurrent")

# Sub-block edge for exact per-key-decay scores inside a chunk: pairs inside a sub-block are computed
# with their own exponent (c x c x Dk work per sub-block), pairs across sub-blocks use matmuls.
_MAX_SUB_BLOCK = 16


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    causal: bool = True,
    form: str = "chunk",
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decayed linear attention (see the module docstring for the math).

    Args:
        q: queries (B, H, L, Dk).
        k: keys (B, H, L, Dk).
        v: values (B, H, L, Dv).
        log_decay: log of the gates, <= 0: None, (H,), (B, H, L) or (B, H, L, Dk). Same dtype as the
            inputs, or float32 beside float16/bfloat16 inputs.
        causal: causal scan (default) or the symmetric non-causal mask.
        form: ``"chunk"`` (default), ``"parallel"`` or ``"recurrent"``; all give the same result.
        chunk_size: tokens per chunk for the chunk form; any L works, it need not divide L.
        initial_state: state before the first token (B, H, Dk, Dv); causal only.
        output_final_state: also return the state after the last token (causal only).
        scale: factor on ``q``; defaults to ``Dk ** -0.5``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``o`` (B, H, L, Dv) in the dtype of ``q``, or ``(o, final_state)`` with ``final_state``
        (B, H, Dk, Dv) in float64 for float64 inputs and float32 otherwise, when
        ``output_final_state`` is set. Streaming a sequence piece by piece through
        ``initial_state``/``output_final_state`` gives the same outputs as the whole sequence.
    """
    _check_arguments(q, k, v, log_decay, causal, form, chunk_size, initial_state, output_final_state, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = (q, k, v, log_decay, initial_state)
    if resolve_backend(backend, *tensors, op="linear_attention", has_triton=_triton is not None) == "triton":
        o, final_state = _triton_linear_attention(q, k, v, log_decay, causal, initial_state, scale)
        return (o, final_state) if output_final_state else o

    dtype = compute_dtype(q.dtype)
    qs, ks, vs = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    gates = _as_gate_tensor(log_decay, q.shape, dtype)
    state = None if initial_state is None else initial_state.to(dtype)

    if causal:
        o, final_state = _CAUSAL_FORMS[form](qs, ks, vs, gates, state, chunk_size)
    else:
        o, final_state = _NONCAUSAL_FORMS[form](qs, ks, vs, gates, chunk_size), None
    o = o.to(q.dtype)
    return (o, final_state) if output_final_state else o


def _check_arguments(q, k, v, log_decay, causal, form, chunk_size, initial_state, output_final_state, scale):
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_same_device(("q", "k", "v"), (q, k, v))
    B, H, L, Dk = q.shape
    check_shape("k", k, q.shape, "(B, H, L, Dk) like q")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must have shape (B, H, L, Dv) = ({B}, {H}, {L}, Dv) like q, got {tuple(v.shape)}"
        )
    if L == 0 or Dk == 0 or v.shape[-1] == 0:
        raise ValueError(f"q, k, v must be non-empty, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_form(form, FORMS)
    check_positive_int("chunk_size", chunk_size)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if log_decay is not None:
        check_tensor("log_decay", log_decay)
        allowed = {(H,): "(H,)", (B, H, L): "(B, H, L)", (B, H, L, Dk): "(B, H, L, Dk)"}
        if tuple(log_decay.shape) not in allowed:
            shapes = ", ".join(f"{name} = {shape}" for shape, name in allowed.items())
            raise ValueError(f"log_decay must have shape {shapes}; got {tuple(log_decay.shape)}")
        check_aux_dtype("log_decay", log_decay, q.dtype)
        check_same_device(("q", "log_decay"), (q, log_decay))
        check_nonpositive("log_decay", log_decay)
    if not causal and (initial_state is not None or output_final_state):
        raise ValueError(
            "initial_state and output_final_state need causal=True: a non-causal scan has no end state"
        )
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_shape("initial_state", initial_state, (B, H, Dk, v.shape[-1]), "(B, H, Dk, Dv)")
        check_aux_dtype("initial_state", initial_state, q.dtype)
        check_same_device(("q", "initial_state"), (q, initial_state))


def _as_gate_tensor(log_decay: torch.Tensor | None, q_shape: torch.Size, dtype: torch.dtype):
    """Bring the log-gates to (B or 1, H, L) for scalar decays or (B, H, L, Dk) for per-key decays."""
    if log_decay is None:
        return None
    _, H, L, _ = q_shape
    g = log_decay.to(dtype)
    return g.view(1, H, 1).expand(1, H, L) if g.dim() == 1 else g


def _per_channel(x: torch.Tensor, scalar: bool) -> torch.Tensor:
    """View scalar log-gates (B', H, ..., L) as (B', H, ..., L, 1) so they broadcast like per-key ones."""
    return x[..., None] if scalar else x


def _gate_for_state(gates: torch.Tensor) -> torch.Tensor:
    """View log-gates (..., L) or (..., L, Dk) so they broadcast against states (..., L, Dk, Dv)."""
    return _per_channel(gates, gates.dim() == 3)[..., None]


def _reverse_gates(gates: torch.Tensor) -> torch.Tensor:
    """Gates of the time-reversed sequence: the gate between reversed steps t-1 and t is a_{L-t}."""
    shifted = torch.cat((gates[:, :, 1:], torch.zeros_like(gates[:, :, :1])), dim=2)
    return shifted.flip(2)


def _diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The s = t term (q_t . k_t) v_t, counted by both directions of a non-causal scan."""
    return (q * k).sum(-1, keepdim=True) * v


# ------------------------------------------------------------------------------------------------
# recurrent form: the readable ground truth
# ------------------------------------------------------------------------------------------------


def _recurrent_causal(q, k, v, gates, state, chunk_size):
    B, H, L, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state
    step_gates = None if gates is None else _gate_for_state(gates).exp()
    # Written into one preallocated output, so memory stays one state plus the output.
    o = q.new_empty(B, H, L, v.shape[-1])
    for t in range(L):
        if step_gates is not None:
            S = S * step_gates[:, :, t]
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o, S


def _recurrent_noncausal(q, k, v, gates, chunk_size):
    forward, _ = _recurrent_causal(q, k, v, gates, None, chunk_size)
    B, H, L, Dk = q.shape
    # Backward pass: R_t = a_{t+1} R_{t+1} + k_t^T v_t, the gate a_{t+1} sitting between t and t+1.
    R = q.new_zeros(B, H, Dk, v.shape[-1])
    step_gates = None if gates is None else _gate_for_state(gates).exp()
    backward = torch.empty_like(forward)
    for t in reversed(range(L)):
        if step_gates is not None and t < L - 1:
            R = R * step_gates[:, :, t + 1]
        R = R + k[:, :, t, :, None] * v[:, :, t, None, :]
        backward[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t], R)
    return forward + backward - _diagonal(q, k, v)


# ------------------------------------------------------------------------------------------------
# parallel form: the L x L matrix
# ------------------------------------------------------------------------------------------------


def _pair_weights(cum: torch.Tensor, causal: bool) -> torch.Tensor:
    """w(t, s) from cumulative log-gates ``cum`` (..., L): causal exp(c_t - c_s) on s <= t, else
    exp(-|c_t - c_s|). Returns (..., L, L), built in place because it is this form's largest buffer."""
    w = cum[..., :, None] - cum[..., None, :]
    if causal:
        future = torch.ones(w.shape[-2:], dtype=torch.bool, device=w.device).triu_(1)
        return w.masked_fill_(future, -math.inf).exp_()
    return w.abs_().neg_().exp_()


def _parallel_scores(q, k, gates, causal):
    """Weighted scores (B, H, L, L), indexed (t, s)."""
    scores = q @ k.transpose(-1, -2)
    if gates is None:
        if causal:
            scores = scores.tril()
        return scores
    if gates.dim() == 3:
        w = _pair_weights(gates.cumsum(-1), causal)
        # In place when autograd does not need the unweighted scores: L x L buffers dominate here.
        return scores * w if w.requires_grad else scores.mul_(w)
    # Per-key decay: the weight differs per key channel, so the (Dk, L, L) tensor is unavoidable.
    w = _pair_weights(gates.cumsum(2).transpose(-1, -2), causal)  # (B, H, Dk, L, L)
    return torch.einsum("bhtk,bhsk,bhkts->bhts", q, k, w)


def _parallel_causal(q, k, v, gates, state, chunk_size):
    o = _parallel_scores(q, k, gates, causal=True) @ v
    if gates is None:
        final = k.transpose(-1, -2) @ v
        if state is not None:
            o = o + q @ state
            final = final + state
        return o, final
    cum = _per_channel(gates.cumsum(2), gates.dim() == 3)  # log of the product of the gates up to t
    last = cum[:, :, -1:]
    final = (k * (last - cum).exp()).transpose(-1, -2) @ v
    if state is not None:
        o = o + (q * cum.exp()) @ state
        final = final + last.transpose(-1, -2).exp() * state
    return o, final


def _parallel_noncausal(q, k, v, gates, chunk_size):
    return _parallel_scores(q, k, gates, causal=False) @ v


# ------------------------------------------------------------------------------------------------
# chunk form: exact scores inside chunks, the state carried between them
# ------------------------------------------------------------------------------------------------


def _sub_block(chunk: int) -> int:
    """Largest divisor of ``chunk`` that is at most _MAX_SUB_BLOCK."""
    return max(d for d in range(1, min(chunk, _MAX_SUB_BLOCK) + 1) if chunk % d == 0)


def _per_key_scores(q: torch.Tensor, k: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """Exact causal scores sum_i q_ti k_si exp(cum_ti - cum_si) inside each chunk.

    q, k, cum: (..., C, Dk), ``cum`` the cumulative log-gate from the chunk start (non-increasing).
    Returns (..., C, C), zero above the diagonal.

    Pairs inside one sub-block of c tokens get their own exponent. A pair (t, s) with s in an earlier
    sub-block J goes through r = the last token of J: exp(cum_t - cum_r) * exp(cum_r - cum_s), where
    both exponents are <= 0 because s <= r < t, so the cross-block scores are matrix products of
    rescaled q and k that cannot overflow.
    """
    C = q.shape[-2]
    c = _sub_block(C)
    m = C // c
    qb, kb, cb = (x.unflatten(-2, (m, c)) for x in (q, k, cum))  # (..., m, c, Dk)

    inside = cb[..., :, None, :] - cb[..., None, :, :]  # (..., m, c_t, c_s, Dk)
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu_(1)
    inside = inside.masked_fill(upper[:, :, None], -math.inf).exp()
    diagonal_blocks = torch.einsum("...mtd,...msd,...mtsd->...mts", qb, kb, inside)
    eye = torch.eye(m, dtype=q.dtype, device=q.device)
    scores = (diagonal_blocks[..., :, :, None, :] * eye[:, None, :, None]).reshape(*q.shape[:-2], C, C)
    if m == 1:
        return scores

    ref = cb[..., :, -1, :]  # (..., m, Dk): cumulative log-gate at the last token of each sub-block
    k_ref = kb * (ref[..., :, None, :] - cb).exp()  # (..., m, c, Dk), exponent <= 0
    block_of_t = torch.arange(C, device=q.device) // c
    later = block_of_t[None, :] > torch.arange(m, device=q.device)[:, None]  # (m_J, C_t)
    to_t = (cum[..., None, :, :] - ref[..., :, None, :]).masked_fill(~later[:, :, None], -math.inf)
    q_ref = q[..., None, :, :] * to_t.exp()  # (..., m_J, C_t, Dk), zero where t is not after J
    cross = torch.einsum("...jtd,...jsd->...tjs", q_ref, k_ref).reshape(*q.shape[:-2], C, C)
    return scores + cross


def _chunk_causal(q, k, v, gates, state, chunk_size):
    B, H, L, Dk = q.shape
    C = min(chunk_size, L)
    n = -(-L // C)
    pad = n * C - L
    if pad:
        # Zero q, k, v and a zero log-gate (gate 1) at the end change neither outputs nor final state.
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        if gates is not None:
            gates = torch.nn.functional.pad(gates, (0, pad) if gates.dim() == 3 else (0, 0, 0, pad))
    q, k, v = (x.unflatten(2, (n, C)) for x in (q, k, v))  # (B, H, n, C, D)

    causal_mask = torch.ones(C, C, dtype=torch.bool, device=q.device).triu_(1)
    if gates is None:
        scores = (q @ k.transpose(-1, -2)).masked_fill_(causal_mask, 0.0)
        chunk_kv = k.transpose(-1, -2) @ v  # (B, H, n, Dk, Dv): what each chunk adds to the state
        q_from_start, chunk_gate = q, None
    else:
        cum = gates.unflatten(2, (n, C)).cumsum(3)  # cumulative log-gate from the chunk start
        if gates.dim() == 3:
            w = (cum[..., :, None] - cum[..., None, :]).masked_fill_(causal_mask, -math.inf).exp_()
            scores = (q @ k.transpose(-1, -2)) * w
        else:
            scores = _per_key_scores(q, k, cum)
        cum = _per_channel(cum, gates.dim() == 3)  # (B', H, n, C, 1 or Dk)
        last = cum[..., -1:, :]
        chunk_kv = (k * (last - cum).exp()).transpose(-1, -2) @ v
        q_from_start = q * cum.exp()
        chunk_gate = last.transpose(-1, -2).exp()  # (B', H, n, 1 or Dk, 1): gate over a whole chunk

    S = q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state
    entering = []
    for i in range(n):
        entering.append(S)
        if chunk_gate is not None:
            S = S * chunk_gate[:, :, i]
        S = S + chunk_kv[:, :, i]
    o = scores @ v + q_from_start @ torch.stack(entering, dim=2)
    return o.flatten(2, 3)[:, :, :L], S


def _chunk_noncausal(q, k, v, gates, chunk_size):
    if gates is None:
        # Without decay every token sees every token with weight 1: o = q (K^T V), one pass.
        return q @ (k.transpose(-1, -2) @ v)
    forward, _ = _chunk_causal(q, k, v, gates, None, chunk_size)
    backward, _ = _chunk_causal(q.flip(2), k.flip(2), v.flip(2), _reverse_gates(gates), None, chunk_size)
    return forward + backward.flip(2) - _diagonal(q, k, v)


_CAUSAL_FORMS = {"recurrent": _recurrent_causal, "parallel": _parallel_causal, "chunk": _chunk_causal}
_NONCAUSAL_FORMS = {
    "recurrent": _recurrent_noncausal,
    "parallel": _parallel_noncausal,
    "chunk": _chunk_noncausal,
}


# ------------------------------------------------------------------------------------------------
# Triton: the chunk form as fused kernels (causal; the non-causal scan is two causal ones)
# ------------------------------------------------------------------------------------------------
#
# Tokens are cut into chunks of CHUNK (the state is carried between chunks) and the outputs into row
# blocks of ROWS tokens inside a chunk. Forward: (1) the cumulative log-gate from each chunk's start,
# (2) one program per (Dk block, Dv block, batch x head) walks the chunks and stores the state entering
# each (float32, (B, H, chunks, Dk, Dv)), (3) one program per (row block, Dv block, batch x head) adds
# the inter-chunk term q_t S and the exact intra-chunk scores times v. Backward: the gradient of each
# chunk's end state by the reverse walk, then one kernel each for dq, dk and dv over row blocks; the
# gate gradient is the reverse cumulative sum of q * dq - k * dk (plus the final state's own term).
#
# Every exponent is a masked difference b_t - b_s with s <= t of the cumulative log-gate from the
# chunk start, so it is <= 0. For per-key decay, pairs in different row blocks go through a reference
# position r between them (exp(b_t - b_r) exp(b_r - b_s), both <= 0) and stay matrix products; pairs
# inside one row block take their own exponent, one column at a time.

# Decay modes of the kernels.
_NO_DECAY, _SCALAR_DECAY, _PER_KEY_DECAY = 0, 1, 2


def _triton_linear_attention(q, k, v, log_decay, causal, initial_state, scale):
    """The Triton path of :func:`linear_attention`, with its arguments already checked.

    Returns ``(o, final_state)``, ``final_state`` None for the non-causal scan."""
    gates = None
    if log_decay is not None:
        H, L = q.shape[1], q.shape[2]
        gates = log_decay.view(1, H, 1).expand(1, H, L) if log_decay.dim() == 1 else log_decay
    if causal:
        return _LinearAttentionTriton.apply(q, k, v, gates, initial_state, scale)
    if gates is None:
        # Every token sees every token with weight 1: two matrix products are already the fast path.
        dtype = compute_dtype(q.dtype)
        o = (q.to(dtype) * scale) @ (k.to(dtype).transpose(-1, -2) @ v.to(dtype))
        return o.to(q.dtype), None
    forward, _ = _LinearAttentionTriton.apply(q, k, v, gates, None, scale)
    flipped = (x.flip(2) for x in (q, k, v))
    backward, _ = _LinearAttentionTriton.apply(*flipped, _reverse_gates(gates), None, scale)
    dtype = compute_dtype(q.dtype)
    diagonal = _diagonal(q.to(dtype) * scale, k.to(dtype), v.to(dtype))
    return (forward.to(dtype) + backward.flip(2).to(dtype) - diagonal).to(q.dtype), None


def _launch_sizes(L: int, Dk: int, Dv: int, mode: int) -> dict[str, int]:
    """Chunk, row-block and head-dim block sizes (powers of two, at least 16 for tl.dot)."""
    chunk = max(16, min(64, _triton.next_power_of_2(L)))
    # Per-key decay computes its diagonal row block one column at a time: keep that block small.
    rows = 16 if mode == _PER_KEY_DECAY else chunk
    block_k = max(16, min(64, _triton.next_power_of_2(Dk)))
    block_v = max(16, min(64, _triton.next_power_of_2(Dv)))
    return {"CHUNK": chunk, "ROWS": rows, "BLOCK_K": block_k, "BLOCK_V": block_v}


def _dot_modes(dtype: torch.dtype) -> dict[str, int]:
    """Products of tiles in the inputs' precision, but products with a state (a sum over the whole
    sequence so far, which can outgrow float16's range) in float32 or tf32."""
    mode = dot_mode(dtype)
    return {"DOT": mode, "STATE_DOT": DOT_IEEE if mode == DOT_IEEE else DOT_TF32}


def _new_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None):
    """Output buffers of the Triton kernels (a seam for tests, which poison them)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


class _LinearAttentionTriton(torch.autograd.Function):
    """Causal decayed linear attention; gates None, (B or 1, H, L) or (B, H, L, Dk) log-gates."""

    @staticmethod
    def forward(ctx, q, k, v, gates, initial_state, scale):
        B, H, L, Dk = q.shape
        Dv = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mode = _NO_DECAY if gates is None else _SCALAR_DECAY if gates.dim() == 3 else _PER_KEY_DECAY
        sizes = _launch_sizes(L, Dk, Dv, mode)
        chunks = _triton.cdiv(L, sizes["CHUNK"])
        cum = _chunk_cumulative_gates(gates, q, sizes["CHUNK"]) if mode else q  # q: an unused pointer
        f32 = torch.float32
        states = torch.empty(B, H, chunks, Dk, Dv, dtype=f32, device=q.device)
        final = _new_output((B, H, Dk, Dv), q, f32)
        has_initial = initial_state is not None
        initial = initial_state.contiguous() if has_initial else final  # final: an unused pointer
        common = {"DECAY": mode, **_dot_modes(q.dtype), **sizes}
        grid = (_triton.cdiv(Dk, sizes["BLOCK_K"]), _triton.cdiv(Dv, sizes["BLOCK_V"]), B * H)
        _forward_states_kernel[grid](
            k, v, cum, initial, states, final, L, Dk, Dv, chunks, HAS_INITIAL=has_initial, **common
        )
        o = _new_output((B, H, L, Dv), q)
        grid = (_triton.cdiv(L, sizes["ROWS"]), _triton.cdiv(Dv, sizes["BLOCK_V"]), B * H)
        _forward_output_kernel[grid](q, k, v, cum, states, o, scale, L, Dk, Dv, chunks, **common)

        ctx.save_for_backward(q, k, v, cum, states, final, initial_state)
        ctx.mode, ctx.sizes, ctx.scale = mode, sizes, scale
        ctx.gate_shape = None if gates is None else gates.shape
        ctx.gate_dtype = None if gates is None else gates.dtype
        return o, final

    @staticmethod
    def backward(ctx, grad_o, grad_final):
        q, k, v, cum, states, final, initial_state = ctx.saved_tensors
        B, H, L, Dk = q.shape
        Dv = v.shape[-1]
        mode, sizes, scale = ctx.mode, ctx.sizes, ctx.scale
        chunks = states.shape[2]
        f32 = torch.float32
        grad_o = torch.zeros_like(v) if grad_o is None else grad_o.contiguous()
        has_grad_final = grad_final is not None
        grad_final = grad_final.contiguous() if has_grad_final else final  # an unused pointer
        common = {"DECAY": mode, **_dot_modes(q.dtype), **sizes}

        # grad_ends[:, :, c]: the gradient of the state at the end of chunk c (entering chunk c + 1).
        grad_ends = torch.empty_like(states)
        grad_initial = _new_output((B, H, Dk, Dv), q, f32)
        grid = (_triton.cdiv(Dk, sizes["BLOCK_K"]), _triton.cdiv(Dv, sizes["BLOCK_V"]), B * H)
        _backward_states_kernel[grid](
            q, grad_o, cum, grad_final, grad_ends, grad_initial, scale, L, Dk, Dv, chunks,
            HAS_GRAD_FINAL=has_grad_final, **common,
        )  # fmt: skip
        grad_q = _new_output((B, H, L, Dk), q, f32)
        grad_k = _new_output((B, H, L, Dk), q, f32)
        grad_v = _new_output((B, H, L, Dv), q, f32)
        rows = _triton.cdiv(L, sizes["ROWS"])
        grid = (rows, _triton.cdiv(Dk, sizes["BLOCK_K"]), B * H)
        # grad_cum: d loss / d cumulative log-gate, written by the dq kernel and completed by the dk one.
        grad_cum = _new_output((B, H, L, Dk), q, f32) if mode != _NO_DECAY else grad_q  # else: unused
        _backward_dq_kernel[grid](
            q, k, v, cum, states, grad_o, grad_q, grad_cum, scale, L, Dk, Dv, chunks, **common
        )
        _backward_dk_kernel[grid](
            q, k, v, cum, grad_ends, grad_o, grad_k, grad_cum, scale, L, Dk, Dv, chunks, **common
        )
        grid = (rows, _triton.cdiv(Dv, sizes["BLOCK_V"]), B * H)
        _backward_dv_kernel[grid](q, k, cum, grad_ends, grad_o, grad_v, scale, L, Dk, Dv, chunks, **common)

        grad_gates = None
        if mode != _NO_DECAY:
            grad_gates = _gate_gradient(grad_cum, final, grad_final if has_grad_final else None)
            if mode == _SCALAR_DECAY:
                grad_gates = grad_gates.sum(-1)
            if ctx.gate_shape[0] == 1 and B > 1:
                grad_gates = grad_gates.sum(0, keepdim=True)
            grad_gates = grad_gates.to(ctx.gate_dtype)
        grad_state = None if initial_state is None else grad_initial.to(initial_state.dtype)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_gates, grad_state, None


def _chunk_cumulative_gates(gates: torch.Tensor, q: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cumulative log-gates from each chunk's start, float32 (B, H, L, 1 or Dk), read through strides."""
    B, H, L, Dk = q.shape
    width = Dk if gates.dim() == 4 else 1
    cum = torch.empty(B, H, L, width, dtype=torch.float32, device=q.device)
    strides = gates.stride() if gates.dim() == 4 else (*gates.stride(), 0)
    if gates.shape[0] == 1:
        strides = (0, *strides[1:])
    block = max(16, min(64, _triton.next_power_of_2(width)))
    grid = (_triton.cdiv(L, chunk), _triton.cdiv(width, block), B * H)
    _chunk_cumsum_kernel[grid](gates, cum, *strides, H, L, width, CHUNK=chunk, BLOCK=block)
    return cum


def _gate_gradient(grad_cum, final, grad_final):
    """d loss / d log-gate, float32 (B, H, L, Dk), from d loss / d b_t for the cumulative log-gate b.

    The loss depends on b_t only through exp(b_t) on q_t, exp(-b_t) on k_t and exp(b_L) on the final
    state, so d loss / d b_t = q_t dq_t - k_t dk_t (the kernels leave out the s = t pair, which adds
    the same to both and cancels) plus final * d final at the last step; a gate at step t enters
    every b_t' with t' >= t: a reverse cumulative sum."""
    if grad_final is not None:
        grad_cum[:, :, -1] += (final * grad_final.float()).sum(-1)
    return grad_cum.flip(2).cumsum(2).flip(2)


if _triton is not None:

    @_triton.jit
    def _chunk_cumsum_kernel(
        g_ptr, cum_ptr, stride_b, stride_h, stride_t, stride_k, H, L, WIDTH,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # cum[b, h, t] = sum of g over the chunk's steps up to t, in float32.
        bh = tl.program_id(2)
        pos = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (pos < L)[:, None] & (cols < WIDTH)[None, :]
        base = (bh // H).to(tl.int64) * stride_b + (bh % H) * stride_h
        g = tl.load(g_ptr + base + pos[:, None] * stride_t + cols[None, :] * stride_k, mask=mask, other=0.0)
        cum = tl.cumsum(g.to(tl.float32), axis=0)
        out = (bh.to(tl.int64) * L + pos[:, None]) * WIDTH + cols[None, :]
        tl.store(cum_ptr + out, cum, mask=mask)

    @_triton.jit
    def _load_cum(cum_ptr, bh, pos, cols, L, DK, DECAY: tl.constexpr):
        """Cumulative log-gates at positions ``pos`` (R,): (R, 1) for scalar, (R, BLOCK_K) per-key decay.

        Positions past the end read the last step's value, the chunk's smallest, so every difference
        b_t - b_s with s <= t stays <= 0 there too (masked rows and columns then hold zeros, not
        0 * inf)."""
        pos = tl.maximum(tl.minimum(pos, L - 1), 0)
        if DECAY == 2:
            offset = (bh.to(tl.int64) * L + pos[:, None]) * DK + cols[None, :]
            b = tl.load(cum_ptr + offset, mask=(cols < DK)[None, :], other=0.0)
        else:
            b = tl.load(cum_ptr + bh.to(tl.int64) * L + pos)[:, None]
        return b

    @_triton.jit
    def _load_tile(ptr, bh, pos, cols, L, D, scale):
        """Rows ``pos`` and columns ``cols`` of a contiguous (B * H, L, D) tensor, float32, 0 outside."""
        offset = (bh.to(tl.int64) * L + pos[:, None]) * D + cols[None, :]
        tile = tl.load(ptr + offset, mask=(pos < L)[:, None] & (cols < D)[None, :], other=0.0)
        return tile.to(tl.float32) * scale

    @_triton.jit
    def _store_tile(ptr, tile, bh, pos, cols, L, D):
        offset = (bh.to(tl.int64) * L + pos[:, None]) * D + cols[None, :]
        tl.store(ptr + offset, tile.to(ptr.dtype.element_ty), mask=(pos < L)[:, None] & (cols < D)[None, :])

    @_triton.jit
    def _state_offsets(bh, chunk, chunks, rows, cols, DK, DV):
        """Offsets and mask of block (rows, cols) of state ``chunk`` in a (B * H, chunks, Dk, Dv) tensor."""
        base = (bh.to(tl.int64) * chunks + chunk) * DK * DV
        return base + rows[:, None] * DV + cols[None, :], (rows < DK)[:, None] & (cols < DV)[None, :]

    @_triton.jit
    def _pair_gates(b_rows, b_cols, row_pos, col_pos):
        """exp(b_t - b_s) for scalar gates where s <= t, else 0: rows t (R, 1), columns s (S, 1)."""
        keep = col_pos[None, :] <= row_pos[:, None]
        return tl.exp(tl.where(keep, b_rows - tl.trans(b_cols), float("-inf")))

    @_triton.jit
    def _forward_states_kernel(
        k_ptr, v_ptr, cum_ptr, initial_ptr, states_ptr, final_ptr, L, DK, DV, CHUNKS,
        HAS_INITIAL: tl.constexpr, DECAY: tl.constexpr, DOT: tl.constexpr, STATE_DOT: tl.constexpr,
        CHUNK: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # S <- exp(b_last) S + sum_s (k_s exp(b_last - b_s))^T v_s, chunk after chunk; stores the state
        # entering every chunk.
        bh = tl.program_id(2)
        k_cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        v_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        offset, mask = _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV)
        if HAS_INITIAL:
            S = tl.load(initial_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        else:
            S = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
        for chunk in range(CHUNKS):
            chunk_offset, _ = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
            tl.store(states_ptr + chunk_offset, S, mask=mask)
            pos = chunk * CHUNK + tl.arange(0, CHUNK)
            k = _load_tile(k_ptr, bh, pos, k_cols, L, DK, 1.0)
            v = _load_tile(v_ptr, bh, pos, v_cols, L, DV, 1.0)
            if DECAY != 0:
                last = tl.minimum(chunk * CHUNK + CHUNK, L) - 1
                b_last = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + last, k_cols, L, DK, DECAY)
                k = k * tl.exp(b_last - _load_cum(cum_ptr, bh, pos, k_cols, L, DK, DECAY))
                S = S * tl.exp(tl.trans(b_last))
            S += dot(tl.trans(k), v, STATE_DOT)
        tl.store(final_ptr + offset, S, mask=mask)

    @_triton.jit
    def _forward_output_kernel(
        q_ptr, k_ptr, v_ptr, cum_ptr, states_ptr, o_ptr, scale, L, DK, DV, CHUNKS,
        DECAY: tl.constexpr, DOT: tl.constexpr, STATE_DOT: tl.constexpr, CHUNK: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # o_t = exp(b_t) q_t S_entering + sum_{s <= t in the chunk} w(t, s) (q_t . k_s) v_s.
        bh = tl.program_id(2)
        first = tl.program_id(0) * ROWS
        rows = first + tl.arange(0, ROWS)
        chunk = first // CHUNK
        cols = chunk * CHUNK + tl.arange(0, CHUNK)  # the chunk's positions, the s of the scores
        v_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        out = tl.zeros([ROWS, BLOCK_V], dtype=tl.float32)
        scores = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
        for k_block in range(tl.cdiv(DK, BLOCK_K)):
            k_cols = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
            q = _load_tile(q_ptr, bh, rows, k_cols, L, DK, scale)
            k = _load_tile(k_ptr, bh, cols, k_cols, L, DK, 1.0)
            offset, mask = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
            S = tl.load(states_ptr + offset, mask=mask, other=0.0)
            if DECAY == 0:
                out += dot(q, S, STATE_DOT)
                scores += dot(q, tl.trans(k), DOT)
            elif DECAY == 1:
                out += dot(q * tl.exp(_load_cum(cum_ptr, bh, rows, k_cols, L, DK, DECAY)), S, STATE_DOT)
                scores += dot(q, tl.trans(k), DOT)
            else:
                b_rows = _load_cum(cum_ptr, bh, rows, k_cols, L, DK, DECAY)
                out += dot(q * tl.exp(b_rows), S, STATE_DOT)
                scores += _per_key_score_tile(
                    q, b_rows, k, first, rows, cols, bh, k_ptr, cum_ptr, k_cols, L, DK, DOT, CHUNK, ROWS
                )
        if DECAY == 0:
            scores = tl.where(cols[None, :] <= rows[:, None], scores, 0.0)
        elif DECAY == 1:
            b_cols = _load_cum(cum_ptr, bh, cols, cols, L, DK, DECAY)
            scores *= _pair_gates(_load_cum(cum_ptr, bh, rows, cols, L, DK, DECAY), b_cols, rows, cols)
        out += dot(scores, _load_tile(v_ptr, bh, cols, v_cols, L, DV, 1.0), DOT)
        _store_tile(o_ptr, out, bh, rows, v_cols, L, DV)

    @_triton.jit
    def _per_key_score_tile(
        q, b_rows, k, first, rows, cols, bh, k_ptr, cum_ptr, k_cols, L, DK,
        DOT: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        """sum_i q_ti k_si exp(b_ti - b_si) over one block of key channels, zero unless s <= t.

        q, b_rows: (ROWS, BLOCK_K) at rows t = first, first + 1, ...; k: (CHUNK, BLOCK_K) at the
        chunk's positions s = cols."""
        # Earlier row blocks of the chunk go through the reference r = first - 1 (a block that starts
        # the chunk has none: its reference is the chunk start, where the cumulative log-gate is 0).
        b_ref = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + first - 1, k_cols, L, DK, 2)
        b_ref = tl.where(first % CHUNK == 0, 0.0, b_ref)
        b_cols = _load_cum(cum_ptr, bh, cols, k_cols, L, DK, 2)
        k_ref = k * tl.exp(tl.where(cols[:, None] < first, b_ref - b_cols, float("-inf")))
        scores = dot(q * tl.exp(b_rows - b_ref), tl.trans(k_ref), DOT)
        # This row block: one column s at a time, each pair with its own exponent.
        for j in range(ROWS):
            s = tl.zeros([1], tl.int32) + first + j
            k_s = _load_tile(k_ptr, bh, s, k_cols, L, DK, 1.0)
            b_s = _load_cum(cum_ptr, bh, s, k_cols, L, DK, 2)
            weights = tl.exp(tl.where(rows[:, None] >= s, b_rows - b_s, float("-inf")))
            column = tl.sum(q * k_s * weights, axis=1)
            scores += tl.where(cols[None, :] == s, column[:, None], 0.0)
        return scores

    @_triton.jit
    def _backward_states_kernel(
        q_ptr, grad_o_ptr, cum_ptr, grad_final_ptr, grad_ends_ptr, grad_initial_ptr, scale, L, DK, DV,
        CHUNKS, HAS_GRAD_FINAL: tl.constexpr, DECAY: tl.constexpr, DOT: tl.constexpr,
        STATE_DOT: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # G <- exp(b_last) G + sum_t (q_t exp(b_t))^T do_t, chunk after chunk from the end: before the
        # update G is the gradient of the state at the end of the chunk, which is what is stored.
        bh = tl.program_id(2)
        k_cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        v_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        offset, mask = _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV)
        if HAS_GRAD_FINAL:
            G = tl.load(grad_final_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        else:
            G = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
        for step in range(CHUNKS):
            chunk = CHUNKS - 1 - step
            chunk_offset, _ = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
            tl.store(grad_ends_ptr + chunk_offset, G, mask=mask)
            pos = chunk * CHUNK + tl.arange(0, CHUNK)
            q = _load_tile(q_ptr, bh, pos, k_cols, L, DK, scale)
            grad_o = _load_tile(grad_o_ptr, bh, pos, v_cols, L, DV, 1.0)
            if DECAY != 0:
                last = tl.minimum(chunk * CHUNK + CHUNK, L) - 1
                b_last = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + last, k_cols, L, DK, DECAY)
                q = q * tl.exp(_load_cum(cum_ptr, bh, pos, k_cols, L, DK, DECAY))
                G = G * tl.exp(tl.trans(b_last))
            G += dot(tl.trans(q), grad_o, STATE_DOT)
        tl.store(grad_initial_ptr + offset, G, mask=mask)

    @_triton.jit
    def _backward_dq_kernel(
        q_ptr, k_ptr, v_ptr, cum_ptr, states_ptr, grad_o_ptr, grad_q_ptr, grad_cum_ptr, scale, L, DK, DV,
        CHUNKS,
        DECAY: tl.constexpr, DOT: tl.constexpr, STATE_DOT: tl.constexpr, CHUNK: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # dq_t = scale [exp(b_t) (do_t S_entering^T) + sum_{s <= t in the chunk} (do_t . v_s) w(t, s) k_s].
        bh = tl.program_id(2)
        first = tl.program_id(0) * ROWS
        rows = first + tl.arange(0, ROWS)
        chunk = first // CHUNK
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        k_cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        from_state = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        grad_scores = tl.zeros([ROWS, CHUNK], dtype=tl.float32)  # do_t . v_s
        for v_block in range(tl.cdiv(DV, BLOCK_V)):
            v_cols = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
            grad_o = _load_tile(grad_o_ptr, bh, rows, v_cols, L, DV, 1.0)
            offset, mask = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
            S = tl.load(states_ptr + offset, mask=mask, other=0.0)
            from_state += dot(grad_o, tl.trans(S), STATE_DOT)
            grad_scores += dot(grad_o, tl.trans(_load_tile(v_ptr, bh, cols, v_cols, L, DV, 1.0)), DOT)
        k = _load_tile(k_ptr, bh, cols, k_cols, L, DK, 1.0)
        if DECAY == 0:
            grad_q = from_state + dot(tl.where(cols[None, :] <= rows[:, None], grad_scores, 0.0), k, DOT)
        elif DECAY == 1:
            b_rows = _load_cum(cum_ptr, bh, rows, k_cols, L, DK, DECAY)
            weights = _pair_gates(b_rows, _load_cum(cum_ptr, bh, cols, k_cols, L, DK, DECAY), rows, cols)
            grad_q = from_state * tl.exp(b_rows) + dot(grad_scores * weights, k, DOT)
        else:
            b_rows = _load_cum(cum_ptr, bh, rows, k_cols, L, DK, DECAY)
            grad_q = from_state * tl.exp(b_rows) + _per_key_contraction(
                grad_scores, b_rows, k, first, rows, cols, bh, k_ptr, cum_ptr, k_cols, L, DK,
                DOT, CHUNK, ROWS, 1.0,
            )  # fmt: skip
        _store_tile(grad_q_ptr, grad_q * scale, bh, rows, k_cols, L, DK)
        if DECAY != 0:
            # The q side of d loss / d b_t, q_t dq_t, without the s = t pair (see _gate_gradient).
            diagonal = tl.sum(tl.where(cols[None, :] == rows[:, None], grad_scores, 0.0), axis=1)
            k_rows = _load_tile(k_ptr, bh, rows, k_cols, L, DK, 1.0)
            q_rows = _load_tile(q_ptr, bh, rows, k_cols, L, DK, scale)
            _store_tile(grad_cum_ptr, q_rows * (grad_q - diagonal[:, None] * k_rows), bh, rows, k_cols, L, DK)

    @_triton.jit
    def _per_key_contraction(
        pair, b_rows, x, first, rows, cols, bh, x_ptr, cum_ptr, k_cols, L, DK,
        DOT: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, x_scale,
    ):  # fmt: skip
        """sum_{s <= t in the chunk} pair[t, s] exp(b_t - b_s) x_s for rows t = first, first + 1, ...

        pair: (ROWS, CHUNK); b_rows: (ROWS, BLOCK_K); x: (CHUNK, BLOCK_K) at the chunk's positions s.
        The same reference positions as in _per_key_score_tile keep every exponent <= 0."""
        b_ref = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + first - 1, k_cols, L, DK, 2)
        b_ref = tl.where(first % CHUNK == 0, 0.0, b_ref)
        b_cols = _load_cum(cum_ptr, bh, cols, k_cols, L, DK, 2)
        x_ref = x * tl.exp(tl.where(cols[:, None] < first, b_ref - b_cols, float("-inf")))
        out = dot(pair, x_ref, DOT) * tl.exp(b_rows - b_ref)
        for j in range(ROWS):
            s = tl.zeros([1], tl.int32) + first + j
            x_s = _load_tile(x_ptr, bh, s, k_cols, L, DK, x_scale)
            b_s = _load_cum(cum_ptr, bh, s, k_cols, L, DK, 2)
            weights = tl.exp(tl.where(rows[:, None] >= s, b_rows - b_s, float("-inf")))
            column = tl.sum(tl.where(cols[None, :] == s, pair, 0.0), axis=1)
            out += column[:, None] * x_s * weights
        return out

    @_triton.jit
    def _backward_dk_kernel(
        q_ptr, k_ptr, v_ptr, cum_ptr, grad_ends_ptr, grad_o_ptr, grad_k_ptr, grad_cum_ptr, scale, L, DK,
        DV, CHUNKS,
        DECAY: tl.constexpr, DOT: tl.constexpr, STATE_DOT: tl.constexpr, CHUNK: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # dk_s = exp(b_last - b_s) (v_s G_end^T) + sum_{t >= s in the chunk} (v_s . do_t) w(t, s) q_t.
        bh = tl.program_id(2)
        first = tl.program_id(0) * ROWS
        rows = first + tl.arange(0, ROWS)  # the s
        chunk = first // CHUNK
        cols = chunk * CHUNK + tl.arange(0, CHUNK)  # the t
        k_cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        from_state = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        grad_scores = tl.zeros([ROWS, CHUNK], dtype=tl.float32)  # v_s . do_t, indexed (s, t)
        for v_block in range(tl.cdiv(DV, BLOCK_V)):
            v_cols = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
            v = _load_tile(v_ptr, bh, rows, v_cols, L, DV, 1.0)
            offset, mask = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
            G = tl.load(grad_ends_ptr + offset, mask=mask, other=0.0)
            from_state += dot(v, tl.trans(G), STATE_DOT)
            grad_scores += dot(v, tl.trans(_load_tile(grad_o_ptr, bh, cols, v_cols, L, DV, 1.0)), DOT)
        q = _load_tile(q_ptr, bh, cols, k_cols, L, DK, scale)
        if DECAY == 0:
            grad_k = from_state + dot(tl.where(cols[None, :] >= rows[:, None], grad_scores, 0.0), q, DOT)
        else:
            last = tl.minimum(chunk * CHUNK + CHUNK, L) - 1
            b_last = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + last, k_cols, L, DK, DECAY)
            b_rows = _load_cum(cum_ptr, bh, rows, k_cols, L, DK, DECAY)
            from_state *= tl.exp(b_last - b_rows)
            if DECAY == 1:
                b_cols = _load_cum(cum_ptr, bh, cols, k_cols, L, DK, DECAY)
                weights = tl.trans(_pair_gates(b_cols, b_rows, cols, rows))
                grad_k = from_state + dot(grad_scores * weights, q, DOT)
            else:
                grad_k = from_state + _per_key_contraction_later(
                    grad_scores, b_rows, q, first, rows, cols, bh, q_ptr, cum_ptr, k_cols, L, DK,
                    DOT, CHUNK, ROWS, scale,
                )  # fmt: skip
        _store_tile(grad_k_ptr, grad_k, bh, rows, k_cols, L, DK)
        if DECAY != 0:
            # Minus the k side, k_s dk_s without the s = t pair; the dq kernel wrote the q side.
            diagonal = tl.sum(tl.where(cols[None, :] == rows[:, None], grad_scores, 0.0), axis=1)
            q_rows = _load_tile(q_ptr, bh, rows, k_cols, L, DK, scale)
            k_rows = _load_tile(k_ptr, bh, rows, k_cols, L, DK, 1.0)
            q_side = _load_tile(grad_cum_ptr, bh, rows, k_cols, L, DK, 1.0)
            grad_cum = q_side - k_rows * (grad_k - diagonal[:, None] * q_rows)
            _store_tile(grad_cum_ptr, grad_cum, bh, rows, k_cols, L, DK)

    @_triton.jit
    def _per_key_contraction_later(
        pair, b_rows, x, first, rows, cols, bh, x_ptr, cum_ptr, k_cols, L, DK,
        DOT: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, x_scale,
    ):  # fmt: skip
        """sum_{t >= s in the chunk} pair[s, t] exp(b_t - b_s) x_t for rows s = first, first + 1, ...

        The mirror of _per_key_contraction: later row blocks go through the reference r = the last
        row of this block that is inside the sequence."""
        ref = tl.minimum(first + ROWS, L) - 1
        b_ref = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + ref, k_cols, L, DK, 2)
        b_cols = _load_cum(cum_ptr, bh, cols, k_cols, L, DK, 2)
        x_ref = x * tl.exp(tl.where(cols[:, None] > ref, b_cols - b_ref, float("-inf")))
        out = dot(pair, x_ref, DOT) * tl.exp(b_ref - b_rows)
        for j in range(ROWS):
            t = tl.zeros([1], tl.int32) + first + j
            x_t = _load_tile(x_ptr, bh, t, k_cols, L, DK, x_scale)
            b_t = _load_cum(cum_ptr, bh, t, k_cols, L, DK, 2)
            weights = tl.exp(tl.where(rows[:, None] <= t, b_t - b_rows, float("-inf")))
            column = tl.sum(tl.where(cols[None, :] == t, pair, 0.0), axis=1)
            out += column[:, None] * x_t * weights
        return out

    @_triton.jit
    def _backward_dv_kernel(
        q_ptr, k_ptr, cum_ptr, grad_ends_ptr, grad_o_ptr, grad_v_ptr, scale, L, DK, DV, CHUNKS,
        DECAY: tl.constexpr, DOT: tl.constexpr, STATE_DOT: tl.constexpr, CHUNK: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # dv_s = (k_s exp(b_last - b_s)) G_end + sum_{t >= s in the chunk} score(t, s) do_t.
        bh = tl.program_id(2)
        first = tl.program_id(0) * ROWS
        rows = first + tl.arange(0, ROWS)  # the s
        chunk = first // CHUNK
        cols = chunk * CHUNK + tl.arange(0, CHUNK)  # the t
        v_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        last = tl.minimum(chunk * CHUNK + CHUNK, L) - 1
        out = tl.zeros([ROWS, BLOCK_V], dtype=tl.float32)
        scores = tl.zeros([ROWS, CHUNK], dtype=tl.float32)  # indexed (s, t)
        for k_block in range(tl.cdiv(DK, BLOCK_K)):
            k_cols = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
            k = _load_tile(k_ptr, bh, rows, k_cols, L, DK, 1.0)
            q = _load_tile(q_ptr, bh, cols, k_cols, L, DK, scale)
            offset, mask = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
            G = tl.load(grad_ends_ptr + offset, mask=mask, other=0.0)
            if DECAY == 0:
                out += dot(k, G, STATE_DOT)
                scores += dot(k, tl.trans(q), DOT)
            else:
                b_last = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + last, k_cols, L, DK, DECAY)
                b_rows = _load_cum(cum_ptr, bh, rows, k_cols, L, DK, DECAY)
                out += dot(k * tl.exp(b_last - b_rows), G, STATE_DOT)
                if DECAY == 1:
                    scores += dot(k, tl.trans(q), DOT)
                else:
                    scores += _per_key_score_tile_later(
                        k, b_rows, q, first, rows, cols, bh, q_ptr, cum_ptr, k_cols, L, DK,
                        DOT, ROWS, scale,
                    )  # fmt: skip
        if DECAY == 0:
            scores = tl.where(cols[None, :] >= rows[:, None], scores, 0.0)
        elif DECAY == 1:
            b_rows = _load_cum(cum_ptr, bh, rows, rows, L, DK, DECAY)
            b_cols = _load_cum(cum_ptr, bh, cols, cols, L, DK, DECAY)
            scores *= tl.trans(_pair_gates(b_cols, b_rows, cols, rows))
        out += dot(scores, _load_tile(grad_o_ptr, bh, cols, v_cols, L, DV, 1.0), DOT)
        _store_tile(grad_v_ptr, out, bh, rows, v_cols, L, DV)

    @_triton.jit
    def _per_key_score_tile_later(
        k, b_rows, q, first, rows, cols, bh, q_ptr, cum_ptr, k_cols, L, DK,
        DOT: tl.constexpr, ROWS: tl.constexpr, q_scale,
    ):  # fmt: skip
        """sum_i k_si q_ti exp(b_ti - b_si) for rows s = first, ... and the chunk's positions t >= s:
        the transposed score tile, through the reference r = the last row of this block."""
        ref = tl.minimum(first + ROWS, L) - 1
        b_ref = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + ref, k_cols, L, DK, 2)
        b_cols = _load_cum(cum_ptr, bh, cols, k_cols, L, DK, 2)
        q_ref = q * tl.exp(tl.where(cols[:, None] > ref, b_cols - b_ref, float("-inf")))
        scores = dot(k * tl.exp(b_ref - b_rows), tl.trans(q_ref), DOT)
        for j in range(ROWS):
            t = tl.zeros([1], tl.int32) + first + j
            q_t = _load_tile(q_ptr, bh, t, k_cols, L, DK, q_scale)
            b_t = _load_cum(cum_ptr, bh, t, k_cols, L, DK, 2)
            weights = tl.exp(tl.where(rows[:, None] <= t, b_t - b_rows, float("-inf")))
            column = tl.sum(k * q_t * weights, axis=1)
            scores += tl.where(cols[None, :] == t, column[:, None], 0.0)
        return scores
