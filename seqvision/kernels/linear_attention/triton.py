"""The Triton kernels of :func:`~seqvision.kernels.linear_attention`: the chunk form as kernels that
run in parallel over (chunk or row block, head-dim block, batch x head), forward and backward, for
causal scans (the non-causal scan is two causal ones), joined to autograd by
``_LinearAttentionTriton``, and ``triton_linear_attention``, the operator's Triton path.

Tokens are cut into chunks of CHUNK (64, or the next power of two >= L for shorter sequences) and,
for outputs and gradients, into row blocks of ROWS tokens inside a chunk (the whole chunk; 16 for
per-key decay). b_t is the cumulative log-gate from the chunk start (<= 0, non-increasing in t),
b_last the chunk's last one, S_c the (Dk, Dv) state entering chunk c. Forward, in three phases:

1. ``_forward_chunk_kernel``, one program per (chunk, Dk block x Dv block, batch x head): the chunk's
   cumulative log-gates from the raw gates (stored once, for the later kernels) and the chunk's own
   contribution to the state at its end, dS_c = sum_s (k_s exp(b_last - b_s))^T v_s, one tl.dot of
   (BLOCK_K x CHUNK) by (CHUNK x BLOCK_V). Every matrix product of the state recurrence runs here,
   all chunks at once.
2. ``_state_pass_kernel``, the only sequential part, and a light one: S_{c+1} = exp(b_last) S_c +
   dS_c, chunk after chunk. The decay is one number or one per key row, so it is elementwise per
   state entry: one program per (256 consecutive entries of the state, batch x head), per chunk a
   load, a multiply-add and a store, in place (slot c holds dS_c before and S_c after). The loads
   do not depend on the carried state, so the loop is software-pipelined (tl.range num_stages):
   several chunks' loads in flight instead of one memory latency per chunk.
3. ``_forward_output_kernel``, one program per (row block, Dv block, batch x head):
   o_t = exp(b_t) q_t S_c + the exact intra-chunk scores times v.

Backward, the same phases mirrored: (1) ``_backward_chunk_kernel``, what each chunk's outputs add to
the gradient of the state entering it, dG_c = sum_t (q_t exp(b_t))^T do_t, all chunks at once;
(2) the same pass from the last chunk, G <- exp(b_last) G + dG_c from the final state's gradient,
giving the gradient of the state at the end of every chunk and of the initial state;
(3) ``_backward_dqk_kernel`` (dq and dk in one program: they share the do . v products, the rows'
loads and the gate gradient) and ``_backward_dv_kernel``, over row blocks. The gate gradient is the
reverse cumulative sum of d loss / d b_t = q_t dq_t - k_t dk_t (plus the final state's own term);
the dqk kernel writes the sum inside its row block and the block's total (scalar decays: already
summed over the key channels), and the host adds the totals of later blocks in one pass.

Traffic with HBM per token and head, for D = Dk = Dv = CHUNK = 64 and 16-bit inputs: a row of q, k,
v, o or do is 128 bytes, a float32 state per chunk 4 D^2 / CHUNK = 256 bytes per token. Forward:
phase 1 reads k, v and the gates and writes dS (about 512 bytes), phase 2 reads dS and writes S
(512), phase 3 reads q, k, v, S and the log-gates and writes o (768): about 1.8 kB; per-key decay
adds its float32 log-gates (256 bytes) per read, and its row blocks of 16 read their chunk's k, v
and S once each (from L2, mostly). The sequential walk this replaced moved the states once less
each way (about 1.3 kB) but ran one program per (head-dim block, batch x head) along the whole
sequence. Backward: phase 1 reads q and do and writes dG (512), phase 2 (512), dqk reads q, k, S
and G, do and v once per key block of 32, and writes dq, dk and the gate gradient inside row blocks
(about 1.5 kB), dv reads q, k, do and G and writes dv (768): about 3.3 kB; the host reads and
writes the gate gradient once more (4 bytes per token for scalar decays, 256 per key). Gradients
are written in the inputs' dtype directly (no float32 copies to convert).

Every exponent is <= 0. The chunk products take exp(b_last - b_s) and exp(b_t) (the cumulative
log-gate is non-increasing from 0 at the chunk start); the pass takes exp(b_last); the scores take a
masked difference b_t - b_s with s <= t. For per-key decay all of them are per key channel (the
decay from a token to its chunk end is exp(b_last - b_s) for each channel); pairs in different row
blocks go through a reference position r between them (exp(b_t - b_r) exp(b_r - b_s), both <= 0)
and stay matrix products, pairs inside one row block take their own exponent, one column at a time.

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
# The pass over chunk states: state entries per program, and chunks whose loads it keeps in flight.
_PASS_ENTRIES, _PASS_STAGES = 256, 4
# Launch options of the tile kernels, from compiling them for sm_90 (benchmarks/kernels_compile.py):
# with 64 x 64 bfloat16 tiles, 4 warps spilled registers in the output, dq / dk and dv kernels; 8
# warps and 2 pipeline stages do not. float32 inputs multiply without tensor cores (exact products)
# and keep more live: at 8 warps their output and dv kernels used all 255 registers and still spilled
# (up to 1 KiB per thread), at 16 warps and 1 stage they take 78-128 and spill nothing.
_TILE_LAUNCH = {"num_warps": 8, "num_stages": 2}
_FLOAT32_OUTPUT_LAUNCH = {"num_warps": 16, "num_stages": 1}  # the output and dv kernels, float32
# The dq / dk kernel keeps about twice the tiles of the others live: key blocks of at most 32.
_DQK_BLOCK_K = 32


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


def _output_launch(dtype: torch.dtype) -> dict[str, int]:
    """Launch options of the output and dv kernels (they replace _TILE_LAUNCH's) for inputs of dtype."""
    return _FLOAT32_OUTPUT_LAUNCH if dtype == torch.float32 else _TILE_LAUNCH


def _new_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None):
    """Buffers the Triton kernels write (a seam for tests, which poison them)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _state_pass(states, cum, start, end, L, chunk, mode, reverse):
    """Phase 2: turn every chunk's own contribution in ``states`` (B, H, chunks, Dk, Dv) into the
    value carried into it, in place, and write the value after the walk into ``end``."""
    B, H, chunks, Dk, Dv = states.shape
    has_start = start is not None
    block = min(_PASS_ENTRIES, _triton.next_power_of_2(Dk * Dv))
    _state_pass_kernel[(_triton.cdiv(Dk * Dv, block), B * H)](
        states, cum, start if has_start else end, end, L, Dk, Dv, chunks, HAS_START=has_start,
        REVERSE=reverse, DECAY=mode, CHUNK=chunk, BLOCK_E=block, STAGES=_PASS_STAGES,
    )  # fmt: skip


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
        f32 = torch.float32
        common = {"DECAY": mode, **_dot_modes(q.dtype), **sizes, **_TILE_LAUNCH}
        k_blocks, v_blocks = _triton.cdiv(Dk, sizes["BLOCK_K"]), _triton.cdiv(Dv, sizes["BLOCK_V"])

        # (1) Every chunk's own contribution to the state at its end, and the cumulative log-gates.
        cum, gate_ptr, gate_strides = q, q, (0, 0, 0, 0)  # q: unused pointers without decay
        if mode != _NO_DECAY:
            cum = _new_output((B, H, L, Dk if mode == _PER_KEY_DECAY else 1), q, f32)
            gate_ptr, gate_strides = gates, _gate_strides(gates)
        states = _new_output((B, H, chunks, Dk, Dv), q, f32)
        _forward_chunk_kernel[(chunks, k_blocks * v_blocks, B * H)](
            k, v, gate_ptr, cum, states, *gate_strides, H, L, Dk, Dv, chunks, **common
        )
        # (2) In place, the state entering every chunk; and the final one.
        final = _new_output((B, H, Dk, Dv), q, f32)
        initial = None if initial_state is None else initial_state.contiguous()
        _state_pass(states, cum, initial, final, L, sizes["CHUNK"], mode, reverse=False)
        # (3) The outputs.
        o = _new_output((B, H, L, Dv), q)
        grid = (_triton.cdiv(L, sizes["ROWS"]), v_blocks, B * H)
        outputs = {**common, **_output_launch(q.dtype)}
        _forward_output_kernel[grid](q, k, v, cum, states, o, scale, L, Dk, Dv, chunks, **outputs)

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
        common = {"DECAY": mode, **_dot_modes(q.dtype), **sizes, **_TILE_LAUNCH}
        k_blocks, v_blocks = _triton.cdiv(Dk, sizes["BLOCK_K"]), _triton.cdiv(Dv, sizes["BLOCK_V"])

        # (1) What every chunk's outputs add to the gradient of the state entering it.
        grad_ends = _new_output(states.shape, q, f32)
        _backward_chunk_kernel[(chunks, k_blocks * v_blocks, B * H)](
            q, grad_o, cum, grad_ends, scale, L, Dk, Dv, chunks, **common
        )
        # (2) In place, grad_ends[:, :, c]: the gradient of the state at the end of chunk c; and the
        # gradient of the initial state.
        grad_initial = _new_output((B, H, Dk, Dv), q, f32)
        start = None if grad_final is None else grad_final.contiguous()
        _state_pass(grad_ends, cum, start, grad_initial, L, sizes["CHUNK"], mode, reverse=True)
        # (3) dq and dk, then dv, over row blocks; the gate gradient inside each row block.
        rows = sizes["ROWS"]
        row_blocks = _triton.cdiv(L, rows)
        grad_q, grad_k, grad_v = _new_output(q.shape, q), _new_output(k.shape, k), _new_output(v.shape, v)
        dqk = {**common, "BLOCK_K": min(_DQK_BLOCK_K, sizes["BLOCK_K"])}
        dqk_k_blocks = _triton.cdiv(Dk, dqk["BLOCK_K"])
        # Rows of the gate gradient padded to whole row blocks; per k block for scalar decays.
        gate_layout = (
            (1, B * H, row_blocks, Dk) if mode == _PER_KEY_DECAY else (dqk_k_blocks, B * H, row_blocks, 1)
        )
        local, totals = grad_q, grad_q  # unused pointers without decay
        if mode != _NO_DECAY:
            local = _new_output((*gate_layout[:2], row_blocks * rows, gate_layout[3]), q, f32)
            totals = _new_output(gate_layout, q, f32)
        _backward_dqk_kernel[(row_blocks, dqk_k_blocks, B * H)](
            q, k, v, cum, states, grad_ends, grad_o, grad_q, grad_k, local, totals, scale, L, Dk, Dv,
            chunks, row_blocks, **dqk,
        )  # fmt: skip
        dv = {**common, **_output_launch(q.dtype)}
        _backward_dv_kernel[(row_blocks, v_blocks, B * H)](
            q, k, cum, grad_ends, grad_o, grad_v, scale, L, Dk, Dv, chunks, **dv
        )

        grad_gates = None
        if mode != _NO_DECAY:
            grad_gates = _gate_gradient(local, totals, final, grad_final, L, rows).view(B, H, L, -1)
            if mode == _SCALAR_DECAY:
                grad_gates = grad_gates.squeeze(-1)
            if ctx.gate_shape[0] == 1 and B > 1:
                grad_gates = grad_gates.sum(0, keepdim=True)
            grad_gates = grad_gates.to(ctx.gate_dtype)
        grad_state = None if initial_state is None else grad_initial.to(initial_state.dtype)
        return grad_q, grad_k, grad_v, grad_gates, grad_state, None


def _gate_strides(gates: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides (batch, head, step, key) of the log-gates, 0 along broadcast axes."""
    strides = gates.stride() if gates.dim() == 4 else (*gates.stride(), 0)
    return (0, *strides[1:]) if gates.shape[0] == 1 else strides


