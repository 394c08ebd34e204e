"""The data every task reads, for pretraining and fine-tuning alike.

* :mod:`~seqvision.data.volumes` - EM volumes: HDF5 / CREMI, TIFF, zarr and npy readers (lazy, for
  volumes larger than memory), ``EMCropDataset`` (random crops with EM augmentations, deterministic
  by seed, epoch and index), ``write_cremi``.
* :mod:`~seqvision.data.synthetic` - synthetic EM volumes with their neuron ids (cells, membranes,
  organelles, blur, noise, missing sections).
* :mod:`~seqvision.data.video` - video lists (class folders, CSV/TSV, Kinetics, UCF101 splits),
  frame sampling, decord decoding with guards, clip transforms, ``VideoClipDataset``.
* :mod:`~seqvision.data.captions` - COCO / Karpathy and video caption files, ``CaptionDataset``.

The EM names are also available here (``from seqvision.data import write_cremi``). They are
imported on first use, so that reading videos or captions does not need the ``em`` extra's
libraries (h5py, zarr, tifffile, scipy).
"""

from __future__ import annotations

import importlib
from typing import Any

_EM_NAMES = {
    "CREMI_RESOLUTION": "volumes",
    "LABELS_KEY": "volumes",
    "RAW_KEY": "volumes",
    "EMAugment": "volumes",
    "EMCropDataset": "volumes",
    "LazyVolume": "volumes",
    "check_voxel_size": "volumes",
    "open_volume": "volumes",
    "read_labels": "volumes",
    "read_volume": "volumes",
    "split_volume_spec": "volumes",
    "write_cremi": "volumes",
    "synthetic_em_volume": "synthetic",
    "synthetic_volume": "synthetic",
}

__all__ = sorted(_EM_NAMES)


def __getattr__(name: str) -> Any:
    module = _EM_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'seqvision.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EM_NAMES})
