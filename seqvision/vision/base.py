"""What every seqvision backbone shares: timm's model interface over a token sequence.

A backbone turns an image (B, C, H, W) or a clip (B, C, T, H, W) into tokens on a grid, runs a stack
of blocks whose token mixer is a scan, normalises, pools and classifies. ``TokenBackbone`` holds the
parts of timm's contract that do not depend on the mixer: ``forward_features`` / ``forward_head`` /
``forward``, ``forward_intermediates`` / ``prune_intermediate_layers`` (behind
``features_only=True``), ``reset_classifier`` / ``get_classifier``, ``set_grad_checkpointing``,
``group_matcher``, and ``set_scan_form`` for the mixers (``ScanMixer``). A family file supplies the
embedding (``_embed``), the blocks and the registered variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices as _timm_feature_take_indices
from torch.utils.checkpoint import checkpoint

from seqvision.utils.checks import check_positive_int

__all__ = [
    "PatchTokenBackbone",
    "ScanMixer",
    "TokenBackbone",
    "build_backbone",
    "check_chunk_size",
    "check_image",
    "default_cfg",
    "fixed_size_cfg",
    "init_linear",
    "select_levels",
]


def select_levels(num_levels: int, indices: int | list[int] | None) -> tuple[list[int], int]:
    """timm's rule for ``forward_intermediates(indices=...)``: an int n takes the last n of
    ``num_levels`` levels, a list those levels (negative from the end), None all of them. Returns
    (the levels, the last one needed). The one place seqvision reaches timm's private helper for it
    (``timm.models._features.feature_take_indices``), so a move in timm is one line here."""
    take, max_index = _timm_feature_take_indices(num_levels, indices)
    return list(take), max_index


def init_linear(module: nn.Module) -> None:
    """timm's ViT initialisation for Linear layers: truncated normal (std 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def default_cfg(**kwargs) -> dict:
    """timm's pretrained cfg for a 224-pixel ImageNet backbone. Without a weight source (the variants
    with no published weights): load your own with ``pretrained_cfg_overlay=dict(file=...)`` or
    ``dict(hf_hub_id=...)``; a pretrained tag adds its source to these fields."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def fixed_size_cfg(**kwargs) -> dict:
    """``default_cfg`` of a model that refuses image sizes other than its ``img_size`` unless it is
    created with ``dynamic_img_size=True``. timm reads ``fixed_input_size``: its builder then passes
    the cfg's ``img_size`` to the model, and its checks feed such a model this size only."""
    return default_cfg(**{"fixed_input_size": True, **kwargs})


