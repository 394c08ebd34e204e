"""Electron-microscopy volumes: readers, a CREMI writer and a random-crop dataset.

Volumes are 3-D arrays in (Z, Y, X) order: Z indexes the serial sections, Y and X the pixels of a
section. Serial-section EM is anisotropic: CREMI's voxels are 40 nm along z and 4 nm in y/x, so
everything here that has a physical size (a blur) takes it in nm and converts it per axis with the
(z, y, x) ``voxel_size``, and nothing blurs or adds noise across sections.

Readers (``read_volume`` for raw intensities, ``read_labels`` for neuron ids, ``open_volume`` for
either without loading it) take HDF5 (CREMI layout: raw at ``volumes/raw``, neuron ids at
``volumes/labels/neuron_ids``; any dataset key), zarr (an array, or a group and a key), multi-page
TIFF stacks (one page per section) and ``.npy`` files, and also ``"file.h5:dataset/key"`` spec
strings. A file they cannot use is an error that names the file and the problem, never a silently
wrong array.

``EMCropDataset`` draws random crops (16 x 160 x 160 by default, TokenUnify's input) from one or more
raw volumes, with optional label volumes for segmentation, scales them to [0, 1] and applies EM
augmentations (``EMAugment``). Sample ``i`` of epoch ``e`` depends only on ``(seed, e, i)``, so a
resumed or distributed run sees exactly the same data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from seqvision.utils.extras import require
from seqvision.utils.io import atomic_path

_PURPOSE = "reading and writing EM volumes"
h5py = require("h5py", "em", _PURPOSE)
tifffile = require("tifffile", "em", _PURPOSE)
zarr = require("zarr", "em", _PURPOSE)
gaussian_filter = require("scipy.ndimage", "em", _PURPOSE).gaussian_filter

__all__ = [
    "CREMI_RESOLUTION",
    "LABELS_KEY",
    "RAW_KEY",
    "EMAugment",
    "EMCropDataset",
    "LazyVolume",
    "check_voxel_size",
    "open_volume",
    "read_labels",
    "read_volume",
    "split_volume_spec",
    "write_cremi",
]

_logger = logging.getLogger(__name__)

RAW_KEY = "volumes/raw"
LABELS_KEY = "volumes/labels/neuron_ids"
CREMI_RESOLUTION = (40.0, 4.0, 4.0)
"""CREMI's voxel size in nm, (z, y, x): 40 nm sections imaged at 4 nm per pixel."""

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_ZARR_SUFFIXES = (".zarr", ".zr")
_TIFF_SUFFIXES = (".tif", ".tiff")
_NPY_SUFFIXES = (".npy",)
_SUFFIXES = _HDF5_SUFFIXES + _ZARR_SUFFIXES + _TIFF_SUFFIXES + _NPY_SUFFIXES
# uint8 / uint16 raw is scaled by its dtype's range, not by the values a volume happens to hold.
_DTYPE_RANGE = {np.dtype(np.uint8): (0.0, 255.0), np.dtype(np.uint16): (0.0, 65535.0)}


# ----------------------------------------------------------------------------------------- readers


