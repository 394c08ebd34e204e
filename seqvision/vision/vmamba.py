"""VMamba (Liu et al., arXiv 2401.10166; code MzeroMiko/VMamba): hierarchical Mamba with a cross scan.

First version ("v0" config): a 4x4 patch stem, 4 stages (96, 192, 384, 768 channels, depths 2-2-9-2)
of SS2D blocks LayerNorm -> cross-scan Mamba -> residual, Swin patch merging between stages. SS2D
differs from Vim's mixer in two places, kept here: one 3x3 depthwise Conv2d on the grid before the
routes (``grid_conv``), and a LayerNorm on the merged routes before the gate (``out_norm``). Stages
take and return NCHW maps, so ``features_only`` gives 4 levels at reductions 4, 8, 16, 32.

The mixer itself is ``mamba.MambaMixer`` with ``scan_directions='cross'``: the 4 routes of the 2-D
map (``kernels.cross_scan`` / ``cross_merge``) run as one scan call.

================================  ===========================  ==========  =================
model                             layout                       parameters  paper
================================  ===========================  ==========  =================
``vmamba_tiny_224``               96-768, depths 2-2-9-2       22.89 M     VMamba-T (v0) 22 M
================================  ===========================  ==========  =================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .base import check_image, default_cfg, init_linear
from .mamba import MambaBlock, MambaStagesMixin

__all__ = ["PatchMerging2d", "VMamba", "VMambaStage"]


class PatchMerging2d(nn.Module):
    """Swin's patch merging on NCHW maps: each 2x2 neighbourhood's 4 C channels, LayerNorm, linear.

    x (B, C, H, W) -> (B, out_dim, ceil(H / 2), ceil(W / 2)); odd sizes are zero-padded first.
    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.norm = LayerNorm2d(4 * dim)
        self.reduction = nn.Conv2d(4 * dim, out_dim or 2 * dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.reduction(self.norm(F.pixel_unshuffle(x, 2)))


class VMambaStage(nn.Module):
    """Optional patch merging, then ``depth`` Mamba blocks on the grid. (B, C_in, H, W) -> (B, C, H', W')."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        drop_path: Sequence[float],
        norm_layer: Callable[[int], nn.Module],
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMerging2d(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[MambaBlock(dim, norm_layer, drop_path[i], **block_kwargs) for i in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        batch, channels, height, width = x.shape
        grid = (height, width)
        # Channels last once per stage: the blocks' norms and projections act on the last axis.
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                tokens = checkpoint(block, tokens, grid, use_reentrant=False)
            else:
                tokens = block(tokens, grid)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class VMamba(MambaStagesMixin, nn.Module):
    """VMamba backbone with timm's model interface.

    Input (B, in_chans, H, W), any size of at least 4x4 pixels (``dynamic_img_size`` is always on);
    ``forward`` returns logits
    (B, num_classes), ``forward_features`` the normalised last map (B, dims[-1], H/32, W/32).
    """

    _no_split_modules = ("VMambaStage",)  # FSDP auto-wrap unit (Accelerate reads this)

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 9, 2),
        patch_size: int = 4,
        d_state: int = 16,
        d_conv: int = 3,
        expand: float = 2,
        dt_rank: int | str = "auto",
        version: int = 1,
        head_dim: int = 64,
        mlp_ratio: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        scan_form: str = "chunk",
        chunk_size: int = 64,
        dynamic_img_size: bool = True,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths) or not dims:
            raise ValueError(
                f"dims and depths must have one entry per stage, got dims={dims} and depths={depths}"
            )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        # Convolutions and scans of whatever grid comes: every input size is dynamic (the flag is
        # accepted, like timm's ViTs take it, and cannot be turned off).
        if not dynamic_img_size:
            raise ValueError("VMamba takes any image size; dynamic_img_size=False is not supported")
        self.dynamic_img_size = True
        self.dims = tuple(dims)
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = dims[-1]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], patch_size, patch_size), LayerNorm2d(dims[0]))
        block = dict(
            d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, version=version,
            head_dim=head_dim, scan_directions="cross", grid_conv=True, out_norm=True, mlp_ratio=mlp_ratio,
        )  # fmt: skip
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.stages = nn.Sequential(
            *[
                VMambaStage(
                    dims[max(i - 1, 0)], dims[i], depths[i], i > 0, rates[i].tolist(), norm_layer, **block
                )
                for i in range(len(dims))
            ]
        )
        self.feature_info = [
            dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}") for i in range(len(dims))
        ]
        self.norm = LayerNorm2d(dims[-1])
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)

        self.set_scan_form(scan_form, chunk_size)
        self.apply(init_linear)

    # ------------------------------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, global_pool)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):
            check_image(x, self.in_chans, 2, (self.patch_size,) * 2, None, pads=True)
            if min(x.shape[2:]) < self.patch_size:
                raise ValueError(
                    f"x must be at least {self.patch_size}x{self.patch_size} pixels (the stem's patch), "
                    f"got {tuple(x.shape[2:])}"
                )
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised last-stage map (B, dims[-1], H/32, W/32)."""
        return self.norm(self.stages(self.stem(self._check(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the stages in ``indices`` as (B, C_i, H_i, W_i) ('NCHW') or channels last ('NHWC').

        ``norm`` applies the final norm to the last stage's output. Returns the list, or
        ``(final features, list)`` unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        x = self.stem(self._check(x))
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 2, 3, 1).contiguous() if output_fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) == last + 1 else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head / norm); returns the indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# ----------------------------------------------------------------------------------------------
# checkpoints, configs, registration
# ----------------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict, model: VMamba) -> dict:
    """Adapt a checkpoint to ``model``: unwrap 'model'/'state_dict'/'module'."""
    for key in ("model", "state_dict", "module"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    return state_dict


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        VMamba,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


# No public weights in this layout; load your own with


# No public weights in this layout; load your own with
# timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="model.safetensors")).
default_cfgs = generate_default_cfgs(
    {"vmamba_tiny_224": default_cfg(first_conv="stem.0", classifier="head.fc", pool_size=(7, 7))}
)


@register_model
def vmamba_tiny_224(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T (first version): 96-192-384-768 channels, depths 2-2-9-2, cross scan (22.89 M)."""
    arch = dict(dims=(96, 192, 384, 768), depths=(2, 2, 9, 2))
    return _create_vmamba("vmamba_tiny_224", pretrained=pretrained, **dict(arch, **kwargs))
