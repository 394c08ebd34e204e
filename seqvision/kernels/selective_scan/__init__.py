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
``chunk_size`` steps: the gates ``exp(delta A)`` and inputs ``delta B u`` are built for a whole chunk
at once, then the state runs through the chunk either one fused multiply-add per step, when a
step's (batch, D, N) state is large enough to keep the CPU busy, or as a log-depth scan vectorised
over the chunk's steps (:func:`seqvision.kernels.linear_recurrence.scan_chunk`) for small states).
The chunk form only multiplies gates and adds, never divides by a cumulative gate, so it is exact
for any decay.

``backend="triton"`` (or ``"auto"`` on CUDA tensors) runs fused kernels for float32, float16 and
bfloat16 inputs: a chunked scan in parallel over (batch, block of channels, chunk of ``chunk_size``
steps, at most 128), in float32, with the bias, softplus, D skip and z gate fused in and every input
read in place through its strides. Each chunk's end state from a zero start, then a pass over the
chunks for the state entering each (kept for the backward pass: memory grows with L / chunk_size,
not with L), then every chunk rescanned from it; the backward pass runs the same three phases on
the state gradient, recomputing each chunk from its checkpoint. Float64 inputs run the PyTorch
forms.

This package: :mod:`.reference` holds the two PyTorch forms, :mod:`.triton` the Triton kernels
and their launch; this file checks the arguments and picks the backend.
"""

from __future__ import annotations

import torch

from seqvision.utils.checks import check_positive_int

from .._common import (
    check_aux_dtype,
    check_form,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    resolve_backend,
)
from .._triton import triton as _triton
from .reference import torch_selective_scan
from .triton import triton_selective_scan

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
        chunk_size: steps per chunk for the chunk form; for the Triton kernels, the chunks scanned
            in parallel (at most 128 steps; the state entering each is kept for the backward pass).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. The Triton kernel ignores ``form`` and
            takes float32, float16 and bfloat16 inputs; ``"triton"`` with float64 inputs is an error,
            ``"auto"`` (also under SEQVISION_BACKEND=triton) runs them through the PyTorch forms.

    Returns:
        ``y`` (B, D, L), or ``(y, last_state)``.
    """
    _check_arguments(u, delta, A, B, C, D, z, delta_bias, form, chunk_size)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if resolve_backend(backend, *tensors, op="selective_scan", has_triton=_triton is not None) == "triton":
        y, last_state = triton_selective_scan(*tensors, delta_softplus, chunk_size)
    else:
        y, last_state = torch_selective_scan(*tensors, delta_softplus, form, chunk_size)
    return (y, last_state) if return_last_state else y


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
