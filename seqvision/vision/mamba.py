"""The Mamba mixer and block, and Vim (isotropic, bidirectional); VMamba builds on them in ``vmamba.py``.

Mamba (Gu & Dao, arXiv 2312.00752) mixes tokens with a selective state-space scan. Per channel d of
the expanded input u (E = expand * dim channels) a state h of N numbers runs along the sequence:

    delta_t = softplus(W_dt (x_proj(u)_t)[:R] + b_dt)          (low-rank step, R = ceil(dim / 16))
    h_t     = exp(delta_t A_d) h_{t-1} + delta_t B_t u_t        (A_d = -exp(A_log_d), N numbers)
    y_t     = C_t . h_t + D_d u_t                               (B_t, C_t = x_proj(u)_t[R:], shared by d)

``MambaMixer`` is the whole block around it: x, z = in_proj(x); u = silu(causal depthwise conv(x));
the scan; y * silu(z); out_proj. ``version=2`` keeps that block and swaps the scan for Mamba-2's SSD
(Dao & Gu, arXiv 2405.21060): one scalar decay per head, a_t = exp(delta_t A_h), and an (N, P) state
per head of P = ``head_dim`` channels,

    S_t = a_t S_{t-1} + B_t^T (delta_t x_t),        y_t = C_t S_t + D_h x_t,

which is ``linear_attention(q=C, k=B, v=delta * x, log_decay=delta * A, scale=1)`` with log_decay of
shape (B, H, L). Mamba-2's own block (x, z, B, C and delta from one fused in_proj, a gated RMSNorm)
is not reproduced; only its scan is.

Images are not sequences, so the mixer scans several routes through the token grid
(``scan_directions``), each route with its own conv, x_proj, dt_proj, A_log and D (in_proj and
out_proj are shared), and sums the routes back in grid order:

===============  =====  ==================================================================
``forward``        1    the sequence as given (raster order for a grid)
``bidirectional``  2    forward + reversed (Vim's "bimamba v2"); any sequence, no grid needed
``cross``          4    VMamba's cross scan of a 2-D grid: rows, columns, both reversed
                        (``kernels.cross_scan`` / ``cross_merge``)
``tri``            3    TokenUnify / SegMamba on a 3-D grid (Z, Y, X): raster, reversed, and an
                        inter-slice route that visits the Z slices of one (y, x) column in turn
===============  =====  ==================================================================

All routes run as ONE scan call: routes are stacked on the channel axis (K * E channels) and B / C
are grouped per route, which both operators accept. The gate silu(z) is applied after the merge:
gating is elementwise and the routes are permutations, so this equals gating each route.

Numerics: whatever the activations' dtype (bf16 / fp16 parameters or autocast), x_proj, dt_proj,
the scan and the route merge run in float32 (float64 for float64 inputs) with autocast switched off;
the low-precision NaNs mamba-ssm's users report come from exp(delta A) and softplus in 16 bits.

Models (parameter counts at 224 px with 1000 classes; weights: the authors' ImageNet-1k files on the
Hugging Face Hub, tag ``.in1k``, read through ``VisionMamba.load_pretrained``):

==================================  ==========================  ==========  ==================  =====
model                               layout                      parameters  paper               .in1k
==================================  ==========================  ==========  ==================  =====
``vim_tiny_patch16_224``            192 wide, 24 blocks         7.15 M      Vim-Ti 7 M          yes
``vim_small_patch16_224``           384 wide, 24 blocks         25.80 M     Vim-S 26 M          yes
``vim_base_patch16_224``            768 wide, 24 blocks         97.60 M     Vim-B 98 M          yes
``vim_tiny_patch16_stride8_224``    Ti, 27 x 27 tokens          7.25 M      Vim-Ti+ 7 M         yes
``vim_small_patch16_stride8_224``   S, 27 x 27 tokens           26.00 M     Vim-S+ 26 M         yes
``vim_base_patch16_stride8_224``    B, 27 x 27 tokens           98.01 M     (not published)     no
==================================  ==========================  ==========  ==================  =====

Vim (Zhu et al., arXiv 2401.09417; code hustvl/Vim): patch embedding, absolute positions, the class
token inserted in the MIDDLE of the patch sequence (so both scan directions reach it after half the
patches), 24 blocks RMSNorm -> bidirectional Mamba (routes averaged, Vim's ``if_divide_out``) ->
residual, RMSNorm, head on the class token. Here the position embedding covers the patches only
(the class token's own position is folded into the learned token), so counts are D lower than Vim's,
and ``forward_features`` returns the patch tokens first and the class token LAST, the layout every
seqvision backbone shares; the middle placement is internal to the blocks. The ``stride8`` models take
16-pixel patches every 8 pixels (27 x 27 tokens at 224, no padding), as the authors' fine-tuned "+"
models do; their features have reduction 8. ``checkpoint_filter_fn`` converts the authors' files
(stacking each scan tensor with its backward twin, folding the class token's position into the
token); ``seqvision.vision.weights.convert_checkpoint(path, "vim_...")`` does the same to a file.

Scripting: not supported (the mixers call Python operators with argument checks). ``MambaMixer`` is
an fx leaf module, so timm's fx feature extraction works for fixed-size Vim models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    RmsNorm,
    register_notrace_module,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from torch.amp import is_autocast_available

from seqvision.kernels import (
    compute_dtype,
    cross_merge,
    cross_scan,
    linear_attention,
    selective_scan,
)
from seqvision.utils.checks import check_positive_int

from .base import PatchTokenBackbone, ScanMixer, build_backbone, fixed_size_cfg, init_linear
from .layers import StridedPatchEmbed
from .weights import (
    load_pretrained_file,
    read_local_files_with_load_pretrained,
    register_converter,
    unwrap_state_dict,
)

__all__ = [
    "SCAN_DIRECTIONS",
    "MambaBlock",
    "MambaMixer",
    "MambaStagesMixin",
    "VisionMamba",
    "dt_bias_init",
    "mamba_no_weight_decay",
    "set_scan_form",
]

# Number of routes of each scan direction, and the grid rank it needs (None: any sequence).
SCAN_DIRECTIONS: dict[str, tuple[int, int | None]] = {
    "forward": (1, None),
    "bidirectional": (2, None),
    "cross": (4, 2),
    "tri": (3, 3),
}


def dt_bias_init(
    shape: Sequence[int], dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4
) -> torch.Tensor:
    """Mamba's dt bias: softplus(bias) log-uniform in [dt_min, dt_max] (floored), via softplus^-1."""
    log_dt = torch.rand(*shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt), stable for small dt


