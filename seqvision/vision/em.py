"""EM (electron-microscopy) Mamba encoder and affinity segmenter, after TokenUnify's "EMmamba".

TokenUnify (Chen et al., arXiv 2405.16847; code ydchen0806/TokenUnify, ``src/segmamba.py``)
pretrains a SegMamba-style encoder on EM volumes (B, 1, Z, Y, X) and fine-tunes it with a
UNETR-style decoder that predicts nearest-neighbour affinities (z, y, x) for neuron segmentation.

Encoder (``EMMambaEncoder``), for a 16 x 160 x 160 crop:

    stem      Conv3d k(1, 7, 7), stride 2                              -> 32 x  8 x 80 x 80
    stage i   [i > 0: InstanceNorm + Conv3d k(1, 2, 2), stride 2]      -> 64 x  4 x 40 x 40, ...
              residual conv block (SegMamba's GSC: two 3x3x3 convs in sequence and a parallel
              1x1x1 conv, summed, then a 1x1x1 conv; each conv -> InstanceNorm -> ReLU; + input)
              ``depth`` Mamba layers: LayerNorm -> Mamba with three scans (+ residual, see below)
    skip i    InstanceNorm + 1x1x1 MLP (C -> 2C -> C, GELU)            -> the decoder's input i

The z stride. The reference text says "Conv3d (1, 2, 2) s2" and also that z is halved at every level
(8 -> 4 -> 2 -> 1 slices). The authors' code has both: kernel (1, 2, 2) (and (1, 7, 7) in the stem)
with stride 2 on ALL axes, so z is subsampled without being mixed (each output slice comes from one
input slice). That is what is built here; it reproduces the stated sizes and sequence lengths
(51200 / 6400 / 800 / 100 tokens). Inputs must therefore be divisible by 16 on every axis.

The three scans. Each Mamba layer scans the volume three times with separate conv / x_proj /
dt_proj / A / D parameters and shared in/out projections, and sums the results: raster order (z
slowest), its reverse, and an inter-slice route that cuts the raster sequence into n equal chunks
and interleaves them. By default (``inter_slice_chunks=None``) n is the stage's real slice count Z,
so the route visits the Z slices of one (y, x) column one after another. The authors' code uses its
Mamba's default ``nslices = 5`` whatever Z is (the stages have 8, 4, 2, 1 slices), which visits
tokens L / 5 apart; ``inter_slice_chunks=5`` reproduces it (every stage's length must then be
divisible by 5, as 16 x 160 x 160 crops are).

The residual. In the authors' encoder a Mamba layer returns mamba(norm(x)) with no residual (the
SegMamba code they started from adds one). Here ``mamba_residual=True`` (the default) adds it,
x + mamba(norm(x)): without it every layer replaces its input, so the conv block's features reach
the skip heads and the next stage only through the Mamba layers as initialised, and every gradient
to the stem and the conv blocks passes through them; the residual keeps the identity path that a
pre-norm stack is designed around (and lets ``drop_path`` work). ``mamba_residual=False``
reproduces the authors' layer. Parameter counts are the same either way.

The authors' weights (``TOKENUNIFY_LAYER`` = ``mamba_residual=False, inter_slice_chunks=5``: their
layers compute that, whatever the weights). ``checkpoint_filter_fn`` converts the authors' files
(their ``SegMamba`` state dict: the encoder under ``vit.``, MONAI's UNETR blocks ``encoder1-5``,
``decoder5-1``, ``out``; or their bare ``MambaEncoder``) to this layout: the three routes' twins
(``conv1d``/``_b``/``_s``, ``x_proj``, ``dt_proj``, ``A_log``/``A_b_log``/``A_s_log``, ``D``) stacked in
the route order raster, reversed, inter-slice, and the decoder renamed (it is the same function:
MONAI's ``UnetrBasicBlock`` / ``UnetrUpBlock`` / ``UnetOutBlock`` with residual blocks). Their widths
and depths differ per file: ``em_architecture`` reads them from a state dict, and
``convert_checkpoint`` / ``create_em_segmenter(pretrained=...)`` size the model from it. Tags: the
pretrained (not fine-tuned) encoders from the Hub's ``Pretrained_weights/`` are timm tags
(``emmamba_small.tokenunify_pretrained_100m``, ...; ``timm.list_pretrained("emmamba_*")``); the
fine-tuned segmenters are ``EM_SEGMENTER_WEIGHTS`` tags for ``create_em_segmenter``
(``"emmamba_small.tokenunify_100m"``, ...).

Decoder (``EMSegMamba``, MONAI's UNETR blocks rebuilt in PyTorch): a residual conv block per
resolution (the input volume itself and skips 0-2, then skip 3 -> ``hidden_size``), four up blocks
(ConvTranspose3d k2 s2, concatenate the skip, residual block), a final residual block and a 1x1x1
conv to 3 channels, sigmoid = affinities. Conv kernels (1, 5, 5), bias-free convs, InstanceNorm
without affine parameters, LeakyReLU(0.01), as in the authors' ``SegMamba``.

Parameter counts (measured; TokenUnify's table gives encoder + decoder):

=================  =====================  ==========  ======  =================  ===========
encoder            widths                 encoder     hidden  encoder + decoder  TokenUnify
=================  =====================  ==========  ======  =================  ===========
``emmamba_base``   32, 64, 128, 256          6.89 M      512        28.30 M         28.3 M
``emmamba_small``  64, 128, 256, 512        26.93 M     1024       112.53 M        112.5 M
``emmamba_mid``    96, 192, 384, 768        60.10 M     1024       206.58 M        206.6 M
``emmamba_large``  144, 288, 576, 1104     126.39 M     2048       506.57 M        506.6 M
``emmamba_huge``   192, 384, 768, 1536     238.45 M     3072      1008.91 M       1008.9 M *
=================  =====================  ==========  ======  =================  ===========

The decoder widths (``hidden_size``) are the ones that reproduce the paper's counts exactly.
(*) The huge size is not in the paper's table: its count is the one stated beside
``segmamba_huge_model`` in the authors' ``src/models_mamba.py`` (their "1B" release).
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from seqvision.utils.checks import check_positive_int, state_mismatch

from .base import default_cfg, select_levels
from .mamba import MambaBlock, MambaStagesMixin, mamba_no_weight_decay
from .weights import first_mismatch, read_checkpoint, register_converter, unwrap_state_dict

__all__ = [
    "EM_ENCODERS",
    "EM_INPUT_SIZE",
    "EM_SEGMENTER_WEIGHTS",
    "TOKENUNIFY_LAYER",
    "EMMambaEncoder",
    "EMMambaStage",
    "EMSegMamba",
    "ResidualConvBlock",
    "SkipHead",
    "UnetResBlock",
    "UnetUpBlock",
    "checkpoint_filter_fn",
    "create_em_segmenter",
    "em_architecture",
    "list_em_segmenters",
    "load_encoder_weights",
]

# Default input (C, Z, Y, X): TokenUnify's 16 x 160 x 160 crops of one-channel volumes.
EM_INPUT_SIZE = (1, 16, 160, 160)

# Registered encoders -> the decoder width that reproduces TokenUnify's parameter counts.
EM_ENCODERS: dict[str, int] = {
    "emmamba_base": 512,
    "emmamba_small": 1024,
    "emmamba_mid": 1024,
    "emmamba_large": 2048,
    "emmamba_huge": 3072,
}

# What the TokenUnify authors' Mamba layers compute, which their weights cannot say: no residual
# around the mixer, and the inter-slice route cut into their Mamba's default nslices = 5 chunks.
TOKENUNIFY_LAYER: dict[str, Any] = {"mamba_residual": False, "inter_slice_chunks": 5}


def check_volume(x: object, in_chans: int, multiple: int) -> None:
    """Clear errors for an EM batch: x (B, in_chans, Z, Y, X), every size divisible by ``multiple``
    (the total reduction) and, for the InstanceNorms, more than one voxel left after it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"x must be a volume batch (B, C, Z, Y, X), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"x must have {in_chans} channels (in_chans), got {x.shape[1]} in {tuple(x.shape)}")
    if any(s % multiple for s in x.shape[2:]):
        raise ValueError(
            f"x must have Z, Y, X divisible by {multiple} (each stage halves every axis), "
            f"got {tuple(x.shape[2:])}"
        )
    if math.prod(x.shape[2:]) == multiple**3:
        raise ValueError(
            f"x must be larger than {multiple} on some axis: the last stage's InstanceNorm needs more "
            f"than one voxel, got {tuple(x.shape[2:])}"
        )


