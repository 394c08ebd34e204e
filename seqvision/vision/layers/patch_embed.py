"""Patch embeddings timm's PatchEmbed does not cover: video tubelets (a clip to a 3-D grid of tokens)
and overlapping image patches (a stride smaller than the patch, Vim's fine-tuned models)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["StridedPatchEmbed", "TubeletEmbed"]


class TubeletEmbed(nn.Module):
    """Non-overlapping (t, h, w) tubelets, each projected to ``embed_dim`` by one Conv3d.

    x (B, C, T, H, W) -> (B, T/t, H/h, W/w, embed_dim). With ``dynamic_pad`` the clip is zero-padded
    at the end of each axis to a multiple of the tubelet, so any clip size works.
    """

    def __init__(
        self,
        clip_size: tuple[int, int, int] = (16, 224, 224),
        tubelet_size: tuple[int, int, int] = (2, 16, 16),
        in_chans: int = 3,
        embed_dim: int = 768,
        dynamic_pad: bool = False,
    ) -> None:
        super().__init__()
        self.clip_size = tuple(clip_size)
        self.patch_size = tuple(tubelet_size)
        self.grid_size = tuple(s // p for s, p in zip(self.clip_size, self.patch_size, strict=True))
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.dynamic_pad = dynamic_pad
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            pad = [(-s) % p for s, p in zip(x.shape[2:], self.patch_size, strict=True)]
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        return self.proj(x).permute(0, 2, 3, 4, 1)


class StridedPatchEmbed(nn.Module):
    """Image patches of ``patch_size`` taken every ``stride`` pixels (overlapping when the stride is
    smaller), each projected to ``embed_dim`` by one Conv2d, without padding.

    x (B, C, H, W) -> (B, h, w, embed_dim) with h = (H - patch) / stride + 1 (so 224 pixels, patch
    16 and stride 8 give 27 tokens per side). A size fits when H - patch is a non-negative multiple of
    the stride. ``strict_img_size``: only ``img_size`` is accepted; ``dynamic_img_pad``: a size of at
    least one patch that does not fit is zero-padded at the bottom / right to the next one that does.
    Otherwise a size that does not fit is refused. The attributes follow timm's ``PatchEmbed``
    (``img_size``, ``patch_size``, ``grid_size``, ``num_patches``, ``proj``, ``dynamic_img_pad``),
    plus ``stride``; ``feat_ratio()`` is the stride, the pixel step between neighbouring tokens.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        stride: int | tuple[int, int] = 8,
        in_chans: int = 3,
        embed_dim: int = 768,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
    ) -> None:
        super().__init__()
        pairs = {}
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("stride", stride)):
            pair = (value, value) if isinstance(value, int) else tuple(value)
            if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
                raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
            pairs[name] = pair
        self.img_size, self.patch_size, self.stride = pairs["img_size"], pairs["patch_size"], pairs["stride"]
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self._check(self.img_size, "img_size")
        self.grid_size = self.dynamic_feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def _fits(self, size: tuple[int, int]) -> bool:
        return all((s - p) % t == 0 for s, p, t in zip(size, self.patch_size, self.stride, strict=True))

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Tokens per side for an image of ``img_size`` (padded first when ``dynamic_img_pad``)."""
        steps = zip(img_size, self.patch_size, self.stride, strict=True)
        return tuple(math.ceil((s - p) / t) + 1 for s, p, t in steps)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.stride) if as_scalar else self.stride

    def _check(self, size: tuple[int, int], name: str = "x") -> None:
        if any(s < p for s, p in zip(size, self.patch_size, strict=True)):
            raise ValueError(f"{name} must be at least one patch {self.patch_size}, got {size}")
        if not self.dynamic_img_pad and not self._fits(size):
            raise ValueError(
                f"{name} must have sizes where size - {self.patch_size} is a multiple of the stride "
                f"{self.stride}, got {size}; dynamic_img_pad=True pads to the next size that fits"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> tokens (B, h, w, embed_dim)."""
        if not isinstance(x, torch.fx.Proxy):  # the checks branch on shapes, which fx cannot trace
            size = (x.shape[-2], x.shape[-1])
            if self.strict_img_size and size != self.img_size:
                raise ValueError(f"x must be {self.img_size} (img_size), got {size}")
            self._check(size)
            if self.dynamic_img_pad:
                steps = zip(self.dynamic_feat_size(size), self.stride, self.patch_size, size, strict=True)
                pad = [(g - 1) * t + p - s for g, t, p, s in steps]
                x = F.pad(x, (0, pad[1], 0, pad[0]))
        return self.proj(x).permute(0, 2, 3, 1)
