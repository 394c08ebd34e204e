"""EM neuron segmentation: segmenter checkpoints, sliding-window affinities, file-level pipelines.

The pipeline (TokenUnify's evaluation, made to run on any volume size and any machine):

1. ``load_segmenter`` (``em_checkpoint``): an ``EMSegMamba`` from a safetensors checkpoint that
   names its architecture.
2. ``predict_affinities``: the model slides over the volume in windows (16 x 160 x 160 with 25 %
   overlap by default), batched, and the window predictions are blended with Gaussian weights.
3. ``seqvision.eval.em_postprocess``: watershed fragments and agglomeration (waterz or the NumPy
   fallback) turn the affinities into neuron ids.
4. ``seqvision.eval.em_metrics``: VOI and ARAND against a ground truth.

``segment`` and ``evaluate`` run steps 1-3 and 4 on files (``seqvision segment`` and
``seqvision eval-seg``).

Checkpoints (``save_segmenter`` / ``load_segmenter``) are described in ``em_checkpoint``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from seqvision.data.volumes import LABELS_KEY, LazyVolume, open_volume
from seqvision.eval.em.checkpoint import SegmenterConfig, load_segmenter
from seqvision.eval.em.metrics import SegmentationScores, evaluate_segmentation
from seqvision.utils.extras import require
from seqvision.utils.io import atomic_path, write_json_atomic

from . import postprocess as em_postprocess

h5py = require("h5py", "em", "EM segmentation")

__all__ = ["AFFINITIES_KEY", "SegmentResult", "evaluate", "predict_affinities", "segment", "write_evaluation"]

_logger = logging.getLogger(__name__)

AFFINITIES_KEY = "volumes/affinities"
"""Where ``segment`` writes the affinities: float32 (3, Z, Y, X), channels (z, y, x)."""

# Raw uint8 / uint16 is scaled by its dtype's range, as EMCropDataset does in training.
_DTYPE_RANGE = {np.dtype(np.uint8): (0.0, 255.0), np.dtype(np.uint16): (0.0, 65535.0)}
_SLAB_VOXELS = 1 << 24


# ------------------------------------------------------------------------------ sliding-window inference


def _check_window(window: Sequence[int], model: nn.Module) -> tuple[int, int, int]:
    size = tuple(window)
    if len(size) != 3 or not all(isinstance(s, int | np.integer) and s > 0 for s in size):
        raise ValueError(f"window must be three positive ints (z, y, x), got {window!r}")
    # EMSegMamba halves every axis 4 times; say so before the first window fails inside the model.
    encoder = getattr(model, "encoder", None)
    multiple = getattr(encoder, "reduction", 1)
    if any(s % multiple for s in size):
        raise ValueError(f"window must be divisible by {multiple} on every axis for this model, got {size}")
    return tuple(int(s) for s in size)


def _check_overlap(overlap: float | Sequence[float]) -> tuple[float, float, float]:
    values = (overlap,) * 3 if np.isscalar(overlap) else tuple(overlap)
    if len(values) != 3 or not all(0 <= float(v) < 1 for v in values):
        raise ValueError(f"overlap must be in [0, 1) (one value or one per axis), got {overlap!r}")
    return tuple(float(v) for v in values)


def _window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one axis: a stride of window * (1 - overlap), the last flush with the end."""
    if size <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _gaussian(window: int, sigma_scale: float) -> np.ndarray:
    """float64 (window,) Gaussian centred on the window, peak 1, sigma = sigma_scale * window."""
    position = np.arange(window) - (window - 1) / 2
    return np.exp(-0.5 * (position / (sigma_scale * window)) ** 2)