# ----------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------


def _conv_norm_relu(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2),
        nn.InstanceNorm3d(channels),
        nn.ReLU(),
    )


class ResidualConvBlock(nn.Module):
    """SegMamba's gated spatial convolution (GSC) block. x (B, C, Z, Y, X) -> same shape.

    x + f(g(h(x)) + k(x)) with h, g 3x3x3 and k, f 1x1x1 conv -> InstanceNorm -> ReLU.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_norm_relu(channels, 3)
        self.conv2 = _conv_norm_relu(channels, 3)
        self.conv3 = _conv_norm_relu(channels, 1)
        self.conv4 = _conv_norm_relu(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv4(self.conv2(self.conv1(x)) + self.conv3(x))


class SkipHead(nn.Module):
    """A stage's output to the decoder: InstanceNorm, then a 1x1x1 MLP C -> 2C -> C. (B, C, *grid) kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels)
        self.fc1 = nn.Conv3d(channels, 2 * channels, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class EMMambaStage(nn.Module):
    """[Downsample,] residual conv block, ``depth`` tri-scan Mamba layers.

    x (B, C_in, Z, Y, X) -> (B, C, Z', Y', X'), halved on every axis when ``downsample``.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        drop_path: Sequence[float],
        mamba_residual: bool = True,
        **mixer_kwargs,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = (
            # Kernel 1 along z with stride 2: z is subsampled, not mixed (see the module docstring).
            nn.Sequential(nn.InstanceNorm3d(in_dim), nn.Conv3d(in_dim, dim, (1, 2, 2), stride=2))
            if downsample
            else nn.Identity()
        )
        self.conv_block = ResidualConvBlock(dim)
        self.blocks = nn.Sequential(
            *[
                MambaBlock(
                    dim, nn.LayerNorm, drop_path[i], mamba_residual, scan_directions="tri", **mixer_kwargs
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_block(self.downsample(x))
        if len(self.blocks) == 0:
            return x
        batch, channels, *grid = x.shape
        grid = tuple(grid)
        tokens = x.flatten(2).transpose(1, 2)  # (B, L, C), raster order, z slowest
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                tokens = checkpoint(block, tokens, grid, use_reentrant=False)
            else:
                tokens = block(tokens, grid)
        return tokens.transpose(1, 2).reshape(batch, channels, *grid)


class EMMambaEncoder(MambaStagesMixin, nn.Module):
    """TokenUnify's EM encoder with timm's model interface.

    Input (B, in_chans, Z, Y, X), every size divisible by 16. ``forward_intermediates`` returns the
    4 skip outputs (B, dims[i], Z / 2^(i+1), Y / 2^(i+1), X / 2^(i+1)), ``forward_features`` the last
    one, and ``forward`` pools it and applies the classifier (none by default: ``num_classes=0``
    returns the pooled features (B, dims[-1])).

    ``mamba_residual`` and ``inter_slice_chunks`` choose the Mamba layer (module docstring);
    ``TOKENUNIFY_LAYER`` is the authors' choice, which their weights need.
    """

    global_pools = ("avg", "")
    _no_split_modules = ("EMMambaStage",)  # FSDP auto-wrap unit (Accelerate reads this)

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 0,
        global_pool: str = "avg",
        dims: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        version: int = 1,
        head_dim: int = 64,
        mamba_residual: bool = True,
        inter_slice_chunks: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        scan_form: str = "chunk",
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths) or not dims:
            raise ValueError(
                f"dims and depths must have one entry per stage, got dims={dims} and depths={depths}"
            )
        for i, depth in enumerate(depths):
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
                raise ValueError(f"depths must be non-negative ints, got {depths!r} (entry {i})")
        for dim in dims:
            check_positive_int("dims entry", dim)
        if global_pool not in self.global_pools:
            raise ValueError(f"global_pool must be one of {self.global_pools}, got {global_pool!r}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.dims = tuple(dims)
        self.depths = tuple(depths)
        self.mamba_residual = mamba_residual
        self.inter_slice_chunks = inter_slice_chunks
        self.num_features = self.head_hidden_size = dims[-1]
        self.reduction = 2 ** len(dims)  # the stem and every later stage halve each axis

        self.stem = nn.Conv3d(in_chans, dims[0], (1, 7, 7), stride=2, padding=(0, 3, 3))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        mixer = dict(
            d_state=d_state, d_conv=d_conv, expand=expand, version=version, head_dim=head_dim,
            inter_slice_chunks=inter_slice_chunks,
        )  # fmt: skip
        self.stages = nn.Sequential(
            *[
                EMMambaStage(
                    dims[max(i - 1, 0)], dims[i], depths[i], i > 0, rates[i].tolist(), mamba_residual, **mixer
                )
                for i in range(len(dims))
            ]
        )
        self.skip_heads = nn.ModuleList([SkipHead(dim) for dim in dims])
        self.feature_info = [
            dict(num_chs=dims[i], reduction=2 ** (i + 1), module=f"skip_heads.{i}") for i in range(len(dims))
        ]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.set_scan_form(scan_form, chunk_size)

    # ------------------------------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=[(r"^(?:stages|skip_heads)\.(\d+)", None)])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in self.global_pools:
                raise ValueError(f"global_pool must be one of {self.global_pools}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):
            check_volume(x, self.in_chans, self.reduction)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Skip outputs of the stages in ``indices``, channels first (B, C_i, Z_i, Y_i, X_i).

        They are normalised by their skip heads already, so ``norm`` changes nothing; 'NCHW' (timm's
        name for channels first) is the only ``output_fmt``. Returns the list, or
        ``(last skip output, list)`` unless ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (channels first), got {output_fmt!r}")
        take_indices, max_index = select_levels(len(self.stages), indices)
        x = self.stem(self._check(x))
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.skip_heads[i](x))
        if intermediates_only:
            return intermediates
        last = len(stages) - 1
        final = intermediates[-1] if last in take_indices else self.skip_heads[last](x)
        return final, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and skip heads) after the last of ``indices``; returns the indices."""
        take_indices, max_index = select_levels(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.skip_heads = self.skip_heads[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, Z, Y, X) -> the last skip output (B, dims[-1], Z/16, Y/16, X/16)."""
        x = self.stages(self.stem(self._check(x)))
        return self.skip_heads[len(self.stages) - 1](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3, 4))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# decoder and segmenter
# ----------------------------------------------------------------------------------------------


class UnetResBlock(nn.Module):
    """MONAI's UnetResBlock: two bias-free convs with InstanceNorm and LeakyReLU(0.01), and a 1x1x1
    projection of the input when the width changes. (B, C_in, *grid) -> (B, C_out, *grid)."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: Sequence[int]) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.conv1 = nn.Conv3d(in_chans, out_chans, kernel_size, padding=padding, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_chans)
        self.conv2 = nn.Conv3d(out_chans, out_chans, kernel_size, padding=padding, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_chans)
        self.act = nn.LeakyReLU(0.01)
        if in_chans != out_chans:
            self.conv3 = nn.Conv3d(in_chans, out_chans, 1, bias=False)
            self.norm3 = nn.InstanceNorm3d(out_chans)
        else:
            self.conv3 = self.norm3 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        residual = x if self.conv3 is None else self.norm3(self.conv3(x))
        return self.act(out + residual)


class UnetUpBlock(nn.Module):
    """MONAI's UnetrUpBlock: ConvTranspose3d k2 s2 (bias-free), concatenate the skip, UnetResBlock.

    x (B, C_in, Z, Y, X), skip (B, C_out, 2Z, 2Y, 2X) -> (B, C_out, 2Z, 2Y, 2X).
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: Sequence[int]) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_chans, out_chans, 2, stride=2, bias=False)
        self.conv_block = UnetResBlock(2 * out_chans, out_chans, kernel_size)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.up(x), skip), dim=1))


class EMSegMamba(nn.Module):
    """EM encoder + UNETR-style decoder -> affinities. x (B, in_chans, Z, Y, X) -> (B, out_chans, Z, Y, X).

    ``forward`` returns sigmoid affinities in (0, 1) (channels z, y, x for ``out_chans=3``);
    ``forward_logits`` the values before the sigmoid.
    """

    _no_split_modules = ("EMMambaStage",)  # FSDP auto-wrap unit (Accelerate reads this)

    def __init__(
        self,
        encoder: EMMambaEncoder,
        out_chans: int = 3,
        hidden_size: int = 512,
        kernel_size: Sequence[int] = (1, 5, 5),
    ) -> None:
        super().__init__()
        if not isinstance(encoder, EMMambaEncoder):
            raise TypeError(f"encoder must be an EMMambaEncoder, got {type(encoder).__name__}")
        if len(encoder.dims) != 4 or len(encoder.stages) != 4:
            raise ValueError(f"encoder must have 4 stages for this decoder, got dims={encoder.dims}")
        check_positive_int("out_chans", out_chans)
        check_positive_int("hidden_size", hidden_size)
        kernel_size = tuple(kernel_size)
        if len(kernel_size) != 3 or any(isinstance(k, bool) or k < 1 or k % 2 == 0 for k in kernel_size):
            raise ValueError(f"kernel_size must be 3 odd positive ints (z, y, x), got {kernel_size!r}")
        self.encoder = encoder
        self.out_chans = out_chans
        self.hidden_size = hidden_size
        d = encoder.dims
        # One block on the input volume itself, one per skip; the deepest widens to hidden_size.
        widths = [(encoder.in_chans, d[0]), (d[0], d[1]), (d[1], d[2]), (d[2], d[3]), (d[3], hidden_size)]
        self.skip_blocks = nn.ModuleList([UnetResBlock(i, o, kernel_size) for i, o in widths])
        ups = [(hidden_size, d[3]), (d[3], d[2]), (d[2], d[1]), (d[1], d[0])]
        self.up_blocks = nn.ModuleList([UnetUpBlock(i, o, kernel_size) for i, o in ups])
        self.final_block = UnetResBlock(d[0], d[0], kernel_size)
        self.head = nn.Conv3d(d[0], out_chans, 1)

    def set_scan_form(self, form: str, chunk_size: int | None = None) -> None:
        """Run every scan mixer of the encoder in ``form``; outputs do not change."""
        self.encoder.set_scan_form(form, chunk_size)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return mamba_no_weight_decay(self)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, Z, Y, X) -> affinity logits (B, out_chans, Z, Y, X)."""
        skips = self.encoder.forward_intermediates(x, intermediates_only=True)  # 4 levels, deepest last
        features = [x, *skips]
        encoded = [block(f) for block, f in zip(self.skip_blocks, features, strict=True)]
        y = encoded[-1]
        for up, skip in zip(self.up_blocks, reversed(encoded[:-1]), strict=True):
            y = up(y, skip)
        return self.head(self.final_block(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(x))


# ----------------------------------------------------------------------------------------------
# weights: seqvision's and the TokenUnify authors' layouts
# ----------------------------------------------------------------------------------------------

# The arguments of create_em_segmenter that describe the decoder (the rest go to the encoder).
_DECODER_ARGS = ("hidden_size", "out_chans", "kernel_size")

# The authors' encoder names (relative to 'vit.') -> seqvision's, for everything but the route twins.
_TOKENUNIFY_RENAMES = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"downsample_layers\.0\.0\.(weight|bias)", r"stem.\1"),
        (r"downsample_layers\.(\d+)\.1\.(weight|bias)", r"stages.\1.downsample.1.\2"),
        # SegMamba's GSC: proj, proj2 (3x3x3, in sequence), proj3 (1x1x1, parallel), proj4 (1x1x1)
        (r"gscs\.(\d+)\.proj\.(weight|bias)", r"stages.\1.conv_block.conv1.0.\2"),
        (r"gscs\.(\d+)\.proj2\.(weight|bias)", r"stages.\1.conv_block.conv2.0.\2"),
        (r"gscs\.(\d+)\.proj3\.(weight|bias)", r"stages.\1.conv_block.conv3.0.\2"),
        (r"gscs\.(\d+)\.proj4\.(weight|bias)", r"stages.\1.conv_block.conv4.0.\2"),
        (r"stages\.(\d+)\.(\d+)\.norm\.(weight|bias)", r"stages.\1.blocks.\2.norm.\3"),
        (
            r"stages\.(\d+)\.(\d+)\.mamba\.(in_proj|out_proj)\.(weight|bias)",
            r"stages.\1.blocks.\2.mixer.\3.\4",
        ),
        (r"mlps\.(\d+)\.(fc[12])\.(weight|bias)", r"skip_heads.\1.\2.\3"),
    )
)

