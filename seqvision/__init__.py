"""seqvision: vision and video backbones whose token mixer is a recurrence."""

from . import kernels

__version__ = "0.1.0"
__all__ = ["__version__", "kernels"]
