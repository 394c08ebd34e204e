"""ViR: Vision Retention Networks (Hatamizadeh et al., arXiv 2310.19731).

A ViT whose softmax attention is replaced by retention: a causal linear recurrence over the patch
sequence with one fixed decay per head,

    S_n = gamma_h S_{n-1} + k_n^T v_n,        o_n = q_n S_n,

    gamma_h = 1 - exp(linspace(ln 1/32, ln 1/512, H))       (0.96875 ... 0.99805 for H = 12).

The class token is appended at the END of the sequence, so through the causal scan it sees every
patch; the head reads it. The absolute position embedding covers the patches only.

One model runs in three equivalent forms, chosen at run time with ``set_retention_form``:
``parallel`` (an L x L decay-masked matrix, for training), ``chunk`` (exact chunkwise, default) and
``recurrent`` (token by token). ``forward_streaming`` is the paper's chunkwise inference: each chunk
of tokens passes through every layer before the next chunk, and only one retention state per layer
is kept, so activation memory does not grow with the number of tokens. All four give the same
logits. ``bidirectional=True`` replaces the causal scan with the symmetric decay mask (a forward and
a reversed scan summed over the same sequence, the diagonal counted once).

Block (as in timm's ViT): LayerNorm(eps 1e-6) -> retention -> LayerScale(1e-5) -> DropPath;
LayerNorm -> MLP(ratio 4, GELU) -> LayerScale -> DropPath. Retention has a fused qkv Linear with bias
and an output Linear with bias, q scaled by head_dim^-0.5; no gate, no group norm, no rotary terms.
Parameter counts equal the matching timm ViT's minus the class token's position embedding (D) plus
the LayerScale vectors (2 D per block).

Weights: the authors published none. ``init_from_vit(model, vit)`` fills a ViR from timm's ViT of the
same size (the same tensors under the same names) as a starting point for fine-tuning; it is not a
pretrained ViR.

Scripting: ``torch.jit.script`` is not supported (the retention call goes through the Python
operator with argument checks and backend dispatch; TorchScript is deprecated upstream). timm's fx
feature extraction works for fixed-size models (``dynamic_img_size=False``): ``Retention`` is
registered as an fx leaf module and the input checks are skipped while tracing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn as nn
from timm.layers import (
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    register_notrace_module,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model

from seqvision.kernels import compute_dtype, linear_attention

from .base import (
    PatchTokenBackbone,
    ScanMixer,
    build_backbone,
    check_chunk_size,
    fixed_size_cfg,
    init_linear,
)
from .weights import first_mismatch, unwrap_state_dict

__all__ = [
    "RETENTION_FORMS",
    "Retention",
    "RetentionBlock",
    "VisionRetentionNet",
    "init_from_vit",
    "retention_log_decay",
]

RETENTION_FORMS = ScanMixer.FORMS
_default_norm = partial(nn.LayerNorm, eps=1e-6)
GLOBAL_POOLS = ("token_last", "avg", "")


def retention_log_decay(num_heads: int) -> torch.Tensor:
    """log gamma_h for gamma_h = 1 - exp(linspace(ln 1/32, ln 1/512, H)); shape (H,), all < 0."""
    return torch.log1p(-torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads)))


@register_notrace_module
class Retention(ScanMixer):
    """Multi-head retention with a fixed decay per head.

    x (B, L, C) -> (B, L, C). With ``state`` (B, H, head_dim, head_dim) the scan continues from it
    and ``forward_with_state`` also returns the state after the last token.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.bidirectional = bidirectional
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # A fixed function of H, so it is not saved in checkpoints.
        self.register_buffer("log_decay", retention_log_decay(num_heads), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._retain(x, None, False)

    def forward_with_state(
        self, x: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bidirectional:
            raise ValueError(
                "a bidirectional retention has no running state: use forward() on the whole sequence"
            )
        return self._retain(x, state, True)

    def _retain(self, x, state, return_state):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = linear_attention(
            q,
            k,
            v,
            # The decays stay in float32 beside 16-bit activations (float64 for float64 checks).
            self.log_decay.to(compute_dtype(q.dtype)),
            causal=not self.bidirectional,
            form=self.form,
            chunk_size=self.chunk_size,
            initial_state=state,
            output_final_state=return_state,
        )
        out, state = out if return_state else (out, None)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))
        return (out, state) if return_state else out


