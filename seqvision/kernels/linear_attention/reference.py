"""The PyTorch forms of :func:`~seqvision.kernels.linear_attention` (the math and the forms are
described in the package docstring): ``recurrent``, the readable ground truth; ``parallel``, the
L x L weighted score matrix; ``chunk``, exact scores inside chunks and the state carried between
them. Each has a causal and a non-causal variant. Imports torch only.
"""

from __future__ import annotations

import math

import torch

from .._common import compute_dtype

# Sub-block edge for exact per-key-decay scores inside a chunk: pairs inside a sub-block are computed
# with their own exponent (c x c x Dk work per sub-block), pairs across sub-blocks use matmuls.
_MAX_SUB_BLOCK = 16


def torch_linear_attention(q, k, v, log_decay, causal, form, chunk_size, initial_state, scale):
    """:func:`~seqvision.kernels.linear_attention` through its PyTorch form ``form``, with its
    arguments already checked and ``scale`` resolved.

    Returns ``(o, final_state)``: ``o`` in the dtype of ``q``, ``final_state`` in the compute dtype
    (None for the non-causal scan)."""
    dtype = compute_dtype(q.dtype)
    qs, ks, vs = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    gates = _as_gate_tensor(log_decay, q.shape, dtype)
    state = None if initial_state is None else initial_state.to(dtype)

    if causal:
        o, final_state = _CAUSAL_FORMS[form](qs, ks, vs, gates, state, chunk_size)
    else:
        o, final_state = _NONCAUSAL_FORMS[form](qs, ks, vs, gates, chunk_size), None
    return o.to(q.dtype), final_state


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


def reverse_gates(gates: torch.Tensor) -> torch.Tensor:
    """Gates of the time-reversed sequence: the gate between reversed steps t-1 and t is a_{L-t}."""
    shifted = torch.cat((gates[:, :, 1:], torch.zeros_like(gates[:, :, :1])), dim=2)
    return shifted.flip(2)


def diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
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
    return forward + backward - diagonal(q, k, v)


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
    backward, _ = _chunk_causal(q.flip(2), k.flip(2), v.flip(2), reverse_gates(gates), None, chunk_size)
    return forward + backward.flip(2) - diagonal(q, k, v)


_CAUSAL_FORMS = {"recurrent": _recurrent_causal, "parallel": _parallel_causal, "chunk": _chunk_causal}
_NONCAUSAL_FORMS = {
    "recurrent": _recurrent_noncausal,
    "parallel": _parallel_noncausal,
    "chunk": _chunk_noncausal,
}
