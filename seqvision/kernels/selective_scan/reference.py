"""The PyTorch forms of :func:`~seqvision.kernels.selective_scan` (the math and the forms are described
in the package docstring): ``recurrent``, the ground truth, and ``chunk``, a loop over chunks with the
state updated step by step or by a log-depth scan inside each. Imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import compute_dtype
from ..linear_recurrence import recurrent_scan, scan_chunk


def torch_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, form, chunk_size):
    """:func:`~seqvision.kernels.selective_scan` through its PyTorch form ``form``, with its arguments
    already checked.

    Returns ``(y, last_state)``: ``y`` (B, D, L) in the dtype of ``u``, ``last_state`` (B, D, N) in
    the compute dtype."""
    dtype = compute_dtype(u.dtype)
    batch, dim, L = u.shape
    groups = channel_groups(B, C)
    # Work time-first in (L, batch, G, D/G, N): each step is one contiguous slab, and fixed or shared
    # B/C broadcast over channels instead of being repeated per channel.
    per_group = dim // groups
    u_, delta_ = (x.to(dtype).permute(2, 0, 1).reshape(L, batch, groups, per_group) for x in (u, delta))
    if delta_bias is not None:
        delta_ = delta_ + delta_bias.to(dtype).reshape(groups, per_group)
    if delta_softplus:
        delta_ = F.softplus(delta_)
    A_ = A.to(dtype).reshape(groups, per_group, -1)
    B_, C_ = (_time_first(x.to(dtype), groups) for x in (B, C))

    if form == "chunk":
        y, last_state = _chunk_form(u_, delta_, A_, B_, C_, chunk_size)
    else:
        h = recurrent_scan(delta_[..., None] * A_, (delta_ * u_)[..., None] * B_)
        y, last_state = _read_out(h, C_), h[-1]
    y = y.reshape(L, batch, dim).permute(1, 2, 0)

    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), last_state.reshape(batch, dim, -1)


def _chunk_form(u, delta, A, B, C, chunk_size):
    """Loop over chunks of the (L, batch, G, D/G) inputs, building every (chunk, ..., N) tensor per chunk.

    Built chunk by chunk, the gates and inputs stay in cache: the whole (L, batch, D, N) state tensor
    is never materialised. Returns y (L, batch, G, D/G) and the last state (batch, G, D/G, N).
    """
    h = None
    ys = []
    for start in range(0, u.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        step = delta[chunk, ..., None]  # (c, batch, G, D/G, 1)
        gates = (step * A).exp()
        inputs = step * u[chunk, ..., None] * (B[chunk] if B.shape[0] > 1 else B)
        stepwise = inputs[0].numel() >= _STEPWISE_SLAB
        hs = _steps(gates, inputs, h) if stepwise else scan_chunk(gates, inputs, h)
        ys.append(_read_out(hs, C[chunk] if C.shape[0] > 1 else C))
        h = hs[-1]
    return torch.cat(ys), h


# A step's state (batch, D, N) from this many numbers up is updated one step at a time inside a chunk:
# one fused multiply-add per step over a slab that stays in cache is cheaper than the log-depth scan's
# extra passes over the whole chunk, and Python's per-step cost is small next to the slab's.
_STEPWISE_SLAB = 4096


def _steps(gates: torch.Tensor, inputs: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """h_t = gates_t h_{t-1} + inputs_t along dim 0 of one chunk (C, ...), from ``carry`` (or 0)."""
    h = carry
    states = []
    for gate, x in zip(gates, inputs, strict=True):
        h = x if h is None else torch.addcmul(x, gate, h)
        states.append(h)
    return torch.stack(states)


def _read_out(h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """y = C . h over the state dim: h (L, batch, G, D/G, N), C broadcastable -> (L, batch, G, D/G)."""
    if C.shape[-2] == 1:  # one C row shared by the channels of a group: a batched mat-vec
        return (h @ C.transpose(-1, -2)).squeeze(-1)
    return (h * C).sum(-1)


def channel_groups(B: torch.Tensor, C: torch.Tensor) -> int:
    """Number of channel groups sharing one B/C: G for (B, G, N, L) inputs, 1 otherwise."""
    gs = {x.shape[1] for x in (B, C) if x.dim() == 4}
    if len(gs) > 1:
        raise ValueError(
            f"B and C must have the same number of groups, got B {tuple(B.shape)} and C {tuple(C.shape)}"
        )
    return gs.pop() if gs else 1


def _time_first(x: torch.Tensor, groups: int) -> torch.Tensor:
    """B or C as a tensor that broadcasts against (L, batch, G, D/G, N)."""
    if x.dim() == 2:  # (D, N): fixed over time, one row per channel
        return x.reshape(1, 1, groups, -1, x.shape[-1])
    if x.dim() == 3:  # (batch, N, L): shared by every channel
        return x.permute(2, 0, 1).contiguous()[:, :, None, None, :]
    return x.permute(3, 0, 1, 2).contiguous()[:, :, :, None, :]  # (batch, G, N, L): shared per group
