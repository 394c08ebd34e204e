"""Tubelet embedding: a video clip to a 3-D grid of tokens (timm's PatchEmbed does the 2-D case)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TubeletEmbed"]


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
