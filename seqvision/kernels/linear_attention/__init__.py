r"""Decayed linear attention: retention, Mamba-2/SSD, GLA / LightNet and plain linear attention.

One operator covers the whole family. With ``q, k`` of shape (B, H, L, Dk) and ``v`` of shape
(B, H, L, Dv), a state ``S`` of shape (Dk, Dv) per (batch, head) evolves as

    S_t = diag(a_t) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t,

where ``a_t = exp(log_decay_t)`` is a gate in (0, 1]. The shape of ``log_decay`` selects the member:

==================  ===================================================================
``None``            no decay: plain linear attention (and LightNet's non-causal scan)
``(H,)``            one constant per head: retention (ViR, RetNet)
``(B, H, L)``       one data-dependent scalar per head and step: Mamba-2 / SSD
``(B, H, L, Dk)``   one data-dependent gate per key channel: GLA, LightNet's recurrence
==================  ===================================================================

Written out, ``o_t = scale * sum_s w(t, s) (q_t . k_s) v_s``. The gate ``a_j`` sits between
positions j-1 and j and ``w(t, s)`` is the product of the gates between s and t:

* causal: ``s <= t`` and ``w = prod_{j=s+1..t} a_j`` (``w = 1`` for ``s = t``);
* non-causal: every s, ``w = prod_{j=min(s,t)+1..max(s,t)} a_j``, a symmetric mask. It equals a
  forward scan plus a reversed scan with the diagonal counted once.

For per-key decay the product is elementwise over the key channels inside the dot product.

Three forms compute the same function:

``recurrent``  the loop above, one step at a time: O(L) time, constant memory, the ground truth.
``parallel``   the L x L weighted score matrix: O(L^2) memory.
``chunk``      exact scores inside chunks of ``chunk_size`` tokens and the state ``S`` carried
               between chunks: O(L * chunk_size). Only the chunk-to-chunk state update is a loop.

The chunk form never divides by a cumulative gate. Every exponent it evaluates is a (masked)
difference ``b_t - b_s`` with ``s <= t`` of the cumulative log-gate, so it is <= 0 and ``exp`` cannot
overflow however strong the decay; per-key decays route each pair through a reference position
between the two (``exp(b_t - b_r) * exp(b_r - b_s)``) to keep the matrix products.

``backend="triton"`` (or ``"auto"`` on CUDA tensors) runs the chunk form as fused Triton kernels,
forward and backward, for float32, float16 and bfloat16 inputs (float32 accumulation; see
:mod:`.triton`). Their gate gradient is the reverse cumulative sum of ``q dq - k dk``, as in
flash-linear-attention: exact in exact arithmetic, but for one constant gate
per head (shape ``(H,)``) it sums the whole sequence and float32 cancellation grows with L (about
1e-4 relative at L = 100). The models here keep such gates fixed.

Checking the decays: ``log_decay`` must be <= 0. On CPU tensors a positive or NaN entry is a
``ValueError``. On CUDA tensors that check would read a value back from the device, a host sync on
every call (one per layer of a model), so it runs only with ``SEQVISION_CHECK_DECAYS=1`` set. Without
it, a positive log-decay is a gate above 1 and nothing fails at once: every form computes the
recurrence with that gate, a state that grows like the exponential of the summed log-decays, as long
as the numbers fit. The exponents the chunk forms and the Triton kernels evaluate, differences
``b_t - b_s`` of the cumulative log-gate, are then positive, and float32 (the compute type of
float32, float16 and bfloat16 inputs) overflows to inf beyond about ``exp(88.7)`` (float64 beyond
``exp(709.8)``): once the log-decays summed over a stretch of the sequence exceed about 88, ``exp()``
or the carried state becomes inf and the outputs and gradients hold inf or NaN. A NaN log-decay gives
NaN outputs.

This package: :mod:`.reference` holds the three PyTorch forms, :mod:`.triton` the Triton kernels
and their launch; this file checks the arguments and picks the backend.
"""

from __future__ import annotations

import torch

from seqvision.utils.checks import check_positive_int