def split_volume_spec(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """Split ``"path.h5:volumes/raw"`` into ``(Path("path.h5"), "volumes/raw")``.

    The split happens at the last ``:`` that follows a known volume suffix (.h5, .hdf5, .hdf, .zarr,
    .zr, .tif, .tiff, .npy), so ``C:/data/a.h5`` and paths with colons elsewhere stay whole. A
    ``PathLike`` is always a path; a string without a key gives ``(path, None)``.
    """
    if not isinstance(spec, str):
        return Path(spec), None
    for i in range(len(spec) - 1, 0, -1):
        if spec[i] == ":" and spec[:i].rstrip("/").lower().endswith(_SUFFIXES):
            return Path(spec[:i]), spec[i + 1 :] or None
    return Path(spec), None


def check_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    """Validate a (z, y, x) voxel size in nm: three positive numbers."""
    try:
        size = tuple(float(s) for s in voxel_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or not all(s > 0 for s in size):
        raise ValueError(f"voxel_size must be three positive sizes in nm (z, y, x), got {voxel_size!r}")
    return size


def _check_volume(shape: Sequence[int], dtype: Any, name: str, labels: bool) -> None:
    """Raise if an array of this shape and dtype is no usable (Z, Y, X) raw or label volume."""
    shape = tuple(shape)
    if len(shape) != 3:
        hint = " (one image: stack its sections into (Z, Y, X))" if len(shape) == 2 else ""
        raise ValueError(f"{name}: expected a 3-D (Z, Y, X) volume, got {len(shape)}-D shape {shape}{hint}")
    if 0 in shape:
        raise ValueError(f"{name}: the volume is empty (shape {shape})")
    try:
        kind = np.dtype(dtype).kind
    except TypeError:  # not a numpy dtype at all
        kind = "?"
    if labels and kind not in "iu":
        raise TypeError(f"{name}: labels must be integer neuron ids, got dtype {dtype}")
    if not labels and kind not in "iuf":
        raise TypeError(
            f"{name}: raw intensities must be integer or floating point numbers, got dtype {dtype}"
        )


def _check_finite(values: np.ndarray, name: str) -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"{name}: raw intensities contain NaN or infinite values")


class LazyVolume:
    """A 3-D dataset in an HDF5 file or a zarr store, read slice by slice on demand.

    The file is opened on the first read in each process and reopened after a fork, and pickling
    drops the open handle, so a ``LazyVolume`` can go to DataLoader workers (h5py handles cannot be
    shared across processes). Indexing returns numpy arrays: ``volume[0:16, 100:260, 100:260]``.
    """

    def __init__(self, path: str | os.PathLike, key: str | None, shape: Sequence[int], dtype: np.dtype):
        self.path = Path(path)
        self.key = key
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._array: Any = None
        self._file: h5py.File | None = None
        self._pid: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def name(self) -> str:
        return f"{self.path}:{self.key}" if self.key else str(self.path)

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            self._open()
        return np.asarray(self._array[index])

    def _open(self) -> None:
        if self.path.suffix.lower() in _HDF5_SUFFIXES:
            self._file = h5py.File(self.path, "r")
            self._array = self._file[self.key]
        else:
            store = zarr.open(str(self.path), mode="r")
            self._array = store[self.key] if self.key else store
        self._pid = os.getpid()

    def close(self) -> None:
        """Close the file; the next read opens it again."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._array = self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_file": None, "_pid": None}

    def __repr__(self) -> str:
        return f"LazyVolume({self.name!r}, shape={self.shape}, dtype={self.dtype})"


def _dataset_keys_hdf5(file: h5py.File) -> list[str]:
    keys: list[str] = []
    file.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
    return keys


def _array_keys_zarr(group: Any, prefix: str = "") -> list[str]:
    keys = [f"{prefix}{name}" for name, _ in group.arrays()]
    for name, child in group.groups():
        keys += _array_keys_zarr(child, f"{prefix}{name}/")
    return sorted(keys)


def _missing_key(path: Path, key: str, found: list[str], what: str) -> ValueError:
    listed = ", ".join(repr(k) for k in found) if found else "none"
    return ValueError(f"{path}: no dataset {key!r} in this {what} file; datasets found: {listed}")


def _open_hdf5(path: Path, key: str | None, labels: bool) -> LazyVolume:
    key = key or (LABELS_KEY if labels else RAW_KEY)
    try:
        file = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: cannot be read as HDF5 ({err})") from err
    with file:
        node = file.get(key)
        if not isinstance(node, h5py.Dataset):
            raise _missing_key(path, key, _dataset_keys_hdf5(file), "HDF5")
        shape, dtype = node.shape, node.dtype
    _check_volume(shape, dtype, f"{path}:{key}", labels)
    return LazyVolume(path, key, shape, dtype)


def _open_zarr(path: Path, key: str | None, labels: bool) -> LazyVolume:
    try:
        store = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several unrelated types for a folder it cannot read
        raise ValueError(f"{path}: cannot be read as zarr ({err})") from err
    if isinstance(store, zarr.Array):
        if key:
            raise ValueError(f"{path}: is a zarr array, not a group; it has no key {key!r}")
        array, name = store, str(path)
    else:
        key = key or (LABELS_KEY if labels else RAW_KEY)
        try:
            array = store[key]
        except KeyError:
            array = None
        if not isinstance(array, zarr.Array):
            raise _missing_key(path, key, _array_keys_zarr(store), "zarr") from None
        name = f"{path}:{key}"
    _check_volume(array.shape, array.dtype, name, labels)
    return LazyVolume(path, key, array.shape, np.dtype(array.dtype))


def _load_tiff(path: Path) -> np.ndarray:
    try:
        return tifffile.imread(path)
    except (tifffile.TiffFileError, ValueError) as err:
        raise ValueError(f"{path}: cannot be read as TIFF ({err})") from err


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as err:
        # numpy refuses object arrays (without pickle, or to map them); say what that means here.
        if "allow_pickle" in str(err) or "Python objects" in str(err):
            raise TypeError(f"{path}: holds Python objects, not numbers (an object array)") from err
        raise ValueError(f"{path}: cannot be read as .npy ({err})") from err


def _is_array_like(source: Any) -> bool:
    return isinstance(source, np.ndarray | h5py.Dataset | zarr.Array | LazyVolume)


def _describe(source: Any) -> str:
    """How error messages name a volume: its file and key where it has them."""
    if isinstance(source, LazyVolume):
        return source.name
    if isinstance(source, h5py.Dataset):
        return f"{source.file.filename}:{source.name.lstrip('/')}"
    if isinstance(source, str | os.PathLike):
        return str(source)
    return f"{type(source).__name__} of shape {tuple(source.shape)}"


def open_volume(
    source: str | os.PathLike | np.ndarray | h5py.Dataset | zarr.Array | LazyVolume,
    key: str | None = None,
    *,
    labels: bool = False,
) -> np.ndarray | LazyVolume | h5py.Dataset | zarr.Array:
    """Open a (Z, Y, X) volume without loading it, after checking its shape and dtype.

    Args:
        source: a file (``.h5``/``.hdf5``/``.hdf``, ``.zarr``/``.zr``, ``.tif``/``.tiff``, ``.npy``),
            a ``"file.h5:key"`` spec string, or an array or dataset already open (checked and
            returned as is).
        key: the dataset inside an HDF5 file or zarr group; default CREMI's ``volumes/raw``
            (``volumes/labels/neuron_ids`` when ``labels``). Overrides a key in the spec string.
        labels: check for integer neuron ids instead of raw intensities.

    Returns:
        HDF5 and zarr: a ``LazyVolume`` read on indexing; ``.npy``: a read-only memory map; TIFF:
        the loaded array (TIFF stacks are read whole). All index as (Z, Y, X).

    Raises:
        FileNotFoundError: no such file. ValueError: no such dataset (the message lists those
        found), not 3-D, empty, unreadable, unknown suffix. TypeError: not numbers (raw), not
        integers (labels).
    """
    if _is_array_like(source):
        _check_volume(source.shape, source.dtype, _describe(source), labels)
        return source
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"source must be a path, a 'file.h5:key' string or an array, got {type(source).__name__}"
        )
    path, spec_key = split_volume_spec(source)
    key = key or spec_key
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in _HDF5_SUFFIXES:
        return _open_hdf5(path, key, labels)
    if suffix in _ZARR_SUFFIXES:
        return _open_zarr(path, key, labels)
    if suffix not in _TIFF_SUFFIXES + _NPY_SUFFIXES:
        raise ValueError(f"{path}: unknown volume format {suffix!r}; expected one of {', '.join(_SUFFIXES)}")
    if key:
        raise ValueError(f"{path}: a key ({key!r}) applies only to HDF5 files and zarr groups")
    array = _load_tiff(path) if suffix in _TIFF_SUFFIXES else _load_npy(path, mmap=True)
    _check_volume(array.shape, array.dtype, str(path), labels)
    return array


def _read(source: Any, key: str | None, labels: bool) -> np.ndarray:
    volume = open_volume(source, key, labels=labels)
    name = _describe(volume if _is_array_like(source) else source)
    if isinstance(volume, LazyVolume) and volume is not source:
        try:
            array = volume[...]
        finally:
            volume.close()  # the caller gets memory, not an open file
    else:
        array = np.array(volume) if isinstance(volume, np.memmap) else np.asarray(volume[...])
    if not labels:
        _check_finite(array, name)
    return array


def read_volume(
    source: str | os.PathLike | np.ndarray | h5py.Dataset | zarr.Array | LazyVolume, key: str | None = None
) -> np.ndarray:
    """Read a raw EM volume into memory: (Z, Y, X), integer or floating point, finite.

    ``source`` and ``key`` as in ``open_volume`` (HDF5 and zarr groups default to ``volumes/raw``).
    Raises what ``open_volume`` raises, and ValueError when floating-point data holds NaN or inf.
    """
    return _read(source, key, labels=False)


def read_labels(
    source: str | os.PathLike | np.ndarray | h5py.Dataset | zarr.Array | LazyVolume, key: str | None = None
) -> np.ndarray:
    """Read a neuron-id volume into memory: (Z, Y, X), integer ids.

    ``source`` and ``key`` as in ``open_volume`` (HDF5 and zarr groups default to
    ``volumes/labels/neuron_ids``).
    """
    return _read(source, key, labels=True)


def write_cremi(
    path: str | os.PathLike,
    raw: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    resolution: Sequence[float] = CREMI_RESOLUTION,
    compression: str | None = "gzip",
) -> Path:
    """Write a CREMI-layout HDF5 file atomically; return its path.

    Writes ``volumes/raw`` (raw as given, (Z, Y, X)) and, with ``labels`` of the same shape,
    ``volumes/labels/neuron_ids`` as uint64; each dataset gets a ``resolution`` attribute (z, y, x
    in nm). The file is written under a temporary name in the same folder and moved into place with
    ``os.replace``, so readers never see a half-written file and an error leaves no partial file.
    """
    path = Path(path)
    resolution = check_voxel_size(resolution)
    raw = np.asarray(raw)
    labels = None if labels is None else np.asarray(labels)
    _check_volume(raw.shape, raw.dtype, "raw", labels=False)
    _check_finite(raw, "raw")
    if labels is not None:
        _check_volume(labels.shape, labels.dtype, "labels", labels=True)
        if labels.shape != raw.shape:
            raise ValueError(f"labels shape {labels.shape} differs from raw shape {raw.shape}")
        if labels.dtype.kind == "i" and labels.min() < 0:
            raise ValueError("labels: neuron ids must be >= 0 (CREMI stores them as uint64)")
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as file:
        dataset = file.create_dataset(RAW_KEY, data=raw, chunks=True, compression=compression)
        dataset.attrs["resolution"] = np.asarray(resolution, dtype=np.float64)
        if labels is not None:
            ids = labels.astype(np.uint64, copy=False)
            dataset = file.create_dataset(LABELS_KEY, data=ids, chunks=True, compression=compression)
            dataset.attrs["resolution"] = np.asarray(resolution, dtype=np.float64)
    _logger.info("wrote %s: raw %s %s", path, raw.shape, raw.dtype)
    return path


# ----------------------------------------------------------------------------------- augmentations


def _check_probability(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_range(name: str, value: Sequence[float], low: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {value!r}")


@dataclass(frozen=True)
class EMAugment:
    """Augmentations for anisotropic serial-section EM crops, each applied with its own probability.

    Geometric (applied identically to raw and labels): flips along z, y and x, and a y <-> x
    transpose, only when the crop is square in y/x and the y and x voxel sizes are equal (otherwise
    it would change the physical geometry). Intensity (raw only, labels untouched), in this order:

    - ``intensity_p``: contrast x U(1 - contrast, 1 + contrast), brightness + U(-brightness,
      brightness), then gamma log-uniform in ``gamma``, on the whole crop.
    - ``blurred_section_p``: 1 to ``max_sections`` sections blurred in y/x by a Gaussian whose sigma
      is drawn in nm from ``blur_sigma_nm`` and converted per axis with the voxel size (out-of-focus
      sections).
    - ``noise_p``: Gaussian noise with a standard deviation drawn per section from U(0,
      ``noise_sigma``) (sections are imaged one by one).
    - ``missing_section_p``: 1 to ``max_sections`` sections replaced by 0 or the crop's mean (lost or
      torn sections); their labels are kept, so a segmentation model learns to bridge them.

    Nothing mixes sections: every blur and noise field lives in one y/x plane.
    """

    flip_z_p: float = 0.5
    flip_y_p: float = 0.5
    flip_x_p: float = 0.5
    transpose_p: float = 0.5
    intensity_p: float = 0.5
    contrast: float = 0.1
    brightness: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.4)
    blurred_section_p: float = 0.1
    blur_sigma_nm: tuple[float, float] = (4.0, 12.0)
    noise_p: float = 0.3
    noise_sigma: float = 0.05
    missing_section_p: float = 0.1
    max_sections: int = 2

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            if name.endswith("_p"):
                _check_probability(name, getattr(self, name))
        if not (0 <= self.contrast < 1 and self.brightness >= 0 and self.noise_sigma >= 0):
            raise ValueError(
                f"need 0 <= contrast < 1, brightness >= 0, noise_sigma >= 0; got {self.contrast}, "
                f"{self.brightness}, {self.noise_sigma}"
            )
        _check_range("gamma", self.gamma, low=1e-6)
        _check_range("blur_sigma_nm", self.blur_sigma_nm, low=0.0)
        if not (isinstance(self.max_sections, int) and self.max_sections >= 1):
            raise ValueError(f"max_sections must be an int >= 1, got {self.max_sections!r}")

    def __call__(
        self,
        raw: np.ndarray,
        labels: np.ndarray | None,
        rng: np.random.Generator,
        voxel_size: Sequence[float] = CREMI_RESOLUTION,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment one crop.

        Args:
            raw: float32 (Z, Y, X) in [0, 1].
            labels: (Z, Y, X) ids or None.
            rng: the sample's generator; the draws are made in a fixed order.
            voxel_size: (z, y, x) in nm.

        Returns:
            ``(raw, labels)``: raw float32 (Z, Y, X) in [0, 1] (a new array), labels moved the same
            way (possibly a view of the input).
        """
        raw, labels = self.geometric(raw, labels, rng, voxel_size)
        return self.intensity(raw, rng, voxel_size), labels

    def geometric(
        self,
        raw: np.ndarray,
        labels: np.ndarray | None,
        rng: np.random.Generator,
        voxel_size: Sequence[float] = CREMI_RESOLUTION,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Flips and the y/x transpose, the same on raw and labels; returns views."""
        for axis, p in enumerate((self.flip_z_p, self.flip_y_p, self.flip_x_p)):
            if rng.random() < p:
                raw = np.flip(raw, axis)
                labels = None if labels is None else np.flip(labels, axis)
        square = raw.shape[1] == raw.shape[2] and voxel_size[1] == voxel_size[2]
        if rng.random() < self.transpose_p and square:
            raw = raw.swapaxes(1, 2)
            labels = None if labels is None else labels.swapaxes(1, 2)
        return raw, labels

    def intensity(
        self, raw: np.ndarray, rng: np.random.Generator, voxel_size: Sequence[float] = CREMI_RESOLUTION
    ) -> np.ndarray:
        """The intensity augmentations on raw float32 (Z, Y, X) in [0, 1]; returns a new array."""
        raw = np.array(raw, dtype=np.float32)  # a contiguous copy: the input may be a flipped view
        if rng.random() < self.intensity_p:
            scale = rng.uniform(1 - self.contrast, 1 + self.contrast)
            shift = rng.uniform(-self.brightness, self.brightness)
            gamma = np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1])))
            raw = np.clip(raw * scale + shift, 0, 1, out=raw) ** np.float32(gamma)
        if rng.random() < self.blurred_section_p:
            sigma_nm = rng.uniform(*self.blur_sigma_nm)
            sigma = (sigma_nm / voxel_size[1], sigma_nm / voxel_size[2])
            for z in self._sections(raw.shape[0], rng):
                raw[z] = gaussian_filter(raw[z], sigma, mode="reflect")
        if rng.random() < self.noise_p:
            sigma = rng.uniform(0, self.noise_sigma, size=(raw.shape[0], 1, 1)).astype(np.float32)
            raw += sigma * rng.standard_normal(raw.shape, dtype=np.float32)
        if rng.random() < self.missing_section_p:
            for z in self._sections(raw.shape[0], rng):
                raw[z] = 0.0 if rng.random() < 0.5 else raw.mean()
        return np.clip(raw, 0, 1, out=raw)

    def _sections(self, depth: int, rng: np.random.Generator) -> np.ndarray:
        count = rng.integers(1, min(self.max_sections, depth) + 1)
        return np.sort(rng.choice(depth, size=count, replace=False))


# ----------------------------------------------------------------------------------------- dataset


@dataclass
class _Volume:
    """One raw volume (and its labels) as the dataset reads it."""

    raw: Any  # indexable (Z, Y, X): np.ndarray, LazyVolume, h5py.Dataset or zarr.Array
    labels: Any
    name: str
    low: float  # per-volume scaling: (raw - low) / (high - low)
    high: float


class EMCropDataset(Dataset):
    """Random crops of EM volumes, scaled to [0, 1] and augmented; optionally with labels.

    Each item is a dict: ``raw`` float32 tensor (1, z, y, x) in [0, 1] and, when label volumes were
    given, ``labels`` int64 tensor (z, y, x) moved by the same flips and transposes (label 0 is
    padding, see ``pad``). The dataset has ``samples_per_epoch`` items; item ``i`` in epoch ``e``
    draws everything (volume, position, augmentations) from
    ``numpy.random.default_rng((seed, e, i))``, so it is the same in every run, on every rank and in
    every DataLoader worker. Call ``set_epoch`` before each epoch (with ``persistent_workers=True``
    the workers keep the epoch they were started with).

    Args:
        raw: one raw volume or a list: paths, ``"file.h5:key"`` strings (HDF5 and zarr default to
            ``volumes/raw``) or arrays / h5py / zarr datasets (sliced lazily).
        labels: None, or one label volume per raw volume with the same shape (files default to
            ``volumes/labels/neuron_ids``).
        crop_size: (z, y, x) in voxels; TokenUnify's 16 x 160 x 160 by default.
        samples_per_epoch: the length of the dataset.
        seed: with the epoch and the index, determines every sample.
        augment: True for ``EMAugment()`` defaults, False for none, or an ``EMAugment``.
        voxel_size: (z, y, x) in nm, CREMI's (40, 4, 4) by default; converts blur sigmas given in nm
            to voxels per axis and permits the y/x transpose only when y and x are equal.
        pad: how volumes smaller than the crop along an axis are filled: ``"reflect"`` mirrors them,
            ``"constant"`` pads raw with 0 and labels with 0, ``None`` makes such volumes an error.
            The volume lands at a random offset inside the crop.
        scaling: ``"volume"``: uint8 and uint16 raw is divided by its dtype's maximum (255, 65535),
            so intensities mean the same in every crop and nothing has to be scanned; other dtypes
            are min-max scaled with the volume's own minimum and maximum (computed once, here).
            ``"crop"``: every crop min-max scaled to exactly [0, 1] (a constant crop gives 0).
        in_memory: read files into memory now (fast crops); False reads HDF5 / zarr crops from the
            file on demand (``LazyVolume``, safe with DataLoader workers) and memory-maps .npy.

    Volumes are chosen with probability proportional to their voxel count. h5py datasets passed
    directly cannot go to DataLoader worker processes; pass paths with ``in_memory=False`` instead.
    """

    def __init__(
        self,
        raw: Any,
        labels: Any = None,
        *,
        crop_size: Sequence[int] = (16, 160, 160),
        samples_per_epoch: int = 1000,
        seed: int = 0,
        augment: bool | EMAugment = True,
        voxel_size: Sequence[float] = CREMI_RESOLUTION,
        pad: Literal["reflect", "constant"] | None = "reflect",
        scaling: Literal["volume", "crop"] = "volume",
        in_memory: bool = True,
    ):
        super().__init__()
        self.crop_size = _check_crop_size(crop_size)
        if not (isinstance(samples_per_epoch, int) and samples_per_epoch > 0):
            raise ValueError(f"samples_per_epoch must be a positive int, got {samples_per_epoch!r}")
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if pad not in ("reflect", "constant", None):
            raise ValueError(f"pad must be 'reflect', 'constant' or None, got {pad!r}")
        if scaling not in ("volume", "crop"):
            raise ValueError(f"scaling must be 'volume' or 'crop', got {scaling!r}")
        if isinstance(augment, bool):
            augment = EMAugment() if augment else None
        elif not isinstance(augment, EMAugment):
            raise TypeError(f"augment must be a bool or an EMAugment, got {type(augment).__name__}")
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.epoch = 0
        self.augment = augment
        self.voxel_size = check_voxel_size(voxel_size)
        self.pad = pad
        self.scaling = scaling
        self.volumes = self._load(raw, labels, in_memory)
        sizes = np.array([np.prod(v.raw.shape, dtype=np.float64) for v in self.volumes])
        self._weights = sizes / sizes.sum()

    def _load(self, raw: Any, labels: Any, in_memory: bool) -> list[_Volume]:
        raws = _as_list(raw)
        label_list = [None] * len(raws) if labels is None else _as_list(labels)
        if not raws:
            raise ValueError("raw: need at least one volume")
        if len(label_list) != len(raws):
            raise ValueError(
                f"labels: need one label volume per raw volume, got {len(label_list)} for {len(raws)}"
            )
        volumes = []
        for source, label_source in zip(raws, label_list, strict=True):
            volume = _open(source, labels=False, in_memory=in_memory)
            name = _describe(source)
            if label_source is not None:
                label_volume = _open(label_source, labels=True, in_memory=in_memory)
                if tuple(label_volume.shape) != tuple(volume.shape):
                    raise ValueError(
                        f"{_describe(label_source)}: labels shape {tuple(label_volume.shape)} "
                        f"differs from raw {name} shape {tuple(volume.shape)}"
                    )
            else:
                label_volume = None
            if self.pad is None and any(s < c for s, c in zip(volume.shape, self.crop_size, strict=True)):
                raise ValueError(
                    f"{name}: volume shape {tuple(volume.shape)} is smaller than the crop {self.crop_size} "
                    "along some axis; pass pad='reflect' or 'constant', or a smaller crop_size"
                )
            low, high = self._intensity_range(volume, name)
            volumes.append(_Volume(volume, label_volume, name, low, high))
        return volumes

    def _intensity_range(self, volume: Any, name: str) -> tuple[float, float]:
        """The (low, high) that per-volume scaling maps to (0, 1)."""
        dtype = np.dtype(volume.dtype)
        if self.scaling == "crop":
            return 0.0, 1.0
        if dtype in _DTYPE_RANGE:
            return _DTYPE_RANGE[dtype]
        low, high = np.inf, -np.inf
        # Slabs of sections, so that a lazily read volume is never loaded whole.
        step = max(1, 2**24 // max(1, volume.shape[1] * volume.shape[2]))
        for z in range(0, volume.shape[0], step):
            slab = np.asarray(volume[z : z + step])
            _check_finite(slab, name)
            low, high = min(low, float(slab.min())), max(high, float(slab.max()))
        return low, high

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples ``__getitem__`` returns (0 at construction)."""
        if not (isinstance(epoch, int) and epoch >= 0):
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples per epoch")
        index %= len(self)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        volume = self.volumes[rng.choice(len(self.volumes), p=self._weights)]
        region, padding = self._place_crop(volume.raw.shape, rng)
        # A copy: scaling works in place, and slicing a float32 array in memory returns a view of it.
        raw = np.array(volume.raw[region], dtype=np.float32)
        if volume.raw.dtype.kind == "f":  # a lazily read or in-memory array not scanned before
            _check_finite(raw, volume.name)
        raw = self._scale(raw, volume)
        labels = None if volume.labels is None else np.asarray(volume.labels[region]).astype(np.int64)
        if any(before or after for before, after in padding):
            mode = self.pad
            raw = np.pad(raw, padding, mode=mode)
            labels = None if labels is None else np.pad(labels, padding, mode=mode)
        if self.augment is not None:
            raw, labels = self.augment(raw, labels, rng, self.voxel_size)
        item = {"raw": torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None]}
        if labels is not None:
            item["labels"] = torch.from_numpy(np.ascontiguousarray(labels))
        return item

    def _place_crop(
        self, shape: Sequence[int], rng: np.random.Generator
    ) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
        """A random crop position: the region to read and the (before, after) padding per axis."""
        region, padding = [], []
        for size, crop in zip(shape, self.crop_size, strict=True):
            if size >= crop:
                start = int(rng.integers(0, size - crop + 1))
                region.append(slice(start, start + crop))
                padding.append((0, 0))
            else:
                before = int(rng.integers(0, crop - size + 1))
                region.append(slice(0, size))
                padding.append((before, crop - size - before))
        return tuple(region), padding

    def _scale(self, raw: np.ndarray, volume: _Volume) -> np.ndarray:
        """Min-max scale float32 raw to [0, 1] in place (per volume or per crop)."""
        if self.scaling == "crop":
            low, high = float(raw.min()), float(raw.max())
        else:
            low, high = volume.low, volume.high
        raw -= low
        if high > low:
            raw /= high - low
        return np.clip(raw, 0, 1, out=raw)


def _check_crop_size(crop_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(crop_size)
    if len(size) != 3 or not all(isinstance(s, int | np.integer) and s > 0 for s in size):
        raise ValueError(f"crop_size must be three positive ints (z, y, x), got {crop_size!r}")
    return tuple(int(s) for s in size)


def _as_list(sources: Any) -> list:
    if isinstance(sources, str | os.PathLike) or _is_array_like(sources):
        return [sources]
    return list(sources)


def _open(source: Any, labels: bool, in_memory: bool) -> Any:
    if in_memory and not _is_array_like(source):
        return read_labels(source) if labels else read_volume(source)
    return open_volume(source, labels=labels)
