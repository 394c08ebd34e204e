"""Backbones and task heads. Importing this package registers every model in timm.

* :mod:`seqvision.vision.vir` - ViR, Vision Retention Networks (``vir_*``).
* :mod:`seqvision.vision.lightnet` - LightNet, one additive scan per layer (``lightnet_*``).
* :mod:`seqvision.vision.base` - the timm interface every backbone shares.
* :mod:`seqvision.vision.layers` - shared layers (MD-TPE, MD-LRPE, group RMSNorm, tubelet embedding).
"""

from . import lightnet, vir
from .lightnet import LightNet
from .vir import VisionRetentionNet

__all__ = ["LightNet", "VisionRetentionNet", "lightnet", "vir"]