from .._common import (
    check_aux_dtype,
    check_form,
    check_nonpositive,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    resolve_backend,
)
from .._triton import triton as _triton
from .reference import torch_linear_attention
from .triton import triton_linear_attention

FORMS = ("parallel", "chunk", "recurrent")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    causal: bool = True,
    form: str = "chunk",
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decayed linear attention (see the module docstring for the math).

    Args:
        q: queries (B, H, L, Dk).
        k: keys (B, H, L, Dk).
        v: values (B, H, L, Dv).
        log_decay: log of the gates, <= 0: None, (H,), (B, H, L) or (B, H, L, Dk). Same dtype as the
            inputs, or float32 beside float16/bfloat16 inputs. Checked on CPU tensors; on CUDA only
            with ``SEQVISION_CHECK_DECAYS=1`` (a host sync): unchecked, positive entries are gates
            above 1 whose exponents overflow float32 once they sum to about 88 (module docstring).
        causal: causal scan (default) or the symmetric non-causal mask.
        form: ``"chunk"`` (default), ``"parallel"`` or ``"recurrent"``; all give the same result.
        chunk_size: tokens per chunk for the chunk form; any L works, it need not divide L.
        initial_state: state before the first token (B, H, Dk, Dv); causal only.
        output_final_state: also return the state after the last token (causal only).
        scale: factor on ``q``; defaults to ``Dk ** -0.5``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``o`` (B, H, L, Dv) in the dtype of ``q``, or ``(o, final_state)`` with ``final_state``
        (B, H, Dk, Dv) in float64 for float64 inputs and float32 otherwise, when
        ``output_final_state`` is set. Streaming a sequence piece by piece through
        ``initial_state``/``output_final_state`` gives the same outputs as the whole sequence.
    """
    _check_arguments(q, k, v, log_decay, causal, form, chunk_size, initial_state, output_final_state, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = (q, k, v, log_decay, initial_state)
    if resolve_backend(backend, *tensors, op="linear_attention", has_triton=_triton is not None) == "triton":
        o, final_state = triton_linear_attention(q, k, v, log_decay, causal, initial_state, scale)
    else:
        o, final_state = torch_linear_attention(
            q, k, v, log_decay, causal, form, chunk_size, initial_state, scale
        )
    return (o, final_state) if output_final_state else o


def _check_arguments(q, k, v, log_decay, causal, form, chunk_size, initial_state, output_final_state, scale):
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_same_device(("q", "k", "v"), (q, k, v))
    B, H, L, Dk = q.shape
    check_shape("k", k, q.shape, "(B, H, L, Dk) like q")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must have shape (B, H, L, Dv) = ({B}, {H}, {L}, Dv) like q, got {tuple(v.shape)}"
        )
    if L == 0 or Dk == 0 or v.shape[-1] == 0:
        raise ValueError(f"q, k, v must be non-empty, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_form(form, FORMS)
    check_positive_int("chunk_size", chunk_size)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if log_decay is not None:
        check_tensor("log_decay", log_decay)
        allowed = {(H,): "(H,)", (B, H, L): "(B, H, L)", (B, H, L, Dk): "(B, H, L, Dk)"}
        if tuple(log_decay.shape) not in allowed:
            shapes = ", ".join(f"{name} = {shape}" for shape, name in allowed.items())
            raise ValueError(f"log_decay must have shape {shapes}; got {tuple(log_decay.shape)}")
        check_aux_dtype("log_decay", log_decay, q.dtype)
        check_same_device(("q", "log_decay"), (q, log_decay))
        check_nonpositive("log_decay", log_decay)
    if not causal and (initial_state is not None or output_final_state):
        raise ValueError(
            "initial_state and output_final_state need causal=True: a non-causal scan has no end state"
        )
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_shape("initial_state", initial_state, (B, H, Dk, v.shape[-1]), "(B, H, Dk, Dv)")
        check_aux_dtype("initial_state", initial_state, q.dtype)
        check_same_device(("q", "initial_state"), (q, initial_state))
