"""The Triton kernels of :func:`~seqvision.kernels.selective_scan`: one program per (batch, block of
channels), sequential along L, the state in registers; the forward kernel saves the state every
``chunk`` steps, the backward kernel recomputes one chunk's states from them and runs the reverse
scan. ``_SelectiveScanTriton`` joins the two to autograd and ``triton_selective_scan`` is the
operator's Triton path.

The kernels write into buffers from ``_new_output``, which the tests replace with NaN-filled ones.
triton is optional (see :mod:`seqvision.kernels._triton`): without it this module still imports,
with no kernels defined.
"""

from __future__ import annotations

import torch

from .._triton import tl
from .._triton import triton as _triton
from . import reference


def triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
    """The Triton path of :func:`~seqvision.kernels.selective_scan`, with its arguments already
    checked. Returns ``(y, last_state)``, ``last_state`` (B, D, N) in float32."""
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    # States are saved for the backward pass only when there will be one.
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    return _SelectiveScanTriton.apply(*tensors, delta_softplus, min(chunk_size, u.shape[-1]), save)


# Channels per program, a power of 2. A program's channels all lie in one group of B / C, so a block
# never spans more than D / G channels; tests lower the cap to get several blocks per group.
_MAX_BLOCK_D = 32
# Largest (channels, N) tile per program: the backward pass keeps about six such tiles in registers.
_MAX_TILE = 1024


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output, partial-gradient and scratch buffers of the Triton kernels (a seam for tests, which
    poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


class _Launch:
    """Grid and block sizes for inputs u (batch, D, L), A (D, N) and G groups of B / C.

    Programs are laid out (batch, G * blocks_per_group): program (b, g * blocks_per_group + k) runs
    channels ``g * D / G + k * block_d + arange(block_d)`` of batch b (masked past the group's end).
    Keeping a program inside one group lets it read an input-dependent B / C step as one row shared
    by all its channels, and sum its channels' gradients for that row before writing them.
    """

    def __init__(self, u: torch.Tensor, A: torch.Tensor, groups: int, chunk: int):
        self.batch, self.dim, self.length = u.shape
        self.n = A.shape[1]
        self.per_group = self.dim // groups
        self.chunk = chunk
        self.n_chunks = _triton.cdiv(self.length, chunk)
        self.block_n = _triton.next_power_of_2(self.n)
        cap = min(_MAX_BLOCK_D, max(1, _MAX_TILE // self.block_n))
        self.block_d = min(cap, _triton.next_power_of_2(self.per_group))
        self.blocks_per_group = _triton.cdiv(self.per_group, self.block_d)
        self.grid = (self.batch, groups * self.blocks_per_group)

    def sizes(self) -> tuple[int, ...]:
        """The kernels' size arguments: D, L, N, D / G, blocks per group, chunk."""
        return self.dim, self.length, self.n, self.per_group, self.blocks_per_group, self.chunk


def _bc_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, row, N, L) strides of B or C. The row is the channel for a fixed (D, N) tensor, the
    group for (batch, G, N, L), and absent (stride 0: a single group) for (batch, N, L)."""
    if x.dim() == 2:
        return 0, x.stride(0), x.stride(1), 0
    if x.dim() == 3:
        return x.stride(0), 0, x.stride(1), x.stride(2)
    return x.stride()


def _bc_partial(x: torch.Tensor, launch: _Launch) -> torch.Tensor:
    """Buffer for one program's share of dB or dC: for a fixed x, (batch, D, N), each channel summed
    over L in registers; for an input-dependent x, (batch, G * blocks_per_group, N, L), each step
    summed over the program's channels."""
    if x.dim() == 2:
        shape = (launch.batch, launch.dim, launch.n)
    else:
        shape = (launch.batch, launch.grid[1], launch.n, launch.length)
    return _new_output(shape, torch.float32, x.device)


def _bc_grad(partial: torch.Tensor, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum the programs' shares of dB or dC (see :func:`_bc_partial`) into the gradient of x."""
    if x.dim() == 2:
        return partial.sum(0).to(x.dtype)
    batch, _, n, length = partial.shape
    partial = partial.reshape(batch, groups, -1, n, length).sum(2)  # over the blocks of each group
    return (partial.sum(1) if x.dim() == 3 else partial).to(x.dtype)


def _channel_strides(x: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, D, L) strides of u, delta, z or the gradient of y; zeros for an absent z."""
    return x.stride() if x is not None else (0, 0, 0)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int, save: bool):
        groups = reference.channel_groups(B, C)
        launch = _Launch(u, A, groups, chunk)
        batch, dim, n = launch.batch, launch.dim, launch.n
        A, D, delta_bias = (x.contiguous() if x is not None else None for x in (A, D, delta_bias))
        y = _new_output((batch, dim, launch.length), u.dtype, u.device)
        last_state = _new_output((batch, dim, n), torch.float32, u.device)
        # The state before every chunk, (batch, D, n_chunks, N), the backward pass's starting points.
        checkpoints = _new_output((batch, dim, launch.n_chunks, n), torch.float32, u.device) if save else None
        _selective_scan_forward_kernel[launch.grid](
            u, delta, A, B, C, _or(D, A), _or(z, u), _or(delta_bias, A),
            y, last_state, _or(checkpoints, last_state),
            *launch.sizes(),
            *u.stride(), *delta.stride(), *_channel_strides(z), *_bc_strides(B), *_bc_strides(C),
            B_FIXED=B.dim() == 2, C_FIXED=C.dim() == 2, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, SAVE_CHECKPOINTS=save,
            BLOCK_D=launch.block_d, BLOCK_N=launch.block_n,
        )  # fmt: skip
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
            ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        return y, last_state

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, grad_last: torch.Tensor):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        groups = reference.channel_groups(B, C)
        launch = _Launch(u, A, groups, ctx.chunk)
        batch, dim, n, device = launch.batch, launch.dim, launch.n, u.device
        grad_u, grad_delta = (_new_output(x.shape, x.dtype, device) for x in (u, delta))
        grad_z = _new_output(z.shape, z.dtype, device) if z is not None else None
        # Sums over batch (and over channels and L for dB / dC) are left to torch: each program writes
        # its own share, so the result does not depend on the order programs run in (no atomics).
        grad_A = _new_output((batch, dim, n), torch.float32, device)
        grad_D, grad_bias = (
            _new_output((batch, dim), torch.float32, device) if x is not None else None
            for x in (D, delta_bias)
        )
        grad_B, grad_C = _bc_partial(B, launch), _bc_partial(C, launch)
        # Per program, the states of one chunk: (chunk, BLOCK_D, BLOCK_N) float32.
        scratch_shape = (batch * launch.grid[1], launch.chunk, launch.block_d, launch.block_n)
        scratch = _new_output(scratch_shape, torch.float32, device)
        _selective_scan_backward_kernel[launch.grid](
            u, delta, A, B, C, _or(D, A), _or(z, u), _or(delta_bias, A), checkpoints,
            grad_y, grad_last.contiguous(),
            grad_u, grad_delta, _or(grad_z, grad_u), grad_A, grad_B, grad_C,
            _or(grad_D, grad_A), _or(grad_bias, grad_A), scratch,
            *launch.sizes(),
            *u.stride(), *delta.stride(), *_channel_strides(z), *grad_y.stride(),
            *_bc_strides(B), *_bc_strides(C),
            B_FIXED=B.dim() == 2, C_FIXED=C.dim() == 2, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.delta_softplus,
            BLOCK_D=launch.block_d, BLOCK_N=launch.block_n,
        )  # fmt: skip
        return (
            grad_u,
            grad_delta,
            grad_A.sum(0).to(A.dtype),
            _bc_grad(grad_B, B, groups),
            _bc_grad(grad_C, C, groups),
            grad_D.sum(0).to(D.dtype) if D is not None else None,
            grad_z,
            grad_bias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            None,
            None,
            None,
        )


def _or(x: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """x, or a placeholder pointer for an absent optional tensor (the kernel never reads it)."""
    return placeholder if x is None else x


if _triton is not None:

    @_triton.jit
    def _softplus(x):
        # log(1 + e^x), with torch's threshold: above 20 it is x to float32 precision (and e^x may overflow).
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))

    @_triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @_triton.jit
    def _program_channels(PER_GROUP, BLOCKS_PER_GROUP, BLOCK_D: tl.constexpr):
        """This program's group, its channels (BLOCK_D,) and their mask (see _Launch)."""
        group = tl.program_id(1) // BLOCKS_PER_GROUP
        local = (tl.program_id(1) % BLOCKS_PER_GROUP) * BLOCK_D + tl.arange(0, BLOCK_D)
        return group, group * PER_GROUP + local, local < PER_GROUP

    @_triton.jit
    def _load_tile(ptr, channels, cols, stride_d, stride_n, mask):
        """A (BLOCK_D, BLOCK_N) tile of a (D, N) tensor (A, or a fixed B / C), in float32."""
        offsets = channels[:, None] * stride_d + cols[None, :] * stride_n
        return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    @_triton.jit
    def _load_step(ptr, rows, t, stride_l, mask_d):
        """Step t of a (batch, D, L) tensor for the program's channels, in float32."""
        return tl.load(ptr + rows + t * stride_l, mask=mask_d, other=0.0).to(tl.float32)

    @_triton.jit
    def _per_channel(ptr, channels, mask_d, PRESENT: tl.constexpr):
        """A (D,) parameter (D skip, delta_bias) for the program's channels, in float32; 0 when absent,
        which costs less than a second code path."""
        if PRESENT:
            x = tl.load(ptr + channels, mask=mask_d, other=0.0).to(tl.float32)
        else:
            x = tl.zeros(channels.shape, dtype=tl.float32)
        return x

    @_triton.jit
    def _fixed_tile(ptr, channels, cols, stride_d, stride_n, mask, FIXED: tl.constexpr):
        """The (BLOCK_D, BLOCK_N) tile of a fixed (D, N) B or C, loaded once for the whole sequence;
        zeros, never read, for an input-dependent one."""
        if FIXED:
            tile = _load_tile(ptr, channels, cols, stride_d, stride_n, mask)
        else:
            tile = tl.zeros(mask.shape, dtype=tl.float32)
        return tile

    @_triton.jit
    def _bc_step(ptr, tile, row, t, stride_n, stride_l, cols, mask_n, FIXED: tl.constexpr):
        """Step t of B or C: the tile of a fixed one, or a (1, BLOCK_N) row of an input-dependent one at
        offset ``row`` (its batch and group), shared by all the program's channels."""
        if FIXED:
            x = tile
        else:
            x = tl.load(ptr + row + t * stride_l + cols * stride_n, mask=mask_n, other=0.0)
            x = x.to(tl.float32)[None, :]
        return x

    @_triton.jit
    def _step_size(raw, SOFTPLUS: tl.constexpr):
        """delta_t + delta_bias -> the step size: softplus'd or not."""
        if SOFTPLUS:
            raw = _softplus(raw)
        return raw

    @_triton.jit
    def _selective_scan_forward_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        y_ptr, last_ptr, checkpoint_ptr,
        DIM, L, N, PER_GROUP, BLOCKS_PER_GROUP, CHUNK,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
        s_B_b, s_B_row, s_B_n, s_B_l, s_C_b, s_C_row, s_C_n, s_C_l,
        B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # y_t = C_t . h_t + D u_t (times silu(z_t)), h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, for the
        # program's (BLOCK_D, BLOCK_N) block of (channel, state) pairs; h_{-1} = 0.
        batch = tl.program_id(0).to(tl.int64)
        group, channels, mask_d = _program_channels(PER_GROUP, BLOCKS_PER_GROUP, BLOCK_D)
        cols = tl.arange(0, BLOCK_N)
        mask_n = cols < N
        mask = mask_d[:, None] & mask_n[None, :]
        A = _load_tile(A_ptr, channels, cols, N, 1, mask)
        skip = _per_channel(D_ptr, channels, mask_d, HAS_D)
        bias = _per_channel(bias_ptr, channels, mask_d, HAS_BIAS)
        B_tile = _fixed_tile(B_ptr, channels, cols, s_B_row, s_B_n, mask, B_FIXED)
        C_tile = _fixed_tile(C_ptr, channels, cols, s_C_row, s_C_n, mask, C_FIXED)
        B_row = batch * s_B_b + group * s_B_row
        C_row = batch * s_C_b + group * s_C_row
        u_rows = batch * s_u_b + channels * s_u_d
        dt_rows = batch * s_dt_b + channels * s_dt_d
        z_rows = batch * s_z_b + channels * s_z_d
        y_rows = (batch * DIM + channels) * L
        state = (batch * DIM + channels[:, None]) * N + cols[None, :]  # (batch, D, N)
        n_chunks = tl.cdiv(L, CHUNK)

        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        for chunk in range(0, n_chunks):
            if SAVE_CHECKPOINTS:  # (batch, D, n_chunks, N): the state before the chunk
                checkpoint = (batch * DIM + channels[:, None]) * n_chunks * N + chunk * N + cols[None, :]
                tl.store(checkpoint_ptr + checkpoint, h, mask=mask)
            start = chunk * CHUNK
            for t in range(start, tl.minimum(start + CHUNK, L)):
                u = _load_step(u_ptr, u_rows, t, s_u_l, mask_d)
                dt = _step_size(_load_step(delta_ptr, dt_rows, t, s_dt_l, mask_d) + bias, SOFTPLUS)
                B_t = _bc_step(B_ptr, B_tile, B_row, t, s_B_n, s_B_l, cols, mask_n, B_FIXED)
                C_t = _bc_step(C_ptr, C_tile, C_row, t, s_C_n, s_C_l, cols, mask_n, C_FIXED)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B_t
                y = tl.sum(h * C_t, axis=1) + skip * u
                if HAS_Z:
                    z = _load_step(z_ptr, z_rows, t, s_z_l, mask_d)
                    y = y * z * _sigmoid(z)
                tl.store(y_ptr + y_rows + t, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        tl.store(last_ptr + state, h, mask=mask)

    @_triton.jit
    def _selective_scan_backward_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, checkpoint_ptr,
        grad_y_ptr, grad_last_ptr,
        grad_u_ptr, grad_delta_ptr, grad_z_ptr, grad_A_ptr, grad_B_ptr, grad_C_ptr, grad_D_ptr,
        grad_bias_ptr, scratch_ptr,
        DIM, L, N, PER_GROUP, BLOCKS_PER_GROUP, CHUNK,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_g_b, s_g_d, s_g_l,
        s_B_b, s_B_row, s_B_n, s_B_l, s_C_b, s_C_row, s_C_n, s_C_l,
        B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # The reverse scan: with dh the gradient reaching h_t (from y_t, from h_{t+1} and, at the end,
        # from the last state), dh = g_t C_t + exp(dt_{t+1} A) dh_{t+1}, where g_t is the gradient of
        # C_t . h_t + D u_t. Every other gradient is read off dh, h_t and h_{t-1} at step t.
        batch = tl.program_id(0).to(tl.int64)
        group, channels, mask_d = _program_channels(PER_GROUP, BLOCKS_PER_GROUP, BLOCK_D)
        cols = tl.arange(0, BLOCK_N)
        mask_n = cols < N
        mask = mask_d[:, None] & mask_n[None, :]
        A = _load_tile(A_ptr, channels, cols, N, 1, mask)
        skip = _per_channel(D_ptr, channels, mask_d, HAS_D)
        bias = _per_channel(bias_ptr, channels, mask_d, HAS_BIAS)
        B_tile = _fixed_tile(B_ptr, channels, cols, s_B_row, s_B_n, mask, B_FIXED)
        C_tile = _fixed_tile(C_ptr, channels, cols, s_C_row, s_C_n, mask, C_FIXED)
        B_row = batch * s_B_b + group * s_B_row
        C_row = batch * s_C_b + group * s_C_row
        u_rows = batch * s_u_b + channels * s_u_d
        dt_rows = batch * s_dt_b + channels * s_dt_d
        z_rows = batch * s_z_b + channels * s_z_d
        g_rows = batch * s_g_b + channels * s_g_d
        out_rows = (batch * DIM + channels) * L  # the contiguous (batch, D, L) gradients
        state = (batch * DIM + channels[:, None]) * N + cols[None, :]  # (batch, D, N)
        program = batch * tl.num_programs(1) + tl.program_id(1)
        # This program's share of an input-dependent dB / dC: (N, L) of (batch, programs, N, L).
        step_share = program * N * L + cols * L
        # Slot k of the scratch holds the state before step start + k of the current chunk.
        scratch = scratch_ptr + program * CHUNK * BLOCK_D * BLOCK_N
        scratch += tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + cols[None, :]
        n_chunks = tl.cdiv(L, CHUNK)

        # Masked channels and states have u, dy, dh and h all 0, so they add 0 to every sum below.
        dh = tl.load(grad_last_ptr + state, mask=mask, other=0.0)
        grad_A = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        grad_B_tile = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        grad_C_tile = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        grad_skip = tl.zeros([BLOCK_D], dtype=tl.float32)
        grad_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, n_chunks):
            chunk = n_chunks - 1 - i
            start = chunk * CHUNK
            end = tl.minimum(start + CHUNK, L)
            # Recompute the chunk's states from its checkpoint, keeping the one before each step.
            checkpoint = (batch * DIM + channels[:, None]) * n_chunks * N + chunk * N + cols[None, :]
            h = tl.load(checkpoint_ptr + checkpoint, mask=mask, other=0.0)
            for t in range(start, end):
                tl.store(scratch + (t - start) * BLOCK_D * BLOCK_N, h)
                u = _load_step(u_ptr, u_rows, t, s_u_l, mask_d)
                dt = _step_size(_load_step(delta_ptr, dt_rows, t, s_dt_l, mask_d) + bias, SOFTPLUS)
                B_t = _bc_step(B_ptr, B_tile, B_row, t, s_B_n, s_B_l, cols, mask_n, B_FIXED)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B_t
            tl.debug_barrier()  # the scratch is read back below by other threads than wrote it

            # Walk the chunk backwards; h is h_t, the scratch gives h_{t-1}.
            for s in range(0, end - start):
                t = end - 1 - s
                h_prev = tl.load(scratch + (t - start) * BLOCK_D * BLOCK_N)
                u = _load_step(u_ptr, u_rows, t, s_u_l, mask_d)
                raw = _load_step(delta_ptr, dt_rows, t, s_dt_l, mask_d) + bias
                dt = _step_size(raw, SOFTPLUS)
                gate = tl.exp(dt[:, None] * A)
                B_t = _bc_step(B_ptr, B_tile, B_row, t, s_B_n, s_B_l, cols, mask_n, B_FIXED)
                C_t = _bc_step(C_ptr, C_tile, C_row, t, s_C_n, s_C_l, cols, mask_n, C_FIXED)
                g = _load_step(grad_y_ptr, g_rows, t, s_g_l, mask_d)
                if HAS_Z:  # y = y' silu(z): dz = dy y' silu'(z), dy' = dy silu(z)
                    z = _load_step(z_ptr, z_rows, t, s_z_l, mask_d)
                    sig = _sigmoid(z)
                    y = tl.sum(h * C_t, axis=1) + skip * u
                    grad_z = g * y * sig * (1.0 + z * (1.0 - sig))
                    tl.store(grad_z_ptr + out_rows + t, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask_d)
                    g = g * z * sig
                grad_skip += g * u
                grad_C_t = g[:, None] * h
                dh += g[:, None] * C_t
                grad_B_t = dh * (dt * u)[:, None]
                # h_t = exp(dt A) h_{t-1} + ...: the gradient of the exponent, shared by dA and d(dt)
                grad_exponent = dh * gate * h_prev
                grad_A += grad_exponent * dt[:, None]
                grad_dt = tl.sum(grad_exponent * A + dh * B_t * u[:, None], axis=1)
                grad_u = g * skip + tl.sum(dh * B_t, axis=1) * dt
                if SOFTPLUS:
                    grad_dt = grad_dt * _sigmoid(raw)
                grad_bias += grad_dt
                tl.store(grad_u_ptr + out_rows + t, grad_u.to(grad_u_ptr.dtype.element_ty), mask=mask_d)
                tl.store(
                    grad_delta_ptr + out_rows + t, grad_dt.to(grad_delta_ptr.dtype.element_ty), mask=mask_d
                )
                if B_FIXED:
                    grad_B_tile += grad_B_t
                else:
                    tl.store(grad_B_ptr + step_share + t, tl.sum(grad_B_t, axis=0), mask=mask_n)
                if C_FIXED:
                    grad_C_tile += grad_C_t
                else:
                    tl.store(grad_C_ptr + step_share + t, tl.sum(grad_C_t, axis=0), mask=mask_n)
                dh = dh * gate
                h = h_prev
            tl.debug_barrier()  # the next chunk overwrites the scratch only once every thread has read it

        # Per-(batch, channel) shares of the reductions; torch sums them over batch.
        tl.store(grad_A_ptr + state, grad_A, mask=mask)
        if B_FIXED:
            tl.store(grad_B_ptr + state, grad_B_tile, mask=mask)
        if C_FIXED:
            tl.store(grad_C_ptr + state, grad_C_tile, mask=mask)
        if HAS_D:
            tl.store(grad_D_ptr + batch * DIM + channels, grad_skip, mask=mask_d)
        if HAS_BIAS:
            tl.store(grad_bias_ptr + batch * DIM + channels, grad_bias, mask=mask_d)
