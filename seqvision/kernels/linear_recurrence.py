r"""First-order linear recurrence along one axis of an N-D tensor.

    h_t = a_t * h_{t-1} + x_t,      h_{-1} = 0,      a_t = exp(log_a_t) in (0, 1],

elementwise, along axis ``dim`` of ``x``. With a gate that is constant along the axis this is the
causal Toeplitz kernel ``h_t = sum_{s <= t} a^(t-s) x_s`` behind LightNet's MD-TPE (applied once per
grid axis); with a gate per step it is the diagonal state update of Mamba-1's selective scan, which
reuses the scans below.

``reverse=True`` runs the same recurrence from the other end: ``h_t = a_t * h_{t+1} + x_t``.

Checking the gates: ``log_a`` must be <= 0. On CPU tensors a positive or NaN entry is a
``ValueError``; on CUDA tensors that check would read a value back from the device (a host sync per
call), so it runs only with ``SEQVISION_CHECK_DECAYS=1`` set. Without it, a positive ``log_a`` is a
gate above 1 and nothing fails at once: both forms and the Triton kernel compute the recurrence with
that gate, ``h`` growing like the exponential of the summed ``log_a`` times the inputs, until a value
overflows: float32 (the compute type of every input but float64) holds at most about
``exp(88.7)``, float64 ``exp(709.8)``, so once ``log_a`` summed over a stretch of the axis exceeds
about 88 the gate products or ``h`` become inf, and the outputs and gradients hold inf or NaN. A NaN
``log_a`` gives NaN outputs.

``backend="triton"`` (or ``"auto"`` on CUDA tensors) runs a chunked scan in parallel over (line,
block of positions across the axis, chunk of the axis), reading x, the gates and the upstream
gradient in place through their strides (no transposes; a gate that broadcasts is read through
stride 0, a gate constant along the axis from one row). A program holds a (steps, positions) tile of
up to 2048 float32 values: 64 steps by 32 positions (one 128-byte line of a contiguous inner axis),
up to 256 steps where the inner axis is narrower. Three phases, forward: (1) each chunk but the
last, from zero, gives the value it carries out of its end, sum_t (a_{t+1} ... a_last) x_t (a reverse
cumulative product of the gates), and its summed log-gate; (2) a pass over the chunks per (line,
block of positions), the only sequential part, folds every earlier chunk into each carry, 16 chunks
per associative scan; (3) every chunk is scanned again from its carry (an associative scan of
(gate, x) pairs along its steps) and h written. Backward, the same three phases on the reverse scan
dh_t = g_t + a_{t+1} dh_{t+1}, run from the end; dlog_a_t = dh_t a_t h_{t-1} with h_{t-1} read from
the saved output, summed inside each chunk for a gate constant along the axis. Passes over memory per
element: forward x and the gates twice, h once (the floor: each once); backward the gradient and the
gates twice, h, dx and dlog_a once; the per-chunk carries add 8 bytes per chunk of 64 steps. Every
decay is a product of gates or the exponential of a summed log-gate, <= 1: nothing divides by a
decay.

Forms:

``recurrent``  a loop over the axis: the ground truth.
``chunk``      the axis cut into chunks of ``chunk_size``: inside a chunk a log-depth (Blelloch-style)
               scan vectorised over the chunk's steps; the value carried out of one chunk enters the
               next through the running product of its gates. The loop runs over chunks only, and a
               chunk's working set stays small enough to live in cache. It multiplies gates and adds,
               never divides by a cumulative gate, so it is exact for every ``log_a <= 0`` however
               strong the decay.
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
    check_tensor,
    compute_dtype,
    resolve_backend,
)
from ._triton import tl
from ._triton import triton as _triton

FORMS = ("chunk", "recurrent")


def linear_recurrence(
    x: torch.Tensor,
    log_a: torch.Tensor,
    dim: int,
    reverse: bool = False,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """Run ``h_t = a_t h_{t-1} + x_t`` along axis ``dim`` of ``x``.

    Args:
        x: inputs of any shape (..., L, ...), L = ``x.shape[dim]``.
        log_a: log of the gates, <= 0, broadcastable to ``x``. Its size along ``dim`` is 1 (one
            gate for every step: a Toeplitz kernel) or L (a gate per step). Checked on CPU tensors;
            on CUDA only with ``SEQVISION_CHECK_DECAYS=1`` (a host sync): unchecked, positive entries
            are gates above 1 that overflow float32 once they sum to about 88 (module docstring).
        dim: the axis to scan along (negative values count from the end).
        reverse: scan from the last position to the first.
        form: ``"chunk"`` (default) or ``"recurrent"``.
        chunk_size: steps per chunk for the chunk form.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. The Triton kernels ignore ``form`` and
            ``chunk_size``: they cut the axis into chunks of their own (up to 256 steps, one register
            tile each), scanned in parallel and joined by a pass over the chunks' carries, reading x
            in place through its strides.

    Returns:
        ``h`` with the shape and dtype of ``x``.
    """
    check_tensor("x", x)
    check_tensor("log_a", log_a)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must be an int in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim!r}"
        )
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    check_form(form, FORMS)
    check_positive_int("chunk_size", chunk_size)
    check_aux_dtype("log_a", log_a, x.dtype)
    check_same_device(("x", "log_a"), (x, log_a))
    dim = dim % x.dim()
    if log_a.dim() > x.dim() or _broadcast_shape(log_a.shape, x.shape) != x.shape:
        raise ValueError(f"log_a must broadcast to x {tuple(x.shape)}, got shape {tuple(log_a.shape)}")
    check_nonpositive("log_a", log_a)
    if resolve_backend(backend, x, log_a, op="linear_recurrence", has_triton=_triton is not None) == "triton":
        return _LinearRecurrenceTriton.apply(x, log_a, dim, reverse)

    dtype = compute_dtype(x.dtype)
    # Scan along dim 0: each step is then one contiguous slab. log_a keeps its broadcast (size-1) dims.
    xs = x.to(dtype).movedim(dim, 0)
    gs = log_a.to(dtype).reshape((1,) * (x.dim() - log_a.dim()) + tuple(log_a.shape)).movedim(dim, 0)
    if reverse:
        xs, gs = xs.flip(0), gs.flip(0)
    h = chunk_scan(gs, xs, chunk_size) if form == "chunk" else recurrent_scan(gs, xs)
    if reverse:
        h = h.flip(0)
    return h.movedim(0, dim).to(x.dtype)


def _broadcast_shape(a: torch.Size, b: torch.Size) -> torch.Size | None:
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None


def recurrent_scan(log_a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``h_t = exp(log_a_t) h_{t-1} + x_t`` along dim 0, one step at a time (h_{-1} = 0).

    log_a: broadcastable to x (L, ...), size 1 or L along dim 0. Returns h (L, ...).
    """
    gates = log_a.exp()
    h = x[0]
    steps = [h]
    for t in range(1, x.shape[0]):
        h = gates[t if gates.shape[0] > 1 else 0] * h + x[t]
        steps.append(h)
    return torch.stack(steps)


