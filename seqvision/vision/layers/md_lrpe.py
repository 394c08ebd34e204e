r"""MD-LRPE: multi-dimensional linearised relative positional encoding, cosine form.

From LightNet (Qin et al., arXiv 2405.21022). A linear-attention scan scores a pair of tokens only
through the dot product of their own feature vectors, so a relative encoding has to be applied to
each query and key separately. The cosine LRPE maps

    x -> concat(x * cos(Theta_s), x * sin(Theta_s))        (d channels -> 2 d),

so that the plain dot product of two encoded vectors is

    lrpe(q)_s . lrpe(k)_t = sum_i q_i k_i (cos Theta_s,i cos Theta_t,i + sin Theta_s,i sin Theta_t,i)
                          = sum_i q_i k_i cos(Theta_s,i - Theta_t,i),

a function of the offset s - t only, and it still factorises across tokens as linear attention needs.

For a token at grid index s = (s_1, ..., s_m), the channels are shared out between the axes in
contiguous blocks of n = ceil(d / m):

    Theta_s = concat(s_1 * theta, ..., s_m * theta)[:d],      theta_i = base^(-i / n),  i = 0 .. n - 1,

so channel i turns with the frequency theta_{i mod n} along axis i // n only, and the score depends on
the per-axis offsets. When m does not divide d the last axis gets fewer channels (none at all if
d <= (m - 1) n). Prefix tokens (class, register) have no grid position and get Theta = 0, i.e. they
become concat(x, 0). Positions are read from the grid at run time, so any image size or clip length
works; there are no learned parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from seqvision.kernels import compute_dtype
from seqvision.utils.checks import check_positive_int

__all__ = ["MdLrpe", "lrpe_angles", "lrpe_frequencies"]


def lrpe_frequencies(
    head_dim: int, num_axes: int, base: float, device: torch.device | None = None, dtype=torch.float32
) -> torch.Tensor:
    """theta_i = base^(-i / n), i = 0 .. n - 1, n = ceil(head_dim / num_axes). Returns (n,)."""
    n = math.ceil(head_dim / num_axes)
    exponent = torch.arange(n, device=device, dtype=torch.float64) / n
    return (base ** (-exponent)).to(dtype)


def lrpe_angles(
    theta: torch.Tensor, grid: Sequence[int], head_dim: int, num_prefix_tokens: int = 0
) -> torch.Tensor:
    """The angle table Theta (L, head_dim), L = num_prefix_tokens + prod(grid), in theta's dtype.

    Rows: the prefix tokens (all zero), then the grid in raster order (last axis fastest).
    """
    axes = [torch.arange(size, device=theta.device, dtype=theta.dtype) for size in grid]
    # indexing="ij" flattens with the last axis fastest: raster order.
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))  # (N, m)
    angles = (coords[:, :, None] * theta).flatten(1)[:, :head_dim]  # (N, head_dim)
    return torch.cat((angles.new_zeros(num_prefix_tokens, head_dim), angles))


# An fx leaf: the angle table is built from the grid at run time.
@register_notrace_module
class MdLrpe(nn.Module):
    """Multi-dimensional cosine LRPE, applied to queries or keys.

    ``forward(x, grid, num_prefix_tokens=0)``: x (B, H, L, d) -> (B, H, L, 2 d), d = ``head_dim``,
    L = num_prefix_tokens + prod(grid), the grid tokens in raster order after the prefix.

    The frequencies ``theta`` (ceil(d / num_axes),) are a non-persistent float32 buffer. Angles are
    computed in float32 (float64 for float64 inputs); if the module has been cast to a lower
    precision the frequencies are recomputed rather than used rounded.
    """

    def __init__(self, head_dim: int, num_axes: int, base: float = 10000.0) -> None:
        super().__init__()
        check_positive_int("head_dim", head_dim)
        check_positive_int("num_axes", num_axes)
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < math.inf:
            raise ValueError(f"base must be a positive finite float, got {base!r}")
        self.head_dim = head_dim
        self.num_axes = num_axes
        self.base = float(base)
        # A fixed function of the arguments, so it is not saved in checkpoints.
        self.register_buffer("theta", lrpe_frequencies(head_dim, num_axes, self.base), persistent=False)

    def forward(self, x: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int = 0) -> torch.Tensor:
        self._check_input(x, grid, num_prefix_tokens)
        return self.apply_table(x, self.table(grid, x, num_prefix_tokens))

    def table(self, grid: Sequence[int], like: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
        """The (L, 2, d) table of [cos Theta; sin Theta] for every token, in the dtype of ``like``.

        Angles are computed in float32 (float64 for float64 ``like``). A 16-bit cast of the module
        rounds the stored frequencies, and positions times rounded frequencies drift by whole
        radians on large grids, so then they are recomputed instead.
        """
        dtype = compute_dtype(like.dtype)
        theta = self.theta
        if theta.dtype != dtype:
            theta = lrpe_frequencies(self.head_dim, self.num_axes, self.base, like.device, dtype)
        angles = lrpe_angles(theta.to(like.device), grid, self.head_dim, num_prefix_tokens)
        return torch.stack((angles.cos(), angles.sin()), dim=-2).to(like.dtype)

    @staticmethod
    def apply_table(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """x (..., L, d) and its rows of the table (L, 2, d) -> concat(x cos, x sin) (..., L, 2 d).

        One product with the stacked table gives the concatenation without a cat.
        """
        return (x.unsqueeze(-2) * table).flatten(-2)

    def _check_input(self, x: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point torch.Tensor, got {got}")
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have shape (B, H, L, d) with d = {self.head_dim}, got {tuple(x.shape)}")
        # SymInt: under torch.compile with dynamic shapes the grid comes from x.shape.
        ok = isinstance(grid, Sequence) and all(
            isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) and s >= 1 for s in grid
        )
        if not ok or len(grid) != self.num_axes:
            raise ValueError(f"grid must be {self.num_axes} positive ints (the grid shape), got {grid!r}")
        P = num_prefix_tokens
        if isinstance(P, bool) or not isinstance(P, int) or P < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        expected = num_prefix_tokens + math.prod(grid)
        if x.shape[2] != expected:
            raise ValueError(
                f"x must have L = num_prefix_tokens + prod(grid) = {num_prefix_tokens} + {math.prod(grid)} "
                f"= {expected} tokens on dim 2, got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_axes={self.num_axes}, base={self.base}"
