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
slowest), its reverse, and an inter-slice route that visits the Z slices of one (y, x) column one
after another. The authors' kernel cuts the sequence into a fixed ``nslices`` (default 5, while the
stages have 8, 4, 2, 1 slices); here the route is built from the real grid of every stage.

The residual. In the authors' encoder a Mamba layer returns mamba(norm(x)) with no residual (the
SegMamba code they started from adds one). Here ``mamba_residual=True`` (the default) adds it,
x + mamba(norm(x)): without it every layer replaces its input, so the conv block's features reach
the skip heads and the next stage only through the Mamba layers as initialised, and every gradient
to the stem and the conv blocks passes through them; the residual keeps the identity path that a
pre-norm stack is designed around (and lets ``drop_path`` work). ``mamba_residual=False``
reproduces the authors' layer. Parameter counts are the same either way.

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
=================  =====================  ==========  ======  =================  ===========

The decoder widths (``hidden_size``) are the ones that reproduce the paper's counts exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from seqvision.kernels._common import check_positive_int

from .base import default_cfg
from .layers.state import state_mismatch
from .mamba import MambaBlock, MambaStagesMixin, mamba_no_weight_decay

__all__ = [
    "EM_ENCODERS",
    "EM_INPUT_SIZE",
    "EMMambaEncoder",
    "EMMambaStage",
    "EMSegMamba",
    "ResidualConvBlock",
    "SkipHead",
    "UnetResBlock",
    "UnetUpBlock",
    "create_em_segmenter",
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
}


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
        self.num_features = self.head_hidden_size = dims[-1]
        self.reduction = 2 ** len(dims)  # the stem and every later stage halve each axis

        self.stem = nn.Conv3d(in_chans, dims[0], (1, 7, 7), stride=2, padding=(0, 3, 3))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand, version=version, head_dim=head_dim)
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
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
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
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
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


def load_encoder_weights(
    encoder: EMMambaEncoder, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> None:
    """Load pretrained encoder weights into ``encoder``, with a strict key check.

    ``source`` is a state dict or the path of one: ``.safetensors``, or a ``torch.save`` file (read
    with ``weights_only=True``). A {'model': ...} / {'state_dict': ...} wrapper is unwrapped, and
    classifier keys ('head.*') are dropped: the segmenter does not use a classifier. Any other
    missing or unexpected key, or a shape that differs, is a ValueError listing them.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_encoder must be an existing file, got {str(path)!r}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise TypeError(f"pretrained_encoder file must hold a state dict, got {type(state).__name__}")
    elif isinstance(source, Mapping):
        state = source
    else:
        raise TypeError(
            f"pretrained_encoder must be a path or a state dict (Mapping), got {type(source).__name__}"
        )
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    problem = state_mismatch(state, expected, limit=8)
    if problem:
        raise ValueError(
            f"pretrained_encoder does not match this encoder ({len(encoder.dims)} stages, dims "
            f"{encoder.dims}): {problem}"
        )
    encoder.load_state_dict(state, strict=False)  # strictness checked above; the head is not loaded


def create_em_segmenter(
    encoder_name: str,
    pretrained_encoder: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    *,
    out_chans: int = 3,
    hidden_size: int | None = None,
    kernel_size: Sequence[int] = (1, 5, 5),
    **encoder_kwargs,
) -> EMSegMamba:
    """Build the affinity segmenter on a registered EM encoder, optionally with pretrained weights.

    Args:
        encoder_name: one of ``EM_ENCODERS`` ('emmamba_base', 'emmamba_small', 'emmamba_mid',
            'emmamba_large').
        pretrained_encoder: the encoder's weights from pretraining: a state dict or a
            .safetensors / torch.save file (see ``load_encoder_weights``).
        out_chans: output channels, 3 affinities (z, y, x) by default.
        hidden_size: width of the deepest decoder block; defaults to the value that reproduces
            TokenUnify's parameter count for the encoder.
        kernel_size: conv kernel of the decoder blocks, (1, 5, 5) as in the authors' code.
        encoder_kwargs: passed to ``timm.create_model`` (e.g. ``depths``, ``scan_form``).
    """
    if encoder_name not in EM_ENCODERS:
        raise ValueError(f"encoder_name must be one of {tuple(EM_ENCODERS)}, got {encoder_name!r}")
    encoder = timm.create_model(encoder_name, num_classes=0, **encoder_kwargs)
    if pretrained_encoder is not None:
        load_encoder_weights(encoder, pretrained_encoder)
    hidden = EM_ENCODERS[encoder_name] if hidden_size is None else hidden_size
    return EMSegMamba(encoder, out_chans=out_chans, hidden_size=hidden, kernel_size=kernel_size)


# ----------------------------------------------------------------------------------------------
# checkpoints, configs, registration
# ----------------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict, model: EMMambaEncoder) -> dict:
    """Adapt a checkpoint to ``model``: unwrap 'model'/'state_dict', and sum or repeat the stem's
    input channels when ``in_chans`` differs (timm's adaptation handles 2-D stems only)."""
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    state_dict = dict(state_dict)
    weight = state_dict.get("stem.weight")
    if weight is not None and weight.shape[1] != model.in_chans:
        source = weight.shape[1]
        if model.in_chans == 1:
            weight = weight.sum(dim=1, keepdim=True)
        else:
            repeats = -(-model.in_chans // source)
            weight = weight.repeat(1, repeats, 1, 1, 1)[:, : model.in_chans] * (source / model.in_chans)
        state_dict["stem.weight"] = weight
    return state_dict


def _create_emmamba(variant: str, pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        EMMambaEncoder,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _em_cfg(**kwargs) -> dict:
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
        description="EM volume encoder: input (B, 1, Z, Y, X), default crop 16 x 160 x 160 (Z, Y, X)",
        **kwargs,
    )


# No public weights; pretrain with seqvision's TokenUnify loop or load your own through
# pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({name: _em_cfg() for name in EM_ENCODERS})


@register_model
def emmamba_base(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 32-64-128-256, depths 2-2-2-2 (6.89 M; 28.30 M with the decoder)."""
    arch = dict(dims=(32, 64, 128, 256), depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_base", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def emmamba_small(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 64-128-256-512, depths 2-2-2-2 (26.93 M; 112.53 M with the decoder)."""
    arch = dict(dims=(64, 128, 256, 512), depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_small", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def emmamba_mid(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 96-192-384-768, depths 2-2-2-2 (60.10 M; 206.58 M with the decoder)."""
    arch = dict(dims=(96, 192, 384, 768), depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_mid", pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def emmamba_large(pretrained: bool = False, **kwargs) -> EMMambaEncoder:
    """EM Mamba encoder, widths 144-288-576-1104, depths 2-2-2-2 (126.39 M; 506.57 M with the decoder)."""
    arch = dict(dims=(144, 288, 576, 1104), depths=(2, 2, 2, 2))
    return _create_emmamba("emmamba_large", pretrained=pretrained, **dict(arch, **kwargs))
