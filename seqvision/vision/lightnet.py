"""LightNet: "You Only Scan Once" (Qin et al., arXiv 2405.21022), one additive scan per layer.

Multiplicative recurrences (Mamba, HGRN) decay exponentially along the scan, so 2-D data needs
several scans. LightNet's additive recurrence weighs every earlier token by exp(k) normalised by the
running sum, independent of distance and order, so one scan over the flattened grid is enough:

    m_t = a_t m_{t-1} + b_t x_t,   a_t + b_t = 1,   g(t) = sum_{s<=t} exp(k_s),
    a_t = g(t-1) / g(t),  b_t = exp(k_t) / g(t)   =>   m_t = sum_{s<=t} exp(k_s) x_s / g(t).

Layer (per head, per key channel): q = silu(W_q x), k = W_k x, v = W_v x; z = logcumsumexp(k) over
the sequence in float32; log a_t = z_{t-1} - z_t; k' = exp(k - z); o = GLA(q, k', v, log a) (the
per-key member of ``linear_attention``); out = W_o(GroupRMSNorm(o) * sigmoid(gate(x))) with a
low-rank gate d -> head_dim -> d. Non-causal (the default, for classification): one scan over the
whole grid, o_t = q_t (softmax_s(K))^T V per key channel, order-free. MD-LRPE (cosine form) rotates
q and k' by each token's grid position (doubling the head dim; the decay is repeated to match), so
q_s . k_t depends on the relative position along every axis. MD-TPE (decayed scans along each grid
axis) is added to the patch tokens as the positional encoding. Both take the grid at run time:
any image size or clip length works without interpolation.

Block: RMSNorm -> LightNet attention -> RMSNorm -> GLU w3(silu(w1 x) * w2 x), both residual.

Inference: in eval mode without autograd, the non-causal blocks run ``inference_chunk_tokens``
tokens at a time (default 1024): a first pass over the chunks accumulates softmax_s(K)^T V with a
running maximum (``KeyValueSummary``), a second reads every query against it and runs the output
projection and the GLU. The result equals the whole-sequence forward, and activation memory is
bounded by the chunk.

Sizes (widths and depths of DeiT, GLU hidden 8/3 d; MD-TPE adds d^2 + small per axis):

=================================  =====  =====  =====  ===========  =================
model                               dim   depth  heads  parameters    DeiT counterpart
=================================  =====  =====  =====  ===========  =================
lightnet_tiny_patch16_224           192     12      3     5.99 M       DeiT-T  5.72 M (+4.7 %)
lightnet_small_patch16_224          384     12      6    22.67 M       DeiT-S 22.05 M (+2.8 %)
lightnet_base_patch16_224           768     12     12    88.11 M       DeiT-B 86.57 M (+1.8 %)
lightnet_small_video_patch16_224    384     12      6    22.74 M       400 classes, 2x16x16 tubelets
=================================  =====  =====  =====  ===========  =================

Scripting and fx: not supported (the grid shape drives the positional encodings at run time, and
the mixer goes through the Python operator); use the model eagerly or with torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, RmsNorm, SwiGLU
from timm.models import generate_default_cfgs, register_model

from seqvision.kernels import compute_dtype, linear_attention

from .base import (
    ScanMixer,
    TokenBackbone,
    build_backbone,
    check_chunk_size,
    check_image,
    fixed_size_cfg,
    init_linear,
)
from .layers import GroupRmsNorm, MdLrpe, MdTpe, TubeletEmbed

__all__ = ["LightNet", "LightNetAttention", "LightNetBlock"]


class LightNetAttention(ScanMixer):
    """LightNet's token mixer. x (B, L, D) with L = prod(grid) -> (B, L, D)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = False,
        num_axes: int = 2,
        use_lrpe: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.lrpe = MdLrpe(self.head_dim, num_axes) if use_lrpe else None
        self.out_norm = GroupRmsNorm(dim, num_heads)
        self.gate = nn.Sequential(nn.Linear(dim, self.head_dim, bias=False), nn.Linear(self.head_dim, dim))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q = silu(W_q x), k, v as (B, H, L, head_dim); k in float32 (float64 stays)
        because its normaliser saturates in 16 bits on long sequences."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return F.silu(q), k.to(compute_dtype(k.dtype)), v

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Scan output o (B, H, L, head_dim) and the layer input x (B, L, D) -> (B, L, D)."""
        B, _, L, _ = o.shape
        o = self.out_norm(o.transpose(1, 2).reshape(B, L, -1)) * torch.sigmoid(self.gate(x))
        return self.proj_drop(self.o_proj(o))

    def forward(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        q, k, v = self._project(x)
        if self.causal:
            z = torch.logcumsumexp(k, dim=2)
            # The gate between t-1 and t is g(t-1)/g(t); nothing comes before the first token.
            log_decay = F.pad(z[:, :, :-1] - z[:, :, 1:], (0, 0, 1, 0)).clamp(max=0.0)
            k = torch.exp(k - z)
        else:
            k, log_decay = torch.softmax(k, dim=2), None
        k = k.to(q.dtype)
        if self.lrpe is not None:
            q, k = self.lrpe(q, grid), self.lrpe(k, grid)
            if log_decay is not None:
                log_decay = torch.cat((log_decay, log_decay), dim=-1)  # cos and sin halves decay alike
        o = linear_attention(
            q, k, v, log_decay, causal=self.causal, form=self.form, chunk_size=self.chunk_size
        )
        return self._output(o, x)


class KeyValueSummary:
    """softmax_s(K)^T V of the non-causal scan (per head, per key channel), accumulated over token
    chunks with a running maximum, so the whole sequence's keys never exist at once.

    ``add(k, v, table)`` takes a chunk's keys (B, H, T, d) in float32/64, values (B, H, T, dv) and
    its MD-LRPE table rows (T, 2, d), or None without MD-LRPE; ``result()`` returns (B, H, R, dv)
    with R = 2 d (or d), the matrix the encoded queries multiply.
    """

    def __init__(self, doubled: bool) -> None:
        self.doubled = doubled
        self.max = self.weights = self.total = None

    def add(self, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None) -> None:
        chunk_max = k.amax(dim=2, keepdim=True)  # (B, H, 1, d)
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        e = torch.exp(k - new_max)
        rows = e if table is None else MdLrpe.apply_table(e, table.to(e.dtype))
        weights, total = rows.transpose(-1, -2) @ v.to(e.dtype), e.sum(dim=2, keepdim=True)
        if self.max is not None:
            rescale = torch.exp(self.max - new_max)  # what was summed under the old maximum
            weights = weights + self.weights * self._per_row(rescale)
            total = total + self.total * rescale
        self.max, self.weights, self.total = new_max, weights, total

    def result(self) -> torch.Tensor:
        return self.weights / self._per_row(self.total)

    def _per_row(self, per_channel: torch.Tensor) -> torch.Tensor:
        """(B, H, 1, d) per key channel -> (B, H, R, 1); MD-LRPE's cos and sin rows share a channel."""
        if self.doubled:
            per_channel = torch.cat((per_channel, per_channel), dim=-1)
        return per_channel.transpose(-1, -2)


