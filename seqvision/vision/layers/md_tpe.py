r"""MD-TPE: multi-dimensional Toeplitz positional encoding (LightNet, Qin et al., arXiv 2405.21022).

LightNet scans the flattened grid once, so the scan alone does not know where a token sits in the
image or clip. MD-TPE gives every token a position-dependent mix of its neighbours along each grid
axis. Per axis ``a`` and head ``h`` (channel group h of ``D / num_heads`` channels) it runs the
decayed causal sum

    y_a[t] = (q_{a,h} . k_{a,h}) * sum_{s <= t} lambda_{a,h}^(t-s) x[s],    lambda_{a,h} = sigmoid(p_{a,h}),

where t, s index axis a with every other axis fixed: a Toeplitz matrix along that axis, i.e. a 1-D
TPE whose "attention" has the same learned q and k at every position. With ``bidirectional=True``
the sum runs over s >= t as well, the diagonal counted once (forward + reverse - (q.k) x). The axes
are summed, y = sum_a y_a, then a per-head group RMS norm and a linear projection. The model adds the
result to the patch tokens: ``x + md_tpe(x)``.

The kernel is a decay, not a table indexed by position, so the grid shape is read from the input at
run time: any image size or clip length works without interpolating anything. Each scan is one call
to :func:`seqvision.kernels.linear_recurrence` with a gate that is constant along the axis.

Initialisation:

* ``q_{a,h} = k_{a,h} = head_dim^-1/2 * ones``, so ``q . k = 1``: every axis and head starts as the
  plain decayed sum with the same weight. Only the product q . k enters the output and the group norm
  removes its common scale, so small random vectors (q . k ~ 1e-3, random sign) would start the axes
  with arbitrary relative weights and make the scale-free q, k take outsized relative steps.
* ``lambda_{a,h}`` spread over the heads from ``decay_init[0]`` to ``decay_init[1]`` (default 0.5 to
  0.99), evenly in log(1 - lambda) so the reach 1 / (1 - lambda) runs geometrically from 2 to 100
  tokens, the same spread on every axis; a single head takes the geometric middle.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from seqvision.kernels import compute_dtype, linear_recurrence
from seqvision.utils.checks import check_positive_int

from .norm import GroupRmsNorm

__all__ = ["MdTpe", "init_decay_logit"]


def init_decay_logit(num_heads: int, decay_init: tuple[float, float] = (0.5, 0.99)) -> torch.Tensor:
    """logit(lambda_h) with 1 - lambda_h spaced evenly in log from 1 - decay_init[0] to 1 - decay_init[1].

    Returns (num_heads,) float32. One head takes the geometric middle of the range.
    """
    lo, hi = _check_decay_init(decay_init)
    log_lo, log_hi = math.log1p(-lo), math.log1p(-hi)
    if num_heads == 1:
        log_gap = torch.tensor([(log_lo + log_hi) / 2], dtype=torch.float64)
    else:
        log_gap = torch.linspace(log_lo, log_hi, num_heads, dtype=torch.float64)
    decay = -torch.expm1(log_gap)
    return torch.logit(decay).float()


def _check_decay_init(decay_init: object) -> tuple[float, float]:
    ok = (
        isinstance(decay_init, (tuple, list))
        and len(decay_init) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in decay_init)
        and 0 < decay_init[0] <= decay_init[1] < 1
    )
    if not ok:
        raise ValueError(f"decay_init must be two floats (lo, hi) with 0 < lo <= hi < 1, got {decay_init!r}")
    return float(decay_init[0]), float(decay_init[1])


def _grid_layout(num_axes: int) -> str:
    """Names of the grid axes in error messages: 'h, w', 't, h, w' or 's1, ..., sm'."""
    names = {1: "l", 2: "h, w", 3: "t, h, w"}
    return names.get(num_axes, ", ".join(f"s{i + 1}" for i in range(num_axes)))


# An fx leaf: the grid shape is read from the input and the operator checks its arguments.
@register_notrace_module
class MdTpe(nn.Module):
    """Multi-dimensional Toeplitz positional encoding.

    x (B, *grid, D) -> (B, *grid, D), ``len(grid) == num_axes``, channels last. Any grid size.

    Parameters: ``q``, ``k`` (num_axes, num_heads, head_dim); ``decay_logit`` (num_axes, num_heads),
    lambda = sigmoid(decay_logit); ``norm`` (a :class:`GroupRmsNorm` with one group per head) and
    ``proj`` (Linear(D, D)).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_axes: int,
        bidirectional: bool = True,
        decay_init: tuple[float, float] = (0.5, 0.99),
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        check_positive_int("num_axes", num_axes)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}")
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_axes = num_axes
        self.bidirectional = bidirectional
        self.decay_init = _check_decay_init(decay_init)
        self.q = nn.Parameter(torch.empty(num_axes, num_heads, self.head_dim))
        self.k = nn.Parameter(torch.empty(num_axes, num_heads, self.head_dim))
        self.decay_logit = nn.Parameter(torch.empty(num_axes, num_heads))
        self.norm = GroupRmsNorm(dim, num_heads)
        self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset q, k and the decays as described in the module docstring (norm and proj keep theirs)."""
        nn.init.constant_(self.q, self.head_dim**-0.5)
        nn.init.constant_(self.k, self.head_dim**-0.5)
        with torch.no_grad():
            # (num_heads,) broadcast over the axes: the same spread on every axis.
            self.decay_logit.copy_(init_decay_logit(self.num_heads, self.decay_init))

    def toeplitz_sum(self, x: torch.Tensor) -> torch.Tensor:
        """y = sum_a y_a, before the norm and the projection. x (B, *grid, D) -> (B, *grid, D)."""
        self._check_input(x)
        # Gates stay in float32 beside 16-bit activations (float64 for float64 checks).
        gate_dtype = compute_dtype(x.dtype)
        # Per head -> per channel: head h owns the contiguous channels [h * head_dim, (h + 1) * head_dim).
        log_decay = F.logsigmoid(self.decay_logit.to(gate_dtype)).repeat_interleave(self.head_dim, dim=-1)
        weight = (self.q * self.k).sum(-1).repeat_interleave(self.head_dim, dim=-1).to(x.dtype)
        # Size 1 on every grid axis: one gate for every step of the scanned axis (a Toeplitz kernel).
        gate_shape = (1,) * (x.dim() - 1) + (self.dim,)
        y = None
        for axis in range(self.num_axes):
            log_a = log_decay[axis].view(gate_shape)
            scan = linear_recurrence(x, log_a, dim=axis + 1)
            if self.bidirectional:
                # Both scans include s == t; count that term once.
                scan = scan + linear_recurrence(x, log_a, dim=axis + 1, reverse=True) - x
            term = scan * weight[axis]
            y = term if y is None else y + term
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.toeplitz_sum(x)))

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point torch.Tensor, got {got}")
        if x.dim() != self.num_axes + 2 or x.shape[-1] != self.dim or 0 in x.shape[1:-1]:
            raise ValueError(
                f"x must have shape (B, {_grid_layout(self.num_axes)}, D) with {self.num_axes} non-empty "
                f"grid axes and D = {self.dim} channels last, got {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_axes={self.num_axes}, "
            f"bidirectional={self.bidirectional}, decay_init={self.decay_init}"
        )
