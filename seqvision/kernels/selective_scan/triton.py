"""The Triton kernels of :func:`~seqvision.kernels.selective_scan`: a chunked scan that runs in
parallel over (batch, block of channels, chunk of the sequence), forward and backward, joined to
autograd by ``_SelectiveScanTriton``, and ``triton_selective_scan``, the operator's Triton path.

The sequence is cut into chunks of ``chunk_size`` steps (at most _MAX_CHUNK; a chunk is one register
tile along L). A program holds a (BLOCK_D channels, BLOCK_T steps) tile of u, delta and z, read
coalesced along L, and walks the state index n = 0 .. N-1: for each n the (channels, steps) gates
a = exp(dt A_n), inputs b = dt u B_n and states h live in registers, and a tl.associative_scan along
the steps composes the (a, b) pairs. With dt_t = softplus(delta_t + bias), h_t = a_t h_{t-1} + b_t
and S_c the (D, N) state entering chunk c, the forward pass runs in three phases:

1. ``_chunk_end_kernel``, one program per (channel block, chunk, batch) for chunks 0 .. n-2: the state
   the chunk leaves from a zero start, E_c = sum_t (a_{t+1} ... a_last) b_t, for each n a reverse
   cumulative product of the gates (no scan of pairs needed: only the end is kept), and the chunk's
   summed step size sum_t dt_t: its decay per (channel, state) is exp(A sum_t dt_t), kept as the
   log's factor, N times smaller than the decays themselves.
2. :func:`~seqvision.kernels.linear_recurrence.chunk_carry_pass`, one program per (block of (channel,
   state) pairs, batch), the only sequential part: S_{c+1} = exp(A sum dt over chunk c) S_c + E_c
   over the chunks, 16 chunks per associative scan, in place. The S_c are the chunk checkpoints the
   backward pass starts from.
3. ``_rescan_kernel``, one program per (channel block, chunk, batch) for every chunk: the scan of the
   chunk again, from S_c folded into its first step, y = sum_n C_n h + D u, times silu(z). The last
   chunk also writes the last state.

Phase 3 rescans rather than adding the fix-up C_t . ((a_first ... a_t) S_c) to a y written by phase
1: both take one exp per (channel, state, step), but the fix-up writes a float32 partial y in phase 1
and reads it back, and reads delta and C in both phases, where the rescan reads u, delta and B twice
and C and z once: fewer bytes. A sequence of one chunk runs phase 3 alone.

Backward, by recomputation from the checkpoints, the same three phases on the state gradient
dh_t = g_t C_t + a_{t+1} dh_{t+1} (g the gradient of y before the z gate), run from the end:
(1) ``_chunk_start_grad_kernel``, for chunks 1 .. n-1, what the chunk's own outputs send into the
state entering it, sum_t (a_first ... a_t) g_t C_t (a cumulative product), and the chunk's summed
step size; (2) the same carry pass in reverse from the last state's gradient, leaving the gradient
reaching the end of every chunk; (3) ``_backward_kernel``, per chunk and n, the forward scan from S_c
and the reverse scan from that gradient, both in registers (no scratch: a per-chunk store of states
would be a (batch, D, L, N) tensor once chunks run side by side), h_{t-1} and a_{t+1} by one-step
tl.gather shifts of the tiles, then every gradient: du, d(delta) and dz per step, dB / dC per step
(or per channel when fixed), dA, dD and d(delta_bias) per (channel, chunk), summed by torch (no
atomics, so the result does not depend on the order programs run in).

No exponent is a sum over more than one step except the carry pass's chunk decay exp(A sum dt), which
is <= 1 for dt >= 0 and A <= 0 (softplus and Mamba's A = -exp(A_log) give both); every other decay is
a product of per-step gates exp(dt A) (the sequential recurrence's own products), and nothing divides
by a decay, so the kernels are exact for any decay strength (tested at dt A down to -2000 per step)
and for gates above 1 lose no more than the recurrence does.

Passes over HBM per (batch, channel, step), 16-bit inputs, chunks of T steps, N states (per-step
B / C are rows shared by a program's channels, read from L2 by every channel block): forward, u and
delta twice, z once, y written once (the floor: u, delta, z and y once), and the float32 chunk states
four times (phase 1 writes, the carry pass reads and writes, phase 3 reads): 16 N / T bytes, 4 bytes
at N = 16, T = 64 (chunk_size 128 halves it). Backward: delta, z and dy twice, u once, du, d(delta)
and dz written once, the state gradients 16 N / T bytes and the states 4 N / T, dA's per-chunk
partial 8 N / T (written, then summed by torch) and, for per-step B / C, per-program rows of dB and
dC (4 N / BLOCK_D bytes each, written, then summed by torch).

Arithmetic: each phase over the steps takes one exp per (channel, state, step), two forward and two
backward: at N = 16 the forward's 32 exps per (channel, step) on an H100 / H200 (16 exps per clock
per SM, 132 SMs at 1.98 GHz: 4.2e12 per second) take about 7.6 ps, against 1.7 ps to move that step's
8 bytes of u, delta, z and y at the H200's 4.8 TB/s. So at N = 16 these kernels are bound by exp
throughput, at best about a fifth of the memory floor's throughput, and any chunked forward that
does not store the states pays the second exp (a single pass, with the states kept sequential, pays
one: at best about two fifths).

The kernels write into buffers from ``_new_output``, which the tests replace with NaN-filled ones.
triton is optional (see :mod:`seqvision.kernels._triton`): without it this module still imports,
with no kernels defined.
"""