class LightNetBlock(nn.Module):
    """RMSNorm -> LightNet attention -> RMSNorm -> GLU, both residual. x (B, L, D) -> (B, L, D)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 8 / 3,
        causal: bool = False,
        num_axes: int = 2,
        use_lrpe: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = RmsNorm(dim)
        self.attn = LightNetAttention(dim, num_heads, causal, num_axes, use_lrpe, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = RmsNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), bias=False, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    @torch.no_grad()
    def forward_chunked(self, x: torch.Tensor, grid: tuple[int, ...], chunk_tokens: int) -> torch.Tensor:
        """The non-causal block for inference, ``chunk_tokens`` tokens at a time; equals ``forward``.

        Two passes over the chunks: the first projects each chunk and accumulates the keys'
        softmax-weighted summary of the values; the second reads every query against it and runs
        the output projection and the GLU. Only the block's input and output and the queries exist
        for the whole sequence, so activation memory is bounded by the chunk.
        """
        attn = self.attn
        table = None if attn.lrpe is None else attn.lrpe.table(grid, x)
        chunks = [slice(start, start + chunk_tokens) for start in range(0, x.shape[1], chunk_tokens)]
        summary, queries = KeyValueSummary(doubled=table is not None), []
        for chunk in chunks:
            q, k, v = attn._project(self.norm1(x[:, chunk]))
            summary.add(k, v, None if table is None else table[chunk])
            queries.append(q)
        kv = summary.result()
        out = torch.empty_like(x)
        for chunk, q in zip(chunks, queries, strict=True):
            if table is not None:
                q = MdLrpe.apply_table(q, table[chunk])
            o = ((q.to(kv.dtype) * q.shape[-1] ** -0.5) @ kv).to(x.dtype)
            # norm1 is recomputed rather than kept from the first pass: keeping it would hold a
            # full-sequence copy of the input, the memory this path exists to save.
            y = x[:, chunk] + attn._output(o, self.norm1(x[:, chunk]))
            out[:, chunk] = y + self.mlp(self.norm2(y))
        return out


class LightNet(TokenBackbone):
    """LightNet backbone with timm's model interface, for images or (with ``num_frames``) clips.

    Input (B, in_chans, H, W), or (B, in_chans, T, H, W) when ``num_frames`` is set; ``forward``
    returns logits (B, num_classes), ``forward_features`` the normalised tokens (B, N, embed_dim) in
    raster order over the patch grid (h, w) or tubelet grid (t, h, w).
    """

    blocks_take_grid = True

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 8 / 3,
        causal: bool = False,
        use_tpe: bool = True,
        use_lrpe: bool = True,
        num_frames: int | None = None,
        tubelet_size: int = 2,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        scan_form: str = "chunk",
        chunk_size: int = 64,
        inference_chunk_tokens: int | None = 1024,
    ) -> None:
        super().__init__()
        self._check_global_pool(global_pool)
        check_chunk_size("inference_chunk_tokens", inference_chunk_tokens)
        self.inference_chunk_tokens = inference_chunk_tokens
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.in_chans = in_chans
        self.causal = causal
        self.dynamic_img_size = dynamic_img_size
        pads = dynamic_img_size if dynamic_img_pad is None else dynamic_img_pad
        self.video = num_frames is not None
        num_axes = 3 if self.video else 2
        if self.video:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.patch_embed = TubeletEmbed(
                (num_frames, *size), (tubelet_size, patch_size, patch_size), in_chans, embed_dim, pads
            )
            self.input_size = self.patch_embed.clip_size
        else:
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
            self.input_size = self.patch_embed.img_size
        self.patch_size = tuple(self.patch_embed.patch_size)
        self.pads = pads
        self.md_tpe = MdTpe(embed_dim, num_heads, num_axes) if use_tpe else None

        # On the cpu explicitly, so that building under torch.device("meta") can read the rates.
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *[
                LightNetBlock(
                    embed_dim, num_heads, mlp_ratio, causal, num_axes, use_lrpe, proj_drop_rate, drop_path[i]
                )
                for i in range(depth)
            ]
        )
        reduction = self.patch_size[-1]
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)
        ]
        self.norm = RmsNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.set_scan_form(scan_form, chunk_size)
        self.apply(init_linear)

    def _run_blocks(self, x: torch.Tensor, grid: tuple[int, ...], blocks: nn.Sequential) -> torch.Tensor:
        # In eval mode without autograd the non-causal blocks run token chunk by token chunk (the
        # same result), so inference memory does not grow with every intermediate of every token.
        chunk = self.inference_chunk_tokens
        chunked = not (self.training or torch.is_grad_enabled() or self.causal or chunk is None)
        if not chunked or x.shape[1] <= chunk:
            return super()._run_blocks(x, grid, blocks)
        for block in blocks:
            x = block.forward_chunked(x, grid, chunk)
        return x

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Decay would pull MD-TPE's q.k gains toward 0 and its lambdas toward 0.5.
        return {f"md_tpe.{name}" for name in ("q", "k", "decay_logit")} if self.md_tpe is not None else set()

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Image or clip -> tokens (B, N, D) in raster order over the grid, and the grid."""
        fixed = None if self.dynamic_img_size else self.input_size
        check_image(x, self.in_chans, 3 if self.video else 2, self.patch_size, fixed, self.pads)
        x = self.patch_embed(x)  # (B, *grid, D)
        grid = tuple(x.shape[1:-1])
        if self.md_tpe is not None:
            x = x + self.md_tpe(x)
        return x.flatten(1, -2), grid


