"""seqvision: vision and video backbones whose token mixer is a recurrence.

``import seqvision`` registers every seqvision model in timm (``timm.list_models('vir_*')``).
"""

from . import kernels, vision

__version__ = "0.1.0"
__all__ = ["__version__", "kernels", "vision"]