@register_notrace_module
class MambaMixer(ScanMixer):
    """Mamba token mixer over one or several scan routes. x (B, L, dim) -> (B, L, dim).

    Args:
        dim: model width.
        d_state: N, state size per channel (version 1) or per head (version 2).
        d_conv: kernel of the depthwise conv: causal along each route, or ``grid_conv`` (odd, same
            padding) on the grid before routing.
        expand: E = expand * dim inner channels.
        dt_rank: R of the low-rank step projection, "auto" = ceil(dim / 16).
        version: 1 (selective scan, diagonal state per channel) or 2 (SSD, scalar decay per head).
        scan_directions: one of ``SCAN_DIRECTIONS``; 'cross' needs a 2-D grid, 'tri' a 3-D grid.
        head_dim: P, channels per head for version 2 (must divide E).
        grid_conv: VMamba's depthwise conv on the grid before the routes instead of a causal conv
            per route ('cross' and 'tri' only).
        out_norm: VMamba's LayerNorm on the merged routes before the gate.
        gate: Mamba's gate, y * silu(z) with z from a second half of in_proj. False: in_proj gives u
            alone and the normalised routes go straight to out_proj (VMamba v2/v3's SS2D, '_noz').
        average_routes: divide the route sum by the number of routes (Vim's ``if_divide_out``).
        inter_slice_chunks: 'tri' only: how the inter-slice route cuts the raster sequence. The
            route splits it into this many equal chunks and interleaves them (position p * n + c
            holds token c * L / n + p). None (default) uses the real slice count Z of the grid, so
            the route visits the Z slices of one (y, x) column in turn; TokenUnify's released code
            uses a fixed 5 whatever Z is (L must then be divisible by it).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes.
        conv_bias, bias: biases of the conv and of in_proj / out_proj.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        version: int = 1,
        scan_directions: str = "forward",
        head_dim: int = 64,
        grid_conv: bool = False,
        out_norm: bool = False,
        gate: bool = True,
        average_routes: bool = False,
        inter_slice_chunks: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("d_state", d_state), ("d_conv", d_conv)):
            check_positive_int(name, value)
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (selective scan) or 2 (SSD), got {version!r}")
        if scan_directions not in SCAN_DIRECTIONS:
            raise ValueError(
                f"scan_directions must be one of {tuple(SCAN_DIRECTIONS)}, got {scan_directions!r}"
            )
        num_routes, grid_ndim = SCAN_DIRECTIONS[scan_directions]
        if grid_conv and (grid_ndim is None or d_conv % 2 == 0):
            raise ValueError(
                "grid_conv needs scan_directions 'cross' or 'tri' and an odd d_conv, "
                f"got scan_directions={scan_directions!r} and d_conv={d_conv}"
            )
        if inter_slice_chunks is not None:
            check_positive_int("inter_slice_chunks", inter_slice_chunks)
            if scan_directions != "tri":
                raise ValueError(
                    "inter_slice_chunks needs scan_directions='tri' (it shapes the inter-slice route), "
                    f"got scan_directions={scan_directions!r}"
                )
        inner = int(expand * dim)
        if inner < 1:
            raise ValueError(f"expand * dim must be at least 1, got expand={expand} and dim={dim}")
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else check_positive_int("dt_rank", dt_rank)
        if version == 2:
            check_positive_int("head_dim", head_dim)
            if inner % head_dim:
                raise ValueError(
                    f"head_dim must divide the inner width expand * dim = {inner}, got head_dim={head_dim}"
                )
        self.dim, self.inner, self.d_state, self.version = dim, inner, d_state, version
        self.scan_directions, self.num_routes, self.grid_ndim = scan_directions, num_routes, grid_ndim
        self.num_heads = inner // head_dim if version == 2 else inner
        self.average_routes = average_routes
        self.inter_slice_chunks = inter_slice_chunks
        # selective_scan has no O(L^2) form; SSD (linear_attention) has all three.
        self.FORMS = ("chunk", "recurrent") if version == 1 else ScanMixer.FORMS

        self.gate = gate
        self.in_proj = nn.Linear(dim, (2 if gate else 1) * inner, bias=bias)
        self.grid_conv = grid_conv
        if grid_conv:
            conv_cls = nn.Conv2d if grid_ndim == 2 else nn.Conv3d
            self.conv = conv_cls(inner, inner, d_conv, padding=d_conv // 2, groups=inner, bias=conv_bias)
        else:
            # One depthwise conv over all routes stacked on the channel axis; padding d_conv - 1 and
            # keeping the first L outputs makes it causal along each route.
            channels = num_routes * inner
            self.conv = nn.Conv1d(
                channels, channels, d_conv, padding=d_conv - 1, groups=channels, bias=conv_bias
            )
        # Per-route parameters carry a leading route axis K. Version 1 has E decays per route with N
        # numbers each; version 2 one decay per head.
        K, E, N, R, H = num_routes, inner, d_state, self.dt_rank, self.num_heads
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, E))
        self.dt_proj_weight = nn.Parameter(torch.empty(K, H, R))
        self.dt_proj_bias = nn.Parameter(torch.empty(K, H))
        self.A_log = nn.Parameter(torch.empty(K, H, N) if version == 1 else torch.empty(K, H))
        self.D = nn.Parameter(torch.empty(K, H))
        self.out_norm = nn.LayerNorm(inner) if out_norm else nn.Identity()
        self.out_proj = nn.Linear(inner, dim, bias=bias)
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation of the scan parameters (in_proj / out_proj keep their own)."""
        # x_proj as nn.Linear would be; dt_proj uniform with std ~ R^-0.5 so delta keeps its variance.
        nn.init.uniform_(self.x_proj_weight, -(self.inner**-0.5), self.inner**-0.5)
        nn.init.uniform_(self.dt_proj_weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        self.dt_proj_bias.copy_(dt_bias_init(self.dt_proj_bias.shape, *self._dt_range))
        if self.version == 1:
            # S4D-real: A_n = -n for n = 1..N in every channel.
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.A_log.shape)
        else:
            A = torch.empty(self.A_log.shape).uniform_(1, 16)  # Mamba-2's A_init_range
        self.A_log.copy_(A.log())
        nn.init.ones_(self.D)

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim). ``grid`` (H, W) or (Z, Y, X) with L = prod(grid) when the
        tokens are a raster-order grid; needed for 'cross', 'tri' and ``grid_conv``."""
        batch, length = self._check_input(x, grid)
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2E, L), or (B, E, L) without the gate
        u, z = xz.chunk(2, dim=1) if self.gate else (xz, None)  # (B, E, L) each
        if self.grid_conv:
            u = F.silu(self.conv(u.reshape(batch, self.inner, *grid))).flatten(2)
            routes = self._route(u, grid)  # (B, K, E, L)
        else:
            routes = self._route(u, grid)
            conv = self.conv(routes.reshape(batch, -1, length))[..., :length]
            routes = F.silu(conv).reshape(batch, self.num_routes, self.inner, length)

        dtype = compute_dtype(x.dtype)
        # Autocast off: it would run x_proj / dt_proj and the route sum in 16 bits. (The meta device,
        # used to count parameters and shapes, has no autocast.)
        device = x.device.type
        with torch.autocast(device, enabled=False) if is_autocast_available(device) else nullcontext():
            routes = routes.to(dtype)
            proj = torch.einsum("bkel,kce->bkcl", routes, self.x_proj_weight.to(dtype))
            dt, B, C = proj.split((self.dt_rank, self.d_state, self.d_state), dim=2)
            ys = self._scan(routes, dt, B, C) if self.version == 1 else self._ssd(routes, dt, B, C)
            y = self._merge(ys, grid)
            if self.average_routes:
                y = y / self.num_routes
        # Back to the activations' dtype (in_proj's output: bf16 under autocast or for bf16 weights).
        y = self.out_norm(y.transpose(1, 2).to(xz.dtype))
        return self.out_proj(y if z is None else y * F.silu(z.transpose(1, 2)))

    def _check_input(self, x: torch.Tensor, grid: Sequence[int] | None) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be tokens (B, L, dim={self.dim}), got {tuple(x.shape)}")
        batch, length, _ = x.shape
        need = self.grid_ndim
        if need is not None or grid is not None:
            ok = grid is not None and len(grid) == (need or len(grid)) and math.prod(grid) == length
            if not ok:
                layout = {2: "(H, W)", 3: "(Z, Y, X)", None: "a grid"}[need]
                raise ValueError(
                    f"grid must be {layout} with prod(grid) = L = {length} for scan_directions="
                    f"{self.scan_directions!r}, got {grid!r}"
                )
        chunks = self.inter_slice_chunks
        if chunks is not None and length % chunks:
            raise ValueError(
                f"inter_slice_chunks={chunks} must divide the sequence length L = {length} (grid "
                f"{tuple(grid)}): the inter-slice route interleaves that many equal chunks"
            )
        return batch, length

    def _route(self, u: torch.Tensor, grid: Sequence[int] | None) -> torch.Tensor:
        """u (B, E, L) in raster order -> the K route sequences (B, K, E, L)."""
        if self.scan_directions == "forward":
            return u.unsqueeze(1)
        if self.scan_directions == "bidirectional":
            return torch.stack((u, u.flip(-1)), dim=1)
        if self.scan_directions == "cross":
            return cross_scan(u.reshape(*u.shape[:2], *grid))
        return torch.stack((u, u.flip(-1), self._interleave(u, grid)), dim=1)

    def _merge(self, ys: torch.Tensor, grid: Sequence[int] | None) -> torch.Tensor:
        """The adjoint of ``_route``: every route back in raster order, summed. (B, K, E, L) -> (B, E, L)."""
        if self.scan_directions == "forward":
            return ys[:, 0]
        if self.scan_directions == "cross":
            return cross_merge(ys, tuple(grid)).flatten(2)
        y = ys[:, 0] + ys[:, 1].flip(-1)
        if self.scan_directions == "tri":
            chunks = grid[0] if self.inter_slice_chunks is None else self.inter_slice_chunks
            y = y + ys[:, 2].unflatten(-1, (-1, chunks)).transpose(-1, -2).flatten(-2)
        return y

    def _interleave(self, u: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """The inter-slice route: (B, E, L) raster -> (B, E, L), n equal chunks interleaved.

        With n = Z (``inter_slice_chunks=None``) the chunks are the slices, so position
        (y * X + x) * Z + z holds voxel (z, y, x): the slices of one column follow each other.
        """
        chunks = grid[0] if self.inter_slice_chunks is None else self.inter_slice_chunks
        return u.unflatten(-1, (chunks, -1)).transpose(-1, -2).flatten(-2)

    def _scan(self, u: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """Mamba-1 on all routes at once: u (B, K, E, L), dt (B, K, R, L), B, C (B, K, N, L) -> y like u."""
        batch, K, E, L = u.shape
        dtype = u.dtype
        delta = torch.einsum("bkrl,ker->bkel", dt, self.dt_proj_weight.to(dtype))
        y = selective_scan(
            u.reshape(batch, K * E, L),
            delta.reshape(batch, K * E, L),
            -torch.exp(self.A_log.to(dtype)).reshape(K * E, -1),
            B,  # (B, G=K, N, L): one B per route, grouped over the route's E channels
            C,
            self.D.to(dtype).reshape(-1),
            delta_bias=self.dt_proj_bias.to(dtype).reshape(-1),
            delta_softplus=True,
            form=self.form,
            chunk_size=self.chunk_size,
        )
        return y.reshape(batch, K, E, L)

    def _ssd(self, u: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """Mamba-2 (SSD) on every route at once, as linear attention with a (B, K*H, L) log-decay.

        S_t = exp(delta_t A) S_{t-1} + B_t^T (delta_t x_t) and y_t = C_t S_t is o_t = q_t S_t with
        q = C, k = B, v = delta * x and no q scaling; D x_t is added per head.
        """
        batch, K, E, L = u.shape
        H, N, dtype = self.num_heads, self.d_state, u.dtype
        delta = torch.einsum("bkrl,khr->bkhl", dt, self.dt_proj_weight.to(dtype))
        delta = F.softplus(delta + self.dt_proj_bias.to(dtype)[..., None])  # (B, K, H, L)
        log_decay = delta * -torch.exp(self.A_log.to(dtype))[..., None]  # <= 0
        x = u.reshape(batch, K, H, E // H, L).transpose(-1, -2)  # (B, K, H, L, P)

        def per_head(t: torch.Tensor) -> torch.Tensor:  # (B, K, N, L) shared by the heads of a route
            return t.transpose(-1, -2).unsqueeze(2).expand(batch, K, H, L, N).reshape(batch, K * H, L, N)

        o = linear_attention(
            per_head(C),
            per_head(B),
            (x * delta[..., None]).reshape(batch, K * H, L, -1),
            log_decay.reshape(batch, K * H, L),
            scale=1.0,
            form=self.form,
            chunk_size=self.chunk_size,
        )
        y = o.reshape(batch, K, H, L, -1) + self.D.to(dtype)[..., None, None] * x
        return y.transpose(-1, -2).reshape(batch, K, E, L)

    # -- inference one token at a time ------------------------------------------------------------

    def allocate_inference_state(
        self, batch: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero state for :meth:`step`: the conv window (B, E, d_conv - 1) in ``dtype`` and the scan
        state, (B, E, N) for version 1 or (B, H, N, P) for version 2, in float32 (float64 for
        float64). Only a causal single-route mixer (scan_directions='forward') can decode."""
        if self.scan_directions != "forward" or self.grid_conv:
            raise ValueError(
                "step() decodes a causal sequence: it needs scan_directions='forward' without grid_conv, "
                f"got scan_directions={self.scan_directions!r}, grid_conv={self.grid_conv}"
            )
        check_positive_int("batch", batch)
        window = torch.zeros(batch, self.inner, self.conv.kernel_size[0] - 1, dtype=dtype, device=device)
        scan_dtype = compute_dtype(dtype)
        if self.version == 1:
            state = torch.zeros(batch, self.inner, self.d_state, dtype=scan_dtype, device=device)
        else:
            head_dim = self.inner // self.num_heads
            state = torch.zeros(
                batch, self.num_heads, self.d_state, head_dim, dtype=scan_dtype, device=device
            )
        return window, state

    def step(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One token: x (B, dim) and the state from :meth:`allocate_inference_state` (or the previous
        step) -> (y (B, dim), new state). Stepping through a sequence gives ``forward``'s outputs,
        in O(1) time and memory per token."""
        window, h = state
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be one token per sequence (B, dim={self.dim}), got {tuple(x.shape)}")
        if window.shape[0] != x.shape[0]:
            raise ValueError(f"state is for batch {window.shape[0]}, got x with batch {x.shape[0]}")
        xz = self.in_proj(x)
        u, z = xz.chunk(2, dim=-1) if self.gate else (xz, None)  # (B, E) each
        # The causal conv over the last d_conv inputs, oldest first (the conv's tap order).
        taps = torch.cat((window, u.unsqueeze(-1)), dim=-1)  # (B, E, d_conv)
        conv = (taps * self.conv.weight[:, 0]).sum(-1)
        if self.conv.bias is not None:
            conv = conv + self.conv.bias
        u = F.silu(conv)
        dtype = h.dtype
        u32 = u.to(dtype)
        proj = u32 @ self.x_proj_weight[0].to(dtype).T  # (B, R + 2N)
        dt, B, C = proj.split((self.dt_rank, self.d_state, self.d_state), dim=-1)
        delta = F.softplus(dt @ self.dt_proj_weight[0].to(dtype).T + self.dt_proj_bias[0].to(dtype))
        A = -torch.exp(self.A_log[0].to(dtype))
        D = self.D[0].to(dtype)
        if self.version == 1:  # per channel: h (B, E, N)
            h = torch.exp(delta[..., None] * A) * h + (delta * u32)[..., None] * B[:, None, :]
            y = (h @ C[..., None]).squeeze(-1) + D * u32
        else:  # per head: S (B, H, N, P), x_h (B, H, P)
            x_h = u32.reshape(x.shape[0], self.num_heads, -1)
            h = (
                torch.exp(delta * A)[..., None, None] * h
                + B[:, None, :, None] * (delta[..., None] * x_h)[:, :, None]
            )
            y = ((C[:, None, None, :] @ h).squeeze(-2) + D[:, None] * x_h).flatten(1)
        y = self.out_norm(y.to(proj.dtype))
        return self.out_proj(y if z is None else y * F.silu(z)), (taps[..., 1:], h)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, inner={self.inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
            f"version={self.version}, scan_directions={self.scan_directions!r}, form={self.form!r}"
        )


class MambaBlock(nn.Module):
    """Pre-norm block: x + DropPath(mixer(norm(x))), then an optional MLP sub-block.

    x (B, L, dim) -> (B, L, dim); ``grid`` is passed to the mixer. With ``residual=False`` the block
    returns mixer(norm(x)) alone (the TokenUnify authors' EM encoder). Extra keyword arguments go to
    ``MambaMixer``.
    """

    def __init__(
        self,
        dim: int,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        drop_path: float = 0.0,
        residual: bool = True,
        mlp_ratio: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        **mixer_kwargs,
    ) -> None:
        super().__init__()
        if drop_path > 0 and not residual:
            raise ValueError(
                f"drop_path needs the residual connection, got drop_path={drop_path} and residual=False"
            )
        self.residual = residual
        self.norm = norm_layer(dim)
        self.mixer = MambaMixer(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
            self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        else:
            self.norm2 = self.mlp = self.drop_path2 = None

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        y = self.drop_path(self.mixer(self.norm(x), grid))
        x = x + y if self.residual else y
        if self.mlp is not None:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


def mamba_no_weight_decay(model: nn.Module) -> set[str]:
    """Names of every mixer's A_log, D and dt bias: decays, skips and biases are not weight-decayed."""
    return {
        f"{name}.{param}"
        for name, module in model.named_modules()
        if isinstance(module, MambaMixer)
        for param in ("A_log", "D", "dt_proj_bias")
    }


def set_scan_form(model: nn.Module, form: str, chunk_size: int | None = None) -> None:
    """Run every scan mixer in ``model`` in ``form`` with ``chunk_size`` tokens per chunk; the outputs
    do not change. Every mixer validates alike, so a bad argument fails before anything changes."""
    for mixer in model.modules():
        if isinstance(mixer, ScanMixer):
            mixer.set_form(form, chunk_size)


class MambaStagesMixin:
    """The configuration half of timm's contract for hierarchical Mamba models whose ``stages``
    (each with a ``grad_checkpointing`` flag) hold the scan mixers: VMamba and the EM encoder."""

    def set_scan_form(self, form: str, chunk_size: int | None = None) -> None:
        """Run every scan mixer in ``form`` with ``chunk_size`` tokens per chunk; outputs do not change."""
        set_scan_form(self, form, chunk_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return mamba_no_weight_decay(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable


# ----------------------------------------------------------------------------------------------
# Vim: isotropic, bidirectional, class token in the middle
# ----------------------------------------------------------------------------------------------


class VisionMamba(PatchTokenBackbone):
    """Vim backbone with timm's model interface.

    Input (B, in_chans, H, W); ``forward`` returns logits (B, num_classes), ``forward_features`` the
    normalised tokens (B, N + 1, embed_dim): the N patch tokens in raster order, then the class token.
    Inside the blocks the class token sits at position N // 2, as in Vim.

    ``stride`` (None: the patch size) below ``patch_size`` takes overlapping patches, as Vim's
    fine-tuned models do (patch 16, stride 8: 27 x 27 tokens at 224 pixels, no padding); it must
    divide the patch size. ``patch_size`` then holds the stride, the pixel step between tokens that
    image sizes are checked against and the features' reduction; ``patch_embed.patch_size`` the patch.
    """

    global_pools = ("token", "avg", "")
    _no_split_modules = ("MambaBlock",)  # FSDP auto-wrap unit (Accelerate reads this)
    stem_pattern = r"^cls_token|pos_embed|patch_embed"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        version: int = 1,
        head_dim: int = 64,
        scan_directions: str = "bidirectional",
        average_routes: bool = True,
        class_token: bool = True,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        scan_form: str = "chunk",
        chunk_size: int = 64,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self._check_global_pool(global_pool)
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if SCAN_DIRECTIONS.get(scan_directions, (0, 0))[1] is not None:
            raise ValueError(
                "scan_directions must be 'forward' or 'bidirectional' for Vim (the class token makes the "
                f"sequence more than a grid), got {scan_directions!r}"
            )
        norm_layer = norm_layer or partial(RmsNorm, eps=1e-5)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0  # timm's name; the token is stored last here
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size

        pads = dynamic_img_size if dynamic_img_pad is None else dynamic_img_pad
        if stride is None or stride == patch_size:
            self.patch_embed = PatchEmbed(
                img_size=img_size,
                patch_size=patch_size,
                in_chans=in_chans,
                embed_dim=embed_dim,
                flatten=False,
                output_fmt="NHWC",
                strict_img_size=not dynamic_img_size,
                dynamic_img_pad=pads,
            )
        else:
            check_positive_int("stride", stride)
            if patch_size % stride:
                raise ValueError(f"stride must divide patch_size={patch_size}, got stride={stride}")
            self.patch_embed = StridedPatchEmbed(
                img_size, patch_size, stride, in_chans, embed_dim, not dynamic_img_size, pads
            )
        # The pixel step between neighbouring tokens (the stride of overlapping patches): the image
        # sizes that fit without padding are its multiples (at least one patch, which patch_embed
        # checks), and it is the reduction of every block's features.
        self.patch_size = tuple(self.patch_embed.feat_ratio(as_scalar=False))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        mixer = dict(
            d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, version=version,
            head_dim=head_dim, scan_directions=scan_directions, average_routes=average_routes,
        )  # fmt: skip
        # On the cpu explicitly, so that building under torch.device("meta") can read the rates.
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *[MambaBlock(embed_dim, norm_layer, drop_path[i], **mixer) for i in range(depth)]
        )
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.patch_size[0]) for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.set_scan_form(scan_form, chunk_size)
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | mamba_no_weight_decay(self)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N + P, D) -> (B, D): the class token ('token'), the patch mean ('avg'), or all ('')."""
        return x[:, -1] if self.global_pool == "token" else super().pool(x)

    def _run_blocks(self, x: torch.Tensor, grid: tuple[int, ...], blocks: nn.Sequential) -> torch.Tensor:
        if self.cls_token is None:
            return super()._run_blocks(x, grid, blocks)
        # Vim scans the class token in the middle of the patches; outside the blocks it is stored last.
        mid = (x.shape[1] - 1) // 2
        x = torch.cat((x[:, :mid], x[:, -1:], x[:, mid:-1]), dim=1)
        x = super()._run_blocks(x, grid, blocks)
        return torch.cat((x[:, :mid], x[:, mid + 1 :], x[:, mid : mid + 1]), dim=1)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's loader for cfgs with ``custom_load``: read a checkpoint file (the authors' training
        checkpoint or seqvision's state dict) without running code from it, convert it with
        ``checkpoint_filter_fn`` and load it, adapting what timm's own loader adapts.

        timm calls it for the Vim tags' hub files, and for a local file given as
        ``pretrained_cfg_overlay=dict(file=...)`` (``weights.read_local_files_with_load_pretrained``;
        ``custom_load=False`` there keeps timm's own reader). The authors' files are training
        checkpoints whose ``"model"`` entry is the network their README's accuracy was measured
        on; timm's own reader would take the ``"model_ema"`` copy where a file has one. As in
        timm, the classifier keeps its initial weights when ``num_classes`` differs from the cfg's,
        and the patch projection is adapted to ``in_chans``. Anything else that does not fit raises
        a ValueError naming the first such key.
        """
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)


