"""Backbones and task heads. Importing this package registers every model in timm.

* :mod:`seqvision.vision.vir` - ViR, Vision Retention Networks (``vir_*``).
"""

from . import vir
from .vir import VisionRetentionNet

__all__ = ["VisionRetentionNet", "vir"]