# Each mixer parameter stacked over the routes <- the authors' three twins, in seqvision's route
# order: raster, reversed ('_b'), inter-slice ('_s'). The convs are concatenated on the channel axis.
_ROUTE_TWINS: dict[str, tuple[str, str, str]] = {
    "conv.weight": ("conv1d.weight", "conv1d_b.weight", "conv1d_s.weight"),
    "conv.bias": ("conv1d.bias", "conv1d_b.bias", "conv1d_s.bias"),
    "x_proj_weight": ("x_proj.weight", "x_proj_b.weight", "x_proj_s.weight"),
    "dt_proj_weight": ("dt_proj.weight", "dt_proj_b.weight", "dt_proj_s.weight"),
    "dt_proj_bias": ("dt_proj.bias", "dt_proj_b.bias", "dt_proj_s.bias"),
    "A_log": ("A_log", "A_b_log", "A_s_log"),
    "D": ("D", "D_b", "D_s"),
}
_TWIN_OF = {
    twin: (target, route) for target, twins in _ROUTE_TWINS.items() for route, twin in enumerate(twins)
}
_TOKENUNIFY_MAMBA = re.compile(r"stages\.(\d+)\.(\d+)\.mamba\.(.+)")


def _unetr_rename(match: re.Match, template: str, offset: int | None = None) -> str:
    """MONAI's numbering -> seqvision's: encoderK -> skip_blocks.(K - 1), decoderK -> up_blocks.(5 - K)."""
    index = int(match[1]) - 1 if offset is None else offset - int(match[1])
    return template.format(index, *match.groups()[1:])