# ----------------------------------------------------------------------------------------------
# checkpoints, configs, registration
# ----------------------------------------------------------------------------------------------


# The authors' Mamba (mamba-1p1p1, bimamba v2) keeps each direction's tensors apart: ours stacks them
# on a leading route axis, forward first (``MambaMixer``'s per-route parameters), or concatenates the
# two depthwise convs on the channel axis (one Conv1d over both routes).
_AUTHORS_STACKED = (  # ours <- (forward, backward) under layers.i.mixer.
    ("x_proj_weight", "x_proj.weight", "x_proj_b.weight"),
    ("dt_proj_weight", "dt_proj.weight", "dt_proj_b.weight"),
    ("dt_proj_bias", "dt_proj.bias", "dt_proj_b.bias"),
    ("A_log", "A_log", "A_b_log"),
    ("D", "D", "D_b"),
)
_AUTHORS_CONCATENATED = (
    ("conv.weight", "conv1d.weight", "conv1d_b.weight"),
    ("conv.bias", "conv1d.bias", "conv1d_b.bias"),
)


def _is_authors_layout(state: dict) -> bool:
    return "norm_f.weight" in state or any(k.startswith("layers.") for k in state)


def _resample_positions(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], model: VisionMamba
) -> torch.Tensor:
    """Patch positions (1, N, D) on ``old_grid`` -> the model's grid (timm's bicubic resampling)."""
    new_grid = tuple(model.patch_embed.grid_size)
    if tuple(old_grid) == new_grid:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens=0)