from __future__ import annotations

import torch

from .._triton import tl
from .._triton import triton as _triton
from ..linear_recurrence import chunk_carry_pass
from . import reference

if _triton is not None:
    from ..linear_recurrence import affine_combine


def triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
    """The Triton path of :func:`~seqvision.kernels.selective_scan`, with its arguments already
    checked. Returns ``(y, last_state)``, ``last_state`` (B, D, N) in float32."""
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    # Chunk states are kept for the backward pass only when there will be one.
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    return _SelectiveScanTriton.apply(*tensors, delta_softplus, chunk_size, save)


# Channels per program, a power of 2. A program's channels all lie in one group of B / C, so a block
# never spans more than D / G channels; tests lower the cap to get several blocks per group.
_MAX_BLOCK_D = 32
# Steps per chunk at most: a chunk is one register tile along L (tests lower it).
_MAX_CHUNK = 128
# Largest (channels x steps) tile per program: the backward kernel keeps about fifteen such float32
# tiles live. Compiled for sm_90 (benchmarks/kernels_compile.py), a full tile at Triton's default 4
# warps took all 255 registers in the backward kernel (and spilled 156 bytes per thread for float32
# inputs) and spilled in the rescan; at 8 warps they take 177-213 and 63-80 registers and spill nothing.
_MAX_TILE = 1024
_FULL_TILE_WARPS = 8


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output, partial-gradient and chunk-state buffers of the Triton kernels (a seam for tests, which
    poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


class _Launch:
    """Chunks, tiles and grids for inputs u (batch, D, L), A (D, N), G groups of B / C and chunks of
    ``chunk_size`` steps (at most _MAX_CHUNK).

    Channel programs are laid out G * blocks_per_group per batch element: program k of group g runs
    channels ``g * D / G + k * block_d + arange(block_d)`` (masked past the group's end). Keeping a
    program inside one group lets it read a per-step B / C row once for all its channels and sum its
    channels' gradients for that row before writing them. The grid is flat, channel programs fastest,
    then chunks, then batch: programs running side by side share their B / C rows in L2.
    """

    def __init__(self, u: torch.Tensor, A: torch.Tensor, groups: int, chunk_size: int):
        self.batch, self.dim, self.length = u.shape
        self.n = A.shape[1]
        self.per_group = self.dim // groups
        self.chunk = min(chunk_size, self.length, _MAX_CHUNK)
        self.n_chunks = _triton.cdiv(self.length, self.chunk)
        self.slots = self.n_chunks - 1  # chunk boundaries: one state (or state gradient) each
        self.block_t = _triton.next_power_of_2(self.chunk)
        cap = min(_MAX_BLOCK_D, max(1, _MAX_TILE // self.block_t))
        self.block_d = min(cap, _triton.next_power_of_2(self.per_group))
        self.blocks_per_group = _triton.cdiv(self.per_group, self.block_d)
        self.programs = groups * self.blocks_per_group
        # Warps of the rescan and backward kernels (the others keep few tiles live: 4 suffice).
        self.num_warps = _FULL_TILE_WARPS if self.block_d * self.block_t >= _MAX_TILE else 4

    def grid(self, chunks: int) -> tuple[int]:
        return (self.programs * chunks * self.batch,)

    def sizes(self) -> tuple[int, ...]:
        """The kernels' size arguments: D, L, N, D / G, blocks per group, channel programs, chunk,
        number of chunks."""
        return (
            self.dim, self.length, self.n, self.per_group, self.blocks_per_group, self.programs,
            self.chunk, self.n_chunks,
        )  # fmt: skip

    def tiles(self) -> dict:
        return dict(BLOCK_D=self.block_d, BLOCK_T=self.block_t)


def _bc_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, row, N, L) strides of B or C. The row is the channel for a fixed (D, N) tensor, the
    group for (batch, G, N, L), and absent (stride 0: a single group) for (batch, N, L)."""
    if x.dim() == 2:
        return 0, x.stride(0), x.stride(1), 0
    if x.dim() == 3:
        return x.stride(0), 0, x.stride(1), x.stride(2)
    return x.stride()


def _bc_partial(x: torch.Tensor, launch: _Launch) -> torch.Tensor:
    """Buffer for the programs' shares of dB or dC: for a fixed x, (batch, chunks, D, N), each channel
    summed over its chunk; for an input-dependent x, (batch, channel programs, N, L), each step summed
    over the program's channels."""
    if x.dim() == 2:
        shape = (launch.batch, launch.n_chunks, launch.dim, launch.n)
    else:
        shape = (launch.batch, launch.programs, launch.n, launch.length)
    return _new_output(shape, torch.float32, x.device)


def _bc_grad(partial: torch.Tensor, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum the programs' shares of dB or dC (see :func:`_bc_partial`) into the gradient of x."""
    if x.dim() == 2:
        return partial.sum((0, 1)).to(x.dtype)
    batch, _, n, length = partial.shape
    partial = partial.reshape(batch, groups, -1, n, length).sum(2)  # over the blocks of each group
    return (partial.sum(1) if x.dim() == 3 else partial).to(x.dtype)


def _channel_strides(x: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, D, L) strides of u, delta, z or the gradient of y; zeros for an absent z."""
    return x.stride() if x is not None else (0, 0, 0)


def _carry_pass(states, sums, A, launch, init=None, reverse=False) -> None:
    """Phase 2 on the (batch, slots, D, N) states (or state gradients), in place: each chunk boundary's
    value takes in the one before it (after it, in reverse) decayed by exp(A * the chunk's summed dt)."""
    batch, dim, n = launch.batch, launch.dim, launch.n
    values = states.view(batch, launch.slots, dim * n)
    start = init.reshape(batch, dim * n) if init is not None else None
    chunk_carry_pass(values, sums, scale=A.reshape(-1), init=start, reverse=reverse)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk_size: int, save: bool):
        groups = reference.channel_groups(B, C)
        launch = _Launch(u, A, groups, chunk_size)
        batch, dim, n, device = launch.batch, launch.dim, launch.n, u.device
        # The gradients of A, D and delta_bias come back in their own dtypes; the kernels and the carry
        # pass read A as a contiguous float32 (D, N).
        ctx.dtypes = tuple(x.dtype if x is not None else None for x in (A, D, delta_bias))
        A = A.contiguous().float()
        y = _new_output((batch, dim, launch.length), u.dtype, device)
        last_state = _new_output((batch, dim, n), torch.float32, device)
        flags = dict(
            B_FIXED=B.dim() == 2, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, **launch.tiles()
        )
        # The state entering chunks 1 .. n-1 (slot c: the state after chunk c), float32.
        states = None
        if launch.slots:
            states = _new_output((batch, launch.slots, dim, n), torch.float32, device)
            sums = _new_output((batch, launch.slots, dim), torch.float32, device)
            _chunk_end_kernel[launch.grid(launch.slots)](
                u, delta, A, B, _or(delta_bias, A), states, sums, *launch.sizes(),
                *u.stride(), *delta.stride(), *_bc_strides(B), **flags,
            )  # fmt: skip
            _carry_pass(states, sums, A, launch)
        _rescan_kernel[launch.grid(launch.n_chunks)](
            u, delta, A, B, C, _or(D, A), _or(z, u), _or(delta_bias, A), _or(states, last_state),
            y, last_state, *launch.sizes(),
            *u.stride(), *delta.stride(), *_channel_strides(z), *_bc_strides(B), *_bc_strides(C),
            C_FIXED=C.dim() == 2, HAS_D=D is not None, HAS_Z=z is not None, **flags,
            num_warps=launch.num_warps,
        )  # fmt: skip
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus, ctx.chunk_size = delta_softplus, chunk_size
        return y, last_state

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, grad_last: torch.Tensor):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        groups = reference.channel_groups(B, C)
        launch = _Launch(u, A, groups, ctx.chunk_size)
        batch, dim, n, device = launch.batch, launch.dim, launch.n, u.device
        grad_last = grad_last.contiguous()
        flags = dict(
            C_FIXED=C.dim() == 2, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, **launch.tiles(),
        )  # fmt: skip
        # Slot c: the gradient reaching the state after chunk c from the chunks after it.
        later = None
        if launch.slots:
            later = _new_output((batch, launch.slots, dim, n), torch.float32, device)
            sums = _new_output((batch, launch.slots, dim), torch.float32, device)
            _chunk_start_grad_kernel[launch.grid(launch.slots)](
                delta, A, C, _or(z, u), _or(delta_bias, A), grad_y, later, sums, *launch.sizes(),
                *delta.stride(), *_channel_strides(z), *grad_y.stride(), *_bc_strides(C), **flags,
            )  # fmt: skip
            _carry_pass(later, sums, A, launch, init=grad_last, reverse=True)

        grad_u, grad_delta = (_new_output(x.shape, x.dtype, device) for x in (u, delta))
        grad_z = _new_output(z.shape, z.dtype, device) if z is not None else None
        # Sums over batch and chunks (and over channels and L for dB / dC) are left to torch: each
        # program writes its own share, so the result does not depend on the order programs run in.
        grad_A = _new_output((batch, launch.n_chunks, dim, n), torch.float32, device)
        grad_D, grad_bias = (
            _new_output((batch, launch.n_chunks, dim), torch.float32, device) if x is not None else None
            for x in (D, delta_bias)
        )
        grad_B, grad_C = _bc_partial(B, launch), _bc_partial(C, launch)
        _backward_kernel[launch.grid(launch.n_chunks)](
            u, delta, A, B, C, _or(D, A), _or(z, u), _or(delta_bias, A), _or(states, grad_last),
            _or(later, grad_last), grad_y, grad_last,
            grad_u, grad_delta, _or(grad_z, grad_u), grad_A, grad_B, grad_C,
            _or(grad_D, grad_A), _or(grad_bias, grad_A), *launch.sizes(),
            *u.stride(), *delta.stride(), *_channel_strides(z), *grad_y.stride(),
            *_bc_strides(B), *_bc_strides(C),
            B_FIXED=B.dim() == 2, HAS_D=D is not None, **flags, num_warps=launch.num_warps,
        )  # fmt: skip
        return (
            grad_u,
            grad_delta,
            grad_A.sum((0, 1)).to(ctx.dtypes[0]),
            _bc_grad(grad_B, B, groups),
            _bc_grad(grad_C, C, groups),
            grad_D.sum((0, 1)).to(ctx.dtypes[1]) if D is not None else None,
            grad_z,
            grad_bias.sum((0, 1)).to(ctx.dtypes[2]) if delta_bias is not None else None,
            None,
            None,
            None,
        )


def _or(x: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """x, or a placeholder pointer for an absent optional tensor (the kernel never reads it)."""
    return placeholder if x is None else x


if _triton is not None:
    # The interpreter (the tests) pays about a millisecond per call of a jit helper, so the kernels
    # call two per program (_setup, _step_sizes) and write what runs per state index n inline.

    @_triton.jit
    def _setup(
        PROGRAMS, CHUNKS_IN_GRID, FIRST_CHUNK, PER_GROUP, BLOCKS_PER_GROUP, CHUNK, L,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        """This program's batch element (int64), channel program, chunk, group, channels (BLOCK_D,)
        and their mask (see _Launch); the chunk's steps (BLOCK_T,) as int64 positions along L and
        their mask; the (channels, steps) mask; the index of the chunk's last step in the tile."""
        pid = tl.program_id(0)
        program = pid % PROGRAMS
        rest = pid // PROGRAMS
        chunk = rest % CHUNKS_IN_GRID + FIRST_CHUNK
        batch = (rest // CHUNKS_IN_GRID).to(tl.int64)
        group = program // BLOCKS_PER_GROUP
        local = (program % BLOCKS_PER_GROUP) * BLOCK_D + tl.arange(0, BLOCK_D)
        channels = group * PER_GROUP + local
        mask_d = local < PER_GROUP
        index = tl.arange(0, BLOCK_T)
        steps = chunk.to(tl.int64) * CHUNK + index
        mask_t = (index < CHUNK) & (steps < L)
        last = tl.minimum(CHUNK, L - chunk.to(tl.int64) * CHUNK) - 1
        return (
            batch,
            program,
            chunk,
            group,
            channels,
            mask_d,
            steps,
            mask_t,
            mask_d[:, None] & mask_t[None, :],
            last,
        )

    @_triton.jit
    def _step_sizes(
        delta_ptr, bias_ptr, rows, channels, steps, stride_l, mask, mask_d,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):  # fmt: skip
        """delta + delta_bias (raw) and the step size dt (softplus'd or not, with torch's threshold:
        above 20 it is x to float32 precision and e^x may overflow), both (channels, steps) in float32;
        dt is 0 on masked elements, so that they neither decay nor feed any sum."""
        raw = tl.load(delta_ptr + rows[:, None] + steps[None, :] * stride_l, mask=mask, other=0.0).to(
            tl.float32
        )
        if HAS_BIAS:
            raw += tl.load(bias_ptr + channels, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw))) if SOFTPLUS else raw
        return raw, tl.where(mask, dt, 0.0)

    @_triton.jit
    def _chunk_end_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, state_ptr, sum_ptr,
        DIM, L, N, PER_GROUP, BLOCKS_PER_GROUP, PROGRAMS, CHUNK, N_CHUNKS,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_B_b, s_B_row, s_B_n, s_B_l,
        B_FIXED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # Phase 1 for chunks 0 .. n-2: E_c[d, n] = sum_t (a_{t+1} ... a_last) dt_t u_t B_t[n], the
        # state after the chunk from a zero start, and sum_t dt_t, into slot c.
        batch, _, chunk, group, channels, mask_d, steps, mask_t, mask, _ = _setup(
            PROGRAMS, N_CHUNKS - 1, 0, PER_GROUP, BLOCKS_PER_GROUP, CHUNK, L, BLOCK_D, BLOCK_T
        )
        _, dt = _step_sizes(
            delta_ptr, bias_ptr, batch * s_dt_b + channels * s_dt_d, channels, steps, s_dt_l, mask, mask_d,
            HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
        u_rows = batch * s_u_b + channels * s_u_d
        dtu = dt * tl.load(u_ptr + u_rows[:, None] + steps[None, :] * s_u_l, mask=mask, other=0.0).to(
            tl.float32
        )
        index = tl.arange(0, BLOCK_T)
        after = tl.broadcast_to(tl.minimum(index + 1, BLOCK_T - 1)[None, :], (BLOCK_D, BLOCK_T))
        slot = batch * (N_CHUNKS - 1) + chunk
        state_rows = (slot * DIM + channels) * N  # (batch, slots, D, N)
        B_row = batch * s_B_b + group * s_B_row
        for n in range(N):
            A_n = tl.load(A_ptr + channels * N + n, mask=mask_d, other=0.0)
            if B_FIXED:  # a (channels, 1) column of the fixed (D, N) B
                B_n = tl.load(B_ptr + channels * s_B_row + n * s_B_n, mask=mask_d, other=0.0)
                B_n = B_n.to(tl.float32)[:, None]
            else:  # a (1, steps) row shared by the program's channels
                B_n = tl.load(B_ptr + B_row + n * s_B_n + steps * s_B_l, mask=mask_t, other=0.0)
                B_n = B_n.to(tl.float32)[None, :]
            # The decay from step t to the chunk's end, a_{t+1} ... a_last: the reverse cumulative
            # product of the gates one step on (1 past the tile; masked steps have gate 1).
            gate = tl.exp(dt * A_n[:, None])
            later = tl.where(index[None, :] < BLOCK_T - 1, tl.gather(gate, after, 1), 1.0)
            e = tl.sum(tl.cumprod(later, axis=1, reverse=True) * dtu * B_n, axis=1)
            tl.store(state_ptr + state_rows + n, e, mask=mask_d)
        tl.store(sum_ptr + slot * DIM + channels, tl.sum(dt, axis=1), mask=mask_d)

    @_triton.jit
    def _rescan_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, state_ptr, y_ptr, last_ptr,
        DIM, L, N, PER_GROUP, BLOCKS_PER_GROUP, PROGRAMS, CHUNK, N_CHUNKS,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
        s_B_b, s_B_row, s_B_n, s_B_l, s_C_b, s_C_row, s_C_n, s_C_l,
        B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # Phase 3: per n, h = the scan of (exp(dt A_n), dt u B_n) along the chunk from S_c (0 for the
        # first chunk), y += C_n h; then y += D u, y *= silu(z). The last chunk writes h_L.
        batch, _, chunk, group, channels, mask_d, steps, mask_t, mask, last = _setup(
            PROGRAMS, N_CHUNKS, 0, PER_GROUP, BLOCKS_PER_GROUP, CHUNK, L, BLOCK_D, BLOCK_T
        )
        _, dt = _step_sizes(
            delta_ptr, bias_ptr, batch * s_dt_b + channels * s_dt_d, channels, steps, s_dt_l, mask, mask_d,
            HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
        u_rows = batch * s_u_b + channels * s_u_d
        u = tl.load(u_ptr + u_rows[:, None] + steps[None, :] * s_u_l, mask=mask, other=0.0).to(tl.float32)
        dtu = dt * u
        first_step = tl.arange(0, BLOCK_T)[None, :] == 0
        # The state entering the chunk (slot chunk - 1 of the checkpoints; 0 for the first chunk) and,
        # for the last chunk, h at its last step: the last state.
        entering_rows = ((batch * (N_CHUNKS - 1) + chunk - 1) * DIM + channels) * N
        mask_entering = mask_d & (chunk > 0)
        last_rows = tl.broadcast_to(((batch * DIM + channels) * N)[:, None], (BLOCK_D, BLOCK_T))
        mask_last = mask_d[:, None] & (tl.arange(0, BLOCK_T)[None, :] == last) & (chunk == N_CHUNKS - 1)
        B_row = batch * s_B_b + group * s_B_row
        C_row = batch * s_C_b + group * s_C_row
        y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        if HAS_D:
            y += tl.load(D_ptr + channels, mask=mask_d, other=0.0).to(tl.float32)[:, None] * u
        for n in range(N):
            A_n = tl.load(A_ptr + channels * N + n, mask=mask_d, other=0.0)
            if B_FIXED:
                B_n = tl.load(B_ptr + channels * s_B_row + n * s_B_n, mask=mask_d, other=0.0)
                B_n = B_n.to(tl.float32)[:, None]
            else:
                B_n = tl.load(B_ptr + B_row + n * s_B_n + steps * s_B_l, mask=mask_t, other=0.0)
                B_n = B_n.to(tl.float32)[None, :]
            if C_FIXED:
                C_n = tl.load(C_ptr + channels * s_C_row + n * s_C_n, mask=mask_d, other=0.0)
                C_n = C_n.to(tl.float32)[:, None]
            else:
                C_n = tl.load(C_ptr + C_row + n * s_C_n + steps * s_C_l, mask=mask_t, other=0.0)
                C_n = C_n.to(tl.float32)[None, :]
            gate = tl.exp(dt * A_n[:, None])
            S_n = tl.load(state_ptr + entering_rows + n, mask=mask_entering, other=0.0)[:, None]
            x = dtu * B_n
            _, h = tl.associative_scan((gate, tl.where(first_step, x + gate * S_n, x)), 1, affine_combine)
            y += C_n * h
            tl.store(last_ptr + last_rows + n, h, mask=mask_last)
        if HAS_Z:
            z_rows = batch * s_z_b + channels * s_z_d
            z = tl.load(z_ptr + z_rows[:, None] + steps[None, :] * s_z_l, mask=mask, other=0.0).to(tl.float32)
            y = y * z / (1.0 + tl.exp(-z))
        y_rows = (batch * DIM + channels) * L
        tl.store(y_ptr + y_rows[:, None] + steps[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @_triton.jit
    def _chunk_start_grad_kernel(
        delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, grad_y_ptr, grad_state_ptr, sum_ptr,
        DIM, L, N, PER_GROUP, BLOCKS_PER_GROUP, PROGRAMS, CHUNK, N_CHUNKS,
        s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_g_b, s_g_d, s_g_l, s_C_b, s_C_row, s_C_n, s_C_l,
        C_FIXED: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # Backward phase 1 for chunks 1 .. n-1: the gradient the chunk's outputs send into the state
        # entering it, sum_t (a_first ... a_t) g_t C_t[n] (g = dy silu(z), the gradient of
        # C . h + D u), and sum_t dt_t, into slot c - 1.
        batch, _, chunk, group, channels, mask_d, steps, mask_t, mask, _ = _setup(
            PROGRAMS, N_CHUNKS - 1, 1, PER_GROUP, BLOCKS_PER_GROUP, CHUNK, L, BLOCK_D, BLOCK_T
        )
        _, dt = _step_sizes(
            delta_ptr, bias_ptr, batch * s_dt_b + channels * s_dt_d, channels, steps, s_dt_l, mask, mask_d,
            HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
        g_rows = batch * s_g_b + channels * s_g_d
        g = tl.load(grad_y_ptr + g_rows[:, None] + steps[None, :] * s_g_l, mask=mask, other=0.0).to(
            tl.float32
        )
        if HAS_Z:
            z_rows = batch * s_z_b + channels * s_z_d
            z = tl.load(z_ptr + z_rows[:, None] + steps[None, :] * s_z_l, mask=mask, other=0.0).to(tl.float32)
            g = g * z / (1.0 + tl.exp(-z))
        slot = batch * (N_CHUNKS - 1) + chunk - 1
        state_rows = (slot * DIM + channels) * N  # (batch, slots, D, N)
        C_row = batch * s_C_b + group * s_C_row
        for n in range(N):
            A_n = tl.load(A_ptr + channels * N + n, mask=mask_d, other=0.0)
            if C_FIXED:
                C_n = tl.load(C_ptr + channels * s_C_row + n * s_C_n, mask=mask_d, other=0.0)
                C_n = C_n.to(tl.float32)[:, None]
            else:
                C_n = tl.load(C_ptr + C_row + n * s_C_n + steps * s_C_l, mask=mask_t, other=0.0)
                C_n = C_n.to(tl.float32)[None, :]
            # The decay from the chunk's start through step t, a_first ... a_t: a cumulative product.
            through = tl.cumprod(tl.exp(dt * A_n[:, None]), axis=1)
            tl.store(grad_state_ptr + state_rows + n, tl.sum(through * g * C_n, axis=1), mask=mask_d)
        tl.store(sum_ptr + slot * DIM + channels, tl.sum(dt, axis=1), mask=mask_d)

    @_triton.jit
    def _backward_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, state_ptr, later_ptr,
        grad_y_ptr, grad_last_ptr,
        grad_u_ptr, grad_delta_ptr, grad_z_ptr, grad_A_ptr, grad_B_ptr, grad_C_ptr, grad_D_ptr,
        grad_bias_ptr,
        DIM, L, N, PER_GROUP, BLOCKS_PER_GROUP, PROGRAMS, CHUNK, N_CHUNKS,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_g_b, s_g_d, s_g_l,
        s_B_b, s_B_row, s_B_n, s_B_l, s_C_b, s_C_row, s_C_n, s_C_l,
        B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # Backward phase 3, per chunk and n: h from the forward scan from S_c; dh from the reverse scan
        # dh_t = g_t C_t + a_{t+1} dh_{t+1}, which takes in the gradient from the later chunks (or the
        # last state's) at the chunk's last step. Then, with q_t = dh_t a_t h_{t-1} (the gradient of
        # the exponent dt_t A_n): dA_n += sum_t q_t dt_t, d(dt) += q_t A_n + dh_t u_t B_t[n],
        # du += dh_t B_t[n] dt_t, dB_t[n] = dh_t dt_t u_t, dC_t[n] = g_t h_t, summed over the
        # program's channels for a per-step B / C or over the chunk's steps for a fixed one.
        batch, program, chunk, group, channels, mask_d, steps, mask_t, mask, last = _setup(
            PROGRAMS, N_CHUNKS, 0, PER_GROUP, BLOCKS_PER_GROUP, CHUNK, L, BLOCK_D, BLOCK_T
        )
        raw, dt = _step_sizes(
            delta_ptr, bias_ptr, batch * s_dt_b + channels * s_dt_d, channels, steps, s_dt_l, mask, mask_d,
            HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
        u_rows = batch * s_u_b + channels * s_u_d
        u = tl.load(u_ptr + u_rows[:, None] + steps[None, :] * s_u_l, mask=mask, other=0.0).to(tl.float32)
        dtu = dt * u
        g_rows = batch * s_g_b + channels * s_g_d
        dy = tl.load(grad_y_ptr + g_rows[:, None] + steps[None, :] * s_g_l, mask=mask, other=0.0).to(
            tl.float32
        )
        g = dy
        if HAS_Z:  # y = y' silu(z): the gradient of y' is dy silu(z)
            z_rows = batch * s_z_b + channels * s_z_d
            z = tl.load(z_ptr + z_rows[:, None] + steps[None, :] * s_z_l, mask=mask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-z))
            g = dy * z * sig
        index = tl.arange(0, BLOCK_T)
        first_step = index[None, :] == 0
        last_step = index[None, :] == last
        # One-step shifts along the tile: h_{t-1} at t, a_{t+1} at t (the step shifted in from outside
        # the tile is replaced below).
        before = tl.broadcast_to(tl.maximum(index - 1, 0)[None, :], (BLOCK_D, BLOCK_T))
        after = tl.broadcast_to(tl.minimum(index + 1, BLOCK_T - 1)[None, :], (BLOCK_D, BLOCK_T))
        # The state entering the chunk (0 for the first) and the gradient reaching its end from the
        # chunks after it (for the last chunk, the last state's gradient), rows of N per channel.
        slot = (batch * (N_CHUNKS - 1) + chunk) * DIM + channels
        entering_rows = (slot - DIM) * N
        mask_entering = mask_d & (chunk > 0)
        later_rows = slot * N
        mask_later = mask_d & (chunk < N_CHUNKS - 1)
        last_rows = (batch * DIM + channels) * N
        mask_last = mask_d & (chunk == N_CHUNKS - 1)
        # Per-(batch, chunk, channel) shares of the reductions (dA, a fixed dB / dC, dD, d(bias)).
        share = (batch * N_CHUNKS + chunk) * DIM + channels
        B_row = batch * s_B_b + group * s_B_row
        C_row = batch * s_C_b + group * s_C_row
        # This program's share of a per-step dB / dC: (N, L) of (batch, programs, N, L).
        step_share = (batch * PROGRAMS + program) * N * L + steps
        skip = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_D:
            skip = tl.load(D_ptr + channels, mask=mask_d, other=0.0).to(tl.float32)
        y = skip[:, None] * u  # y' = C . h + D u, for dz
        grad_h_B = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)  # sum_n dh B_n
        grad_dt = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        for n in range(N):
            A_n = tl.load(A_ptr + channels * N + n, mask=mask_d, other=0.0)[:, None]
            if B_FIXED:
                B_n = tl.load(B_ptr + channels * s_B_row + n * s_B_n, mask=mask_d, other=0.0)
                B_n = B_n.to(tl.float32)[:, None]
            else:
                B_n = tl.load(B_ptr + B_row + n * s_B_n + steps * s_B_l, mask=mask_t, other=0.0)
                B_n = B_n.to(tl.float32)[None, :]
            if C_FIXED:
                C_n = tl.load(C_ptr + channels * s_C_row + n * s_C_n, mask=mask_d, other=0.0)
                C_n = C_n.to(tl.float32)[:, None]
            else:
                C_n = tl.load(C_ptr + C_row + n * s_C_n + steps * s_C_l, mask=mask_t, other=0.0)
                C_n = C_n.to(tl.float32)[None, :]
            S_n = tl.load(state_ptr + entering_rows + n, mask=mask_entering, other=0.0)[:, None]
            G_n = tl.load(later_ptr + later_rows + n, mask=mask_later, other=0.0)
            G_n += tl.load(grad_last_ptr + last_rows + n, mask=mask_last, other=0.0)
            gate = tl.exp(dt * A_n)
            x = dtu * B_n
            _, h = tl.associative_scan((gate, tl.where(first_step, x + gate * S_n, x)), 1, affine_combine)
            h_prev = tl.where(first_step, S_n, tl.gather(h, before, 1))
            # Reverse scan of (a_{t+1}, g_t C_t): a_{t+1} is 0 from the chunk's last step on, where
            # the later chunks' gradient enters instead.
            next_gate = tl.where(index[None, :] < last, tl.gather(gate, after, 1), 0.0)
            x = g * C_n
            x = tl.where(last_step, x + G_n[:, None], x)
            _, dh = tl.associative_scan((next_gate, x), 1, affine_combine, reverse=True)
            q = dh * gate * h_prev
            tl.store(grad_A_ptr + share * N + n, tl.sum(q * dt, axis=1), mask=mask_d)
            grad_dt += q * A_n + dh * B_n * u
            grad_h_B += dh * B_n
            y += C_n * h
            if B_FIXED:
                tl.store(grad_B_ptr + share * N + n, tl.sum(dh * dtu, axis=1), mask=mask_d)
            else:
                tl.store(grad_B_ptr + step_share + n * L, tl.sum(dh * dtu, axis=0), mask=mask_t)
            if C_FIXED:
                tl.store(grad_C_ptr + share * N + n, tl.sum(g * h, axis=1), mask=mask_d)
            else:
                tl.store(grad_C_ptr + step_share + n * L, tl.sum(g * h, axis=0), mask=mask_t)

        out = (batch * DIM + channels[:, None]) * L + steps[None, :]  # the contiguous (batch, D, L) gradients
        grad_u = grad_h_B * dt + skip[:, None] * g
        tl.store(grad_u_ptr + out, grad_u.to(grad_u_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:  # d softplus(x) / dx = sigmoid(x)
            grad_dt = grad_dt / (1.0 + tl.exp(-raw))
        tl.store(grad_delta_ptr + out, grad_dt.to(grad_delta_ptr.dtype.element_ty), mask=mask)
        if HAS_Z:  # dz = dy y' silu'(z), silu'(z) = sig (1 + z (1 - sig))
            grad_z = dy * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(grad_z_ptr + out, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
        if HAS_D:
            tl.store(grad_D_ptr + share, tl.sum(g * u, axis=1), mask=mask_d)
        if HAS_BIAS:
            tl.store(grad_bias_ptr + share, tl.sum(tl.where(mask, grad_dt, 0.0), axis=1), mask=mask_d)