class RetentionBlock(nn.Module):
    """Pre-norm ViT block with retention as the token mixer. x (B, L, C) -> (B, L, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        init_values: float | None = 1e-5,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] | None = None,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or _default_norm
        self.norm1 = norm_layer(dim)
        self.attn = Retention(
            dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, bidirectional=bidirectional
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return self._mlp(x)

    def forward_with_state(
        self, x: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of tokens, continuing the retention scan from ``state`` (None at the start)."""
        mixed, state = self.attn.forward_with_state(self.norm1(x), state)
        return self._mlp(x + self.drop_path1(self.ls1(mixed))), state

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionRetentionNet(PatchTokenBackbone):
    """ViR backbone with timm's model interface.

    Input (B, in_chans, H, W); ``forward`` returns logits (B, num_classes), ``forward_features``
    the normalised tokens (B, N + 1, embed_dim) with the N patch tokens first (raster order) and the
    class token last.
    """

    global_pools = GLOBAL_POOLS
    stem_pattern = r"^cls_token|pos_embed|patch_embed"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token_last",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = 1e-5,
        class_token: bool = True,
        bidirectional: bool = False,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        retention_form: str = "chunk",
        chunk_size: int = 64,
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self._check_global_pool(global_pool)
        if global_pool == "token_last" and not class_token and bidirectional:
            raise ValueError("global_pool='token_last' without a class token needs the causal scan")
        norm_layer = norm_layer or _default_norm
        act_layer = act_layer or nn.GELU
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0  # prefix in timm's sense; here it sits at the end
        self.in_chans = in_chans
        self.bidirectional = bidirectional
        self.dynamic_img_size = dynamic_img_size

        # Dynamic sizes pad to a multiple of the patch size unless told otherwise: any image size works.
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=not dynamic_img_size,
            dynamic_img_pad=dynamic_img_size if dynamic_img_pad is None else dynamic_img_pad,
        )
        self.patch_size = self.patch_embed.patch_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # On the cpu explicitly, so that building under torch.device("meta") can read the rates.
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *[
                RetentionBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    init_values=init_values,
                    drop_path=drop_path[i],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    bidirectional=bidirectional,
                )
                for i in range(depth)
            ]
        )
        reduction = self.patch_size[0]
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.set_scan_form(retention_form, chunk_size)
        self.init_weights()

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            # std 0.02, not the authors' 1e-6: the class token gets no position embedding here (ViT's
            # does, std 0.02), so at 1e-6 its pre-norm variance sits far below LayerNorm's eps and every
            # LayerScale'd (1e-5) branch keeps it there: the head reads ~0 and training stalls at chance
            # (measured on sklearn digits: loss 2.30 after 60 AdamW steps, against 1.81 with 0.02).
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    def set_retention_form(self, form: str, chunk_size: int | None = None) -> None:
        """Run every retention layer in ``form`` ('parallel' | 'chunk' | 'recurrent'); same outputs."""
        self.set_scan_form(form, chunk_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward_streaming(self, x: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
        """Chunkwise inference: logits (B, num_classes) equal to ``forward(x)``.

        The token sequence is cut into chunks of ``chunk_tokens``; each chunk passes through every
        block before the next one starts, carrying one retention state (B, H, d, d) per block, so
        activations are bounded by the chunk, not by the image. Pooling accumulates as it goes.
        """
        check_chunk_size("chunk_tokens", chunk_tokens)
        if self.bidirectional:
            raise ValueError("forward_streaming needs the causal scan; this model is bidirectional")
        if self.global_pool == "":
            raise ValueError(
                "forward_streaming pools as it goes; global_pool='' keeps every token, use forward()"
            )
        tokens, _ = self._embed(x)
        num_patches = tokens.shape[1] - self.num_prefix_tokens
        states: list[torch.Tensor | None] = [None] * len(self.blocks)
        pooled = None
        for start in range(0, tokens.shape[1], chunk_tokens):
            chunk = tokens[:, start : start + chunk_tokens]
            for i, block in enumerate(self.blocks):
                chunk, states[i] = block.forward_with_state(chunk, states[i])
            chunk = self.norm(chunk)
            if self.global_pool == "token_last":
                pooled = chunk[:, -1]
            else:
                patch_part = chunk[:, : max(0, num_patches - start)].sum(dim=1)
                pooled = patch_part if pooled is None else pooled + patch_part
        if self.global_pool == "avg":
            pooled = pooled / num_patches
        return self.head(self.head_drop(pooled))


def _resample_patch_positions(pos_embed: torch.Tensor, model: VisionRetentionNet) -> torch.Tensor:
    """A square grid of patch positions (1, N, D) resampled to the model's patch grid."""
    if pos_embed.shape == model.pos_embed.shape:
        return pos_embed
    side = math.isqrt(pos_embed.shape[1])
    if side * side != pos_embed.shape[1]:
        raise ValueError(f"pos_embed of the checkpoint has {pos_embed.shape[1]} tokens, not a square grid")
    return resample_abs_pos_embed(pos_embed, model.patch_embed.grid_size, (side, side), num_prefix_tokens=0)


def checkpoint_filter_fn(state_dict: dict, model: VisionRetentionNet) -> dict:
    """Adapt a ViR checkpoint to ``model``: unwrap 'model'/'state_dict', resize the position embedding."""
    state = unwrap_state_dict(state_dict)
    if "pos_embed" in state:
        state["pos_embed"] = _resample_patch_positions(state["pos_embed"], model)
    return state


def init_from_vit(
    model: VisionRetentionNet,
    vit: nn.Module | Mapping[str, torch.Tensor] | str,
    layer_scale: float | None = 1.0,
) -> VisionRetentionNet:
    """Initialise a ViR from a timm ViT of the same width, depth and heads, for fine-tuning.

    No ViR weights are published. A ViR block is timm's ViT block with attention replaced by
    retention over the same fused ``qkv`` and ``proj`` Linears, so a ViT's weights fill every ViR
    tensor (the names are the same). This is a starting point for fine-tuning, not a pretrained ViR:
    the retention mixes tokens differently from the softmax attention those weights were trained
    for, so the model must be fine-tuned before its predictions mean anything.

    Args:
        model: the ViR to fill (e.g. ``timm.create_model("vir_small_patch16_224")``); changed in place.
        vit: a ViT module, its state dict, or a timm name with a pretrained tag
            (``"vit_small_patch16_224.augreg_in21k_ft_in1k"``, downloaded by timm).
        layer_scale: the value of the ViR's LayerScale vectors (a ViT has none, which is a scale of
            1: the default keeps the ViT's residual branches at their trained strength); None keeps
            the ViR's own initialisation (1e-5, near-identity blocks).

    The ViT's class token absorbs its position (row 0 of ``pos_embed``: the ViR's class token has no
    position); its patch positions are resampled when the ViR's grid differs; the head is copied when
    the class counts agree and kept otherwise. Any other difference is a ValueError naming the first
    key that does not fit. Returns ``model``.
    """
    if isinstance(vit, str):
        import timm

        vit = timm.create_model(vit, pretrained=True)
    if isinstance(vit, nn.Module):
        vit = vit.state_dict()
    if not isinstance(vit, Mapping):
        raise TypeError(f"vit must be a ViT module, its state dict or a timm name, got {type(vit).__name__}")
    state = dict(vit)
    if "cls_token" not in state or "pos_embed" not in state:
        raise ValueError(
            "vit must be a ViT with a class token and a position embedding (cls_token, pos_embed)"
        )
    if model.cls_token is None:
        raise ValueError("model must have a class token (class_token=True) to take a ViT's")
    pos_embed = state["pos_embed"]
    if pos_embed.shape[1] == model.pos_embed.shape[1]:
        raise ValueError(
            "vit's pos_embed must hold the class token's row first (timm's ViT layout), got as many "
            f"rows ({pos_embed.shape[1]}) as the ViR has patches"
        )
    state["cls_token"] = state["cls_token"] + pos_embed[:, :1]
    state["pos_embed"] = _resample_patch_positions(pos_embed[:, 1:], model)
    expected = model.state_dict()
    for name, value in expected.items():
        if name.endswith(("ls1.gamma", "ls2.gamma")) and name not in state:
            state[name] = value if layer_scale is None else torch.full_like(value, layer_scale)
    if state.get("head.weight") is not None and state["head.weight"].shape != expected["head.weight"].shape:
        state["head.weight"], state["head.bias"] = expected["head.weight"], expected["head.bias"]
    problem = first_mismatch(state, expected)
    if problem:
        raise ValueError(f"vit does not fit {type(model).__name__} (embed_dim {model.embed_dim}): {problem}")
    model.load_state_dict(state)
    return model


def _create_vir(variant: str, pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    return build_backbone(
        VisionRetentionNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


# No ViR weights are published (the authors released none); load your own with
# timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="model.safetensors")) or a
# Hub id with pretrained_cfg_overlay=dict(hf_hub_id="user/repo"), or start fine-tuning from a timm ViT
# of the same size with init_from_vit.
default_cfgs = generate_default_cfgs(
    {
        "vir_tiny_patch16_224": fixed_size_cfg(),
        "vir_small_patch16_224": fixed_size_cfg(),
        "vir_base_patch16_224": fixed_size_cfg(),
        "vir_large_patch16_224": fixed_size_cfg(),
        "vir_large_patch14_224": fixed_size_cfg(),
        "vir_tiny_patch16_224_bidir": fixed_size_cfg(),
        "vir_small_patch16_224_bidir": fixed_size_cfg(),
        "vir_base_patch16_224_bidir": fixed_size_cfg(),
    }
)


def _variant(name: str, pretrained: bool, kwargs: dict, **arch) -> VisionRetentionNet:
    return _create_vir(name, pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def vir_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    """ViR-Tiny/16: 192 wide, 12 blocks, 3 heads."""
    return _variant(
        "vir_tiny_patch16_224", pretrained, kwargs, patch_size=16, embed_dim=192, depth=12, num_heads=3
    )


@register_model
def vir_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    """ViR-Small/16: 384 wide, 12 blocks, 6 heads."""
    return _variant(
        "vir_small_patch16_224", pretrained, kwargs, patch_size=16, embed_dim=384, depth=12, num_heads=6
    )


@register_model
def vir_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    """ViR-Base/16: 768 wide, 12 blocks, 12 heads."""
    return _variant(
        "vir_base_patch16_224", pretrained, kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12
    )


@register_model
def vir_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    """ViR-Large/16: 1024 wide, 24 blocks, 16 heads."""
    return _variant(
        "vir_large_patch16_224", pretrained, kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16
    )


@register_model
def vir_large_patch14_224(pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    """ViR-Large/14: 1024 wide, 24 blocks, 16 heads, 14-pixel patches."""
    return _variant(
        "vir_large_patch14_224", pretrained, kwargs, patch_size=14, embed_dim=1024, depth=24, num_heads=16
    )


@register_model
def vir_tiny_patch16_224_bidir(pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    """ViR-Tiny/16 with the bidirectional (symmetric) decay mask."""
    return _variant(
        "vir_tiny_patch16_224_bidir", pretrained, kwargs,
        patch_size=16, embed_dim=192, depth=12, num_heads=3, bidirectional=True,
    )  # fmt: skip


@register_model
def vir_small_patch16_224_bidir(pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    """ViR-Small/16 with the bidirectional (symmetric) decay mask."""
    return _variant(
        "vir_small_patch16_224_bidir", pretrained, kwargs,
        patch_size=16, embed_dim=384, depth=12, num_heads=6, bidirectional=True,
    )  # fmt: skip


@register_model
def vir_base_patch16_224_bidir(pretrained: bool = False, **kwargs) -> VisionRetentionNet:
    """ViR-Base/16 with the bidirectional (symmetric) decay mask."""
    return _variant(
        "vir_base_patch16_224_bidir", pretrained, kwargs,
        patch_size=16, embed_dim=768, depth=12, num_heads=12, bidirectional=True,
    )  # fmt: skip