def _gate_gradient(local, totals, final, grad_final, L, rows):
    """d loss / d log-gate, float32 (B * H, L, 1 or Dk), from the dqk kernel's row-block sums.

    The loss depends on the cumulative log-gate b_t (from the sequence start) only through exp(b_t)
    on q_t, exp(-b_t) on k_t and exp(b_L) on the final state, so d loss / d b_t = q_t dq_t - k_t dk_t
    (the kernel leaves out the s = t pair, which adds the same to both and cancels) plus
    final * d final at the last step; a gate at step t enters every b_t' with t' >= t: a reverse
    cumulative sum. ``local`` holds it inside each row block of ``rows`` steps and ``totals`` each
    block's sum, both per k block for scalar decays (summed here)."""
    # (B * H, row blocks (x rows), 1 or Dk)
    local, totals = (x[0] if x.shape[0] == 1 else x.sum(0) for x in (local, totals))
    # What the later row blocks add, summed from the end (no total minus a prefix: no cancellation).
    later = torch.zeros_like(totals)
    later[:, :-1] = totals.flip(1).cumsum(1).flip(1)[:, 1:]
    if grad_final is not None:
        # The final state's term sits at the last step, so every gate gets it.
        term = (final * grad_final.float()).sum(-1).flatten(0, 1)
        later += (term if totals.shape[-1] > 1 else term.sum(-1, keepdim=True))[:, None]
    blocks = (local.unflatten(1, (totals.shape[1], rows)) + later[:, :, None]).flatten(1, 2)
    return blocks[:, :L]


