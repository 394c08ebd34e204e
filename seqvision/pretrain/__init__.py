"""Pretraining for EM volumes: readers, random-crop datasets with EM augmentations, synthetic volumes.

The TokenUnify objectives and the Accelerate training loop build on ``EMCropDataset``; EM
segmentation fine-tuning reuses it with label volumes.
"""

from .data import (
    CREMI_RESOLUTION,
    LABELS_KEY,
    RAW_KEY,
    EMAugment,
    EMCropDataset,
    LazyVolume,
    open_volume,
    read_labels,
    read_volume,
    split_volume_spec,
    write_cremi,
)
from .synthetic import synthetic_em_volume
from .tokenunify import TokenUnify

__all__ = [
    "CREMI_RESOLUTION",
    "LABELS_KEY",
    "RAW_KEY",
    "EMAugment",
    "EMCropDataset",
    "LazyVolume",
    "TokenUnify",
    "open_volume",
    "read_labels",
    "read_volume",
    "split_volume_spec",
    "synthetic_em_volume",
    "write_cremi",
]
