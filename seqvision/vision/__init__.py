"""Backbones and task heads. Importing this package registers every model in timm.

* :mod:`seqvision.vision.vir` - ViR, Vision Retention Networks (``vir_*``).
* :mod:`seqvision.vision.lightnet` - LightNet, one additive scan per layer (``lightnet_*``).
* :mod:`seqvision.vision.mamba` - the Mamba mixer and block; Vim (``vim_*``).
* :mod:`seqvision.vision.vmamba` - VMamba, hierarchical with a cross scan (``vmamba_*``).
* :mod:`seqvision.vision.em` - TokenUnify's EM encoder (``emmamba_*``) and affinity segmenter
  (:func:`create_em_segmenter`).
* :mod:`seqvision.vision.lrcn` - LRCN, a frame encoder + LSTM + per-step classifier (``lrcn_*``).
* :mod:`seqvision.vision.caffenet` - the LRCN authors' CaffeNet variant as a frame encoder
  (``caffenet_hybrid``, ``lrcn_caffenet_singleframe``).
* :mod:`seqvision.vision.captioner` - LRCN captioners (LRCN2f / 2u / 1u) with greedy, beam and
  sampled decoding (:class:`LRCNCaptioner`).
* :mod:`seqvision.vision.base` - the timm interface every backbone shares.
* :mod:`seqvision.vision.weights` - reading the authors' checkpoints, the converters behind every
  family's checkpoint filter and ``seqvision convert``.
* :mod:`seqvision.vision.caffe` - reading Caffe ``.caffemodel`` files (the protobuf wire format).
* :mod:`seqvision.vision.layers` - shared layers (MD-TPE, MD-LRPE, group RMSNorm, tubelet embedding,
  the frame encoder LRCN and the captioner share).
"""

from . import caffe, caffenet, captioner, em, lightnet, lrcn, mamba, vir, vmamba, weights
from .caffenet import CaffeNet
from .captioner import LRCNCaptioner, create_captioner
from .em import (
    EMMambaEncoder,
    EMSegMamba,
    create_em_segmenter,
    em_architecture,
    list_em_segmenters,
    load_encoder_weights,
)
from .lightnet import LightNet
from .lrcn import LRCN
from .mamba import MambaMixer, VisionMamba
from .vir import VisionRetentionNet, init_from_vit
from .vmamba import VMamba
from .weights import convert_checkpoint, read_checkpoint

__all__ = [
    "LRCN",
    "CaffeNet",
    "EMMambaEncoder",
    "EMSegMamba",
    "LRCNCaptioner",
    "LightNet",
    "MambaMixer",
    "VMamba",
    "VisionMamba",
    "VisionRetentionNet",
    "caffe",
    "caffenet",
    "captioner",
    "convert_checkpoint",
    "create_captioner",
    "create_em_segmenter",
    "em",
    "em_architecture",
    "init_from_vit",
    "lightnet",
    "list_em_segmenters",
    "load_encoder_weights",
    "lrcn",
    "mamba",
    "read_checkpoint",
    "vir",
    "vmamba",
    "weights",
]
