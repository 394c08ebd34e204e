r"""Mamba-1's selective scan, with mamba-ssm's ``selective_scan_fn`` signature and semantics.

For every batch b and channel d, a state ``h`` of N numbers evolves over the sequence:

    delta_t = softplus(delta_t + delta_bias)          (bias and softplus optional)
    h_t     = exp(delta_t A) * h_{t-1} + delta_t B_t u_t
    y_t     = C_t . h_t + D u_t
    y_t    *= silu(z_t)                               (optional gating)

Shapes (mamba-ssm's, kept so the two can be swapped):

==============  =====================================================================
``u``           (B, D, L) input
``delta``       (B, D, L) step sizes
``A``           (D, N) real state matrix (diagonal per channel), usually negative
``B``, ``C``    (D, N) fixed, (B, N, L) input-dependent, or (B, G, N, L) input-dependent with G
                groups of D / G channels each sharing one B / C
``D``           (D,) skip, ``z`` (B, D, L) gate, ``delta_bias`` (D,)
==============  =====================================================================

Returns ``y`` (B, D, L) in the dtype of ``u``, and with ``return_last_state`` also ``h_L``
(B, D, N) in float32 (float64 for float64 inputs). Complex ``A`` is not supported.

Forms: ``recurrent`` (the loop above, the ground truth) and ``chunk`` (a loop over chunks of
``chunk_size`` steps; inside a chunk the state recurrence is a log-depth scan,
:func:`seqvision.kernels.linear_recurrence.scan_chunk`, vectorised over the chunk's steps). The
chunk form only multiplies gates and adds, never divides by a cumulative gate, so it is exact for
any decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    check_aux_dtype,
    check_form,
    check_positive_int,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_backend,
)
from .linear_recurrence import recurrent_scan, scan_chunk

FORMS = ("chunk", "recurrent")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan (Mamba-1). See the module docstring for the math and shapes.

    Args:
        u, delta: (B, D, L). A: (D, N). B, C: (D, N), (B, N, L) or (B, G, N, L).
        D: (D,) skip weights. z: (B, D, L) gate. delta_bias: (D,).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last step (B, D, N).
        form: ``"chunk"`` (default) or ``"recurrent"``.
        chunk_size: steps per chunk for the chunk form.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``y`` (B, D, L), or ``(y, last_state)``.
    """
    _check_arguments(u, delta, A, B, C, D, z, delta_bias, form, chunk_size)
    resolve_backend(backend, u, delta, A, B, C, D, z, delta_bias, op="selective_scan")

    dtype = compute_dtype(u.dtype)
    batch, dim, L = u.shape
    groups = _groups(B, C)
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
    y = y.to(u.dtype)
    if return_last_state:
        return y, last_state.reshape(batch, dim, -1)
    return y


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
        hs = scan_chunk(gates, inputs, h)
        ys.append(_read_out(hs, C[chunk] if C.shape[0] > 1 else C))
        h = hs[-1]
    return torch.cat(ys), h


def _read_out(h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """y = C . h over the state dim: h (L, batch, G, D/G, N), C broadcastable -> (L, batch, G, D/G)."""
    if C.shape[-2] == 1:  # one C row shared by the channels of a group: a batched mat-vec
        return (h @ C.transpose(-1, -2)).squeeze(-1)
    return (h * C).sum(-1)


def _groups(B: torch.Tensor, C: torch.Tensor) -> int:
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


def _check_arguments(u, delta, A, B, C, D, z, delta_bias, form, chunk_size):
    check_tensor("u", u, 3)
    check_tensor("delta", delta, 3)
    batch, dim, L = u.shape
    if L == 0 or dim == 0:
        raise ValueError(f"u must be non-empty, got shape {tuple(u.shape)}")
    check_shape("delta", delta, u.shape, "(B, D, L) like u")
    check_same_dtype(("u", "delta"), (u, delta))
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError("A must be real: complex A is not supported by seqvision's selective_scan")
    check_tensor("A", A, 2)
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (D, N) with D = {dim}, got {tuple(A.shape)}")
    N = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        check_tensor(name, x, (2, 3, 4))
        if x.dim() == 2:
            check_shape(name, x, (dim, N), "(D, N)")
        elif x.dim() == 3:
            check_shape(name, x, (batch, N, L), "(B, N, L)")
        elif x.shape[0] != batch or x.shape[2:] != (N, L) or x.shape[1] < 1 or dim % x.shape[1]:
            raise ValueError(
                f"{name} must have shape (B, G, N, L) = ({batch}, G, {N}, {L}) with G dividing D = {dim}, "
                f"got {tuple(x.shape)}"
            )
    optional = {"D": (D, (dim,), "(D,)"), "z": (z, tuple(u.shape), "(B, D, L)")}
    optional["delta_bias"] = (delta_bias, (dim,), "(D,)")
    for name, (x, shape, layout) in optional.items():
        if x is not None:
            check_tensor(name, x)
            check_shape(name, x, shape, layout)
    if z is not None:
        check_same_dtype(("u", "z"), (u, z))
    for name, x in (("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            check_aux_dtype(name, x, u.dtype)
    present = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    present = {name: x for name, x in present.items() if x is not None}
    check_same_device(list(present), list(present.values()))
    check_form(form, FORMS)
    check_positive_int("chunk_size", chunk_size)
