"""A picture of an EM segmentation: raw, affinities, segmentation and ground truth, a few sections."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from seqvision.utils.extras import require
from seqvision.utils.io import atomic_path

__all__ = ["label_colors", "save_segmentation_figure"]


def label_colors(labels: np.ndarray) -> np.ndarray:
    """A random-looking but fixed RGB colour per id: float32 (..., 3) in [0.15, 1]; id 0 is black.

    The colour is a hash of the id itself, so a neuron has the same colour in every section and
    every panel without a shared colour table.
    """
    ids = np.asarray(labels).astype(np.uint64)
    # Fibonacci hashing: multiplication by 2^64 / phi scatters consecutive ids over all 64 bits.
    mixed = ids * np.uint64(0x9E3779B97F4A7C15)
    channels = [(mixed >> np.uint64(shift)) & np.uint64(255) for shift in (56, 40, 24)]
    colors = 0.15 + 0.85 * np.stack(channels, axis=-1).astype(np.float32) / 255.0
    colors[ids == 0] = 0.0
    return colors


def _gray(section: np.ndarray) -> np.ndarray:
    section = section.astype(np.float32)
    low, high = float(section.min()), float(section.max())
    return (section - low) / (high - low) if high > low else np.zeros_like(section)


def _overlay(gray: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    return (1 - alpha) * gray[..., None] + alpha * label_colors(labels)


def _check(raw, affinities, segmentation, ground_truth) -> tuple[np.ndarray, ...]:
    raw = np.asarray(raw)
    if raw.ndim != 3:
        raise ValueError(f"raw must be (Z, Y, X), got shape {raw.shape}")
    affinities = np.asarray(affinities)
    if affinities.ndim != 4 or affinities.shape[0] < 3 or affinities.shape[1:] != raw.shape:
        raise ValueError(f"affinities must be (3, *raw.shape) = (3, *{raw.shape}), got {affinities.shape}")
    volumes = [np.asarray(segmentation)] + ([] if ground_truth is None else [np.asarray(ground_truth)])
    for name, volume in zip(("segmentation", "ground_truth"), volumes, strict=False):
        if volume.shape != raw.shape:
            raise ValueError(f"{name} must have raw's shape {raw.shape}, got {volume.shape}")
    return raw, affinities, *volumes


def save_segmentation_figure(
    path: str | os.PathLike,
    raw: np.ndarray,
    affinities: np.ndarray,
    segmentation: np.ndarray,
    ground_truth: np.ndarray | None = None,
    slices: Sequence[int] | None = None,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Save a grid of sections (rows) x panels (columns) as an image, atomically.

    Panels: the raw section; the affinities as RGB (z -> red, y -> green, x -> blue, so boundaries
    are dark and a z-only break is cyan); the segmentation over the raw in random colours; the
    ground truth likewise when given.

    Args:
        path: the image file (format from the suffix, e.g. ``.png``).
        raw: (Z, Y, X) intensities, any range (each section is min-max scaled for display).
        affinities: float (3, Z, Y, X) in [0, 1], channels (z, y, x).
        segmentation: integer (Z, Y, X) ids.
        ground_truth: integer (Z, Y, X) ids or None.
        slices: the z sections to show; default three spread over the volume.
        title: the figure's title.
        dpi: resolution; a panel is about 3 inches wide.

    Returns:
        the path.
    """
    require("matplotlib", "em", "the segmentation figure")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    raw, affinities, *labels = _check(raw, affinities, segmentation, ground_truth)
    depth = raw.shape[0]
    if slices is None:
        slices = sorted({depth // 4, depth // 2, (3 * depth) // 4})
    slices = [int(z) for z in slices]
    if not slices or not all(0 <= z < depth for z in slices):
        raise ValueError(f"slices must be section indices in [0, {depth}), got {slices!r}")
    names = ["raw", "affinities (z, y, x)", "segmentation", "ground truth"][: 2 + len(labels)]

    # Figure and its Agg canvas directly, not pyplot: no global backend switch, no figure registry.
    figure = Figure(figsize=(3 * len(names), 3 * len(slices) + (0.4 if title else 0)), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(slices), len(names), squeeze=False)
    for row, z in enumerate(slices):
        gray = _gray(raw[z])
        panels = [gray, np.clip(np.moveaxis(affinities[:3, z], 0, -1), 0, 1)]
        panels += [_overlay(gray, volume[z]) for volume in labels]
        for column, (ax, image) in enumerate(zip(axes[row], panels, strict=True)):
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(names[column], fontsize=10)
            if column == 0:
                ax.set_ylabel(f"z = {z}")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary)
    return Path(path)
