"""Backbones and task heads. Importing this package registers every model in timm.

* :mod:`seqvision.vision.vir` - ViR, Vision Retention Networks (``vir_*``).
* :mod:`seqvision.vision.lightnet` - LightNet, one additive scan per layer (``lightnet_*``).
* :mod:`seqvision.vision.mamba` - the Mamba mixer and block; Vim (``vim_*``).
* :mod:`seqvision.vision.vmamba` - VMamba, hierarchical with a cross scan (``vmamba_*``).
* :mod:`seqvision.vision.em` - TokenUnify's EM encoder (``emmamba_*``) and affinity segmenter
  (:func:`create_em_segmenter`).
* :mod:`seqvision.vision.lrcn` - LRCN, a frame encoder + LSTM + per-step classifier (``lrcn_*``).
* :mod:`seqvision.vision.captioner` - LRCN captioners (LRCN2f / 2u / 1u) with greedy, beam and
  sampled decoding (:class:`LRCNCaptioner`).
* :mod:`seqvision.vision.base` - the timm interface every backbone shares.
* :mod:`seqvision.vision.layers` - shared layers (MD-TPE, MD-LRPE, group RMSNorm, tubelet embedding,
  the frame encoder LRCN and the captioner share).
"""

from . import captioner, em, lightnet, lrcn, mamba, vir, vmamba
from .captioner import LRCNCaptioner, create_captioner
from .em import EMMambaEncoder, EMSegMamba, create_em_segmenter, load_encoder_weights
from .lightnet import LightNet
from .lrcn import LRCN
from .mamba import MambaMixer, VisionMamba
from .vir import VisionRetentionNet
from .vmamba import VMamba

__all__ = [
    "LRCN",
    "EMMambaEncoder",
    "EMSegMamba",
    "LRCNCaptioner",
    "LightNet",
    "MambaMixer",
    "VMamba",
    "VisionMamba",
    "VisionRetentionNet",
    "captioner",
    "create_captioner",
    "create_em_segmenter",
    "em",
    "lightnet",
    "load_encoder_weights",
    "lrcn",
    "mamba",
    "vir",
    "vmamba",
]
