"""The Triton kernels of :func:`~seqvision.kernels.linear_attention`: the chunk form as fused
kernels, forward and backward, for causal scans (the non-causal scan is two causal ones), joined
to autograd by ``_LinearAttentionTriton``, and ``triton_linear_attention``, the operator's Triton
path.

Tokens are cut into chunks of CHUNK (the state is carried between chunks) and the outputs into row
blocks of ROWS tokens inside a chunk. Forward: (1) the cumulative log-gate from each chunk's start,
(2) one program per (Dk block, Dv block, batch x head) walks the chunks and stores the state entering
each (float32, (B, H, chunks, Dk, Dv)), (3) one program per (row block, Dv block, batch x head) adds
the inter-chunk term q_t S and the exact intra-chunk scores times v. Backward: the gradient of each
chunk's end state by the reverse walk, then one kernel each for dq, dk and dv over row blocks; the
gate gradient is the reverse cumulative sum of q * dq - k * dk (plus the final state's own term).

Every exponent is a masked difference b_t - b_s with s <= t of the cumulative log-gate from the
chunk start, so it is <= 0. For per-key decay, pairs in different row blocks go through a reference
position r between them (exp(b_t - b_r) exp(b_r - b_s), both <= 0) and stay matrix products; pairs
inside one row block take their own exponent, one column at a time.

The kernels write into buffers from ``_new_output``, which the tests replace with NaN-filled ones.
triton is optional (see :mod:`seqvision.kernels._triton`): without it this module still imports,
with no kernels defined.
"""

from __future__ import annotations

import torch

from .._common import compute_dtype
from .._triton import DOT_IEEE, DOT_TF32, dot_mode, tl
from .._triton import triton as _triton
from . import reference

if _triton is not None:
    from .._triton import dot

# Decay modes of the kernels.
_NO_DECAY, _SCALAR_DECAY, _PER_KEY_DECAY = 0, 1, 2


def triton_linear_attention(q, k, v, log_decay, causal, initial_state, scale):
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
    backward, _ = _LinearAttentionTriton.apply(*flipped, reference.reverse_gates(gates), None, scale)
    dtype = compute_dtype(q.dtype)
    diagonal = reference.diagonal(q.to(dtype) * scale, k.to(dtype), v.to(dtype))
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