def _axis_weights(size: int, window: int, starts: list[int], sigma_scale: float) -> list[np.ndarray]:
    """Each window's blending weights along one axis, divided by the sum over all windows there.

    A window's weight is a product of one Gaussian per axis and the windows are all combinations
    of the per-axis starts, so the total weight at (z, y, x) is the product of three per-axis sums
    and normalising factorises: nothing the size of the volume has to be accumulated.
    """
    gaussian = _gaussian(window, sigma_scale)
    total = np.zeros(max(size, window))
    for start in starts:
        total[start : start + window] += gaussian
    return [(gaussian / total[start : start + window]).astype(np.float32) for start in starts]


def _intensity_range(volume: Any) -> tuple[float, float]:
    """(low, high) that scales raw to [0, 1]: the dtype's range for uint8 / uint16, else the volume's
    min and max (read in slabs; NaN or inf is an error)."""
    dtype = np.dtype(volume.dtype)
    if dtype in _DTYPE_RANGE:
        return _DTYPE_RANGE[dtype]
    low, high = math.inf, -math.inf
    step = max(1, _SLAB_VOXELS // max(1, volume.shape[1] * volume.shape[2]))
    for z in range(0, volume.shape[0], step):
        slab = np.asarray(volume[z : z + step])
        if dtype.kind == "f" and not np.isfinite(slab).all():
            last = min(z + step, volume.shape[0]) - 1
            raise ValueError(
                f"{_name(volume)}: raw intensities contain NaN or infinite values (sections {z} to {last})"
            )
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
    return low, high


def _name(volume: Any) -> str:
    """How errors name a volume: its file and key where it has them."""
    return volume.name if isinstance(volume, LazyVolume) else "volume"


def _open_raw(volume: Any) -> Any:
    if torch.is_tensor(volume):
        volume = volume.detach().cpu().numpy()
    return open_volume(volume)  # checks: 3-D, not empty, numbers; opens paths lazily


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(itertools.chain(model.parameters(), model.buffers()), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    dtype = parameter.dtype if parameter.is_floating_point() else torch.float32
    return parameter.device, dtype


def _read_window(volume: Any, start: Sequence[int], window: Sequence[int], scale: tuple[float, float]):
    """float32 window (Z, Y, X) at ``start``, scaled to [0, 1] and reflected past the volume's end."""
    region = tuple(slice(s, min(s + w, n)) for s, w, n in zip(start, window, volume.shape, strict=True))
    values = np.asarray(volume[region], dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError(
            f"{_name(volume)}: raw intensities contain NaN or infinite values in the window at {tuple(start)}"
        )
    low, high = scale
    values = np.clip((values - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    padding = [(0, w - v) for w, v in zip(window, values.shape, strict=True)]
    if any(after for _, after in padding):
        values = np.pad(values, padding, mode="reflect")
    return values


def _prepare_output(out: Any, channels: int, shape: tuple[int, int, int]) -> Any:
    if out is None:
        return np.zeros((channels, *shape), dtype=np.float32)
    if tuple(out.shape) != (channels, *shape):
        raise ValueError(f"out must have shape {(channels, *shape)} (C, Z, Y, X), got {tuple(out.shape)}")
    if isinstance(out, np.ndarray):
        out.fill(0)
    else:  # an HDF5 / zarr dataset: zeroed slab by slab so that memory stays bounded
        step = max(1, _SLAB_VOXELS // max(1, channels * shape[1] * shape[2]))
        for z in range(0, shape[0], step):
            out[:, z : z + step] = np.zeros((channels, min(step, shape[0] - z), *shape[1:]), np.float32)
    return out


def predict_affinities(
    model: nn.Module,
    volume: Any,
    window: Sequence[int] = (16, 160, 160),
    overlap: float | Sequence[float] = 0.25,
    batch_size: int = 1,
    *,
    progress: bool = True,
    out: Any = None,
    device: str | torch.device | None = None,
    intensity_range: tuple[float, float] | None = None,
    sigma_scale: float = 0.125,
) -> Any:
    """Affinities of a whole volume by sliding-window inference with Gaussian blending.

    Windows of ``window`` voxels step by ``window * (1 - overlap)`` along each axis (the last one
    flush with the volume's end); along an axis shorter than the window, the volume is reflected up
    to the window's size and the prediction cropped back. Each window's prediction is weighted by
    a Gaussian (sigma ``sigma_scale`` x the window, nnU-Net's and MONAI's default 1/8) that trusts
    the window's centre over its border, and the weights are normalised to sum to one at every
    voxel. Memory is one batch of windows plus the output: ``out`` may be an HDF5 (or zarr) dataset,
    written window by window, for volumes larger than memory.

    Args:
        model: maps (B, 1, z, y, x) in [0, 1] to (B, C, z, y, x) (``EMSegMamba``: sigmoid
            affinities). Run in eval mode under ``torch.no_grad``; its mode is restored after.
        volume: raw (Z, Y, X): a numpy array, tensor, h5py / zarr dataset, ``LazyVolume``, or a
            path / ``"file.h5:key"`` spec (read window by window).
        window: (z, y, x) window size; divisible by 16 for ``EMSegMamba``.
        overlap: fraction of a window shared with the next one, per axis or for all.
        batch_size: windows per forward pass.
        progress: show a tqdm bar over the windows.
        out: None (a new float32 array) or a preallocated (C, Z, Y, X) array / dataset, overwritten.
        device: run the model there (it is moved); default: where its parameters are.
        intensity_range: (low, high) mapped to (0, 1); default as in training: uint8 / uint16 by
            their dtype's range, other dtypes by the volume's own min and max.
        sigma_scale: the Gaussian's sigma as a fraction of the window.

    Returns:
        ``out``: float32 (C, Z, Y, X), channels (z, y, x) for affinities.
    """
    source = volume
    volume = _open_raw(volume)
    try:
        return _predict(
            model, volume, window, overlap, batch_size, progress, out, device, intensity_range, sigma_scale
        )
    finally:
        if isinstance(volume, LazyVolume) and volume is not source:
            volume.close()  # opened here from a path: the caller gets no open file


def _predict(
    model: nn.Module,
    volume: Any,
    window: Sequence[int],
    overlap: float | Sequence[float],
    batch_size: int,
    progress: bool,
    out: Any,
    device: str | torch.device | None,
    intensity_range: tuple[float, float] | None,
    sigma_scale: float,
) -> Any:
    window = _check_window(window, model)
    overlaps = _check_overlap(overlap)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    shape = tuple(int(s) for s in volume.shape)
    scale = _intensity_range(volume) if intensity_range is None else tuple(float(v) for v in intensity_range)
    starts = [_window_starts(n, w, o) for n, w, o in zip(shape, window, overlaps, strict=True)]
    weights = [_axis_weights(n, w, s, sigma_scale) for n, w, s in zip(shape, window, starts, strict=True)]
    positions = list(itertools.product(*(range(len(s)) for s in starts)))  # z-major: HDF5 chunk locality

    if device is not None:
        model.to(device)
    device, dtype = _model_device_dtype(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(positions), desc="affinities", unit="window", disable=not progress)
    try:
        with torch.no_grad():
            for first in range(0, len(positions), batch_size):
                batch = positions[first : first + batch_size]
                corners = [tuple(starts[a][i] for a, i in enumerate(p)) for p in batch]
                raw = np.stack([_read_window(volume, corner, window, scale) for corner in corners])
                prediction = model(torch.from_numpy(raw[:, None]).to(device=device, dtype=dtype))
                prediction = _check_prediction(prediction, len(batch), window)
                if first == 0:
                    out = _prepare_output(out, prediction.shape[1], shape)
                for index, corner, values in zip(batch, corners, prediction, strict=True):
                    _accumulate(out, values, corner, shape, [weights[a][i] for a, i in enumerate(index)])
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return out


def _check_prediction(prediction: Any, count: int, window: tuple[int, int, int]) -> np.ndarray:
    if not torch.is_tensor(prediction) or prediction.dim() != 5 or prediction.shape[0] != count:
        got = tuple(prediction.shape) if torch.is_tensor(prediction) else type(prediction).__name__
        raise ValueError(f"the model must return (B, C, *window) = ({count}, C, *{window}), got {got}")
    if tuple(prediction.shape[2:]) != window:
        raise ValueError(f"the model returned windows of {tuple(prediction.shape[2:])}, expected {window}")
    values = prediction.float().cpu().numpy()
    if not np.isfinite(values).all():
        raise ValueError("the model returned NaN or infinite values (corrupt weights, or fp16 overflow?)")
    return values


def _accumulate(
    out: Any, values: np.ndarray, corner: Sequence[int], shape: Sequence[int], weights: list[np.ndarray]
) -> None:
    """Add one window's normalised, weighted prediction (C, z, y, x) into ``out`` at ``corner``."""
    extent = [min(w, n - s) for w, n, s in zip(values.shape[1:], shape, corner, strict=True)]
    wz, wy, wx = (w[:e] for w, e in zip(weights, extent, strict=True))
    contribution = values[:, : extent[0], : extent[1], : extent[2]] * (
        wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
    )
    region = (slice(None), *(slice(s, s + e) for s, e in zip(corner, extent, strict=True)))
    if isinstance(out, np.ndarray):
        out[region] += contribution
    else:  # read-modify-write: h5py and zarr datasets have no in-place add
        out[region] = np.asarray(out[region]) + contribution


# ------------------------------------------------------------------------------------------ file level


@dataclass(frozen=True)
class SegmentResult:
    """What ``segment`` wrote: the file, its dataset keys and the segment counts."""

    path: Path
    affinities_key: str
    segmentation_keys: dict[float, str]
    shape: tuple[int, int, int]
    segments: dict[float, int]


def _threshold_key(segmentation_key: str, threshold: float, first: bool) -> str:
    return segmentation_key if first else f"{segmentation_key}_threshold_{threshold:g}"


def _write_volume(file: h5py.File, key: str, data: np.ndarray, attrs: Mapping[str, Any]) -> None:
    dataset = file.create_dataset(key, data=data, chunks=True, compression="gzip")
    for name, value in attrs.items():
        dataset.attrs[name] = value


def _input_resolution(volume: Any) -> np.ndarray | None:
    """CREMI's 'resolution' attribute of an HDF5 input, to copy to the outputs."""
    if not (isinstance(volume, LazyVolume) and volume.path.suffix.lower() in (".h5", ".hdf5", ".hdf")):
        return None
    with h5py.File(volume.path, "r") as file:
        value = file[volume.key].attrs.get("resolution")
    return None if value is None else np.asarray(value, dtype=np.float64)


def segment(
    checkpoint: str | os.PathLike,
    raw: str | os.PathLike,
    output: str | os.PathLike,
    *,
    window: Sequence[int] = (16, 160, 160),
    overlap: float = 0.25,
    batch_size: int = 1,
    thresholds: Sequence[float] = (0.5,),
    method: str = "auto",
    scoring: str = "median",
    mode: str = "2d",
    seed_method: str = "maxima_distance",
    boundary_threshold: float = 0.5,
    min_seed_distance: int = 3,
    affinities_key: str = AFFINITIES_KEY,
    segmentation_key: str = LABELS_KEY,
    config: SegmenterConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Segment a raw volume file with a segmenter checkpoint; write affinities and neuron ids.

    ``raw`` is a raw volume file (``"file.h5:key"``, default key ``volumes/raw``; zarr, TIFF, .npy).
    ``output`` is an HDF5 file, written atomically (a temporary file renamed into place), holding
    ``affinities_key`` float32 (3, Z, Y, X) and, per threshold, uint64 (Z, Y, X) ids: the first
    threshold at ``segmentation_key`` (CREMI's ``volumes/labels/neuron_ids``, so ``eval-seg`` and
    ``read_labels`` find it), the others at ``<segmentation_key>_threshold_<t>``. The other
    arguments are those of ``predict_affinities``, ``watershed_fragments`` and ``agglomerate``.
    """
    output = Path(output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: no such folder to write {output.name} into")
    thresholds = list(dict.fromkeys(float(t) for t in thresholds))  # each once, in the order given
    volume = open_volume(raw)  # before loading the model: a bad input fails fast
    try:
        model = load_segmenter(checkpoint, config, device=device or _default_device())
        affinities = predict_affinities(model, volume, window, overlap, batch_size, progress=progress)
        del model
        fragments = em_postprocess.watershed_fragments(
            affinities,
            mode=mode,
            seed_method=seed_method,
            boundary_threshold=boundary_threshold,
            min_seed_distance=min_seed_distance,
        )
        segmentations = em_postprocess.agglomerate(
            affinities, fragments, thresholds, scoring=scoring, method=method
        )
        resolution = _input_resolution(volume)
    finally:
        if isinstance(volume, LazyVolume):
            volume.close()

    common = {} if resolution is None else {"resolution": resolution}
    volumes = {
        affinities_key: (affinities, {**common, "channels": "zyx", "window": window, "overlap": overlap})
    }
    keys = {}
    for i, (threshold, segmentation) in enumerate(zip(thresholds, segmentations, strict=True)):
        keys[threshold] = _threshold_key(segmentation_key, threshold, first=i == 0)
        attrs = {**common, "threshold": threshold, "method": method, "scoring": scoring, "mode": mode}
        volumes[keys[threshold]] = (segmentation, attrs)
    _write_file(output, volumes, {"checkpoint": str(checkpoint), "raw": str(raw)})
    _logger.info("wrote %s: affinities and %d segmentation(s) of %s", output, len(keys), affinities.shape[1:])
    counts = {t: int(s.max()) for t, s in zip(thresholds, segmentations, strict=True)}
    return SegmentResult(output, affinities_key, keys, affinities.shape[1:], counts)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_file(
    path: Path, volumes: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]], attrs: Mapping[str, Any]
) -> None:
    """Write datasets (key -> (data, attributes)) and file attributes to an HDF5 file, atomically."""
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as file:
        for name, value in attrs.items():
            file.attrs[name] = value
        for key, (data, dataset_attrs) in volumes.items():
            _write_volume(file, key, data, dataset_attrs)


def evaluate(
    prediction: str | os.PathLike, ground_truth: str | os.PathLike, *, ignore_label: int | None = 0
) -> SegmentationScores:
    """VOI and ARAND of a segmentation file against a ground-truth file.

    Both are label volumes (``"file.h5:key"``; HDF5 and zarr default to
    ``volumes/labels/neuron_ids``), read slab by slab. Raises ValueError when the shapes differ.
    """
    pred = open_volume(prediction, labels=True)
    gt = open_volume(ground_truth, labels=True)
    try:
        if tuple(pred.shape) != tuple(gt.shape):
            raise ValueError(
                f"prediction {prediction} has shape {tuple(pred.shape)}, ground truth {ground_truth} "
                f"{tuple(gt.shape)}; they must match"
            )
        return evaluate_segmentation(pred, gt, ignore_label=ignore_label)
    finally:
        for volume in (pred, gt):
            if isinstance(volume, LazyVolume):
                volume.close()


def write_evaluation(
    path: str | os.PathLike,
    scores: SegmentationScores,
    *,
    prediction: str | os.PathLike,
    ground_truth: str | os.PathLike,
) -> Path:
    """``evaluate``'s scores, with the two files they compare, as JSON at ``path``, atomically."""
    values = {**scores.to_dict(), "prediction": str(prediction), "ground_truth": str(ground_truth)}
    return write_json_atomic(path, values)