def _square_grid(rows: int, what: str) -> tuple[int, int]:
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"pos_embed of the checkpoint must cover a square grid of patches, got {what}")
    return side, side


def _convert_authors_state(state: dict, model: VisionMamba) -> dict:
    """hustvl/Vim's keys and packing -> seqvision's (see ``checkpoint_filter_fn``)."""
    out, used = {}, set()
    layers = {k.split(".")[1] for k in state if k.startswith("layers.")}
    for i in sorted(int(i) for i in layers if i.isdigit()):
        theirs, ours = f"layers.{i}.mixer.", f"blocks.{i}.mixer."
        for pairs, join in ((_AUTHORS_STACKED, torch.stack), (_AUTHORS_CONCATENATED, torch.cat)):
            for name, forward, backward in pairs:
                keys = (theirs + forward, theirs + backward)
                present = [k in state for k in keys]
                if not any(present):  # conv biases of a conv_bias=False model: the loader names them
                    continue
                if not all(present):
                    missing = keys[present.index(False)]
                    raise ValueError(
                        f"the authors' Vim checkpoint must hold both directions of {keys[0]!r}: "
                        f"{missing!r} is missing (bimamba v2 keeps a backward twin of every scan tensor)"
                    )
                try:
                    out[ours + name] = join([state[k] for k in keys], dim=0)
                except (RuntimeError, TypeError) as e:
                    shapes = [tuple(getattr(state[k], "shape", ())) for k in keys]
                    raise ValueError(
                        f"{keys[0]!r} {shapes[0]} and its backward twin {keys[1]!r} {shapes[1]} must have "
                        "the same shape"
                    ) from e
                used.update(keys)
    if "cls_token" in state and "pos_embed" in state:
        # Their pos_embed (1, N + 1, D) has the class token's row at N // 2, where the token is scanned.
        pos_embed = state["pos_embed"]
        mid = (pos_embed.shape[1] - 1) // 2
        out["cls_token"] = state["cls_token"] + pos_embed[:, mid : mid + 1]
        patches = torch.cat((pos_embed[:, :mid], pos_embed[:, mid + 1 :]), dim=1)
        rows = f"{patches.shape[1]} patch rows (its pos_embed {tuple(pos_embed.shape)} less the class row)"
        grid = _square_grid(patches.shape[1], rows)
        out["pos_embed"] = _resample_positions(patches, grid, model)
        used.update(("cls_token", "pos_embed"))
    for key, value in state.items():  # renamed one to one; anything unknown is kept for the strict check
        if key in used:
            continue
        if key.startswith("norm_f."):
            key = "norm." + key[len("norm_f.") :]
        elif key.startswith("layers."):
            key = "blocks." + key[len("layers.") :]
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: dict, model: VisionMamba) -> dict:
    """Adapt a Vim checkpoint to ``model``: the authors' (hustvl/Vim) or seqvision's layout.

    Unwraps a training checkpoint (the ``"model"`` entry, never the EMA copy). The authors' layout
    (``layers.i.mixer.*`` with backward twins ``*_b`` / ``A_b_log``, ``norm_f``, a ``pos_embed`` of
    N + 1 rows) is converted: ``layers`` -> ``blocks``, ``norm_f`` -> ``norm``; each scan tensor
    stacked with its backward twin, forward first (x_proj, dt_proj, A_log, D: (2, ...)), the two
    depthwise convs concatenated on channels (2E); the class token's position (row N // 2, where
    their model inserts the token) added to ``cls_token`` and dropped from ``pos_embed``. The patch
    positions of either layout are then resampled when the model's grid differs (a square grid is
    assumed for the file's). Raises ValueError naming the key where a backward twin is missing or
    does not match its forward tensor; other misfits are named by the loader.
    """
    state = unwrap_state_dict(state_dict)
    if _is_authors_layout(state):
        return _convert_authors_state(state, model)
    out = dict(state)
    pos_embed = out.get("pos_embed")
    if isinstance(pos_embed, torch.Tensor) and pos_embed.shape != model.pos_embed.shape:
        grid = _square_grid(pos_embed.shape[1], f"{pos_embed.shape[1]} rows")
        out["pos_embed"] = _resample_positions(pos_embed, grid, model)
    return out


