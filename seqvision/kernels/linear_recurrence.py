r"""First-order linear recurrence along one axis of an N-D tensor.

    h_t = a_t * h_{t-1} + x_t,      h_{-1} = 0,      a_t = exp(log_a_t) in (0, 1],

elementwise, along axis ``dim`` of ``x``. With a gate that is constant along the axis this is the
causal Toeplitz kernel ``h_t = sum_{s <= t} a^(t-s) x_s`` behind LightNet's MD-TPE (applied once per
grid axis); with a gate per step it is the diagonal state update of Mamba-1's selective scan, which
reuses the scans below.

``reverse=True`` runs the same recurrence from the other end: ``h_t = a_t * h_{t+1} + x_t``.

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

import torch
import torch.nn.functional as F

from ._common import (
    check_aux_dtype,
    check_chunk_size,
    check_form,
    check_nonpositive,
    check_same_device,
    check_tensor,
    compute_dtype,
    resolve_backend,
)

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
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

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
    check_chunk_size(chunk_size)
    check_aux_dtype("log_a", log_a, x.dtype)
    check_same_device(("x", "log_a"), (x, log_a))
    dim = dim % x.dim()
    if log_a.dim() > x.dim():
        raise ValueError(f"log_a must broadcast to x {tuple(x.shape)}, got shape {tuple(log_a.shape)}")
    log_a = log_a.reshape((1,) * (x.dim() - log_a.dim()) + tuple(log_a.shape))
    try:
        torch.broadcast_shapes(log_a.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"log_a must broadcast to x {tuple(x.shape)}, got shape {tuple(log_a.shape)}"
        ) from None
    if log_a.shape[dim] not in (1, x.shape[dim]) or log_a.dim() != x.dim():
        raise ValueError(
            f"log_a must have size 1 or {x.shape[dim]} along dim {dim}, got shape {tuple(log_a.shape)}"
        )
    check_nonpositive("log_a", log_a)
    resolve_backend(backend, x, log_a)

    dtype = compute_dtype(x.dtype)
    # Work in (..., L, F) with the scanned axis second to last; broadcast dims of log_a stay size 1.
    xs = x.to(dtype).unsqueeze(-1).movedim(dim, -2)
    gs = log_a.to(dtype).unsqueeze(-1).movedim(dim, -2)
    if reverse:
        xs, gs = xs.flip(-2), gs.flip(-2)
    h = chunk_scan(gs, xs, chunk_size) if form == "chunk" else recurrent_scan(gs, xs)
    if reverse:
        h = h.flip(-2)
    return h.movedim(-2, dim).squeeze(-1).to(x.dtype)


def recurrent_scan(log_a: torch.Tensor, x: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    """``h_t = exp(log_a_t) h_{t-1} + x_t`` along dim -2, one step at a time.

    log_a: broadcastable to x (..., L, F), size 1 or L along dim -2; initial: h_{-1} (..., F) or None.
    Returns h (..., L, F).
    """
    gates = log_a.exp()
    h = initial
    steps = []
    for t in range(x.shape[-2]):
        x_t = x[..., t, :]
        h = x_t if h is None else gates[..., t if gates.shape[-2] > 1 else 0, :] * h + x_t
        steps.append(h)
    return torch.stack(steps, dim=-2)


def chunk_scan(log_a: torch.Tensor, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``h_t = exp(log_a_t) h_{t-1} + x_t`` along dim -2, by chunks.

    log_a: broadcastable to x (..., L, F), size 1 or L along dim -2. Returns h (..., L, F).
    """
    L = x.shape[-2]
    per_step = log_a.shape[-2] > 1
    gates = None if per_step else log_a.exp()
    carry = None
    pieces = []
    for start in range(0, L, chunk_size):
        stop = min(start + chunk_size, L)
        chunk_gates = log_a[..., start:stop, :].exp() if per_step else gates
        h = scan_chunk(chunk_gates, x[..., start:stop, :], carry)
        carry = h[..., -1, :]
        pieces.append(h)
    return torch.cat(pieces, dim=-2)


def scan_chunk(gates: torch.Tensor, x: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """One chunk of ``h_t = gates_t h_{t-1} + x_t`` along dim -2, vectorised over its steps.

    gates: broadcastable to x (..., C, F), size 1 or C along dim -2; carry: h before the chunk
    (..., F) or None for zero. Returns h (..., C, F).
    """
    h = _prefix_scan(gates, x)
    if carry is None:
        return h
    # The carried value reaches step t through the product of the chunk's gates up to t.
    steps = gates.expand(*gates.shape[:-2], x.shape[-2], gates.shape[-1])
    return torch.addcmul(h, steps.cumprod(-2), carry.unsqueeze(-2))


def _prefix_scan(gates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Inclusive scan ``h_t = gates_t h_{t-1} + x_t`` (h_{-1} = 0) along dim -2 in log2(L) levels.

    gates: broadcastable to x (..., L, F), size 1 or L along dim -2. Each level composes neighbouring
    pairs, (a, x) then (a', x') -> (a' a, a' x + x'), scans the half-length sequence of pairs and fills
    in the even positions; work stays linear in L.
    """
    L = x.shape[-2]
    if L == 1:
        return x
    if L % 2:
        x = F.pad(x, (0, 0, 0, 1))
        if gates.shape[-2] > 1:
            gates = F.pad(gates, (0, 0, 0, 1), value=1.0)
    if gates.shape[-2] > 1:
        a_even, a_odd = gates[..., 0::2, :], gates[..., 1::2, :]
    else:
        a_even = a_odd = gates
    x_even, x_odd = x[..., 0::2, :], x[..., 1::2, :]
    h_odd = _prefix_scan(a_odd * a_even, torch.addcmul(x_odd, a_odd, x_even))
    h_before_even = F.pad(h_odd[..., :-1, :], (0, 0, 1, 0))
    h_even = torch.addcmul(x_even, a_even, h_before_even)
    return torch.stack((h_even, h_odd), dim=-2).flatten(-3, -2)[..., :L, :]
