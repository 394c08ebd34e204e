"""VMamba (Liu et al., arXiv 2401.10166; code MzeroMiko/VMamba): hierarchical Mamba with a cross scan.

Two generations of the architecture, both with 4 stages of VSS blocks (LayerNorm -> SS2D ->
residual, and in the second generation LayerNorm -> MLP -> residual) on NCHW maps at reductions
4, 8, 16, 32, so ``features_only`` gives 4 levels:

* **v0** (the authors' "Vanilla-VMamba"): a 4x4 patch stem, SS2D with Mamba's z gate
  (d_state 16), no MLP, Swin patch merging between stages.
* **v2/v3** (the released "s1l8" / "s2l5" families): a stem of two 3x3 stride-2 convs, SS2D without
  the gate (``gate=False``, the authors' ``forward_type='v05_noz'``), d_state 1, a bias-free
  depthwise conv, an MLP of ratio 4 in every block, and a 3x3 stride-2 conv + LayerNorm2d as the
  downsample. The authors run it channels first (``norm_layer='ln2d'``); the math per pixel is the
  same on the channels-last tokens used here.

SS2D is ``mamba.MambaMixer`` with ``scan_directions='cross'`` (the 4 routes of the 2-D map,
``kernels.cross_scan`` / ``cross_merge``, in one scan call), ``grid_conv`` (one 3x3 depthwise conv on
the grid before the routes) and ``out_norm`` (a LayerNorm on the merged routes). Every LayerNorm uses
``norm_eps`` (1e-5, the authors' value; the mixer's out_norm is always 1e-5).

Published weights: the authors' nine ImageNet-1k files (GitHub releases ``#v0cls`` and ``#v2cls``)
are pretrained tags of these models; ``checkpoint_filter_fn`` converts their layout (see there),
``VMamba.load_pretrained`` reads the files (they hold a yacs config that timm's weights-only loader
refuses). Parameter counts at 224 px with 1000 classes, against the authors' (assets/performance.md):

==========================  ===============================  ==========  ========================
model                       layout                           parameters  authors (performance.md)
==========================  ===============================  ==========  ========================
``vmamba_tiny_224``         v0, 96-768, 2-2-9-2              22.89 M     Vanilla-VMamba-T 23M
``vmamba_small_224``        v0, 96-768, 2-2-27-2             44.42 M     Vanilla-VMamba-S 44M
``vmamba_base_224``         v0, 128-1024, 2-2-27-2           76.25 M     Vanilla-VMamba-B 76M
``vmamba_tiny_s2l5_224``    v2, 96-768, 2-2-5-2, ratio 2     30.71 M     VMamba-T[s2l5] 31M
``vmamba_small_s2l15_224``  v2, 96-768, 2-2-15-2, ratio 2    50.15 M     VMamba-S[s2l15] 50M
``vmamba_base_s2l15_224``   v2, 128-1024, 2-2-15-2, ratio 2  88.56 M     VMamba-B[s2l15] 89M
``vmamba_tiny_s1l8_224``    v2, 96-768, 2-2-8-2, ratio 1     30.25 M     VMamba-T[s1l8] 30M
``vmamba_small_s1l20_224``  v2, 96-768, 2-2-20-2, ratio 1    49.01 M     VMamba-S[s1l20] 49M
``vmamba_base_s1l20_224``   v2, 128-1024, 2-2-20-2, ratio 1  86.61 M     VMamba-B[s1l20] 87M
==========================  ===============================  ==========  ========================
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from .base import check_image, init_linear, select_levels
from .mamba import MambaBlock, MambaStagesMixin
from .weights import (
    load_pretrained_file,
    read_local_files_with_load_pretrained,
    register_converter,
    unwrap_state_dict,
)

__all__ = ["ConvDownsample", "ConvStem", "PatchMerging2d", "VMamba", "VMambaStage", "checkpoint_filter_fn"]

STEM_TYPES = ("patch", "conv")
DOWNSAMPLE_TYPES = ("merge", "conv")


class ConvStem(nn.Module):
    """VMamba v2/v3's stem: two 3x3 stride-2 convs with LayerNorm2d + GELU between, LayerNorm2d after.

    x (B, in_chans, H, W) -> (B, dim, ceil(H / 4), ceil(W / 4)).
    """

    def __init__(self, in_chans: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(dim // 2, eps=eps)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = LayerNorm2d(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class PatchMerging2d(nn.Module):
    """Swin's patch merging on NCHW maps: each 2x2 neighbourhood's 4 C channels, LayerNorm, linear.

    x (B, C, H, W) -> (B, out_dim, ceil(H / 2), ceil(W / 2)); odd sizes are zero-padded first. The 4C
    channels are in ``pixel_unshuffle`` order, c * 4 + 2 * dy + dx; the VMamba authors concatenate the
    offsets (dy, dx) = (0, 0), (1, 0), (0, 1), (1, 1) instead, a permutation that
    ``checkpoint_filter_fn`` applies to their weights (LayerNorm is permutation-equivariant).
    """

    def __init__(self, dim: int, out_dim: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = LayerNorm2d(4 * dim, eps=eps)
        self.reduction = nn.Conv2d(4 * dim, out_dim or 2 * dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.reduction(self.norm(F.pixel_unshuffle(x, 2)))


class ConvDownsample(nn.Module):
    """VMamba v2/v3's downsample: 3x3 stride-2 conv, LayerNorm2d.

    x (B, C, H, W) -> (B, out_dim, ceil(H / 2), ceil(W / 2)).
    """

    def __init__(self, dim: int, out_dim: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim or 2 * dim, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(out_dim or 2 * dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class VMambaStage(nn.Module):
    """Optional downsample, then ``depth`` Mamba blocks on the grid. (B, C_in, H, W) -> (B, C, H', W').

    ``downsample(in_dim, dim)`` builds the downsample module (None: keep the map as it is).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: Callable[[int, int], nn.Module] | None,
        drop_path: Sequence[float],
        norm_layer: Callable[[int], nn.Module],
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample(in_dim, dim) if downsample is not None else nn.Identity()
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
    ``forward`` returns logits (B, num_classes), ``forward_features`` the normalised last map
    (B, dims[-1], H/32, W/32).

    Args beyond timm's usual ones:
        dims, depths: channels and blocks per stage.
        patch_size: the stem's reduction (4 for ``stem_type='conv'``).
        d_state, d_conv, expand, dt_rank, version, head_dim: ``MambaMixer``'s (``expand`` is the
            authors' ``ssm_ratio``).
        gate: Mamba's z gate in SS2D (v0: True; v2/v3: False).
        conv_bias: bias of SS2D's depthwise conv (v0: True; v2/v3: False).
        mlp_ratio: MLP after every mixer (0: none, v0; 4: v2/v3).
        stem_type: 'patch' (patch_size x patch_size conv + LayerNorm2d, v0) or 'conv' (``ConvStem``).
        downsample_type: 'merge' (``PatchMerging2d``, v0) or 'conv' (``ConvDownsample``).
        norm_eps: eps of every LayerNorm of the stem, blocks, downsamples and the final norm.
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
        gate: bool = True,
        conv_bias: bool = True,
        mlp_ratio: float = 0.0,
        stem_type: str = "patch",
        downsample_type: str = "merge",
        norm_eps: float = 1e-5,
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
        if stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type must be one of {STEM_TYPES}, got {stem_type!r}")
        if downsample_type not in DOWNSAMPLE_TYPES:
            raise ValueError(f"downsample_type must be one of {DOWNSAMPLE_TYPES}, got {downsample_type!r}")
        if stem_type == "conv" and patch_size != 4:
            raise ValueError(
                f"stem_type='conv' reduces by 4 (two stride-2 convs), got patch_size={patch_size}"
            )
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive float, got {norm_eps!r}")
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
        self.stem_type = stem_type
        self.num_features = self.head_hidden_size = dims[-1]
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        if stem_type == "patch":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, dims[0], patch_size, patch_size), LayerNorm2d(dims[0], eps=norm_eps)
            )
        else:
            self.stem = ConvStem(in_chans, dims[0], eps=norm_eps)
        downsample_cls = PatchMerging2d if downsample_type == "merge" else ConvDownsample
        block = dict(
            d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, version=version,
            head_dim=head_dim, scan_directions="cross", grid_conv=True, out_norm=True, gate=gate,
            conv_bias=conv_bias, mlp_ratio=mlp_ratio,
        )  # fmt: skip
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.stages = nn.Sequential(
            *[
                VMambaStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    partial(downsample_cls, eps=norm_eps) if i > 0 else None,
                    rates[i].tolist(),
                    norm_layer,
                    **block,
                )
                for i in range(len(dims))
            ]
        )
        self.feature_info = [
            dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}") for i in range(len(dims))
        ]
        self.norm = LayerNorm2d(dims[-1], eps=norm_eps)
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)

        self.set_scan_form(scan_form, chunk_size)
        self.apply(init_linear)

    @property
    def first_conv(self) -> str:
        """Name of the convolution that reads the image (timm's ``first_conv``)."""
        return "stem.0" if self.stem_type == "patch" else "stem.conv1"

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
    # published weights
    # ------------------------------------------------------------------------------------------

    def load_pretrained(self, path: str | os.PathLike, use_ema: bool = False) -> None:
        """Load the authors' (or seqvision's) weights file; timm calls this for cfgs with ``custom_load``.

        Reads with ``read_checkpoint`` (the authors' files hold a yacs config, which timm's weights-only
        reader refuses), converts with ``checkpoint_filter_fn`` (``use_ema``: the file's 'model_ema'
        instead of 'model'), then does what timm's loader does after its filter: the first conv is
        adapted to ``in_chans``, the classifier is dropped when it does not fit this model's head
        (other ``num_classes``, or none), and everything else must fit exactly (ValueError naming the
        first key that does not).
        """
        load_pretrained_file(self, path, partial(checkpoint_filter_fn, use_ema=use_ema))

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):
            check_image(x, self.in_chans, 2, (self.patch_size,) * 2, None, pads=True)
            if min(x.shape[2:]) < self.patch_size:
                raise ValueError(
                    f"x must be at least {self.patch_size}x{self.patch_size} pixels (the stem's reduction), "
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
        take_indices, max_index = select_levels(len(self.stages), indices)
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
        take_indices, max_index = select_levels(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# ----------------------------------------------------------------------------------------------
# the authors' checkpoints
# ----------------------------------------------------------------------------------------------

# Older spellings in the authors' first files (their VSSM._load_from_state_dict renames them too).
_OLD_SPELLINGS = (
    ("patch_embed.proj.", "patch_embed.0."),
    ("patch_embed.norm.", "patch_embed.2."),
    (".ln_1.", ".norm."),
    (".self_attention.", ".op."),
)
# SS2D's parameter names -> MambaMixer's. A_logs (4E, N) and Ds (4E) get the route axis split out.
_MIXER_NAMES = {
    "in_proj.weight": "in_proj.weight",
    "conv2d.weight": "conv.weight",
    "conv2d.bias": "conv.bias",
    "x_proj_weight": "x_proj_weight",
    "dt_projs_weight": "dt_proj_weight",
    "dt_projs_bias": "dt_proj_bias",
    "A_logs": "A_log",
    "Ds": "D",
    "out_norm.weight": "out_norm.weight",
    "out_norm.bias": "out_norm.bias",
    "out_proj.weight": "out_proj.weight",
}
# Their nn.Sequential stems and v3 downsample -> ConvStem / ConvDownsample (Permute/GELU hold nothing).
_CONV_STEM_NAMES = {"0": "conv1", "2": "norm1", "5": "conv2", "7": "norm2"}
_PATCH_STEM_NAMES = {"0": "0", "2": "1"}
_CONV_DOWNSAMPLE_NAMES = {"1": "conv", "3": "norm"}
_ROUTES = 4  # SS2D's k_group: the cross scan's 4 routes


def merge_channel_order(channels: int) -> torch.Tensor:
    """For each of ``PatchMerging2d``'s 4C channels (c * 4 + 2 * dy + dx), the index of the same
    channel in the authors' concatenation ((dy, dx) = (0, 0), (1, 0), (0, 1), (1, 1), each C wide),
    i.e. (dy + 2 * dx) * C + c. (channels = 4C) -> (4C,) int64."""
    if channels % 4:
        raise ValueError(f"channels must be 4 * C for a 2x2 patch merge, got {channels}")
    # The authors' index k * C + c with k = 2 * dx + dy, read as (dx, dy, c), reordered to (c, dy, dx).
    return torch.arange(channels).view(2, 2, channels // 4).permute(2, 1, 0).flatten()


def _as_linear(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv kernel (O, I, 1, 1), as the authors' Linear2d may be saved, as a Linear weight (O, I)."""
    return weight.flatten(1) if weight.dim() == 4 and weight.shape[2:] == (1, 1) else weight


def _convert_block(prefix: str, name: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One parameter of the authors' VSSBlock ('norm.weight', 'op.A_logs', 'mlp.fc1.weight', ...)."""
    if name.startswith("op."):
        ours = _MIXER_NAMES.get(name[3:])
        if ours is None:
            return None
        stacked = value.dim() in (1, 2) and value.shape[0] % _ROUTES == 0  # else the shape check names it
        if ours == "A_log" and stacked and value.dim() == 2:
            value = value.reshape(_ROUTES, -1, value.shape[-1])
        elif ours in ("D", "dt_proj_bias") and stacked:
            value = value.reshape(_ROUTES, -1)
        elif ours in ("in_proj.weight", "out_proj.weight"):
            value = _as_linear(value)
        return f"{prefix}mixer.{ours}", value
    if re.fullmatch(r"norm2?\.(weight|bias)", name):
        return prefix + name, value
    if re.fullmatch(r"mlp\.fc[12]\.(weight|bias)", name):
        return prefix + name, _as_linear(value)
    return None


def _convert_downsample(prefix: str, name: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One parameter of the authors' downsample at the end of a layer (patch merging or v3 conv)."""
    if name in ("norm.weight", "norm.bias"):  # patch merging: LayerNorm(4C) in their channel order
        if value.dim() != 1 or value.shape[0] % 4:
            return prefix + name, value  # not a 2x2 merge: the shape check names it
        return prefix + name, value[merge_channel_order(value.shape[0])]
    if name == "reduction.weight":  # Linear (C', 4C) -> 1x1 conv with the input channels reordered
        weight = _as_linear(value)
        if weight.dim() != 2 or weight.shape[1] % 4:
            return prefix + name, value
        return prefix + name, weight[:, merge_channel_order(weight.shape[1])][..., None, None]
    index, _, param = name.partition(".")
    if index in _CONV_DOWNSAMPLE_NAMES and param in ("weight", "bias"):
        return f"{prefix}{_CONV_DOWNSAMPLE_NAMES[index]}.{param}", value
    return None


def convert_authors_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' VSSM state dict (any of their key spellings) in ``VMamba``'s layout.

    * ``patch_embed.{0,2}`` -> ``stem.{0,1}``; their two-conv stem ``patch_embed.{0,2,5,7}`` ->
      ``stem.{conv1,norm1,conv2,norm2}``;
    * ``layers.i.blocks.j.{norm,op,norm2,mlp}`` -> ``stages.i.blocks.j.{norm,mixer,norm2,mlp}``, SS2D's
      ``A_logs`` (4E, N) -> ``A_log`` (4, E, N), ``Ds`` / ``dt_projs_bias`` -> (4, E);
    * ``layers.i.downsample`` (at the END of their layer i) -> ``stages.{i+1}.downsample`` (at the start
      of ours): patch merging's LayerNorm(4C) and reduction columns permuted to ``pixel_unshuffle``'s
      channel order (``merge_channel_order``), the reduction as a 1x1 conv; the v3 conv
      ``downsample.{1,3}`` -> ``downsample.{conv,norm}``;
    * ``classifier.{norm,head}`` -> ``norm``, ``head.fc``.

    A key it does not know keeps its own name, so the mismatch check names the authors' key.
    """
    conv_stem = any(k.startswith("patch_embed.5.") for k in state)
    out: dict[str, torch.Tensor] = {}
    for original, value in state.items():
        key = original
        for old, new in _OLD_SPELLINGS:
            key = key.replace(old, new)
        if key.startswith(("norm.", "head.")):  # the first files kept these at the top level
            key = f"classifier.{key}"
        converted = None
        if match := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            stage, block, name = match.groups()
            converted = _convert_block(f"stages.{stage}.blocks.{block}.", name, value)
        elif match := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key):
            converted = _convert_downsample(f"stages.{int(match[1]) + 1}.downsample.", match[2], value)
        elif match := re.fullmatch(r"patch_embed\.(\d+)\.(weight|bias)", key):
            names = _CONV_STEM_NAMES if conv_stem else _PATCH_STEM_NAMES
            if match[1] in names:
                converted = f"stem.{names[match[1]]}.{match[2]}", value
        elif match := re.fullmatch(r"classifier\.(norm|head)\.(weight|bias)", key):
            converted = ("norm." if match[1] == "norm" else "head.fc.") + match[2], value
        key, value = converted if converted is not None else (original, value)
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: dict, model: VMamba, use_ema: bool = False) -> dict:
    """Adapt a checkpoint to ``model``: unwrap it ('model', or 'model_ema' with ``use_ema``;
    'state_dict' / 'module' wrappers; a 'module.' prefix), and convert the authors' layout
    (``convert_authors_state``, recognised by their ``patch_embed.`` / ``layers.`` keys). A state dict
    in seqvision's layout passes unchanged."""
    state = unwrap_state_dict(state_dict, use_ema=use_ema)
    if any(k.startswith(("patch_embed.", "layers.")) for k in state):
        state = convert_authors_state(state)
    return state


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    kwargs = read_local_files_with_load_pretrained(kwargs)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        VMamba,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


# ``seqvision convert`` / convert_checkpoint for the authors' files (read without running their yacs).
register_converter("vmamba_*", checkpoint_filter_fn)


_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/"


def _cfg(url: str, first_conv: str, **kwargs) -> dict:
    """The authors' ImageNet-1k files: their eval transform (Resize(256) + CenterCrop(224) bicubic,
    ImageNet mean/std: classification/data/build.py, config.py), MIT license (their LICENSE).
    ``custom_load``: the files hold a yacs config, so ``VMamba.load_pretrained`` reads them."""
    return {
        "url": _RELEASES + url,
        "custom_load": True,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


_v0 = partial(_cfg, first_conv="stem.0")
_v2 = partial(_cfg, first_conv="stem.conv1")

# Accuracies (ImageNet-1k top-1 at 224) from the authors' assets/performance.md. Every tag loads the
# file's 'model': the v0 small/base files hold their EMA weights there (the authors copied model_ema
# into model, analyze/get_ckpt.py; issue #68), v0 tiny was trained without EMA, and the authors'
# own loaders (Backbone_VSSM.load_pretrained, main.py --pretrained) read 'model'.
default_cfgs = generate_default_cfgs(
    {
        "vmamba_tiny_224.in1k": _v0("%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth"),  # 82.2
        "vmamba_small_224.in1k": _v0("%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth"),  # 83.5
        "vmamba_base_224.in1k": _v0("%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth"),  # 83.7
        "vmamba_tiny_s2l5_224.in1k": _v2("%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth"),  # 82.5
        "vmamba_small_s2l15_224.in1k": _v2("%23v2cls/vssm_small_0229_ckpt_epoch_222.pth"),  # 83.6
        "vmamba_base_s2l15_224.in1k": _v2("%23v2cls/vssm_base_0229_ckpt_epoch_237.pth"),  # 83.9
        "vmamba_tiny_s1l8_224.in1k": _v2("%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth"),  # 82.6
        "vmamba_small_s1l20_224.in1k": _v2("%23v2cls/vssm1_small_0229s_ckpt_epoch_240.pth"),  # 83.3
        "vmamba_base_s1l20_224.in1k": _v2("%23v2cls/vssm1_base_0229s_ckpt_epoch_225.pth"),  # 83.8
    }
)

# The second generation's block and stages (the authors' vmamba_*_s1l* / *_s2l* functions and
# configs/vssm/vmambav2*_224.yaml): gate-free SS2D with d_state 1 and a bias-free depthwise conv,
# MLP ratio 4, the two-conv stem and the conv downsample.
_V2 = dict(d_state=1, gate=False, conv_bias=False, mlp_ratio=4.0, stem_type="conv", downsample_type="conv")


def _register(variant: str, pretrained: bool, arch: dict, kwargs: dict) -> VMamba:
    return _create_vmamba(variant, pretrained=pretrained, **dict(arch, **kwargs))


# Drop path: the models default to 0 (timm's convention). The authors trained with 0.1 / 0.3 / 0.6
# (v0 tiny / small / base, from the file names), 0.2 / 0.3 / 0.6 (s2l5 / s2l15 tiny, small, base) and
# 0.2 / 0.3 / 0.5 (s1l8 / s1l20 tiny, small, base); pass drop_path_rate=... to fine-tune alike.


@register_model
def vmamba_tiny_224(pretrained: bool = False, **kwargs) -> VMamba:
    """Vanilla-VMamba-T (v0): 96-768 channels, depths 2-2-9-2, gated SS2D, d_state 16 (22.89 M)."""
    arch = dict(dims=(96, 192, 384, 768), depths=(2, 2, 9, 2))
    return _register("vmamba_tiny_224", pretrained, arch, kwargs)


@register_model
def vmamba_small_224(pretrained: bool = False, **kwargs) -> VMamba:
    """Vanilla-VMamba-S (v0): 96-768 channels, depths 2-2-27-2, gated SS2D, d_state 16 (44.42 M)."""
    arch = dict(dims=(96, 192, 384, 768), depths=(2, 2, 27, 2))
    return _register("vmamba_small_224", pretrained, arch, kwargs)


@register_model
def vmamba_base_224(pretrained: bool = False, **kwargs) -> VMamba:
    """Vanilla-VMamba-B (v0): 128-1024 channels, depths 2-2-27-2, gated SS2D, d_state 16 (76.25 M)."""
    arch = dict(dims=(128, 256, 512, 1024), depths=(2, 2, 27, 2))
    return _register("vmamba_base_224", pretrained, arch, kwargs)


@register_model
def vmamba_tiny_s2l5_224(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T[s2l5] (v2): 96-768 channels, depths 2-2-5-2, ssm ratio 2 (30.71 M)."""
    arch = dict(_V2, dims=(96, 192, 384, 768), depths=(2, 2, 5, 2), expand=2.0)
    return _register("vmamba_tiny_s2l5_224", pretrained, arch, kwargs)


@register_model
def vmamba_small_s2l15_224(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-S[s2l15] (v2): 96-768 channels, depths 2-2-15-2, ssm ratio 2 (50.15 M)."""
    arch = dict(_V2, dims=(96, 192, 384, 768), depths=(2, 2, 15, 2), expand=2.0)
    return _register("vmamba_small_s2l15_224", pretrained, arch, kwargs)


@register_model
def vmamba_base_s2l15_224(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-B[s2l15] (v2): 128-1024 channels, depths 2-2-15-2, ssm ratio 2 (88.56 M)."""
    arch = dict(_V2, dims=(128, 256, 512, 1024), depths=(2, 2, 15, 2), expand=2.0)
    return _register("vmamba_base_s2l15_224", pretrained, arch, kwargs)


@register_model
def vmamba_tiny_s1l8_224(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T[s1l8] (v2): 96-768 channels, depths 2-2-8-2, ssm ratio 1 (30.25 M)."""
    arch = dict(_V2, dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), expand=1.0)
    return _register("vmamba_tiny_s1l8_224", pretrained, arch, kwargs)


@register_model
def vmamba_small_s1l20_224(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-S[s1l20] (v2): 96-768 channels, depths 2-2-20-2, ssm ratio 1 (49.01 M)."""
    arch = dict(_V2, dims=(96, 192, 384, 768), depths=(2, 2, 20, 2), expand=1.0)
    return _register("vmamba_small_s1l20_224", pretrained, arch, kwargs)


@register_model
def vmamba_base_s1l20_224(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-B[s1l20] (v2): 128-1024 channels, depths 2-2-20-2, ssm ratio 1 (86.61 M)."""
    arch = dict(_V2, dims=(128, 256, 512, 1024), depths=(2, 2, 20, 2), expand=1.0)
    return _register("vmamba_base_s1l20_224", pretrained, arch, kwargs)
