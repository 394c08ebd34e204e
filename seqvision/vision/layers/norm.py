"""Group RMS normalisation over the channel (last) axis.

Each of ``num_groups`` contiguous groups of ``C / num_groups`` channels is scaled to unit root mean
square on its own, then every channel gets a learned weight:

    y[..., g, j] = x[..., g, j] / sqrt(mean_j x[..., g, j]^2 + eps) * weight[g * C/G + j]

With one group per attention head this is the per-head output norm of LightNet (and of TransNormer /
RetNet-style mixers): every head is brought to the same scale before the output projection mixes them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from seqvision.kernels import compute_dtype
from seqvision.utils.checks import check_positive_int

__all__ = ["GroupRmsNorm"]


# An fx leaf: the dtype choice and the input checks branch on tensor attributes, which fx cannot trace.
@register_notrace_module
class GroupRmsNorm(nn.Module):
    """RMS norm applied separately to ``num_groups`` contiguous channel groups.

    x (..., C) -> (..., C), C = ``num_channels``. The statistics are computed in float32 (float64 for
    float64 inputs) and the result has the dtype of ``x``.
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        check_positive_int("num_channels", num_channels)
        check_positive_int("num_groups", num_groups)
        if num_channels % num_groups:
            raise ValueError(
                f"num_channels must be divisible by num_groups, got num_channels={num_channels} "
                f"and num_groups={num_groups}"
            )
        if not eps >= 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point torch.Tensor, got {got}")
        if x.dim() < 1 or x.shape[-1] != self.num_channels:
            raise ValueError(
                f"x must have shape (..., C={self.num_channels}) with channels last, got {tuple(x.shape)}"
            )
        # 16-bit squares lose most of their mantissa in the mean; float64 stays float64 for exact checks.
        dtype = compute_dtype(x.dtype)
        groups = x.to(dtype).unflatten(-1, (self.num_groups, -1))
        y = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)
        y = y.flatten(-2)
        if self.weight is not None:
            y = y * self.weight.to(dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"
