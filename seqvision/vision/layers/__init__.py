"""Layers shared by the vision backbones. Nothing here registers a model.

* :class:`GroupRmsNorm` - RMS norm over contiguous channel groups (one per head), float32 statistics.
* :class:`MdTpe` - LightNet's multi-dimensional Toeplitz positional encoding: a decayed scan along each
  grid axis of (B, *grid, D) tokens, any grid shape at run time.
* :class:`MdLrpe` - LightNet's multi-dimensional cosine LRPE for queries and keys (B, H, L, d) ->
  (B, H, L, 2 d): scores depend only on the per-axis offset between tokens.
* :class:`TubeletEmbed` - a clip (B, C, T, H, W) to a 3-D grid of tokens (B, t, h, w, D).
* :class:`StridedPatchEmbed` - an image to (B, h, w, D) tokens from patches taken every ``stride``
  pixels (overlapping when the stride is smaller than the patch; Vim's stride-8 models).
"""

from .md_lrpe import MdLrpe
from .md_tpe import MdTpe
from .norm import GroupRmsNorm
from .patch_embed import StridedPatchEmbed, TubeletEmbed

__all__ = ["GroupRmsNorm", "MdLrpe", "MdTpe", "StridedPatchEmbed", "TubeletEmbed"]