def _create_lightnet(variant: str, pretrained: bool = False, **kwargs) -> LightNet:
    return build_backbone(LightNet, variant, pretrained, **kwargs)


# No public ImageNet weights exist for these sizes; load your own through
# pretrained_cfg_overlay=dict(file=...) or dict(hf_hub_id=...).
default_cfgs = generate_default_cfgs(
    {
        "lightnet_tiny_patch16_224": fixed_size_cfg(),
        "lightnet_small_patch16_224": fixed_size_cfg(),
        "lightnet_base_patch16_224": fixed_size_cfg(),
        "lightnet_small_video_patch16_224": fixed_size_cfg(num_classes=400),
    }
)


def _variant(name: str, pretrained: bool, kwargs: dict, **arch) -> LightNet:
    return _create_lightnet(name, pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def lightnet_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LightNet:
    """LightNet-Tiny/16: 192 wide, 12 blocks, 3 heads (5.99 M parameters; DeiT-T 5.72 M)."""
    return _variant("lightnet_tiny_patch16_224", pretrained, kwargs, embed_dim=192, depth=12, num_heads=3)


@register_model
def lightnet_small_patch16_224(pretrained: bool = False, **kwargs) -> LightNet:
    """LightNet-Small/16: 384 wide, 12 blocks, 6 heads (22.67 M parameters; DeiT-S 22.05 M)."""
    return _variant("lightnet_small_patch16_224", pretrained, kwargs, embed_dim=384, depth=12, num_heads=6)


@register_model
def lightnet_base_patch16_224(pretrained: bool = False, **kwargs) -> LightNet:
    """LightNet-Base/16: 768 wide, 12 blocks, 12 heads (88.11 M parameters; DeiT-B 86.57 M)."""
    return _variant("lightnet_base_patch16_224", pretrained, kwargs, embed_dim=768, depth=12, num_heads=12)


@register_model
def lightnet_small_video_patch16_224(pretrained: bool = False, **kwargs) -> LightNet:
    """LightNet-Small/16 for clips (B, 3, 16, 224, 224): 2x16x16 tubelets, 3-D MD-TPE and MD-LRPE."""
    return _variant(
        "lightnet_small_video_patch16_224", pretrained, kwargs,
        embed_dim=384, depth=12, num_heads=6, num_frames=16, tubelet_size=2, num_classes=400,
    )  # fmt: skip
