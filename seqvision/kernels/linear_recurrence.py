r"""First-order linear recurrence along one axis of an N-D tensor.

    h_t = a_t * h_{t-1} + x_t,      h_{-1} = 0,      a_t = exp(log_a_t) in (0, 1],

elementwise, along axis ``dim`` of ``x``. With a gate that is constant along the axis this is the
causal Toeplitz kernel ``h_t = sum_{s <= t} a^(t-s) x_s`` behind LightNet's MD-TPE (applied once per
grid axis); with a gate per step it is the diagonal state update of Mamba-1's selective scan, which
reuses the scans below.

``reverse=True`` runs the same recurrence from the other end: ``h_t = a_t * h_{t+1} + x_t``.

``backend="triton"`` (or ``"auto"`` on CUDA tensors) runs a fused kernel: one program per line and
block of positions across the axis, walking the axis in registers and reading x through its stride
(no transposes); the backward pass is the reverse scan, recomputing nothing but reading the saved
outputs for the gate gradients.

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
            gate for every step: a Toeplitz kernel) or L (a gate per step).
        dim: the axis to scan along (negative values count from the end).
        reverse: scan from the last position to the first.
        form: ``"chunk"`` (default) or ``"recurrent"``.
        chunk_size: steps per chunk for the chunk form.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. The Triton kernel ignores ``form`` and
            ``chunk_size``: each program walks the axis step by step, its running value in
            registers, reading x in place through its strides.

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
        return _LinearRecurrenceTriton.apply(x, log_a.expand(x.shape), dim, reverse)

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
# Triton: one program per (outer index, block of inner positions), sequential along the axis
# ------------------------------------------------------------------------------------------------


def _as_three_axes(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int, int, int]:
    """View a contiguous x as (outer, L, inner) around axis ``dim``: step t of line (o, i) sits at
    o * L * inner + t * inner + i, so the kernels read the axis through its stride, no transpose."""
    x = x.contiguous()
    outer = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1 :])
    return x, outer, x.shape[dim], inner


def _launch(outer: int, inner: int) -> tuple[tuple[int, int], int]:
    block = min(256, _triton.next_power_of_2(inner))
    return (outer, _triton.cdiv(inner, block)), block


class _LinearRecurrenceTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, log_a: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
        dim = dim % x.dim()
        x, outer, length, inner = _as_three_axes(x, dim)
        log_a = log_a.contiguous()  # the caller expanded it to x's shape
        h = _new_output(x)
        grid, block = _launch(outer, inner)
        _recurrence_forward_kernel[grid](x, log_a, h, length, inner, REVERSE=reverse, BLOCK=block)
        ctx.save_for_backward(log_a, h)
        ctx.dim, ctx.reverse = dim, reverse
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        log_a, h = ctx.saved_tensors
        grad, outer, length, inner = _as_three_axes(grad, ctx.dim)
        grad_x = _new_output(grad)
        grad_log_a = torch.empty(log_a.shape, dtype=torch.float32, device=log_a.device)
        grid, block = _launch(outer, inner)
        _recurrence_backward_kernel[grid](
            grad, log_a, h, grad_x, grad_log_a, length, inner, REVERSE=ctx.reverse, BLOCK=block
        )
        return grad_x, grad_log_a.to(log_a.dtype), None, None


def _new_output(like: torch.Tensor) -> torch.Tensor:
    """Output buffers of the Triton kernels (a seam for tests, which poison them)."""
    return torch.empty_like(like)


if _triton is not None:

    @_triton.jit
    def _recurrence_forward_kernel(
        x_ptr, log_a_ptr, h_ptr, L, INNER, REVERSE: tl.constexpr, BLOCK: tl.constexpr
    ):
        # h_t = exp(log_a_t) h_{t-1} + x_t along the middle axis of (outer, L, inner), in float32.
        line = tl.program_id(0).to(tl.int64) * L * INNER
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < INNER
        h = tl.zeros([BLOCK], dtype=tl.float32)
        for step in range(L):
            t = L - 1 - step if REVERSE else step
            offset = line + t * INNER + cols
            gate = tl.exp(tl.load(log_a_ptr + offset, mask=mask, other=0.0).to(tl.float32))
            h = gate * h + tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
            tl.store(h_ptr + offset, h.to(h_ptr.dtype.element_ty), mask=mask)

    @_triton.jit
    def _recurrence_backward_kernel(
        grad_ptr,
        log_a_ptr,
        h_ptr,
        grad_x_ptr,
        grad_log_a_ptr,
        L,
        INNER,
        REVERSE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # The reverse scan g_t = dh_t + a_{t+1} g_{t+1}; dx_t = g_t, dlog_a_t = g_t a_t h_{t-1}, where
        # "t+1" / "t-1" are the next / previous steps in scan order and h_{-1} = 0.
        line = tl.program_id(0).to(tl.int64) * L * INNER
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < INNER
        g = tl.zeros([BLOCK], dtype=tl.float32)
        next_gate = tl.zeros([BLOCK], dtype=tl.float32)
        for step in range(L):
            t = step if REVERSE else L - 1 - step  # scan order backwards
            offset = line + t * INNER + cols
            g = tl.load(grad_ptr + offset, mask=mask, other=0.0).to(tl.float32) + next_gate * g
            tl.store(grad_x_ptr + offset, g.to(grad_x_ptr.dtype.element_ty), mask=mask)
            gate = tl.exp(tl.load(log_a_ptr + offset, mask=mask, other=0.0).to(tl.float32))
            has_previous = (t < L - 1) if REVERSE else (t > 0)
            previous = offset + INNER if REVERSE else offset - INNER
            h_previous = tl.load(h_ptr + previous, mask=mask & has_previous, other=0.0).to(tl.float32)
            tl.store(grad_log_a_ptr + offset, g * gate * h_previous, mask=mask)
            next_gate = gate