def chunk_scan(log_a: torch.Tensor, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``h_t = exp(log_a_t) h_{t-1} + x_t`` along dim 0, by chunks (h_{-1} = 0).

    log_a: broadcastable to x (L, ...), size 1 or L along dim 0. Returns h (L, ...).
    """
    per_step = log_a.shape[0] > 1
    gates = None if per_step else log_a.exp()
    carry = None
    pieces = []
    for start in range(0, x.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        h = scan_chunk(log_a[chunk].exp() if per_step else gates, x[chunk], carry)
        carry = h[-1]
        pieces.append(h)
    return torch.cat(pieces)


def scan_chunk(gates: torch.Tensor, x: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """One chunk of ``h_t = gates_t h_{t-1} + x_t`` along dim 0, vectorised over its steps.

    gates: broadcastable to x (C, ...), size 1 or C along dim 0; carry: h before the chunk (...) or
    None for zero. Returns h (C, ...).

    A log-depth scan: neighbouring steps compose in pairs, (a, x) then (a', x') -> (a' a, a' x + x'),
    the half-length sequence of pairs is scanned the same way (with the same carry, since a pair's
    gate multiplies what came before it), and the even steps are filled in from the odd ones. The
    work stays linear in C and only gates are ever multiplied together.
    """
    C = x.shape[0]
    per_step = gates.shape[0] > 1
    if C == 1:
        return x if carry is None else torch.addcmul(x, gates, carry)
    if C % 2:
        x = torch.cat((x, torch.zeros_like(x[:1])))
        if per_step:
            gates = torch.cat((gates, torch.ones_like(gates[:1])))
    a_even, a_odd = (gates[0::2], gates[1::2]) if per_step else (gates, gates)
    x_even, x_odd = x[0::2], x[1::2]
    h_odd = scan_chunk(a_odd * a_even, torch.addcmul(x_odd, a_odd, x_even), carry)
    # h_{2i} = a_{2i} h_{2i-1} + x_{2i}, with the carry in front of the first step.
    before_even = h_odd[:-1] if carry is None else torch.cat((carry.unsqueeze(0), h_odd[:-1]))
    if carry is None:
        first, a_rest, x_rest = x_even[:1], (a_even[1:] if per_step else a_even), x_even[1:]
        h_even = torch.cat((first, torch.addcmul(x_rest, a_rest, before_even)))
    else:
        h_even = torch.addcmul(x_even, a_even, before_even)
    return torch.stack((h_even, h_odd), dim=1).flatten(0, 1)[:C]


# ------------------------------------------------------------------------------------------------
# Triton: chunks of the axis scanned in parallel, a pass over the chunk carries, a rescan per chunk
# ------------------------------------------------------------------------------------------------

# Steps per chunk at most (tests lower it to get many chunks from short axes), and steps x inner
# positions per program tile at most: the backward kernel keeps about six such float32 tiles live.
_MAX_CHUNK = 256
_MAX_TILE = 2048
# Inner positions per program: 32 float32 values are one 128-byte line of a contiguous inner axis.
_MAX_INNER_BLOCK = 32
# The pass over chunk carries: carries scanned per iteration (a power of 2; tests lower it so the
# pass takes several iterations) and positions per program.
_MAX_CARRY_SLOTS = 16
_MAX_CARRY_WIDTH = 128


class _Lines:
    """A tensor of ``shape`` seen as (outer, L, inner) around axis ``dim``, cut into chunks of the axis.

    Step t of line (o, i) is element (o, t, i) of the (outer, L, inner) view; the kernels take each
    operand's three strides of that view, so x, the gates (expanded, stride 0 where they broadcast)
    and the upstream gradient are read where they lie. Programs form one flat grid, inner blocks
    fastest, then chunks, then outer lines: neighbouring programs read neighbouring memory.
    """

    def __init__(self, shape: torch.Size, dim: int):
        self.outer = math.prod(shape[:dim])
        self.length = shape[dim]
        self.inner = math.prod(shape[dim + 1 :])
        self.shape = (self.outer, self.length, self.inner)
        self.block_i = min(_MAX_INNER_BLOCK, _triton.next_power_of_2(self.inner))
        self.chunk = min(self.length, _MAX_CHUNK, _MAX_TILE // self.block_i)
        self.block_t = _triton.next_power_of_2(self.chunk)
        self.n_chunks = _triton.cdiv(self.length, self.chunk)
        self.inner_blocks = _triton.cdiv(self.inner, self.block_i)

    def grid(self, chunks: int) -> tuple[int]:
        return (self.inner_blocks * chunks * self.outer,)

    def sizes(self) -> tuple[int, ...]:
        """The kernels' size arguments: L, inner, chunk, number of chunks, inner blocks."""
        return self.length, self.inner, self.chunk, self.n_chunks, self.inner_blocks

    def buffer(self, slots: int, device: torch.device) -> torch.Tensor:
        """A float32 (outer, slots, inner) buffer of per-chunk values."""
        return _new_output(torch.empty((self.outer, slots, self.inner), dtype=torch.float32, device=device))


def _gates(log_a: torch.Tensor, lines: _Lines, shape: torch.Size) -> torch.Tensor:
    """log_a broadcast to x's shape as an (outer, L, inner) view: stride 0 along the dims it broadcasts
    over (a gate constant along the axis is read from one row), copied only where the dims it spans
    cannot merge into three."""
    return log_a.expand(shape).reshape(lines.shape)


class _LinearRecurrenceTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, log_a: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
        dim = dim % x.dim()
        lines = _Lines(x.shape, dim)
        xs, gates = x.reshape(lines.shape), _gates(log_a, lines, x.shape)
        h = _new_output(xs)
        carries = None
        if lines.n_chunks > 1:
            carries = _chunk_carries(xs, gates, lines, reverse, from_start=False)
        _recurrence_rescan_kernel[lines.grid(lines.n_chunks)](
            xs, gates, _or(carries, h), h, *lines.sizes(), *xs.stride(), *gates.stride(), *h.stride(),
            REVERSE=reverse, BLOCK_T=lines.block_t, BLOCK_I=lines.block_i,
        )  # fmt: skip
        ctx.save_for_backward(log_a, h)
        ctx.dim, ctx.reverse, ctx.shape = dim, reverse, x.shape
        return h.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        log_a, h = ctx.saved_tensors
        lines = _Lines(ctx.shape, ctx.dim)
        grads, gates = grad.reshape(lines.shape), _gates(log_a, lines, ctx.shape)
        grad_x = _new_output(grads)
        # A gate constant along the axis gets its gradient summed over each chunk in the kernel, one
        # value per (line, chunk), instead of a full-size gradient for torch to reduce.
        per_step = lines.length == 1 or gates.stride(1) != 0
        grad_gates = lines.buffer(lines.length if per_step else lines.n_chunks, grad.device)
        carries = None
        if lines.n_chunks > 1:
            carries = _chunk_carries(grads, gates, lines, ctx.reverse, from_start=True)
        _recurrence_backward_kernel[lines.grid(lines.n_chunks)](
            grads, gates, h, _or(carries, grad_x), grad_x, grad_gates, *lines.sizes(),
            *grads.stride(), *gates.stride(), *h.stride(), *grad_x.stride(),
            REVERSE=ctx.reverse, PER_STEP=per_step, BLOCK_T=lines.block_t, BLOCK_I=lines.block_i,
        )  # fmt: skip
        if not per_step:
            grad_gates = grad_gates.sum(1, keepdim=True)
        axis_size = lines.length if per_step else 1
        shape = (*ctx.shape[: ctx.dim], axis_size, *ctx.shape[ctx.dim + 1 :])
        grad_log_a = grad_gates.view(shape).sum_to_size(log_a.shape).to(log_a.dtype)
        return grad_x.view(ctx.shape), grad_log_a, None, None


def _chunk_carries(
    values: torch.Tensor, gates: torch.Tensor, lines: _Lines, reverse: bool, from_start: bool
) -> torch.Tensor:
    """Phases 1 and 2 of a chunked scan along the (outer, L, inner) view, for chunks 2 and on.

    Forward (``from_start=False``): slot k of the (outer, chunks - 1, inner) result is the value
    carried out of chunk k, which enters chunk k + 1. Backward (``from_start=True``, ``values`` the
    upstream gradient): slot k is the gradient reaching the end of chunk k from the chunks after it.
    """
    slots = lines.n_chunks - 1
    carries, logs = lines.buffer(slots, values.device), lines.buffer(slots, values.device)
    _recurrence_summary_kernel[lines.grid(slots)](
        values, gates, carries, logs, *lines.sizes(), int(from_start), *values.stride(), *gates.stride(),
        REVERSE=reverse, FROM_START=from_start, BLOCK_T=lines.block_t, BLOCK_I=lines.block_i,
    )  # fmt: skip
    chunk_carry_pass(carries, logs, reverse=from_start)
    return carries


def chunk_carry_pass(
    values: torch.Tensor,
    logs: torch.Tensor,
    scale: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    reverse: bool = False,
) -> None:
    """Phase 2 of the chunked scans (this operator's and selective_scan's), in place.

    values (outer, slots, width) and logs (outer, slots, width / group), float32 and contiguous:
    ``values[:, k] += exp(log_k) * values[:, k - 1]`` for k = 0, 1, ... in turn (``reverse``:
    ``values[:, k] += exp(log_k) * values[:, k + 1]`` for k = slots - 1, ..., 0), the value before
    the first slot in scan order being ``init`` (float32 (outer, width)) or 0, and ``log_k`` being
    ``logs[:, k, j // group]``, times ``scale[j]`` (float32 (width,)) when a scale is given.
    Chunk-local carries and the chunks' summed log-gates go in; the carries with every earlier chunk
    folded in come out.
    """
    outer, slots, width = values.shape
    block = min(_MAX_CARRY_WIDTH, _triton.next_power_of_2(width))
    blocks = _triton.cdiv(width, block)
    _chunk_carry_kernel[(outer * blocks,)](
        values, logs, _or(scale, values), _or(init, values), slots, width, width // logs.shape[-1], blocks,
        SCALED=scale is not None, HAS_INIT=init is not None, REVERSE=reverse,
        BLOCK_K=min(_MAX_CARRY_SLOTS, _triton.next_power_of_2(slots)), BLOCK=block,
    )  # fmt: skip


def _or(x: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """x, or a placeholder pointer for an absent buffer (the kernel never reads it)."""
    return placeholder if x is None else x


def _new_output(like: torch.Tensor) -> torch.Tensor:
    """Output and scratch buffers of the Triton kernels, shaped like ``like`` (a seam for tests, which
    poison them)."""
    return torch.empty_like(like)


if _triton is not None:

    @_triton.jit
    def affine_combine(a1, b1, a2, b2):
        """Compose the steps v -> a1 v + b1, then v -> a2 v + b2: the combine of tl.associative_scan
        for h_t = a_t h_{t-1} + b_t. Only gates are multiplied together, never divided."""
        return a1 * a2, a2 * b1 + b2

    # The interpreter (the tests) pays about a millisecond per call of a jit helper, so each kernel
    # calls one (_setup) and loads its tiles inline.

    @_triton.jit
    def _setup(
        INNER, CHUNKS_IN_GRID, FIRST_CHUNK, INNER_BLOCKS, CHUNK, L,
        REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        """This program's line (int64), chunk and inner positions (see _Lines), and the chunk's rows in
        scan order: their positions p along the scan (int64), the axis index t each reads (L - 1 - p
        when scanning in reverse), the rows' mask and the (rows, positions) mask."""
        pid = tl.program_id(0)
        rest = pid // INNER_BLOCKS
        cols = (pid % INNER_BLOCKS) * BLOCK_I + tl.arange(0, BLOCK_I)
        chunk = rest % CHUNKS_IN_GRID + FIRST_CHUNK
        line = (rest // CHUNKS_IN_GRID).to(tl.int64)
        rows = tl.arange(0, BLOCK_T)
        p = chunk.to(tl.int64) * CHUNK + rows
        t = L - 1 - p if REVERSE else p
        valid = (rows < CHUNK) & (p < L)
        return line, chunk, cols, p, t, valid, valid[:, None] & (cols < INNER)[None, :]

    @_triton.jit
    def _recurrence_summary_kernel(
        src_ptr, gate_ptr, carry_ptr, log_ptr, L, INNER, CHUNK, N_CHUNKS, INNER_BLOCKS, FIRST_CHUNK,
        s_x_o, s_x_l, s_x_i, s_g_o, s_g_l, s_g_i,
        REVERSE: tl.constexpr, FROM_START: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        # Phase 1, one chunk from zero, with a_p the chunk's gates in scan order: forward, the value
        # it carries out of its end, sum_p (a_{p+1} ... a_last) x_p, for chunks 0 .. n-2 into slot c;
        # backward (src the upstream gradient), the gradient it sends out of its start,
        # sum_p (a_first ... a_p) g_p, for chunks 1 .. n-1 into slot c - 1. The decays are cumulative
        # products of the gates (exp(log_a) <= 1 each), the same products the rescan forms. Also the
        # chunk's summed log-gate, for phase 2.
        line, chunk, cols, p, t, _, mask = _setup(
            INNER, N_CHUNKS - 1, FIRST_CHUNK, INNER_BLOCKS, CHUNK, L, REVERSE, BLOCK_T, BLOCK_I
        )
        x = tl.load(src_ptr + line * s_x_o + t[:, None] * s_x_l + cols[None, :] * s_x_i, mask=mask, other=0.0)
        gates = gate_ptr + line * s_g_o + cols[None, :] * s_g_i
        log_a = tl.load(gates + t[:, None] * s_g_l, mask=mask, other=0.0).to(tl.float32)
        if FROM_START:
            decay = tl.cumprod(tl.exp(log_a), axis=0)
        else:
            # The next step's gate, read one step on (1 past the chunk's end: masked loads give log 0).
            t_next = t - 1 if REVERSE else t + 1
            mask_next = mask & ((tl.arange(0, BLOCK_T) + 1 < CHUNK) & (p + 1 < L))[:, None]
            next_gate = tl.exp(
                tl.load(gates + t_next[:, None] * s_g_l, mask=mask_next, other=0.0).to(tl.float32)
            )
            decay = tl.cumprod(next_gate, axis=0, reverse=True)
        slot = chunk - FIRST_CHUNK
        out = (line * (N_CHUNKS - 1) + slot) * INNER + cols
        tl.store(carry_ptr + out, tl.sum(decay * x.to(tl.float32), axis=0), mask=cols < INNER)
        tl.store(log_ptr + out, tl.sum(log_a, axis=0), mask=cols < INNER)

    @_triton.jit
    def _chunk_carry_kernel(
        value_ptr, log_ptr, scale_ptr, init_ptr, SLOTS, WIDTH, GROUP, WIDTH_BLOCKS,
        SCALED: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # Phase 2 (see chunk_carry_pass): one program per (line, block of positions) runs along the
        # slots BLOCK_K at a time, each block an associative scan of (gate, value) pairs that then
        # takes in the carry from the blocks before it. Slots past the end are (1, 0): no-ops.
        pid = tl.program_id(0)
        line = (pid // WIDTH_BLOCKS).to(tl.int64)
        cols = (pid % WIDTH_BLOCKS) * BLOCK + tl.arange(0, BLOCK)
        mask_w = cols < WIDTH
        if HAS_INIT:
            carry = tl.load(init_ptr + line * WIDTH + cols, mask=mask_w, other=0.0)
        else:
            carry = tl.zeros([BLOCK], dtype=tl.float32)
        if SCALED:
            scale = tl.load(scale_ptr + cols, mask=mask_w, other=0.0)
        rows = tl.arange(0, BLOCK_K)
        values = value_ptr + line * SLOTS * WIDTH
        logs = log_ptr + line * SLOTS * (WIDTH // GROUP)
        for start in range(0, SLOTS, BLOCK_K):
            k = (start + rows).to(tl.int64)
            mask = (k < SLOTS)[:, None] & mask_w[None, :]
            if REVERSE:
                k = SLOTS - 1 - k
            at = k[:, None] * WIDTH + cols[None, :]
            value = tl.load(values + at, mask=mask, other=0.0)
            log_gate = tl.load(
                logs + k[:, None] * (WIDTH // GROUP) + (cols // GROUP)[None, :], mask=mask, other=0.0
            )
            if SCALED:
                log_gate = log_gate * scale[None, :]
            gate, value = tl.associative_scan((tl.exp(log_gate), value), 0, affine_combine, reverse=False)
            value += gate * carry[None, :]
            # Each element is loaded and stored by the same thread (one layout), so in place is safe.
            tl.store(values + at, value, mask=mask)
            carry = tl.sum(tl.where(rows[:, None] == BLOCK_K - 1, value, 0.0), axis=0)

    @_triton.jit
    def _recurrence_rescan_kernel(
        x_ptr, gate_ptr, carry_ptr, h_ptr, L, INNER, CHUNK, N_CHUNKS, INNER_BLOCKS,
        s_x_o, s_x_l, s_x_i, s_g_o, s_g_l, s_g_i, s_h_o, s_h_l, s_h_i,
        REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        # Phase 3: h_t = exp(log_a_t) h_{t-1} + x_t through one chunk, an associative scan along its
        # steps, the carry from phase 2 folded into its first step (chunk 0 starts from 0).
        line, chunk, cols, _, t, _, mask = _setup(
            INNER, N_CHUNKS, 0, INNER_BLOCKS, CHUNK, L, REVERSE, BLOCK_T, BLOCK_I
        )
        x = tl.load(x_ptr + line * s_x_o + t[:, None] * s_x_l + cols[None, :] * s_x_i, mask=mask, other=0.0)
        log_a = tl.load(
            gate_ptr + line * s_g_o + t[:, None] * s_g_l + cols[None, :] * s_g_i, mask=mask, other=0.0
        )
        gate = tl.exp(log_a.to(tl.float32))
        carry_at = (line * (N_CHUNKS - 1) + chunk - 1) * INNER + cols
        carry = tl.load(carry_ptr + carry_at, mask=(cols < INNER) & (chunk > 0), other=0.0)
        x = x.to(tl.float32)
        x = tl.where(tl.arange(0, BLOCK_T)[:, None] == 0, x + gate * carry[None, :], x)
        _, h = tl.associative_scan((gate, x), 0, affine_combine)
        offsets = line * s_h_o + t[:, None] * s_h_l + cols[None, :] * s_h_i
        tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)

    @_triton.jit
    def _recurrence_backward_kernel(
        grad_ptr, gate_ptr, h_ptr, carry_ptr, grad_x_ptr, grad_gate_ptr, L, INNER, CHUNK, N_CHUNKS,
        INNER_BLOCKS, s_g_o, s_g_l, s_g_i, s_a_o, s_a_l, s_a_i, s_h_o, s_h_l, s_h_i, s_x_o, s_x_l, s_x_i,
        REVERSE: tl.constexpr, PER_STEP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        # The reverse scan through one chunk, in scan order: dh_p = g_p + a_{p+1} dh_{p+1}, with the
        # gradient from the later chunks (phase 2, backward) entering at the chunk's last step;
        # dx_p = dh_p and dlog_a_p = dh_p a_p h_{p-1}, h_{p-1} read from the saved output (0 at p = 0).
        line, chunk, cols, p, t, valid, mask = _setup(
            INNER, N_CHUNKS, 0, INNER_BLOCKS, CHUNK, L, REVERSE, BLOCK_T, BLOCK_I
        )
        mask_i = cols < INNER
        rows = tl.arange(0, BLOCK_T)
        g = tl.load(
            grad_ptr + line * s_g_o + t[:, None] * s_g_l + cols[None, :] * s_g_i, mask=mask, other=0.0
        )
        g = g.to(tl.float32)
        gates = gate_ptr + line * s_a_o + cols[None, :] * s_a_i
        gate = tl.exp(tl.load(gates + t[:, None] * s_a_l, mask=mask, other=0.0).to(tl.float32))
        # The next step's gate, 0 at the chunk's last step (and past it): read from memory, one step on.
        if REVERSE:
            t_next = t - 1
            t_previous = t + 1
        else:
            t_next = t + 1
            t_previous = t - 1
        has_next = (rows + 1 < CHUNK) & (p + 1 < L)
        mask_next = has_next[:, None] & mask_i[None, :]
        next_gate = tl.exp(tl.load(gates + t_next[:, None] * s_a_l, mask=mask_next, other=0.0).to(tl.float32))
        next_gate = tl.where(mask_next, next_gate, 0.0)
        later_at = (line * (N_CHUNKS - 1) + chunk) * INNER + cols
        later = tl.load(carry_ptr + later_at, mask=mask_i & (chunk < N_CHUNKS - 1), other=0.0)
        last = tl.minimum(CHUNK, L - chunk.to(tl.int64) * CHUNK) - 1
        g = tl.where(rows[:, None] == last, g + later[None, :], g)
        _, dh = tl.associative_scan((next_gate, g), 0, affine_combine, reverse=True)
        out = line * s_x_o + t[:, None] * s_x_l + cols[None, :] * s_x_i
        tl.store(grad_x_ptr + out, dh.to(grad_x_ptr.dtype.element_ty), mask=mask)
        mask_previous = (valid & (p > 0))[:, None] & mask_i[None, :]
        h_previous = tl.load(
            h_ptr + line * s_h_o + t_previous[:, None] * s_h_l + cols[None, :] * s_h_i,
            mask=mask_previous,
            other=0.0,
        ).to(tl.float32)
        grad_gate = dh * gate * h_previous
        if PER_STEP:  # a float32 (outer, L, inner) gradient
            at = (line * L + t[:, None]) * INNER + cols[None, :]
            tl.store(grad_gate_ptr + at, grad_gate, mask=mask)
        else:  # one sum per (line, chunk): (outer, chunks, inner)
            at = (line * N_CHUNKS + chunk) * INNER + cols
            tl.store(grad_gate_ptr + at, tl.sum(grad_gate, axis=0), mask=mask_i)