# MONAI's UNETR blocks as the authors' SegMamba names them -> EMSegMamba's names.
_UNETR_RENAMES: tuple[tuple[re.Pattern, Callable[[re.Match], str]], ...] = tuple(
    (re.compile(pattern), rename)
    for pattern, rename in (
        (
            r"encoder([1-5])\.layer\.(conv[123])\.conv\.weight",
            lambda m: _unetr_rename(m, "skip_blocks.{}.{}.weight"),
        ),
        (
            r"decoder([2-5])\.transp_conv\.conv\.weight",
            lambda m: _unetr_rename(m, "up_blocks.{}.up.weight", 5),
        ),
        (
            r"decoder([2-5])\.conv_block\.(conv[123])\.conv\.weight",
            lambda m: _unetr_rename(m, "up_blocks.{}.conv_block.{}.weight", 5),
        ),
        (r"decoder1\.layer\.(conv[123])\.conv\.weight", lambda m: f"final_block.{m[1]}.weight"),
        (r"out\.conv\.conv\.(weight|bias)", lambda m: f"head.{m[1]}"),
    )
)

# Where each layout keeps what em_architecture reads; {i} a stage, {j} a layer. The encoder's keys
# carry the layout's prefix, the decoder's do not.
_LAYOUT_KEYS: dict[str, dict[str, str]] = {
    "tokenunify": dict(
        stem="downsample_layers.0.0.weight", conv="gscs.{i}.proj.weight", norm="stages.{i}.{j}.norm.weight",
        mixer="stages.{i}.{j}.mamba.", conv1d="conv1d.weight", hidden="encoder5.layer.conv1.conv.weight",
        out="out.conv.conv.weight",
    ),
    "seqvision": dict(
        stem="stem.weight", conv="stages.{i}.conv_block.conv1.0.weight",
        norm="stages.{i}.blocks.{j}.norm.weight",
        mixer="stages.{i}.blocks.{j}.mixer.", conv1d="conv.weight", hidden="skip_blocks.4.conv1.weight",
        out="head.weight",
    ),
}  # fmt: skip