if _triton is not None:

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
    def _chunk_tile(DV, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
        """This program's tile on the grid (chunks, key blocks x value blocks, B * H): its chunk, value
        block and (batch, head) row, the chunk's positions (CHUNK,), its key columns (BLOCK_K,) and
        value columns (BLOCK_V,)."""
        chunk = tl.program_id(0)
        v_blocks = tl.cdiv(DV, BLOCK_V)
        k_block, v_block = tl.program_id(1) // v_blocks, tl.program_id(1) % v_blocks
        pos = chunk * CHUNK + tl.arange(0, CHUNK)
        k_cols = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        v_cols = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
        return chunk, v_block, tl.program_id(2), pos, k_cols, v_cols

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
    def _chunk_gates(
        g_ptr, cum_ptr, bh, pos, k_cols, H, L, DK, stride_b, stride_h, stride_t, stride_k, write,
        DECAY: tl.constexpr,
    ):  # fmt: skip
        """Cumulative log-gates from the chunk start at positions ``pos`` (one chunk), float32, from the
        raw gates read through their strides: (CHUNK, 1) scalar, (CHUNK, BLOCK_K) per key; stored
        into the (B * H, L, 1 or Dk) buffer where ``write``. Steps past the end add a zero log-gate,
        so they repeat the last step's value (the convention of _load_cum)."""
        base = (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
        inside = pos < L
        if DECAY == 2:
            mask = inside[:, None] & (k_cols < DK)[None, :]
            g = tl.load(
                g_ptr + base + pos[:, None] * stride_t + k_cols[None, :] * stride_k, mask=mask, other=0.0
            )
            b = tl.cumsum(g.to(tl.float32), axis=0)
            offset = (bh.to(tl.int64) * L + pos[:, None]) * DK + k_cols[None, :]
            tl.store(cum_ptr + offset, b, mask=mask & write)
        else:
            g = tl.load(g_ptr + base + pos * stride_t, mask=inside, other=0.0)
            b_steps = tl.cumsum(g.to(tl.float32), axis=0)
            tl.store(cum_ptr + bh.to(tl.int64) * L + pos, b_steps, mask=inside & write)
            b = b_steps[:, None]
        return b

    @_triton.jit
    def _forward_chunk_kernel(
        k_ptr, v_ptr, g_ptr, cum_ptr, states_ptr, stride_b, stride_h, stride_t, stride_k, H, L, DK, DV,
        CHUNKS,
        DECAY: tl.constexpr, DOT: tl.constexpr, STATE_DOT: tl.constexpr, CHUNK: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # dS = sum_s (k_s exp(b_last - b_s))^T v_s over this chunk, into its slot of the states. The
        # factors k_s exp(b_last - b_s) are at most |k_s|, so the product takes the inputs' precision.
        chunk, v_block, bh, pos, k_cols, v_cols = _chunk_tile(DV, CHUNK, BLOCK_K, BLOCK_V)
        k = _load_tile(k_ptr, bh, pos, k_cols, L, DK, 1.0)
        if DECAY != 0:
            # One program per key block stores the log-gates (per-key decay; one in all for scalar ones).
            write = v_block == 0 if DECAY == 2 else tl.program_id(1) == 0
            b = _chunk_gates(
                g_ptr, cum_ptr, bh, pos, k_cols, H, L, DK, stride_b, stride_h, stride_t, stride_k, write,
                DECAY,
            )  # fmt: skip
            # b_last: the stored value at the chunk's last step, the one the pass over chunks reads.
            last = tl.minimum(chunk * CHUNK + CHUNK, L) - 1
            b_last = tl.sum(tl.where((pos == last)[:, None], b, 0.0), axis=0)[None, :]
            k = k * tl.exp(b_last - b)
        v = _load_tile(v_ptr, bh, pos, v_cols, L, DV, 1.0)
        offset, mask = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
        tl.store(states_ptr + offset, dot(tl.trans(k), v, DOT), mask=mask)

    @_triton.jit
    def _backward_chunk_kernel(
        q_ptr, grad_o_ptr, cum_ptr, grad_ends_ptr, scale, L, DK, DV, CHUNKS,
        DECAY: tl.constexpr, DOT: tl.constexpr, STATE_DOT: tl.constexpr, CHUNK: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # dG = sum_t (q_t exp(b_t))^T do_t over this chunk, into its slot: what the chunk's outputs add
        # to the gradient of the state entering it. exp(b_t) <= 1, so the inputs' precision again.
        chunk, _, bh, pos, k_cols, v_cols = _chunk_tile(DV, CHUNK, BLOCK_K, BLOCK_V)
        q = _load_tile(q_ptr, bh, pos, k_cols, L, DK, scale)
        if DECAY != 0:
            q = q * tl.exp(_load_cum(cum_ptr, bh, pos, k_cols, L, DK, DECAY))
        grad_o = _load_tile(grad_o_ptr, bh, pos, v_cols, L, DV, 1.0)
        offset, mask = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
        tl.store(grad_ends_ptr + offset, dot(tl.trans(q), grad_o, DOT), mask=mask)

    @_triton.jit
    def _state_pass_kernel(
        states_ptr, cum_ptr, start_ptr, end_ptr, L, DK, DV, CHUNKS,
        HAS_START: tl.constexpr, REVERSE: tl.constexpr, DECAY: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK_E: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        # X <- exp(b_last) X + (slot c) over the chunks c (from the last with REVERSE), storing into
        # slot c, in place, the X met before chunk c: forward, the state entering chunk c; backward,
        # the gradient of the state at the end of chunk c. Elementwise per state entry (the decay is
        # one number, or one per key row), on BLOCK_E consecutive entries of the (Dk, Dv) state.
        bh = tl.program_id(1)
        entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)  # flat (key, value) indices
        inside = entries < DK * DV
        keys = entries // DV
        edge = bh.to(tl.int64) * DK * DV + entries
        if HAS_START:
            X = tl.load(start_ptr + edge, mask=inside, other=0.0).to(tl.float32)
        else:
            X = tl.zeros([BLOCK_E], dtype=tl.float32)
        # The loads of a chunk's slot and gates do not depend on X: STAGES chunks ahead can be in
        # flight (software pipelining), so the walk is not one memory latency per chunk.
        for step in tl.range(0, CHUNKS, num_stages=STAGES):
            chunk = CHUNKS - 1 - step if REVERSE else step
            offsets = (bh.to(tl.int64) * CHUNKS + chunk) * DK * DV + entries
            own = tl.load(states_ptr + offsets, mask=inside, other=0.0)
            tl.store(states_ptr + offsets, X, mask=inside)
            if DECAY != 0:
                # The log-gate over the whole chunk, for each entry's key row (scalar decays: one for
                # all entries, still loaded as a tensor, so that it is prefetched like the slot).
                last = tl.minimum(chunk * CHUNK + CHUNK, L) - 1
                row = bh.to(tl.int64) * L + last
                offset = row * DK + keys if DECAY == 2 else row + keys * 0
                X = X * tl.exp(tl.load(cum_ptr + offset, mask=inside, other=0.0))
            X += own
        tl.store(end_ptr + edge, X, mask=inside)

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
    def _backward_dqk_kernel(
        q_ptr, k_ptr, v_ptr, cum_ptr, states_ptr, grad_ends_ptr, grad_o_ptr, grad_q_ptr, grad_k_ptr,
        local_ptr, totals_ptr, scale, L, DK, DV, CHUNKS, ROW_BLOCKS,
        DECAY: tl.constexpr, DOT: tl.constexpr, STATE_DOT: tl.constexpr, CHUNK: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        # For the rows t (as queries) and s (as keys) of this block:
        # dq_t = scale [exp(b_t) (do_t S_c^T) + sum_{s <= t in the chunk} (do_t . v_s) w(t, s) k_s],
        # dk_s = exp(b_last - b_s) (v_s G_c^T) + sum_{t >= s in the chunk} (v_s . do_t) w(t, s) q_t,
        # with S_c the state entering the chunk and G_c the gradient of the state at its end. dq is
        # finished and stored before dk starts, so that fewer tiles are live at once.
        bh = tl.program_id(2)
        first = tl.program_id(0) * ROWS
        rows = first + tl.arange(0, ROWS)
        chunk = first // CHUNK
        cols = chunk * CHUNK + tl.arange(0, CHUNK)  # the chunk's positions
        k_cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        if DECAY != 0:
            b_rows = _load_cum(cum_ptr, bh, rows, k_cols, L, DK, DECAY)

        # dq, from the state entering the chunk and the pairs do_t . v_s.
        from_state = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        q_pairs = tl.zeros([ROWS, CHUNK], dtype=tl.float32)  # do_t . v_s, indexed (t, s)
        for v_block in range(tl.cdiv(DV, BLOCK_V)):
            v_cols = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
            grad_o = _load_tile(grad_o_ptr, bh, rows, v_cols, L, DV, 1.0)
            offset, mask = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
            from_state += dot(grad_o, tl.trans(tl.load(states_ptr + offset, mask=mask, other=0.0)), STATE_DOT)
            q_pairs += dot(grad_o, tl.trans(_load_tile(v_ptr, bh, cols, v_cols, L, DV, 1.0)), DOT)
        k_cols_tile = _load_tile(k_ptr, bh, cols, k_cols, L, DK, 1.0)
        if DECAY == 0:
            grad_q = from_state + dot(
                tl.where(cols[None, :] <= rows[:, None], q_pairs, 0.0), k_cols_tile, DOT
            )
        elif DECAY == 1:
            weights = _pair_gates(b_rows, _load_cum(cum_ptr, bh, cols, k_cols, L, DK, DECAY), rows, cols)
            grad_q = from_state * tl.exp(b_rows) + dot(q_pairs * weights, k_cols_tile, DOT)
        else:
            grad_q = from_state * tl.exp(b_rows) + _per_key_contraction(
                q_pairs, b_rows, k_cols_tile, first, rows, cols, bh, k_ptr, cum_ptr, k_cols, L, DK,
                DOT, CHUNK, ROWS, 1.0,
            )  # fmt: skip
        _store_tile(grad_q_ptr, grad_q * scale, bh, rows, k_cols, L, DK)
        if DECAY != 0:
            # d loss / d b_t = q_t dq_t - k_t dk_t, both without the s = t pair (the same in both, it
            # cancels; leaving it out spares float32 the cancellation): the q side here.
            diagonal = tl.sum(tl.where(cols[None, :] == rows[:, None], q_pairs, 0.0), axis=1)[:, None]
            k_rows = _load_tile(k_ptr, bh, rows, k_cols, L, DK, 1.0)
            grad_b = _load_tile(q_ptr, bh, rows, k_cols, L, DK, scale) * (grad_q - diagonal * k_rows)

        # dk, from the gradient of the state at the chunk's end and the pairs v_s . do_t.
        from_state = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        k_pairs = tl.zeros([ROWS, CHUNK], dtype=tl.float32)  # v_s . do_t, indexed (s, t)
        for v_block in range(tl.cdiv(DV, BLOCK_V)):
            v_cols = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
            v = _load_tile(v_ptr, bh, rows, v_cols, L, DV, 1.0)
            offset, mask = _state_offsets(bh, chunk, CHUNKS, k_cols, v_cols, DK, DV)
            from_state += dot(v, tl.trans(tl.load(grad_ends_ptr + offset, mask=mask, other=0.0)), STATE_DOT)
            if ROWS != CHUNK:
                k_pairs += dot(v, tl.trans(_load_tile(grad_o_ptr, bh, cols, v_cols, L, DV, 1.0)), DOT)
        if ROWS == CHUNK:
            k_pairs = tl.trans(q_pairs)  # the rows are the whole chunk: the same products, transposed
        q_cols = _load_tile(q_ptr, bh, cols, k_cols, L, DK, scale)
        if DECAY == 0:
            grad_k = from_state + dot(tl.where(cols[None, :] >= rows[:, None], k_pairs, 0.0), q_cols, DOT)
        else:
            last = tl.minimum(chunk * CHUNK + CHUNK, L) - 1
            b_last = _load_cum(cum_ptr, bh, tl.zeros([1], tl.int32) + last, k_cols, L, DK, DECAY)
            from_state *= tl.exp(b_last - b_rows)
            if DECAY == 1:
                b_cols = _load_cum(cum_ptr, bh, cols, k_cols, L, DK, DECAY)
                weights = tl.trans(_pair_gates(b_cols, b_rows, cols, rows))
                grad_k = from_state + dot(k_pairs * weights, q_cols, DOT)
            else:
                grad_k = from_state + _per_key_contraction_later(
                    k_pairs, b_rows, q_cols, first, rows, cols, bh, q_ptr, cum_ptr, k_cols, L, DK,
                    DOT, CHUNK, ROWS, scale,
                )  # fmt: skip
        _store_tile(grad_k_ptr, grad_k, bh, rows, k_cols, L, DK)

        if DECAY != 0:
            # The k side (q and k rows read again, from cache: fewer live tiles), then the sum from
            # the block's end and the block's total.
            q_rows = _load_tile(q_ptr, bh, rows, k_cols, L, DK, scale)
            grad_b -= _load_tile(k_ptr, bh, rows, k_cols, L, DK, 1.0) * (grad_k - diagonal * q_rows)
            padded = ROW_BLOCKS * ROWS
            if DECAY == 2:
                offset = (bh.to(tl.int64) * padded + rows[:, None]) * DK + k_cols[None, :]
                mask = (rows < L)[:, None] & (k_cols < DK)[None, :]
                tl.store(local_ptr + offset, tl.cumsum(grad_b, axis=0, reverse=True), mask=mask)
                total_offset = (bh.to(tl.int64) * ROW_BLOCKS + tl.program_id(0)) * DK + k_cols
                tl.store(totals_ptr + total_offset, tl.sum(grad_b, axis=0), mask=k_cols < DK)
            else:
                # Scalar decays: summed over this block's key channels (the host sums the blocks).
                grad_b = tl.sum(grad_b, axis=1)
                series = tl.program_id(1) * tl.num_programs(2) + bh.to(tl.int64)
                local = tl.cumsum(grad_b, axis=0, reverse=True)
                tl.store(local_ptr + series * padded + rows, local, mask=rows < L)
                tl.store(totals_ptr + series * ROW_BLOCKS + tl.program_id(0), tl.sum(grad_b, axis=0))

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