register_converter("vim_*", checkpoint_filter_fn)


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    kwargs = read_local_files_with_load_pretrained(kwargs)
    return build_backbone(
        VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


def _vim_cfg(hub_id: str | None = None, filename: str | None = None, top1: str | None = None) -> dict:
    """The authors' evaluation transform (vim/datasets.py and main.py: resize to 224 / 0.875 = 256
    pixels bicubic, 224 centre crop, ImageNet mean / std) at Vim's fixed 224-pixel input, and the
    hub file. ``custom_load``: ``VisionMamba.load_pretrained`` reads their training checkpoints."""
    weights = {"hf_hub_id": hub_id, "hf_hub_filename": filename} if hub_id else {}
    return fixed_size_cfg(
        crop_pct=0.875,
        interpolation="bicubic",
        custom_load="hf",
        license="apache-2.0",  # hustvl/Vim's LICENSE.txt
        origin_url="https://github.com/hustvl/Vim",
        paper_ids="arXiv:2401.09417",
        paper_name="Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space "
        "Model",
        **({"notes": (f"ImageNet-1k top-1 {top1} (hustvl/Vim README)",)} if top1 else {}),
        **weights,
    )


# The authors' ImageNet-1k weights (hustvl/Vim README, "Model Weights"): architecture, hub repository,
# file, top-1. The "+" files are their stride-8 fine-tunes of the stride-16 models, on ImageNet-1k
# again, so every architecture has one set of weights and one tag, .in1k.
_AUTHORS_WEIGHTS = (
    ("vim_tiny_patch16_224", "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", "76.1"),
    ("vim_small_patch16_224", "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", "80.5"),
    ("vim_base_patch16_224", "hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth", "81.9"),
    ("vim_tiny_patch16_stride8_224", "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth", "78.3"),
    ("vim_small_patch16_stride8_224", "hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth", "81.6"),
)
default_cfgs = generate_default_cfgs(
    {f"{arch}.in1k": _vim_cfg(hub_id, file, top1) for arch, hub_id, file, top1 in _AUTHORS_WEIGHTS}
    | {"vim_base_patch16_stride8_224": _vim_cfg()}  # the authors published no stride-8 Vim-B
)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti/16: 192 wide, 24 bidirectional Mamba blocks, class token in the middle (7.15 M)."""
    arch = dict(patch_size=16, embed_dim=192, depth=24)
    return _create_vim("vim_tiny_patch16_224", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S/16: 384 wide, 24 bidirectional Mamba blocks, class token in the middle (25.80 M)."""
    arch = dict(patch_size=16, embed_dim=384, depth=24)
    return _create_vim("vim_small_patch16_224", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B/16: 768 wide, 24 bidirectional Mamba blocks, class token in the middle (97.60 M)."""
    arch = dict(patch_size=16, embed_dim=768, depth=24)
    return _create_vim("vim_base_patch16_224", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti+/16: Vim-Ti on 16-pixel patches every 8 pixels, 27 x 27 tokens at 224 (7.25 M)."""
    arch = dict(patch_size=16, stride=8, embed_dim=192, depth=24)
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S+/16: Vim-S on 16-pixel patches every 8 pixels, 27 x 27 tokens at 224 (26.00 M)."""
    arch = dict(patch_size=16, stride=8, embed_dim=384, depth=24)
    return _create_vim("vim_small_patch16_stride8_224", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def vim_base_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B/16 on 16-pixel patches every 8 pixels, 27 x 27 tokens at 224 (98.01 M)."""
    arch = dict(patch_size=16, stride=8, embed_dim=768, depth=24)
    return _create_vim("vim_base_patch16_stride8_224", pretrained=pretrained, **dict(arch, **kwargs))