def _layout(state: Mapping[str, Any]) -> tuple[str, str]:
    """(layout, encoder key prefix) of an unwrapped EM state dict; ValueError when it is neither."""
    for layout, prefix in (
        ("tokenunify", "vit."),
        ("tokenunify", ""),
        ("seqvision", "encoder."),
        ("seqvision", ""),
    ):
        if prefix + _LAYOUT_KEYS[layout]["stem"] in state:
            return layout, prefix
    raise ValueError(
        "state_dict must be an EM encoder or segmenter checkpoint (the TokenUnify authors' or seqvision's): "
        "found none of the stem keys 'vit.downsample_layers.0.0.weight', 'downsample_layers.0.0.weight', "
        f"'encoder.stem.weight', 'stem.weight' among {len(state)} keys"
    )


def _shape(state: Mapping[str, Any], key: str) -> torch.Size:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"the EM checkpoint lacks {key!r} (or it is not a tensor), which its other keys imply"
        )
    return value.shape


def em_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture an EM checkpoint holds, as keyword arguments of ``create_em_segmenter`` (all of
    them) or of the ``emmamba_*`` encoders (all but ``hidden_size``, ``out_chans``, ``kernel_size``).

    Reads the TokenUnify authors' layout (their ``SegMamba``, encoder under ``vit.``, or their bare
    ``MambaEncoder``) and seqvision's (``EMSegMamba``, encoder under ``encoder.``, or an
    ``EMMambaEncoder``); training wrappers ('model', 'state_dict', 'module.') are unwrapped. Returns

    * ``dims``, ``depths``, ``in_chans``: from each stage's conv block and its Mamba layers' norms;
    * ``d_state``, ``d_conv``, ``expand`` from the first Mamba layer (when a stage has one), and
      ``version=2``, ``head_dim`` for seqvision's Mamba-2 layers;
    * for the authors' layout ``TOKENUNIFY_LAYER`` (``mamba_residual=False``, ``inter_slice_chunks=5``):
      what their code computes, which the weights cannot tell;
    * ``num_classes`` for a seqvision encoder with a classifier;
    * ``hidden_size``, ``out_chans``, ``kernel_size`` when the checkpoint holds the decoder.

    Raises ValueError for a state dict of neither layout.
    """
    state = unwrap_state_dict(state_dict)
    layout, prefix = _layout(state)
    keys = _LAYOUT_KEYS[layout]
    dims, depths = [], []
    while (conv := state.get(prefix + keys["conv"].format(i=len(dims)))) is not None:
        i = len(dims)
        dims.append(conv.shape[0])
        depths.append(0)
        while prefix + keys["norm"].format(i=i, j=depths[i]) in state:
            depths[i] += 1
    arch: dict[str, Any] = dict(
        dims=tuple(dims), depths=tuple(depths), in_chans=_shape(state, prefix + keys["stem"])[1]
    )
    if any(depths):
        stage = next(i for i, depth in enumerate(depths) if depth)
        mixer = prefix + keys["mixer"].format(i=stage, j=0)
        in_proj = _shape(state, mixer + "in_proj.weight")  # (2E, dim)
        inner, dim = in_proj[0] // 2, in_proj[1]
        expand = inner / dim
        arch.update(
            d_conv=_shape(state, mixer + keys["conv1d"])[-1],
            expand=int(expand) if expand.is_integer() else expand,
        )
        A_log = _shape(state, mixer + "A_log")
        if layout == "tokenunify" or len(A_log) == 3:  # theirs (E, N), seqvision's Mamba-1 (K, E, N)
            arch["d_state"] = A_log[-1]
        else:  # (K, H): Mamba-2, N read off x_proj (K, R + 2N, E) with R from dt_proj (K, H, R)
            rank = _shape(state, mixer + "dt_proj_weight")[-1]
            arch.update(
                d_state=(_shape(state, mixer + "x_proj_weight")[1] - rank) // 2,
                version=2,
                head_dim=inner // A_log[1],
            )
    if layout == "tokenunify":
        arch.update(TOKENUNIFY_LAYER)
    hidden = state.get(keys["hidden"])
    if hidden is not None:
        arch.update(
            hidden_size=hidden.shape[0],
            out_chans=_shape(state, keys["out"])[0],
            kernel_size=tuple(hidden.shape[2:]),
        )
    elif layout == "seqvision" and "head.weight" in state:
        arch["num_classes"] = state["head.weight"].shape[0]
    return arch


def _check_tokenunify_model(state: Mapping[str, Any], encoder: EMMambaEncoder) -> None:
    """The authors' weights need their widths, depths and layer; say what to build otherwise."""
    arch = em_architecture(state)
    wanted = dict(dims=arch["dims"], depths=arch["depths"], **TOKENUNIFY_LAYER)
    built = dict(
        dims=encoder.dims,
        depths=encoder.depths,
        mamba_residual=encoder.mamba_residual,
        inter_slice_chunks=encoder.inter_slice_chunks,
    )
    if wanted != built:
        text = ", ".join(f"{k}={v!r}" for k, v in wanted.items())
        raise ValueError(
            f"the checkpoint holds the TokenUnify authors' encoder ({text}), the model was built with "
            f"{', '.join(f'{k}={v!r}' for k, v in built.items())}: build it with those keyword arguments "
            "(a published tag sets the layer's), or size it from the file with convert_checkpoint(path, "
            "name) or create_em_segmenter(name, pretrained=path)"
        )


