"""Optional dependencies: a missing one is one clear error that names the extra to install.

``pip install seqvision`` installs the core (torch, torchvision, timm, triton, accelerate,
safetensors, numpy, pyyaml, tqdm): every model and operator works with it. Each task's own
libraries come with an extra: ``em`` (h5py, zarr, tifffile, scikit-image, scipy, waterz,
matplotlib), ``video`` (decord, matplotlib), ``caption`` (pycocoevalcap, matplotlib),
``classification`` (matplotlib), ``bench`` (matplotlib, scikit-learn), ``tensorboard``; ``all`` is
every one of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """A library of an optional extra is not installed (``pip install 'seqvision[<extra>]'``)."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise ``MissingExtraError`` saying that ``purpose`` needs it and which
    extra installs it: ``require("h5py", "em", "reading HDF5 volumes")``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs {package}, which is not installed; it comes with seqvision's "
            f"'{extra}' extra: pip install 'seqvision[{extra}]'"
        ) from err
