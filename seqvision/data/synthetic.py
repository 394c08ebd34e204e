"""Synthetic serial-section EM volumes with a known neuron segmentation.

``synthetic_em_volume`` draws a (Z, Y, X) volume that looks like anisotropic serial-section EM
(CREMI: 40 nm sections, 4 nm pixels): neurites that run mostly along z, dark membranes between them,
organelles inside them, texture, blur, shot noise and missing sections. It returns the raw uint8
image and the uint64 neuron ids it was drawn from, so pipelines can be exercised end to end (and
pretraining tried) without downloading a data set.

How it is drawn:

1. **Cells** are the Voronoi cells of random seed points in a *metric space* in which z is shrunk
   by ``elongation`` (so a cell ``cell_size_nm`` wide in y/x is ``elongation`` times longer along z,
   like a neurite) and y/x are displaced by a smooth random field (so boundaries curve instead of
   being straight polygon edges). Each section is one nearest-two-seeds query in a KD-tree; the
   two distances give every voxel its distance to the nearest cell boundary.
2. **Labels**: every voxel carries the id (>= 1) of the cell it lies in, membranes included, as in
   CREMI's ``neuron_ids`` (no background 0). Boundaries are where ids change; an affinity target
   computed from the labels marks exactly those.
3. **Intensity**: a brightness per cell plus smooth texture, dark or bright ellipsoidal organelles
   (mitochondria, vesicles) kept inside their cell, darkened by a membrane profile around
   boundaries; then a Gaussian blur that is wider in y/x than in z (in voxels), signal-dependent
   noise, and a few missing sections (uniform black or grey slices, labels kept).

Everything is drawn from one ``numpy.random.Generator`` in a fixed order: the same arguments give a
bit-identical volume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from seqvision.data.volumes import CREMI_RESOLUTION, check_voxel_size
from seqvision.utils.extras import require

_PURPOSE = "synthetic EM volumes"
gaussian_filter = require("scipy.ndimage", "em", _PURPOSE).gaussian_filter
cKDTree = require("scipy.spatial", "em", _PURPOSE).cKDTree  # noqa: N816  (scipy's name)

__all__ = ["synthetic_em_volume", "synthetic_volume"]

_logger = logging.getLogger(__name__)


def synthetic_em_volume(
    shape: Sequence[int] = (32, 256, 256),
    seed: int = 0,
    *,
    voxel_size: Sequence[float] = CREMI_RESOLUTION,
    cell_size_nm: float = 300.0,
    elongation: float = 4.0,
    membrane_width_nm: float = 16.0,
    organelle_density: float = 20.0,
    blur_sigma_nm: Sequence[float] = (12.0, 5.0, 5.0),
    noise: float = 0.03,
    missing_sections: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a synthetic EM volume and its neuron segmentation.

    Args:
        shape: (Z, Y, X) in voxels.
        seed: seeds the one random generator everything is drawn from.
        voxel_size: (z, y, x) voxel size in nm; CREMI's (40, 4, 4) by default.
        cell_size_nm: typical neurite diameter in the y/x plane, nm.
        elongation: how many times longer than wide cells are along z.
        membrane_width_nm: width of the dark band around cell boundaries, nm (4 voxels at 4 nm).
        organelle_density: organelles per cubic micrometre.
        blur_sigma_nm: (z, y, x) Gaussian blur sigma in nm; (0.3, 1.25, 1.25) voxels at CREMI's size.
        noise: standard deviation of the signal-independent part of the noise (intensities in [0, 1]);
            a shot-noise part proportional to the square root of the intensity is added to it.
        missing_sections: how many z-sections to blank (uniform black or grey); ``None``: one per 32
            sections (at least one when Z >= 3). The first and last sections are never blanked.
        progress: show a tqdm bar over the sections while the cells are computed.

    Returns:
        ``(raw, labels)``: raw uint8 (Z, Y, X); labels uint64 (Z, Y, X), ids 1..N with no gaps,
        membranes labelled with the cell they bound.
    """
    shape = _check_shape(shape)
    voxel = np.asarray(check_voxel_size(voxel_size), dtype=np.float64)
    for name, value in (
        ("cell_size_nm", cell_size_nm),
        ("elongation", elongation),
        ("membrane_width_nm", membrane_width_nm),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if organelle_density < 0 or noise < 0:
        raise ValueError(f"organelle_density and noise must be >= 0, got {organelle_density}, {noise}")
    blur = tuple(float(s) for s in blur_sigma_nm)
    if len(blur) != 3 or min(blur) < 0:
        raise ValueError(f"blur_sigma_nm must be three sigmas >= 0 in nm (z, y, x), got {blur_sigma_nm!r}")
    if missing_sections is None:
        missing_sections = max(1, shape[0] // 32) if shape[0] >= 3 else 0
    if missing_sections < 0 or missing_sections > max(shape[0] - 2, 0):
        raise ValueError(
            f"missing_sections must be in [0, Z - 2] = [0, {max(shape[0] - 2, 0)}] (the first and last "
            f"sections are kept), got {missing_sections}"
        )

    rng = np.random.default_rng(seed)
    labels, gap = _voronoi_cells(shape, voxel, rng, cell_size_nm, elongation, progress)
    n_cells = int(labels.max())
    image = _cell_intensity(labels, n_cells, voxel, rng)
    _add_organelles(image, labels, gap, voxel, rng, organelle_density, membrane_width_nm)
    # Lipid bilayers stain dark: a Gaussian dip around every boundary, 0.6 deep at its centre.
    half_width = membrane_width_nm / 2
    image *= 1 - 0.6 * np.exp(-((gap / half_width) ** 2))
    del gap
    image = gaussian_filter(image, sigma=tuple(blur / voxel), mode="reflect", output=np.float32)
    _add_noise(image, rng, noise)
    _blank_sections(image, rng, missing_sections)
    raw = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    _logger.debug("synthetic EM volume %s: %d cells, seed %d", shape, n_cells, seed)
    return raw, labels.astype(np.uint64)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    dims = tuple(shape)
    if len(dims) != 3 or not all(isinstance(d, int | np.integer) and d > 0 for d in dims):
        raise ValueError(f"shape must be three positive ints (Z, Y, X), got {shape!r}")
    return tuple(int(d) for d in dims)


class _SmoothNoise:
    """Smooth Gaussian noise of unit variance on a (Z, Y, X) grid, evaluated one section at a time.

    White noise on a coarse lattice (one node per ``spacing`` voxels along each axis) is interpolated
    with Gaussian weights (sigma one lattice step) through one small matrix per axis, so a section
    costs two matrix products and the full-resolution field is never held in memory.
    """

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator, channels=1):
        self.wz, self.wy, wx = (
            _interpolation_matrix(n, max(float(s), 1.0)) for n, s in zip(shape, spacing, strict=True)
        )
        # Contiguous, because a transposed operand sends small products down a slow BLAS path.
        self.wx_t = np.ascontiguousarray(wx.T)
        lattice = (self.wz.shape[1], self.wy.shape[1], wx.shape[1])
        self.lattice = rng.standard_normal((channels, *lattice)).astype(np.float32)

    def section(self, z: int) -> np.ndarray:
        """The field at section ``z``: (channels, Y, X) float32."""
        plane = np.tensordot(self.lattice, self.wz[z], axes=([1], [0]))  # (channels, Ly, Lx)
        return self.wy @ plane @ self.wx_t


def _interpolation_matrix(n: int, spacing: float) -> np.ndarray:
    """(n, lattice) weights from lattice nodes to n voxels; rows have unit norm so that a white-noise
    lattice gives unit variance at every voxel. Two spare nodes on each side avoid edge effects."""
    nodes = math.ceil((n - 1) / spacing) + 5
    position = np.arange(n) / spacing + 2
    weights = np.exp(-0.5 * (position[:, None] - np.arange(nodes)[None, :]) ** 2)
    return (weights / np.linalg.norm(weights, axis=1, keepdims=True)).astype(np.float32)


def _voronoi_cells(
    shape: tuple[int, int, int],
    voxel: np.ndarray,
    rng: np.random.Generator,
    cell_size_nm: float,
    elongation: float,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Warped anisotropic Voronoi cells.

    Returns labels uint32 (Z, Y, X), ids 1..N without gaps, and gap float32 (Z, Y, X): each voxel's
    distance in nm to the boundary of its cell in the metric space (z shrunk by ``elongation``).
    """
    # Metric-space coordinates in nm: z divided by the elongation, so cells (isotropic in this space)
    # come out elongation times longer along z than wide in y/x.
    scale = voxel / np.array([elongation, 1.0, 1.0])
    extent = np.array(shape) * scale
    # Seeds beyond the volume (one cell size plus the warp) keep border cells as large as inner ones.
    margin = 1.5 * cell_size_nm
    low, high = -margin, extent + margin
    # A Poisson-Voronoi cell holds on average 1 / density of space: a ball of diameter cell_size_nm.
    density = 6 / (math.pi * cell_size_nm**3)
    n_seeds = max(2, round(float(np.prod(high - low)) * density))
    seeds = rng.uniform(low, high, size=(n_seeds, 3))
    tree = cKDTree(seeds)

    # The y/x warp: about a third of a cell in amplitude, smooth over a cell (a cell length along z).
    warp_spacing = cell_size_nm / scale
    warp = _SmoothNoise(shape, warp_spacing, rng, channels=2)
    warp_amplitude = 0.3 * cell_size_nm

    Z, Y, X = shape
    yy, xx = np.meshgrid(np.arange(Y) * scale[1], np.arange(X) * scale[2], indexing="ij")
    points = np.empty((Y * X, 3), dtype=np.float64)
    nearest = np.empty(shape, dtype=np.uint32)
    gap = np.empty(shape, dtype=np.float32)
    for z in tqdm(range(Z), desc="cells", unit="section", disable=not progress, leave=False):
        displacement = warp.section(z) * warp_amplitude
        points[:, 0] = z * scale[0]
        points[:, 1] = (yy + displacement[0]).ravel()
        points[:, 2] = (xx + displacement[1]).ravel()
        distance, index = tree.query(points, k=2, workers=-1)
        # Distance from a point to the bisector plane of its two nearest seeds a and b:
        # (|p - b|^2 - |p - a|^2) / (2 |a - b|), exact for Euclidean Voronoi cells.
        separation = np.linalg.norm(seeds[index[:, 0]] - seeds[index[:, 1]], axis=1)
        to_boundary = (distance[:, 1] ** 2 - distance[:, 0] ** 2) / (2 * separation)
        nearest[z] = index[:, 0].reshape(Y, X)
        gap[z] = to_boundary.reshape(Y, X)

    # Seeds that own no voxel would leave holes in the ids: renumber the used ones 1..N.
    used = np.zeros(n_seeds, dtype=bool)
    used[nearest.ravel()] = True
    ids = np.cumsum(used, dtype=np.uint32)
    return ids[nearest], gap


def _cell_intensity(
    labels: np.ndarray, n_cells: int, voxel: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Per-cell brightness plus cytoplasm texture (smooth noise ~20 nm in y/x, per section in z):
    float32 (Z, Y, X) around 0.55-0.8."""
    brightness = rng.uniform(0.55, 0.8, size=n_cells + 1).astype(np.float32)
    image = brightness[labels]
    texture = _SmoothNoise(labels.shape, (1.0, 20.0 / voxel[1], 20.0 / voxel[2]), rng)
    for z in range(labels.shape[0]):
        image[z] += 0.04 * texture.section(z)[0]
    return image


def _add_organelles(
    image: np.ndarray,
    labels: np.ndarray,
    gap: np.ndarray,
    voxel: np.ndarray,
    rng: np.random.Generator,
    density: float,
    membrane_width_nm: float,
) -> None:
    """Paint ellipsoids in place: dark mitochondria (60-120 nm wide, 100-400 nm long in z) and bright
    vesicles (30-50 nm), each clipped to the cell holding its centre and kept off the membranes."""
    volume_um3 = float(np.prod(np.array(labels.shape) * voxel)) / 1e9
    count = rng.poisson(density * volume_um3)
    centres = (rng.random((count, 3)) * labels.shape).astype(np.int64)
    is_mito = rng.random(count) < 0.4
    radii_nm = np.where(
        is_mito[:, None],
        rng.uniform([50, 30, 30], [200, 60, 60], size=(count, 3)),
        rng.uniform([20, 15, 15], [40, 25, 25], size=(count, 3)),
    )
    contrast = np.where(is_mito, rng.uniform(-0.35, -0.2, count), rng.uniform(0.1, 0.2, count))
    for centre, radius_nm, delta in zip(centres, radii_nm, contrast, strict=True):
        radius = np.maximum(radius_nm / voxel, 0.5)
        lo = np.maximum(centre - np.ceil(radius).astype(np.int64), 0)
        hi = np.minimum(centre + np.ceil(radius).astype(np.int64) + 1, labels.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grid = np.ogrid[box]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True)) <= 1
        inside &= labels[box] == labels[tuple(centre)]
        inside &= gap[box] > membrane_width_nm
        image[box][inside] += delta


def _add_noise(image: np.ndarray, rng: np.random.Generator, noise: float) -> None:
    """Add noise in place: Gaussian with variance noise^2 + intensity / 300 (read-out noise plus the
    shot noise of about 300 detected electrons at full brightness)."""
    std = np.sqrt(noise**2 + np.clip(image, 0, None) / 300.0)
    image += std * rng.standard_normal(image.shape, dtype=np.float32)


def _blank_sections(image: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Replace ``count`` sections (never the first or last) by a uniform black or mean-grey slice."""
    if count == 0:
        return
    sections = rng.choice(np.arange(1, image.shape[0] - 1), size=count, replace=False)
    for z in np.sort(sections):
        image[z] = 0.0 if rng.random() < 0.5 else float(image[z].mean())


_SYNTHETIC_DEFAULTS = {"shape": (32, 256, 256), "seed": 0}


def synthetic_volume(spec: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The synthetic volume a config's ``data.synthetic`` mapping describes.

    ``spec`` holds ``synthetic_em_volume`` arguments; ``shape`` defaults to (32, 256, 256) and
    ``seed`` to 0.

    Returns:
        ``(raw, labels, spec)``: raw uint8 (Z, Y, X), labels uint64 (Z, Y, X) and the arguments as
        used (defaults filled in), whose ``voxel_size``, when given, the dataset should use too.
    """
    spec = {**_SYNTHETIC_DEFAULTS, **(spec or {})}
    spec["shape"] = tuple(spec["shape"])
    raw, labels = synthetic_em_volume(**spec)
    return raw, labels, spec