def _convert_tokenunify_encoder(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The authors' encoder keys under ``prefix`` -> an EMMambaEncoder state dict. Unknown keys are kept
    as they are (the strict check names them); an incomplete set of route twins is a ValueError."""
    out: dict[str, Any] = {}
    twins: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        for pattern, replacement in _TOKENUNIFY_RENAMES:
            if match := pattern.fullmatch(name):
                out[match.expand(replacement)] = value
                break
        else:
            match = _TOKENUNIFY_MAMBA.fullmatch(name)
            if match and match[3] in _TWIN_OF:
                target, route = _TWIN_OF[match[3]]
                twins.setdefault((match[1], match[2], target), {})[route] = value
            else:
                out[name] = value
    for (stage, layer, target), routes in twins.items():
        names = [f"{prefix}stages.{stage}.{layer}.mamba.{twin}" for twin in _ROUTE_TWINS[target]]
        missing = [name for route, name in enumerate(names) if route not in routes]
        if missing:
            raise ValueError(
                f"the TokenUnify checkpoint lacks {missing[0]!r}: the layer's three routes (raster, "
                f"reversed, inter-slice) are stacked into one tensor, and its twins {names} must all be there"
            )
        shapes = [tuple(routes[route].shape) for route in range(3)]
        for name, shape in zip(names[1:], shapes[1:], strict=True):
            if shape != shapes[0]:
                raise ValueError(
                    f"the TokenUnify checkpoint's {name!r} has shape {shape}, its twin {names[0]!r} "
                    f"{shapes[0]}"
                )
        tensors = [routes[route] for route in range(3)]
        key = f"stages.{stage}.blocks.{layer}.mixer.{target}"
        out[key] = torch.cat(tensors) if target.startswith("conv.") else torch.stack(tensors)
    return out


def _convert_unetr_decoder(state: Mapping[str, Any]) -> dict[str, Any]:
    """The authors' decoder keys (MONAI's names) -> EMSegMamba's; unknown keys are kept as they are."""
    out = {}
    for key, value in state.items():
        for pattern, rename in _UNETR_RENAMES:
            if match := pattern.fullmatch(key):
                out[rename(match)] = value
                break
        else:
            out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: EMMambaEncoder | EMSegMamba) -> dict[str, Any]:
    """Adapt a checkpoint to ``model``: an encoder (timm's loader calls this), or a whole segmenter.

    Unwraps training checkpoints ('model', 'state_dict', 'module', a 'module.' prefix). The TokenUnify
    authors' layout is converted (module docstring) after checking that ``model`` has the file's
    widths and depths and computes their layer (``TOKENUNIFY_LAYER``; a ValueError says what to build
    otherwise); an encoder takes the encoder of their whole segmenter's file. seqvision's layout is
    kept. Finally the stem's input channels are summed or repeated when ``in_chans`` differs (timm's
    adaptation handles 2-D stems only).
    """
    state = unwrap_state_dict(state_dict)
    segmenter = isinstance(model, EMSegMamba)
    encoder = model.encoder if segmenter else model
    prefix = "encoder." if segmenter else ""
    layout, authors_prefix = _layout(state)
    if layout == "tokenunify":
        _check_tokenunify_model(state, encoder)
        converted = {prefix + k: v for k, v in _convert_tokenunify_encoder(state, authors_prefix).items()}
        if segmenter and authors_prefix:
            converted.update(
                _convert_unetr_decoder({k: v for k, v in state.items() if not k.startswith(authors_prefix)})
            )
        state = converted
    weight = state.get(prefix + "stem.weight")
    if isinstance(weight, torch.Tensor) and weight.dim() == 5 and weight.shape[1] != encoder.in_chans:
        source = weight.shape[1]
        if encoder.in_chans == 1:
            weight = weight.sum(dim=1, keepdim=True)
        else:
            repeats = -(-encoder.in_chans // source)
            weight = weight.repeat(1, repeats, 1, 1, 1)[:, : encoder.in_chans] * (source / encoder.in_chans)
        state[prefix + "stem.weight"] = weight
    return state


def load_encoder_weights(
    encoder: EMMambaEncoder, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> None:
    """Load pretrained encoder weights into ``encoder``, with a strict key check.

    ``source`` is a state dict or the path of one: ``.safetensors``, or a ``torch.save`` file (read
    without running code from it, ``read_checkpoint``). It goes through ``checkpoint_filter_fn``:
    training wrappers are unwrapped and the TokenUnify authors' layout is converted (the encoder of
    their whole segmenter's file; ``encoder`` must then have their widths, depths and layer). Classifier
    keys ('head.*') are dropped: the segmenter does not use a classifier. Any other missing or
    unexpected key, or a shape that differs, is a ValueError listing them.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_encoder must be an existing file, got {str(path)!r}")
        state = read_checkpoint(path)
    elif isinstance(source, Mapping):
        state = source
    else:
        raise TypeError(
            f"pretrained_encoder must be a path or a state dict (Mapping), got {type(source).__name__}"
        )
    state = checkpoint_filter_fn(state, encoder)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    problem = state_mismatch(state, expected, limit=8)
    if problem:
        raise ValueError(
            f"pretrained_encoder does not match this encoder ({len(encoder.dims)} stages, dims "
            f"{encoder.dims}): {problem}"
        )
    encoder.load_state_dict(state, strict=False)  # strictness checked above; the head is not loaded


# ----------------------------------------------------------------------------------------------
# published weights
# ----------------------------------------------------------------------------------------------

# The authors' releases (README, "Model Weights"): their names' sizes -> the encoder whose segmenter
# has that many parameters (the counts beside segmamba_*_model in their src/models_mamba.py: 112.53 M,
# 206.58 M, 506.57 M, 1008.91 M). The README names the models, not the files: the file names below
# add the '.pth' of their training checkpoints (util_mamba/misc.py save_model) and are unconfirmed.
_TOKENUNIFY_RELEASES = {
    "emmamba_small": "100M",
    "emmamba_mid": "200M",
    "emmamba_large": "500M",
    "emmamba_huge": "1B",
}
_TOKENUNIFY_HUB = "cyd0806/TokenUnify"
# Neither the repository nor its README states a license for the code or the weights (the README's
# usage notes restrict the EM data to non-commercial research; src/segmamba.py carries MONAI's
# Apache-2.0 header for the UNETR parts).
_TOKENUNIFY_LICENSE = "unknown"
_TOKENUNIFY_INPUT = (
    "input (B, 1, Z, Y, X) EM volume, grey values / 255 in [0, 1], trained on 16 x 160 x 160 (Z, Y, X) "
    "crops; every size divisible by 16 and each stage's length by 5"
)

# Fine-tuned segmenters: create_em_segmenter(tag, pretrained=True).
EM_SEGMENTER_WEIGHTS: dict[str, dict[str, Any]] = {
    f"{name}.tokenunify_{size.lower()}": dict(
        hf_hub_id=_TOKENUNIFY_HUB,
        hf_hub_filename=f"TokenUnify-{size}.pth",
        license=_TOKENUNIFY_LICENSE,
        description=(
            f"TokenUnify-{size}: the authors' fine-tuned affinity segmenter (their SegMamba: this encoder "
            f"and the UNETR decoder, 3 affinities); {_TOKENUNIFY_INPUT}"
        ),
        model_args=dict(TOKENUNIFY_LAYER),
    )
    for name, size in _TOKENUNIFY_RELEASES.items()
}


def list_em_segmenters(pattern: str = "*") -> list[str]:
    """The published segmenters' tags (``EM_SEGMENTER_WEIGHTS``) matching the fnmatch ``pattern``."""
    return sorted(name for name in EM_SEGMENTER_WEIGHTS if fnmatch.fnmatchcase(name, pattern))


def _segmenter_file(encoder_name: str, pretrained: bool | str | os.PathLike) -> Path:
    if pretrained is True:
        weights = EM_SEGMENTER_WEIGHTS[encoder_name]
        return Path(hf_hub_download(weights["hf_hub_id"], weights["hf_hub_filename"]))
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained must be True or an existing file, got {str(path)!r}")
    return path


def create_em_segmenter(
    encoder_name: str,
    pretrained_encoder: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    *,
    pretrained: bool | str | os.PathLike = False,
    out_chans: int | None = None,
    hidden_size: int | None = None,
    kernel_size: Sequence[int] | None = None,
    **encoder_kwargs,
) -> EMSegMamba:
    """Build the affinity segmenter on a registered EM encoder, optionally with weights.

    Examples::

        create_em_segmenter("emmamba_base")                                    # random
        create_em_segmenter("emmamba_small", "encoder.safetensors")            # pretrained encoder
        create_em_segmenter("emmamba_small.tokenunify_100m", pretrained=True)  # the authors' segmenter
        create_em_segmenter("emmamba_small", pretrained="checkpoint-400.pth")  # a local file

    Args:
        encoder_name: one of ``EM_ENCODERS`` ('emmamba_base', 'emmamba_small', 'emmamba_mid',
            'emmamba_large', 'emmamba_huge'), or a published segmenter's tag (``list_em_segmenters()``,
            e.g. 'emmamba_small.tokenunify_100m'), which also sets the layer its weights need
            (``TOKENUNIFY_LAYER``).
        pretrained_encoder: the encoder's weights from pretraining: a state dict or a .safetensors /
            torch.save file in seqvision's or the authors' layout (see ``load_encoder_weights``); the
            decoder starts random.
        pretrained: the whole segmenter's weights: True downloads the tag's file from the Hugging Face
            Hub; a path reads that file (the authors' SegMamba checkpoint, or an ``EMSegMamba`` state
            dict). The architecture is then read from the file (``em_architecture``: widths, depths,
            decoder width and kernel, output channels; the authors' layer for their layout); keyword
            arguments given here override it.
        out_chans: output channels: 3 affinities (z, y, x), or the ``pretrained`` file's.
        hidden_size: width of the deepest decoder block: the value that reproduces TokenUnify's
            parameter count for the encoder (``EM_ENCODERS``), or the ``pretrained`` file's.
        kernel_size: conv kernel of the decoder blocks: (1, 5, 5) as in the authors' code, or the
            ``pretrained`` file's.
        encoder_kwargs: passed to ``timm.create_model`` (e.g. ``depths``, ``scan_form``).

    Raises:
        ValueError: an unknown name or tag, ``pretrained=True`` without a tag, both ``pretrained`` and
            ``pretrained_encoder``, a file holding an encoder only, or weights that do not fit (the
            first such key is named). FileNotFoundError: a ``pretrained`` path that does not exist.
    """
    name, _, tag = encoder_name.partition(".")
    if name not in EM_ENCODERS:
        raise ValueError(
            f"encoder_name must be one of {tuple(EM_ENCODERS)} or a tag of one, got {encoder_name!r}"
        )
    if tag and encoder_name not in EM_SEGMENTER_WEIGHTS:
        raise ValueError(
            f"encoder_name's tag must be a published segmenter's {list_em_segmenters()}, got {encoder_name!r}"
        )
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be a bool or a path, got {type(pretrained).__name__}")
    if pretrained is True and not tag:
        raise ValueError(
            f"pretrained=True downloads a published segmenter: encoder_name must be its tag, one of "
            f"{list_em_segmenters()}, got {encoder_name!r} (or pass pretrained=<path>)"
        )
    if pretrained is not False and pretrained_encoder is not None:
        raise ValueError(
            "pass pretrained (the whole segmenter) or pretrained_encoder (its encoder), not both"
        )
    if tag:
        encoder_kwargs = {**EM_SEGMENTER_WEIGHTS[encoder_name]["model_args"], **encoder_kwargs}
    decoder: dict[str, Any] = dict(out_chans=out_chans, hidden_size=hidden_size, kernel_size=kernel_size)
    checkpoint = path = None
    if pretrained is not False:
        path = _segmenter_file(encoder_name, pretrained)
        checkpoint = read_checkpoint(path)
        arch = em_architecture(checkpoint)
        if "hidden_size" not in arch:
            raise ValueError(
                f"pretrained must hold a whole segmenter, {str(path)!r} holds an encoder only: pass it as "
                "pretrained_encoder (the decoder then starts random)"
            )
        decoder = {k: arch[k] if v is None else v for k, v in decoder.items()}
        encoder_kwargs = {**{k: v for k, v in arch.items() if k not in _DECODER_ARGS}, **encoder_kwargs}
    encoder = timm.create_model(name, num_classes=0, **encoder_kwargs)
    if pretrained_encoder is not None:
        load_encoder_weights(encoder, pretrained_encoder)
    segmenter = EMSegMamba(
        encoder,
        out_chans=3 if decoder["out_chans"] is None else decoder["out_chans"],
        hidden_size=EM_ENCODERS[name] if decoder["hidden_size"] is None else decoder["hidden_size"],
        kernel_size=(1, 5, 5) if decoder["kernel_size"] is None else decoder["kernel_size"],
    )
    if checkpoint is not None:
        state = checkpoint_filter_fn(checkpoint, segmenter)
        problem = first_mismatch(state, segmenter.state_dict())
        if problem:
            raise ValueError(f"pretrained {str(path)!r} does not fit the segmenter: {problem}")
        segmenter.load_state_dict(state)
    return segmenter


# ----------------------------------------------------------------------------------------------
# configs, registration
# ----------------------------------------------------------------------------------------------


def _create_emmamba(variant: str, pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    # A tag of the authors' weights also builds their layer (explicit keyword arguments win).
    tag = kwargs.get("pretrained_cfg")
    if isinstance(tag, str):
        for key, value in _TAG_MODEL_ARGS.get(f"{variant}.{tag}", {}).items():
            kwargs.setdefault(key, value)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        EMMambaEncoder,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _em_cfg(description: str = "", **kwargs) -> dict:
    # timm's cfg describes 2-D inputs (its builder asserts a 3-tuple input_size), so input_size is
    # one slice (C, Y, X) and the crop's depth is stated in the description; EM_INPUT_SIZE has all
    # four. Volumes are min-max scaled to [0, 1] (TokenUnify), so no further normalisation.
    return default_cfg(
        num_classes=0,
        input_size=(EM_INPUT_SIZE[0], *EM_INPUT_SIZE[2:]),
        pool_size=(1, 10, 10),
        crop_pct=1.0,
        mean=(0.0,),
        std=(1.0,),
        first_conv="stem",
        classifier="head",
        description=description
        or "EM volume encoder: input (B, 1, Z, Y, X), default crop 16 x 160 x 160 (Z, Y, X)",
        **kwargs,
    )


# The pretrained (not fine-tuned) encoders of the authors' Hub folder Pretrained_weights/: their whole
# pretraining model's file, whose 'vit.' encoder the filter takes.
_TOKENUNIFY_PRETRAINED = {
    f"{name}.tokenunify_pretrained_{size.lower()}": _em_cfg(
        description=(
            f"TokenUnify_pretrained-{size}: the authors' pretrained (not fine-tuned) EM encoder, with their "
            f"layer (no residual around the mixer, 5-chunk inter-slice route); {_TOKENUNIFY_INPUT}"
        ),
        hf_hub_id=_TOKENUNIFY_HUB,
        hf_hub_filename=f"Pretrained_weights/TokenUnify_pretrained-{size}.pth",
        license=_TOKENUNIFY_LICENSE,
    )
    for name, size in _TOKENUNIFY_RELEASES.items()
}
_TAG_MODEL_ARGS = {name: dict(TOKENUNIFY_LAYER) for name in _TOKENUNIFY_PRETRAINED}

# The untagged cfgs (no hosted weights: seqvision's own layer) stay the default: a name without a
# tag builds the same model as before, and the authors' weights are asked for by tag. (timm makes
# the first tag with weights the default unless a later '*' tag claims it, hence this order.)
default_cfgs = generate_default_cfgs(
    {**_TOKENUNIFY_PRETRAINED, **{f"{name}.*": _em_cfg() for name in EM_ENCODERS}}
)


_REGISTERED_DIMS: dict[str, tuple[int, ...]] = {
    "emmamba_base": (32, 64, 128, 256),
    "emmamba_small": (64, 128, 256, 512),
    "emmamba_mid": (96, 192, 384, 768),
    "emmamba_large": (144, 288, 576, 1104),
    "emmamba_huge": (192, 384, 768, 1536),
}


def _encoder_name_for(dims: Sequence[int]) -> str:
    """The registered encoder with these widths, else the base one (the file's widths apply anyway)."""
    return next((name for name, d in _REGISTERED_DIMS.items() if d == tuple(dims)), "emmamba_base")


def _build_encoder_from_file(name: str, raw: Mapping[str, Any], **kwargs) -> EMMambaEncoder:
    """convert_checkpoint's builder for 'emmamba_*': the encoder sized from the file."""
    arch = {k: v for k, v in em_architecture(raw).items() if k not in _DECODER_ARGS}
    return timm.create_model(name, **{**arch, **kwargs})


def _build_segmenter_from_file(name: str, raw: Mapping[str, Any], **kwargs) -> EMSegMamba:
    """convert_checkpoint's builder for 'em_segmenter': the segmenter sized from the file."""
    arch = em_architecture(raw)
    if "hidden_size" not in arch:
        raise ValueError(
            "em_segmenter converts a whole segmenter's checkpoint; this one holds an encoder only"
        )
    arch.pop("num_classes", None)
    return create_em_segmenter(_encoder_name_for(arch["dims"]), **{**arch, **kwargs})


register_converter("emmamba_*", checkpoint_filter_fn, build=_build_encoder_from_file)
register_converter("em_segmenter", checkpoint_filter_fn, build=_build_segmenter_from_file)


@register_model
def emmamba_base(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 32-64-128-256, depths 2-2-2-2 (6.89 M; 28.30 M with the decoder)."""
    arch = dict(dims=_REGISTERED_DIMS["emmamba_base"], depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_base", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def emmamba_small(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 64-128-256-512, depths 2-2-2-2 (26.93 M; 112.53 M with the decoder)."""
    arch = dict(dims=_REGISTERED_DIMS["emmamba_small"], depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_small", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def emmamba_mid(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 96-192-384-768, depths 2-2-2-2 (60.10 M; 206.58 M with the decoder)."""
    arch = dict(dims=_REGISTERED_DIMS["emmamba_mid"], depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_mid", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def emmamba_large(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 144-288-576-1104, depths 2-2-2-2 (126.39 M; 506.57 M with the decoder)."""
    arch = dict(dims=_REGISTERED_DIMS["emmamba_large"], depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_large", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def emmamba_huge(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 192-384-768-1536, depths 2-2-2-2 (238.45 M; 1008.91 M with the decoder)."""
    arch = dict(dims=_REGISTERED_DIMS["emmamba_huge"], depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_huge", pretrained=pretrained, **dict(arch, **kwargs))