def build_backbone(model_cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's builder with the feature getter (``features_only=True`` through forward_intermediates)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def check_chunk_size(name: str, value: int | None) -> None:
    """None (keep the current size) or a positive int."""
    if value is not None:
        check_positive_int(name, value)


class ScanMixer(nn.Module):
    """A token mixer that calls one of ``seqvision.kernels``' operators in a selectable form."""

    FORMS: tuple[str, ...] = ("parallel", "chunk", "recurrent")

    def __init__(self) -> None:
        super().__init__()
        self.form = "chunk"
        self.chunk_size = 64

    def set_form(self, form: str, chunk_size: int | None = None) -> None:
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        check_chunk_size("chunk_size", chunk_size)
        self.form = form
        if chunk_size is not None:
            self.chunk_size = chunk_size


def check_image(
    x: object,
    in_chans: int,
    spatial_dims: int,
    patch_size: Sequence[int],
    fixed_size: Sequence[int] | None,
    pads: bool,
) -> None:
    """Clear errors for what a patch embedding would otherwise reject with an assertion.

    x: (B, C, H, W) for ``spatial_dims == 2`` or (B, C, T, H, W) for 3; ``fixed_size`` the only
    accepted spatial size (None when any size works); ``pads`` whether sizes need not divide by
    ``patch_size``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    layout = "an image batch (B, C, H, W)" if spatial_dims == 2 else "a clip batch (B, C, T, H, W)"
    if x.dim() != 2 + spatial_dims:
        raise ValueError(f"x must be {layout}, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"x must have {in_chans} channels (in_chans), got {x.shape[1]} in {tuple(x.shape)}")
    size = tuple(x.shape[2:])
    if fixed_size is not None and size != tuple(fixed_size):
        raise ValueError(
            f"x must be {tuple(fixed_size)} for this model, got {size}; "
            "create it with img_size=... or dynamic_img_size=True for other sizes"
        )
    if not pads and any(s % p for s, p in zip(size, patch_size, strict=True)):
        raise ValueError(
            f"x must have sizes divisible by the patch size {tuple(patch_size)}, got {size}; "
            "use dynamic_img_size=True to pad"
        )


class TokenBackbone(nn.Module):
    """timm's model interface for a stack of blocks over grid tokens.

    A subclass sets ``in_chans``, ``num_classes``, ``global_pool``, ``embed_dim`` (also
    ``num_features`` and ``head_hidden_size``), ``num_prefix_tokens`` (extra tokens, which sit AFTER
    the grid tokens here), ``blocks`` (nn.Sequential), ``norm``, ``head_drop``, ``head`` and
    ``feature_info``, and implements ``_embed(x) -> (tokens (B, N + P, D), grid)`` with N = prod(grid).
    Blocks receive the grid as a second argument when ``blocks_take_grid`` is set.
    """

    global_pools: tuple[str, ...] = ("avg", "")
    blocks_take_grid = False
    stem_pattern = r"^patch_embed"
    grad_checkpointing = False

    # ------------------------------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------------------------------

    def _check_global_pool(self, global_pool: str) -> None:
        if global_pool not in self.global_pools:
            raise ValueError(f"global_pool must be one of {self.global_pools}, got {global_pool!r}")

    def set_scan_form(self, form: str, chunk_size: int | None = None) -> None:
        """Run every scan mixer in ``form`` with ``chunk_size`` tokens per chunk; outputs do not change."""
        # Every mixer validates the same way, so a bad argument fails on the first, before any change.
        for mixer in self.modules():
            if isinstance(mixer, ScanMixer):
                mixer.set_form(form, chunk_size)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=self.stem_pattern, blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self._check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def _run_blocks(self, x: torch.Tensor, grid: tuple[int, ...], blocks: nn.Sequential) -> torch.Tensor:
        extra = (grid,) if self.blocks_take_grid else ()
        for block in blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, *extra, use_reentrant=False)
            else:
                x = block(x, *extra)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, N + P, D): the N grid tokens in raster order, then the P extra ones."""
        tokens, grid = self._embed(x)
        return self.norm(self._run_blocks(tokens, grid, self.blocks))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, D) -> (B, D) by ``global_pool``: the last token, the mean of the grid tokens,
        or no pooling ('')."""
        if self.global_pool == "token_last":
            return x[:, -1]
        if self.global_pool == "avg":
            return x[:, : x.shape[1] - self.num_prefix_tokens].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the blocks in ``indices``: channels first on the grid, (B, D, *grid) ('NCHW'),
        or tokens (B, N, D) ('NLC').

        With ``return_prefix_tokens`` each entry is ``(grid_tokens, extra_tokens (B, P, D))``.
        Returns the list, or ``(final features, list)`` unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = select_levels(len(self.blocks), indices)
        x, grid = self._embed(x)
        n = x.shape[1] - self.num_prefix_tokens
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_blocks(x, grid, [block])
            if i in take_indices:
                y = self.norm(x) if norm else x
                spatial, prefix = y[:, :n], y[:, n:]
                if output_fmt == "NCHW":
                    spatial = spatial.reshape(x.shape[0], *grid, -1).movedim(-1, 1).contiguous()
                intermediates.append((spatial, prefix) if return_prefix_tokens else spatial)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the head / norm); returns the indices."""
        take_indices, max_index = select_levels(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


class PatchTokenBackbone(TokenBackbone):
    """A TokenBackbone whose tokens are timm ``PatchEmbed`` patches (``output_fmt="NHWC"``) plus a
    learned position per patch, and an optional class token appended LAST.

    A subclass sets ``patch_embed``, ``patch_size``, ``pos_embed`` (1, N, D) over the patches only,
    ``cls_token`` (1, 1, D) or None, ``pos_drop`` and ``dynamic_img_size``.
    """

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image (B, C, H, W) -> tokens (B, N (+1), D) with the class token last, and the patch grid."""
        if not isinstance(x, torch.fx.Proxy):  # the checks branch on shapes, which fx cannot trace
            fixed = None if self.dynamic_img_size else self.patch_embed.img_size
            check_image(x, self.in_chans, 2, self.patch_size, fixed, self.patch_embed.dynamic_img_pad)
        x = self.patch_embed(x)  # (B, h, w, D)
        if self.dynamic_img_size:
            grid = (x.shape[1], x.shape[2])
            pos_embed = resample_abs_pos_embed(
                self.pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=0
            )
        else:
            grid, pos_embed = self.patch_embed.grid_size, self.pos_embed
        x = x.flatten(1, 2) + pos_embed
        if self.cls_token is not None:
            x = torch.cat((x, self.cls_token.expand(x.shape[0], -1, -1)), dim=1)
        return self.pos_drop(x), grid
