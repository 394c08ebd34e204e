"""TokenUnify's three token objectives on an EM Mamba encoder, as one module whose forward is the loss.

TokenUnify (Chen et al., arXiv 2405.16847) pretrains the EM encoder (``emmamba_*``) by predicting
hidden parts of a volume crop. The crop (B, C, Z, Y, X), by default 16 x 160 x 160, is cut into
patch tokens, by default 4 x 16 x 16, giving a grid of 4 x 10 x 10 = 400 tokens. Tokens are numbered
in z-major raster order: token ``t`` covers the patch at grid position (iz, iy, ix) with
``t = (iz * gy + iy) * gx + ix``.

Objectives (each builds a corrupted input from the crop; every target is the clean crop):

``masked``      random-token prediction (MAE-like). Per sample a ratio r ~ U(mask_ratio) picks
                round(r * T) tokens uniformly at random; their voxels are replaced by noise and the
                network reconstructs the volume. The loss is the MSE over the hidden voxels only:
                the decoder sees the input at full resolution, so visible voxels could be copied
                through and would only dilute the loss with a trivial task (MAE's choice too).
``next_token``  per sample a prefix length k ~ U{1, ..., T - 1}; tokens 0..k-1 are kept, tokens k..T-1
                replaced by noise. A small head reads the decoder's features at token k and predicts
                its voxels; MSE on that token.
``next_all``    from the same prefix input (one encoder pass serves both), reconstruct the whole
                volume; MSE over every voxel, as in the reference. The prefix part is not a copy
                task when the input was degraded (see below).

Choices, where the reference leaves room:

* Hidden voxels are filled with standard normal noise (the reference's ``fill_with_noise`` option):
  it spans and exceeds the [0, 1] intensity range, so hidden tokens cannot be mistaken for tissue
  although the encoder has no mask channel.
* Degradation. With probability ``degrade_prob`` per sample, one of ``degradations`` (additive
  Gaussian noise, in-plane Gaussian blur, a zeroed cuboid) is applied to the input. The reference
  degrades before hiding tokens; here it is applied after, so that a blur cannot carry hidden voxels
  into the visible ones next to them: nothing of a hidden token reaches the input.
* The output heads are linear (no sigmoid), so any intensity range can be regressed. Volumes are
  expected min-max scaled to [0, 1], the range the noise fill and the degradations are scaled for,
  but values are not checked: the check would cost a device synchronisation on every step.

Schedules (``active_objectives(step)``):

``joint``       every objective at every step, losses summed with ``weights``.
``alternate``   one objective at a time, the next one in ``objectives`` every ``switch_every`` steps.
                (The reference's alternating mode never switches: it keys on an epoch argument that
                is always 0.)
``sequential``  ``masked`` for the first ``masked_steps`` steps, then the other objectives jointly
                (the paper's order: random-token first, autoregressive after).

Randomness comes from torch's default generator on the volume's device, drawn in a fixed order that
does not depend on the data, so saving and restoring the RNG state reproduces a run.

In ``alternate`` and ``sequential`` some parameters (the next-token head, for one) get no gradient
on some steps: under DistributedDataParallel the training loop must set
``find_unused_parameters=True``.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from collections.abc import Mapping, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqvision.utils.checks import check_positive_int
from seqvision.vision.em import EM_ENCODERS, EMMambaEncoder, UnetResBlock, UnetUpBlock
from seqvision.vision.mamba import mamba_no_weight_decay

__all__ = [
    "DEGRADATIONS",
    "OBJECTIVES",
    "SCHEDULES",
    "NextTokenHead",
    "RandomDegradation",
    "ReconstructionDecoder",
    "TokenUnify",
    "hide_tokens",
    "mask_count_range",
    "prefix_token_mask",
    "random_token_mask",
    "take_token",
    "token_grid",
    "token_mask_to_voxels",
]

OBJECTIVES = ("masked", "next_token", "next_all")
SCHEDULES = ("joint", "alternate", "sequential")
DEGRADATIONS = ("noise", "blur", "cutout")
_PREFIX_OBJECTIVES = ("next_token", "next_all")


def _triple(name: str, value: object) -> tuple[int, int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{name} must be 3 positive ints (z, y, x), got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be 3 positive ints (z, y, x), got {value!r}")
    return tuple(value)


def _range(name: str, value: object, low: float, high: float, closed: bool = True) -> tuple[float, float]:
    """A (lo, hi) pair with low <= lo <= hi <= high (strict at both ends unless ``closed``)."""
    ok = (
        not isinstance(value, (str, bytes))
        and isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    )
    if ok:
        lo, hi = float(value[0]), float(value[1])
        inside = (low <= lo and hi <= high) if closed else (low < lo and hi < high)
        ok = inside and lo <= hi
    if not ok:
        bounds = f"[{low}, {high}]" if closed else f"({low}, {high})"
        raise ValueError(f"{name} must be a pair (lo, hi) with lo <= hi inside {bounds}, got {value!r}")
    return lo, hi


# ----------------------------------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------------------------------


def token_grid(size: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Token grid (gz, gy, gx) of a (Z, Y, X) volume cut into (pz, py, px) patches; they must divide."""
    if any(s % p for s, p in zip(size, patch_size, strict=True)):
        raise ValueError(
            f"patch_size {tuple(patch_size)} must divide the volume size {tuple(size)} on every axis"
        )
    return tuple(s // p for s, p in zip(size, patch_size, strict=True))


def token_mask_to_voxels(mask: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """Spread a per-token mask (B, T), z-major raster order, over its voxels: (B, 1, Z, Y, X)."""
    (gz, gy, gx), (pz, py, px) = grid, patch_size
    batch = mask.shape[0]
    voxels = mask.reshape(batch, 1, gz, 1, gy, 1, gx, 1).expand(batch, 1, gz, pz, gy, py, gx, px)
    return voxels.reshape(batch, 1, gz * pz, gy * py, gx * px)


def take_token(x: torch.Tensor, index: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """The patch of token ``index[b]`` of each sample: x (B, C, Z, Y, X), index (B,) -> (B, C, pz, py, px).

    One gather, no device synchronisation, and only the B patches are copied.
    """
    batch, channels = x.shape[:2]
    gz, gy, gx = token_grid(x.shape[2:], patch_size)
    pz, py, px = patch_size
    patches = x.reshape(batch, channels, gz, pz, gy, py, gx, px)
    iz, iy, ix = index // (gy * gx), (index // gx) % gy, index % gx
    # The advanced indices are not adjacent, so their broadcast (B,) dimension comes first.
    return patches[torch.arange(batch, device=x.device), :, iz, :, iy, :, ix, :]


def mask_count_range(num_tokens: int, mask_ratio: Sequence[float]) -> tuple[int, int]:
    """Fewest and most tokens a mask may hide so that the hidden fraction lies inside ``mask_ratio``,
    at least one token hidden and one visible. Raises when no count fits (too few tokens)."""
    lo, hi = mask_ratio
    # Rounding guards against lo * T landing a hair above an integer (0.2 * 400 = 80.00000000000001).
    fewest = max(1, math.ceil(round(lo * num_tokens, 9)))
    most = min(num_tokens - 1, math.floor(round(hi * num_tokens, 9)))
    if fewest > most:
        raise ValueError(
            f"mask_ratio {tuple(mask_ratio)} selects no whole number of the {num_tokens} tokens "
            "(leaving at least one hidden and one visible); use a wider ratio or smaller patches"
        )
    return fewest, most


def random_token_mask(
    batch: int, num_tokens: int, mask_ratio: Sequence[float], device: torch.device | str | None = None
) -> torch.Tensor:
    """Hidden tokens for random-token prediction: (B, T) bool.

    Per sample a ratio r ~ U(mask_ratio); round(r * T), clipped to ``mask_count_range``, tokens are
    hidden, chosen uniformly without replacement. Draws ``torch.rand`` twice, (B,) then (B, T).
    """
    fewest, most = mask_count_range(num_tokens, mask_ratio)
    lo, hi = mask_ratio
    ratio = lo + (hi - lo) * torch.rand(batch, device=device)
    count = (ratio * num_tokens).round().long().clamp(fewest, most)
    # The rank of each token in a random permutation; the `count` lowest ranks are hidden.
    rank = torch.rand(batch, num_tokens, device=device).argsort(dim=1).argsort(dim=1)
    return rank < count[:, None]


def prefix_token_mask(prefix_len: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Hidden tokens after a prefix: prefix_len (B,) -> (B, T) bool, True for tokens t >= prefix_len."""
    return torch.arange(num_tokens, device=prefix_len.device) >= prefix_len[:, None]


def hide_tokens(volume: torch.Tensor, hidden: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Replace the voxels of the hidden tokens by standard normal noise.

    volume (B, C, Z, Y, X), hidden (B, T) bool in z-major raster order -> (B, C, Z, Y, X). The noise
    is drawn for the whole volume (``torch.randn_like``), so the draw does not depend on the mask.
    """
    grid = token_grid(volume.shape[2:], patch_size)
    voxels = token_mask_to_voxels(hidden, grid, patch_size)
    return torch.where(voxels, torch.randn_like(volume), volume)


# ----------------------------------------------------------------------------------------------
# degradations
# ----------------------------------------------------------------------------------------------


class RandomDegradation(nn.Module):
    """With probability ``prob`` per sample, one degradation picked uniformly from ``kinds``.

    x (B, C, Z, Y, X) -> same shape. ``noise``: + N(0, std^2), std ~ U(noise_std); ``blur``: Gaussian
    blur within each z-section (EM volumes are imaged section by section, and z is sampled far more
    coarsely than y and x), sigma ~ U(blur_sigma) voxels; ``cutout``: a cuboid set to 0, each side a
    fraction ~ U(cutout_size) of the volume's. The default ranges are modest for intensities in
    [0, 1]. Every random number is drawn for every sample whatever is picked, so the stream of draws
    depends on the batch shape only.
    """

    def __init__(
        self,
        prob: float = 0.5,
        kinds: Sequence[str] = DEGRADATIONS,
        noise_std: Sequence[float] = (0.02, 0.1),
        blur_sigma: Sequence[float] = (0.5, 2.0),
        cutout_size: Sequence[float] = (0.1, 0.4),
    ) -> None:
        super().__init__()
        if isinstance(prob, bool) or not isinstance(prob, numbers.Real) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"degrade_prob must be a number in [0, 1], got {prob!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not kinds or len(set(kinds)) != len(kinds) or any(k not in DEGRADATIONS for k in kinds):
            raise ValueError(f"degradations must be distinct names from {DEGRADATIONS}, got {kinds!r}")
        self.prob = float(prob)
        self.kinds = kinds
        self.noise_std = _range("noise_std", noise_std, 0.0, math.inf)
        self.blur_sigma = _range("blur_sigma", blur_sigma, 1e-3, math.inf)
        self.cutout_size = _range("cutout_size", cutout_size, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, kinds={self.kinds}"

    @staticmethod
    def _uniform(bounds: tuple[float, float], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(shape, device=device)

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian along y then x, one kernel per sample (a grouped conv), edges replicated."""
        batch, channels = x.shape[:2]
        radius = math.ceil(3 * self.blur_sigma[1])
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0).to(x.dtype)
        y = x.reshape(1, batch * channels, *x.shape[2:])
        y = F.pad(y, (0, 0, radius, radius, 0, 0), mode="replicate")
        y = F.conv3d(y, kernel.view(-1, 1, 1, 2 * radius + 1, 1), groups=batch * channels)
        y = F.pad(y, (radius, radius, 0, 0, 0, 0), mode="replicate")
        y = F.conv3d(y, kernel.view(-1, 1, 1, 1, 2 * radius + 1), groups=batch * channels)
        return y.reshape(x.shape)

    def _cutout(self, x: torch.Tensor, fraction: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor(x.shape[2:], device=x.device)
        side = (fraction * sizes).round().long().clamp(min=1)  # (B, 3)
        start = (position * (sizes - side + 1)).floor().long()
        inside = torch.ones(x.shape[0], 1, 1, 1, 1, dtype=torch.bool, device=x.device)
        for axis in range(3):
            coord = torch.arange(x.shape[2 + axis], device=x.device)
            hit = (coord >= start[:, axis, None]) & (coord < start[:, axis, None] + side[:, axis, None])
            view = [x.shape[0], 1, 1, 1, 1]
            view[2 + axis] = x.shape[2 + axis]
            inside = inside & hit.view(view)
        return x.masked_fill(inside, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0:
            return x
        batch, device = x.shape[0], x.device
        apply = torch.rand(batch, device=device) < self.prob
        pick = torch.randint(len(self.kinds), (batch,), device=device)
        out = x
        for i, kind in enumerate(self.kinds):
            if kind == "noise":
                std = self._uniform(self.noise_std, (batch,), device)
                degraded = x + std.view(-1, 1, 1, 1, 1).to(x.dtype) * torch.randn_like(x)
            elif kind == "blur":
                degraded = self._blur(x, self._uniform(self.blur_sigma, (batch,), device))
            else:
                fraction = self._uniform(self.cutout_size, (batch, 3), device)
                degraded = self._cutout(x, fraction, torch.rand(batch, 3, device=device))
            chosen = (apply & (pick == i)).view(-1, 1, 1, 1, 1)
            out = torch.where(chosen, degraded, out)
        return out


# ----------------------------------------------------------------------------------------------
# decoder and heads
# ----------------------------------------------------------------------------------------------


class ReconstructionDecoder(nn.Module):
    """EMSegMamba's UNETR-style decoder, returning its full-resolution features.

    A residual block on the input volume and on each skip (the deepest widens to ``hidden_size``),
    then per level a k2 s2 transposed conv, the skip concatenated and a residual block, and a final
    residual block. x (B, in_chans, Z, Y, X) and the encoder's skips (B, dims[i], Z / 2^(i+1), ...)
    -> (B, dims[0], Z, Y, X).
    """

    def __init__(
        self, in_chans: int, dims: Sequence[int], hidden_size: int, kernel_size: Sequence[int] = (1, 3, 3)
    ) -> None:
        super().__init__()
        # Block i takes the input (i = 0) or skip i - 1 to the width of the level it is joined at
        # on the way up; the deepest skip widens to hidden_size.
        self.skip_blocks = nn.ModuleList(
            [UnetResBlock(i, o, kernel_size) for i, o in itertools.pairwise([in_chans, *dims])]
            + [UnetResBlock(dims[-1], hidden_size, kernel_size)]
        )
        ups = [hidden_size, *reversed(dims)]
        self.up_blocks = nn.ModuleList([UnetUpBlock(i, o, kernel_size) for i, o in itertools.pairwise(ups)])
        self.final_block = UnetResBlock(dims[0], dims[0], kernel_size)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        encoded = [block(f) for block, f in zip(self.skip_blocks, [x, *skips], strict=True)]
        y = encoded[-1]
        for up, skip in zip(self.up_blocks, reversed(encoded[:-1]), strict=True):
            y = up(y, skip)
        return self.final_block(y)


class NextTokenHead(nn.Module):
    """Predicts one token's voxels from the decoder features of its patch.

    x (B, C, pz, py, px) -> (B, out_chans, pz, py, px): an in-plane 3x3 conv, GELU, a 1x1x1 conv.
    """

    def __init__(self, in_chans: int, out_chans: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_chans, in_chans, (1, 3, 3), padding=(0, 1, 1))
        self.act = nn.GELU()
        self.proj = nn.Conv3d(in_chans, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.conv(x)))


# ----------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------


def _build_encoder(encoder: str | nn.Module, encoder_kwargs: Mapping | None) -> EMMambaEncoder:
    if isinstance(encoder, str):
        if encoder not in EM_ENCODERS:
            raise ValueError(
                f"encoder must be one of {tuple(EM_ENCODERS)} or an EMMambaEncoder, got {encoder!r}"
            )
        return timm.create_model(encoder, **{"num_classes": 0, **(encoder_kwargs or {})})
    if not isinstance(encoder, EMMambaEncoder):
        raise TypeError(f"encoder must be a model name or an EMMambaEncoder, got {type(encoder).__name__}")
    if encoder_kwargs:
        raise ValueError("encoder_kwargs apply only when encoder is a model name, not to an EMMambaEncoder")
    return encoder


class TokenUnify(nn.Module):
    """TokenUnify pretraining: encoder + reconstruction decoder + next-token head; forward = losses.

    Args:
        encoder: a registered EM encoder name (``EM_ENCODERS``: 'emmamba_base', ...) built with
            ``timm.create_model(encoder, num_classes=0, **encoder_kwargs)``, or an ``EMMambaEncoder``
            without a classifier. Reachable as ``self.encoder``; ``encoder_state_dict()`` exports it.
        crop_size: (Z, Y, X) of the volumes ``forward`` takes; divisible by ``patch_size`` and by the
            encoder's total reduction (16 for four stages).
        patch_size: (pz, py, px) of a token.
        objectives: the objectives used, a subset of ``OBJECTIVES``; order matters for 'alternate'.
        weights: objective -> loss weight (>= 0), 1 for any not given. A weight of 0 keeps the
            objective's loss in the output for monitoring but gives it no gradient.
        schedule: 'joint', 'alternate' or 'sequential' (see the module docstring).
        switch_every: steps per objective in 'alternate'.
        masked_steps: steps of the masked objective before the others in 'sequential'.
        mask_ratio: (lo, hi), 0 < lo <= hi < 1: per-sample fraction of hidden tokens, ~ U(lo, hi).
        degrade_prob: probability per sample and input of one degradation; 0 turns them off.
        degradations: the degradations to pick from, a subset of ``DEGRADATIONS``.
        encoder_kwargs: passed to ``timm.create_model`` with an encoder name (e.g. dims, depths).
        decoder_hidden_size: width of the deepest decoder block; by default the one that
            ``create_em_segmenter`` uses for a registered name (unless ``encoder_kwargs`` changes
            its ``dims``), else twice the last encoder width.
        decoder_kernel_size: conv kernel of the decoder blocks; (1, 3, 3) as in the reference's
            pretraining network (its segmentation network uses (1, 5, 5)).
    """

    def __init__(
        self,
        encoder: str | nn.Module = "emmamba_base",
        *,
        crop_size: Sequence[int] = (16, 160, 160),
        patch_size: Sequence[int] = (4, 16, 16),
        objectives: Sequence[str] = OBJECTIVES,
        weights: Mapping[str, float] | None = None,
        schedule: str = "joint",
        switch_every: int = 100,
        masked_steps: int = 1000,
        mask_ratio: Sequence[float] = (0.2, 0.8),
        degrade_prob: float = 0.5,
        degradations: Sequence[str] = DEGRADATIONS,
        encoder_kwargs: Mapping | None = None,
        decoder_hidden_size: int | None = None,
        decoder_kernel_size: Sequence[int] = (1, 3, 3),
    ) -> None:
        super().__init__()
        self.encoder = _build_encoder(encoder, encoder_kwargs)
        if self.encoder.num_classes:
            raise ValueError(
                f"encoder must have no classifier (num_classes=0) so that its weights export as the "
                f"timm backbone's, got num_classes={self.encoder.num_classes}"
            )
        self.crop_size = _triple("crop_size", crop_size)
        self.patch_size = _triple("patch_size", patch_size)
        reduction = self.encoder.reduction
        if any(s % reduction for s in self.crop_size) or math.prod(self.crop_size) == reduction**3:
            raise ValueError(
                f"crop_size must be divisible by the encoder's reduction {reduction} on every axis and "
                f"larger than {reduction} on one (its last InstanceNorm needs two voxels), "
                f"got {self.crop_size}"
            )
        if any(s % p for s, p in zip(self.crop_size, self.patch_size, strict=True)):
            raise ValueError(
                f"patch_size {self.patch_size} must divide crop_size {self.crop_size} on every axis"
            )
        self.grid = token_grid(self.crop_size, self.patch_size)
        self.num_tokens = math.prod(self.grid)
        if self.num_tokens < 2:
            raise ValueError(
                f"crop_size {self.crop_size} and patch_size {self.patch_size} give {self.num_tokens} "
                "token; the objectives need at least 2"
            )

        objectives = (objectives,) if isinstance(objectives, str) else tuple(objectives)
        if not objectives or len(set(objectives)) != len(objectives) or set(objectives) - set(OBJECTIVES):
            raise ValueError(f"objectives must be distinct names from {OBJECTIVES}, got {objectives!r}")
        self.objectives = objectives
        self.weights = self._check_weights(weights)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "alternate" and len(objectives) < 2:
            raise ValueError(
                f"schedule 'alternate' needs at least 2 objectives, got objectives={objectives!r}"
            )
        if schedule == "sequential" and ("masked" not in objectives or len(objectives) < 2):
            raise ValueError(
                "schedule 'sequential' needs 'masked' and at least one autoregressive objective, "
                f"got objectives={objectives!r}"
            )
        self.schedule = schedule
        self.switch_every = check_positive_int("switch_every", switch_every)
        if isinstance(masked_steps, bool) or not isinstance(masked_steps, int) or masked_steps < 0:
            raise ValueError(f"masked_steps must be a non-negative int, got {masked_steps!r}")
        self.masked_steps = masked_steps
        self.mask_ratio = _range("mask_ratio", mask_ratio, 0.0, 1.0, closed=False)
        mask_count_range(self.num_tokens, self.mask_ratio)  # fails early when no count fits
        self.degrade = RandomDegradation(degrade_prob, degradations)

        dims = self.encoder.dims
        if decoder_hidden_size is None:
            # The segmenter's width for a registered architecture; twice the last width otherwise.
            registered = isinstance(encoder, str) and "dims" not in (encoder_kwargs or {})
            decoder_hidden_size = EM_ENCODERS[encoder] if registered else 2 * dims[-1]
        check_positive_int("decoder_hidden_size", decoder_hidden_size)
        kernel = _triple("decoder_kernel_size", decoder_kernel_size)
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"decoder_kernel_size must be odd on every axis, got {kernel}")
        in_chans = self.encoder.in_chans
        self.decoder = ReconstructionDecoder(in_chans, dims, decoder_hidden_size, kernel)
        self.reconstruction_head = nn.Conv3d(dims[0], in_chans, 1)
        self.next_token_head = NextTokenHead(dims[0], in_chans)

    def _check_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        weights = {} if weights is None else weights
        if not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a mapping objective -> float, got {type(weights).__name__}")
        unknown = sorted(set(weights) - set(self.objectives))
        if unknown:
            raise ValueError(f"weights names {unknown}, which are not in objectives {self.objectives}")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
                raise ValueError(f"weights must be finite numbers >= 0, got {name!r}: {w!r}")
        return {name: float(weights.get(name, 1.0)) for name in self.objectives}

    def extra_repr(self) -> str:
        return (
            f"crop_size={self.crop_size}, patch_size={self.patch_size}, tokens={self.num_tokens}, "
            f"objectives={self.objectives}, weights={self.weights}, schedule={self.schedule!r}"
        )

    # ------------------------------------------------------------------------------------------
    # training-loop interface
    # ------------------------------------------------------------------------------------------

    def active_objectives(self, step: int) -> tuple[str, ...]:
        """The objectives whose losses ``forward`` computes at optimizer step ``step`` (>= 0)."""
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"step must be an int, got {type(step).__name__}") from None
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.schedule == "joint":
            return self.objectives
        if self.schedule == "alternate":
            return (self.objectives[(step // self.switch_every) % len(self.objectives)],)
        if step < self.masked_steps:
            return ("masked",)
        return tuple(name for name in self.objectives if name != "masked")

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's keys: loads strictly into ``timm.create_model(name)``."""
        return dict(self.encoder.state_dict())

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return mamba_no_weight_decay(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------

    def check_volume(self, volume: object) -> torch.Tensor:
        """Clear errors unless ``volume`` is a float tensor (B, in_chans, *crop_size)."""
        if not isinstance(volume, torch.Tensor):
            raise TypeError(f"volume must be a torch.Tensor, got {type(volume).__name__}")
        if not volume.is_floating_point():
            raise TypeError(f"volume must be a floating-point tensor, got dtype {volume.dtype}")
        expected = (self.encoder.in_chans, *self.crop_size)
        if volume.dim() != 5 or tuple(volume.shape[1:]) != expected:
            raise ValueError(
                f"volume must have shape (B, {', '.join(map(str, expected))}) = (B, C, Z, Y, X) "
                f"(in_chans, crop_size), got {tuple(volume.shape)}"
            )
        return volume

    def masked_input(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input of random-token prediction: (corrupted (B, C, Z, Y, X), hidden tokens (B, T) bool)."""
        hidden = random_token_mask(volume.shape[0], self.num_tokens, self.mask_ratio, volume.device)
        return self.degrade(hide_tokens(volume, hidden, self.patch_size)), hidden

    def prefix_input(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input of next-token / next-all prediction: (corrupted (B, C, Z, Y, X), prefix length k (B,)).

        Tokens 0..k-1 are kept, k ~ U{1, ..., T - 1} per sample; token k is the one to predict.
        """
        prefix_len = torch.randint(1, self.num_tokens, (volume.shape[0],), device=volume.device)
        hidden = prefix_token_mask(prefix_len, self.num_tokens)
        return self.degrade(hide_tokens(volume, hidden, self.patch_size)), prefix_len

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder and decoder: x (B, C, Z, Y, X) -> full-resolution features (B, dims[0], Z, Y, X)."""
        return self.decoder(x, self.encoder.forward_intermediates(x, intermediates_only=True))

    def forward(self, volume: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Losses of the objectives active at ``step`` on a batch of clean crops.

        volume (B, C, *crop_size), min-max scaled to [0, 1]. Returns 'loss', the weighted sum (a
        scalar to backpropagate), and each active objective's MSE, detached, for logging.
        """
        self.check_volume(volume)
        active = self.active_objectives(step)
        target = volume.float()
        losses: dict[str, torch.Tensor] = {}
        if "masked" in active:
            corrupted, hidden = self.masked_input(volume)
            prediction = self.reconstruction_head(self.forward_features(corrupted)).float()
            voxels = token_mask_to_voxels(hidden, self.grid, self.patch_size).to(prediction.dtype)
            squared = (prediction - target) ** 2 * voxels
            losses["masked"] = squared.sum() / (voxels.sum() * prediction.shape[1])
        if any(name in active for name in _PREFIX_OBJECTIVES):
            corrupted, prefix_len = self.prefix_input(volume)
            features = self.forward_features(corrupted)
            if "next_token" in active:
                token = self.next_token_head(take_token(features, prefix_len, self.patch_size)).float()
                losses["next_token"] = F.mse_loss(token, take_token(target, prefix_len, self.patch_size))
            if "next_all" in active:
                losses["next_all"] = F.mse_loss(self.reconstruction_head(features).float(), target)
        total = sum(self.weights[name] * losses[name] for name in active)
        return {"loss": total, **{name: losses[name].detach() for name in active}}
