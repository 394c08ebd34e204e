"""From affinities to a neuron segmentation: watershed fragments, then agglomeration.

Affinities are float (3, Z, Y, X) in [0, 1], channels (z, y, x): ``affinities[c, z, y, x]`` is the
affinity between voxel (z, y, x) and its predecessor along axis c (z - 1, y - 1 or x - 1), as
``affinity_targets`` builds them and waterz reads them. The pipeline, after TokenUnify (and the
"superhuman" / waterz recipe it uses):

1. **Boundary map** (``boundary_map``): per voxel, 1 - the minimum (or mean) affinity of the edges
   that touch it, over y and x ('2d', per section) or z, y and x ('3d'): a voxel is interior only
   when all its edges are strong. It places the seeds.
2. **Fragments** (``watershed_fragments``): seeds are the local maxima of the distance transform of
   the interior (boundary < ``boundary_threshold``), every interior component getting at least one
   (``seed_method='maxima_distance'``, the default), or the regional minima of the boundary map
   (``'minima'``). A seeded watershed then grows them along the affinity edges: every voxel joins
   the seed it reaches through the path whose weakest edge is strongest (zwatershed's rule),
   section by section ('2d', the default for anisotropic serial-section EM) or in 3-D. Flooding
   the voxel boundary map instead would hand each membrane voxel to whichever basin reaches it
   first, leaving slivers of one neuron in its neighbour's fragments; agglomeration then merges
   the two neurons through the slivers (on the synthetic test volume this took the true
   affinities' VOI from 0.005 to 0.5). Fragments over-segment on purpose: step 3 only merges.
3. **Agglomeration** (``agglomerate``): a region adjacency graph over the fragments, every edge
   scored 1 - the median (or mean) affinity of the voxel edges between the two regions, merged
   greedily from the lowest score while the score is below ``threshold``, re-scoring the merged
   region's edges after every merge. waterz does this in C++ (median through a 256-bin histogram,
   its ``HistogramQuantileAffinity``); without waterz the same greedy merge runs here in NumPy and
   Python (exact medians; slower, fine up to some 10^5 fragments). One call returns the
   segmentations of several thresholds.

``segment_affinities`` chains the three. Thresholds follow waterz: a higher threshold merges more;
0.5 merges two regions when the median affinity across their boundary exceeds 0.5.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from seqvision.eval.em.affinity import slice_along
from seqvision.utils.extras import require

ndi = require("scipy.ndimage", "em", "watershed and agglomeration")

__all__ = [
    "WATERZ_SCORING",
    "agglomerate",
    "boundary_map",
    "region_adjacency_edges",
    "segment_affinities",
    "watershed_fragments",
    "waterz_available",
]

_logger = logging.getLogger(__name__)

# waterz scoring functions with the names used here; both are compiled into waterz's wheels.
WATERZ_SCORING = {
    "median": "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256, false>>",
    "mean": "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>",
}
# waterz's bin queue (scores rounded to 1/256) is TokenUnify's setting and much faster than exact.
_WATERZ_QUEUE_BINS = 256


def _import_waterz() -> Any:
    """waterz, or None where it is not installed (it ships wheels for Python >= 3.11 only)."""
    try:
        import waterz
    except ImportError:
        return None
    return waterz


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence standard output: waterz reports every step, from Python and from C++ (std::cout).

    Python's ``sys.stdout`` is swapped for a sink and file descriptor 1 pointed at /dev/null; the C
    library's buffer is flushed before it is pointed back, so nothing written meanwhile appears later.
    """
    libc = _libc()
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        if libc is not None:
            libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows has no process-wide C library handle
        return None


def waterz_available() -> bool:
    """Whether ``agglomerate(method='auto')`` will use waterz."""
    return _import_waterz() is not None


def _check_affinities(affinities: Any) -> np.ndarray:
    affinities = np.asarray(affinities)
    if affinities.ndim != 4 or affinities.shape[0] < 3:
        raise ValueError(
            f"affinities must be (3, Z, Y, X) with channels (z, y, x), got shape {affinities.shape}"
        )
    if affinities.dtype.kind != "f":
        raise TypeError(f"affinities must be floating point in [0, 1], got dtype {affinities.dtype}")
    if not np.isfinite(affinities[:3]).all():
        raise ValueError("affinities contain NaN or infinite values")
    return affinities[:3]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def boundary_map(
    affinities: np.ndarray, mode: Literal["2d", "3d"] = "2d", reduce: Literal["min", "mean"] = "min"
) -> np.ndarray:
    """Per-voxel boundary strength from nearest-neighbour affinities.

    Args:
        affinities: float (3, Z, Y, X) in [0, 1], channels (z, y, x), each voxel's edge to its
            predecessor along that axis.
        mode: '2d' uses the y and x edges only (sections are independent); '3d' adds z.
        reduce: 'min': 1 - the lowest affinity of the (up to 4 or 6) edges touching the voxel, so a
            voxel is interior only when all its edges are strong; 'mean': 1 - their mean.

    Returns:
        float32 (Z, Y, X) in [0, 1]; edges that leave the volume do not count.
    """
    _check_choice("mode", mode, ("2d", "3d"))
    _check_choice("reduce", reduce, ("min", "mean"))
    return _boundary_map(_check_affinities(affinities), mode, reduce)


def _boundary_map(affinities: np.ndarray, mode: str, reduce: str) -> np.ndarray:
    shape = affinities.shape[1:]
    axes = (1, 2) if mode == "2d" else (0, 1, 2)
    if reduce == "min":
        strength = np.ones(shape, dtype=np.float32)
    else:
        strength = np.zeros(shape, dtype=np.float32)
        count = np.zeros(shape, dtype=np.float32)
    for axis in axes:
        # The edge stored at position i joins voxels i - 1 and i: it touches voxels 1: as their
        # edge to the predecessor and voxels :-1 as their edge to the successor.
        edge = affinities[axis][slice_along(axis - 3, 1, None)].astype(np.float32, copy=False)
        for end in (slice_along(axis - 3, 1, None), slice_along(axis - 3, None, -1)):
            if reduce == "min":
                np.minimum(strength[end], edge, out=strength[end])
            else:
                strength[end] += edge
                count[end] += 1
    if reduce == "mean":
        # A voxel without edges (a 1 x 1 section) has no boundary.
        np.divide(strength, count, out=strength, where=count > 0)
        strength[count == 0] = 1.0
    return 1.0 - strength


def _distance_maxima(boundary: np.ndarray, threshold: float, min_distance: int) -> np.ndarray:
    """Seeds at the maxima of the distance to the boundary: bool mask of one section or volume."""
    interior = boundary < threshold
    distance = ndi.distance_transform_edt(interior)
    size = 2 * min_distance + 1
    seeds = interior & (distance == ndi.maximum_filter(distance, size=size, mode="nearest"))
    # A small interior component next to a wider one can lose its maximum to the wider one's
    # inside the filter window; give every component without a seed one at its deepest voxel.
    components, n = ndi.label(interior)
    if n:
        seeded = np.zeros(n + 1, dtype=bool)
        seeded[components[seeds]] = True
        missing = np.flatnonzero(~seeded[1:]) + 1
        if len(missing):
            for position in ndi.maximum_position(distance, components, missing):
                seeds[position] = True
    return seeds


def _regional_minima(boundary: np.ndarray, threshold: float) -> np.ndarray:
    local_minima = require("skimage.morphology", "em", "watershed seeds").local_minima

    return local_minima(boundary, connectivity=1, allow_borders=True) & (boundary < threshold)


def _edge_watershed(edges: Sequence[np.ndarray], markers: np.ndarray) -> np.ndarray:
    """Seeded watershed on the edges of the voxel grid rather than on its voxels.

    ``edges[a]`` holds the affinity of each voxel's edge to its predecessor along axis a (entry 0
    unused), ``markers`` the seeds (int, 0 = none). The grid is refined to 2n - 1 nodes per axis:
    voxels at even positions (height 0), the edge between voxels i - 1 and i at position 2i - 1
    (height 1 - affinity), the rest at height 1. scikit-image's node watershed on that grid floods
    across edges in order of their affinity, so every voxel joins the seed it reaches through the
    strongest path (zwatershed's rule). A watershed of a per-voxel boundary map would instead leave
    a voxel that lies on a membrane to whichever neighbouring basin floods it first, which puts
    slivers of one neuron into the next neuron's fragment.
    """
    watershed = require("skimage.segmentation", "em", "watershed fragments").watershed

    shape = markers.shape
    voxels = tuple(slice(0, None, 2) for _ in shape)
    grid = np.ones(tuple(2 * n - 1 for n in shape), dtype=np.float32)
    grid[voxels] = 0.0
    for axis, affinity in enumerate(edges):
        index = list(voxels)
        index[axis] = slice(1, None, 2)
        inner = [slice(None)] * len(shape)
        inner[axis] = slice(1, None)
        grid[tuple(index)] = 1.0 - affinity[tuple(inner)]
    seeds = np.zeros(grid.shape, dtype=np.int32)
    seeds[voxels] = markers
    return watershed(grid, seeds, connectivity=1)[voxels]


def _fragments(
    edges: Sequence[np.ndarray], boundary: np.ndarray, seed_method: str, threshold: float, min_distance: int
) -> np.ndarray:
    """Fragments of one section (2-D) or volume (3-D): int64 ids 1..N covering it."""
    if seed_method == "maxima_distance":
        seeds = _distance_maxima(boundary, threshold, min_distance)
    else:
        seeds = _regional_minima(boundary, threshold)
    markers, n = ndi.label(seeds)
    if n == 0:  # all boundary (a blank section): one fragment, agglomeration decides its neighbours
        return np.ones(boundary.shape, dtype=np.int64)
    return _edge_watershed(edges, markers).astype(np.int64, copy=False)


def watershed_fragments(
    affinities: np.ndarray,
    *,
    mode: Literal["2d", "3d"] = "2d",
    seed_method: Literal["maxima_distance", "minima"] = "maxima_distance",
    boundary_threshold: float = 0.5,
    min_seed_distance: int = 3,
    reduce: Literal["min", "mean"] = "min",
) -> np.ndarray:
    """Over-segment a volume into fragments: seeds from the boundary map, grown along the affinities.

    Args:
        affinities: float (3, Z, Y, X) in [0, 1], channels (z, y, x).
        mode: '2d': one watershed per section (TokenUnify's choice for anisotropic EM; fragments
            never cross sections and agglomeration joins them along z); '3d': one over the volume
            (its refined grid holds 8 nodes per voxel: for volumes of a few 10^7 voxels at most).
        seed_method: 'maxima_distance': local maxima of the Euclidean distance to the nearest
            boundary voxel (``boundary >= boundary_threshold``), within ``min_seed_distance``
            voxels; 'minima': regional minima of the boundary map below ``boundary_threshold``.
        boundary_threshold: boundary values at or above this are membrane for the seeds.
        min_seed_distance: half the window (voxels) in which a distance maximum must be the
            largest; larger values give fewer, larger fragments.
        reduce: how the boundary map combines a voxel's edges (see ``boundary_map``).

    Returns:
        uint64 (Z, Y, X) fragment ids 1..N, unique across sections, covering every voxel.
    """
    _check_choice("seed_method", seed_method, ("maxima_distance", "minima"))
    if not 0 < boundary_threshold <= 1:
        raise ValueError(f"boundary_threshold must be in (0, 1], got {boundary_threshold!r}")
    if isinstance(min_seed_distance, bool) or not isinstance(min_seed_distance, int) or min_seed_distance < 1:
        raise ValueError(f"min_seed_distance must be an int >= 1, got {min_seed_distance!r}")
    _check_choice("mode", mode, ("2d", "3d"))
    _check_choice("reduce", reduce, ("min", "mean"))
    affinities = _check_affinities(affinities)
    boundary = _boundary_map(affinities, mode, reduce)
    seeds = (seed_method, boundary_threshold, min_seed_distance)
    if mode == "3d":
        return _fragments(affinities, boundary, *seeds).astype(np.uint64)
    fragments = np.empty(boundary.shape, dtype=np.uint64)
    next_id = 0
    for z, section in enumerate(boundary):
        ids = _fragments(affinities[1:, z], section, *seeds)
        fragments[z] = ids + next_id
        next_id += int(ids.max())
    return fragments


# ------------------------------------------------------------------------------------ agglomeration


def region_adjacency_edges(
    fragments: np.ndarray, affinities: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every voxel edge between two different fragments, with its affinity.

    Args:
        fragments: integer (Z, Y, X) ids.
        affinities: float (3, Z, Y, X), channels (z, y, x).

    Returns:
        ``(u, v, affinity)``: fragment ids u < v and float32 affinities, one entry per voxel edge,
        sorted by (u, v, affinity).
    """
    us, vs, values = [], [], []
    for axis in range(3):
        before = fragments[slice_along(axis - 3, None, -1)]
        after = fragments[slice_along(axis - 3, 1, None)]
        cut = before != after
        a, b = before[cut], after[cut]
        us.append(np.minimum(a, b))
        vs.append(np.maximum(a, b))
        values.append(affinities[axis][slice_along(axis - 3, 1, None)][cut].astype(np.float32))
    u, v, value = (np.concatenate(parts) for parts in (us, vs, values))
    order = np.lexsort((value, v, u))
    return u[order], v[order], value[order]


class _RegionGraph:
    """Greedy agglomeration of fragments 0..n-1 on their adjacency graph, waterz's algorithm.

    Edge statistics: for 'median' the sorted affinities of all voxel edges between the two regions
    (merging regions merges them), for 'mean' their sum and count. The median of n values is the
    (n // 2)-th smallest (0-based), waterz's quantile rule. A heap holds (score, u, v) with u < v;
    an entry whose score is not the edge's current one is left over and skipped. Merging two regions
    joins their edges to a common neighbour; like waterz, the joined edge waits in the queue at the
    lower of the two old scores and is re-scored when it comes up (``stale``).
    """

    def __init__(self, n: int, u: np.ndarray, v: np.ndarray, values: np.ndarray, scoring: str):
        self.scoring = scoring
        self.parent = np.arange(n)
        self.neighbours: list[set[int]] = [set() for _ in range(n)]
        self.stats: dict[tuple[int, int], Any] = {}
        starts = np.flatnonzero(np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])])
        counts = np.diff(np.r_[starts, len(u)])
        # Initial scores for all edges at once; values are sorted within each (u, v) group.
        if scoring == "median":
            scores = 1.0 - values[starts + counts // 2].astype(np.float64)
        else:
            sums = np.add.reduceat(values.astype(np.float64), starts) if len(starts) else np.zeros(0)
            scores = 1.0 - sums / np.maximum(counts, 1)
        pairs = list(zip(u[starts].tolist(), v[starts].tolist(), strict=True))
        self.scores: dict[tuple[int, int], float] = dict(zip(pairs, scores.tolist(), strict=True))
        for (a, b), start, count in zip(pairs, starts.tolist(), counts.tolist(), strict=True):
            group = values[start : start + count]
            self.stats[a, b] = group if scoring == "median" else (float(group.sum(dtype=np.float64)), count)
            self.neighbours[a].add(b)
            self.neighbours[b].add(a)
        self.stale: set[tuple[int, int]] = set()
        self.heap = [(score, a, b) for (a, b), score in self.scores.items()]
        heapq.heapify(self.heap)

    def _score(self, a: int, b: int) -> float:
        stats = self.stats[a, b]
        affinity = float(stats[len(stats) // 2]) if self.scoring == "median" else stats[0] / stats[1]
        self.scores[a, b] = score = 1.0 - affinity
        return score

    def _combine(self, first: Any, second: Any) -> Any:
        if self.scoring == "median":
            merged = np.concatenate((first, second))
            merged.sort()
            return merged
        return first[0] + second[0], first[1] + second[1]

    def next_merge(self, threshold: float) -> tuple[int, int] | None:
        """The edge to merge next, or None when the lowest score is at or above ``threshold``."""
        while self.heap:
            score, a, b = self.heap[0]
            if self.scores.get((a, b)) != score:  # superseded or removed
                heapq.heappop(self.heap)
                continue
            if score >= threshold:
                return None
            heapq.heappop(self.heap)
            if (a, b) in self.stale:
                self.stale.discard((a, b))
                heapq.heappush(self.heap, (self._score(a, b), a, b))
                continue
            return a, b
        return None

    def merge(self, a: int, b: int) -> None:
        """Merge regions a and b: the one with fewer neighbours is folded into the other."""
        keep, gone = (a, b) if len(self.neighbours[a]) >= len(self.neighbours[b]) else (b, a)
        self.parent[gone] = keep
        del self.stats[a, b], self.scores[a, b]
        self.neighbours[keep].discard(gone)
        for other in self.neighbours[gone]:
            if other == keep:
                continue
            old = (min(gone, other), max(gone, other))
            stats, score = self.stats.pop(old), self.scores.pop(old)
            self.stale.discard(old)
            self.neighbours[other].discard(gone)
            new = (min(keep, other), max(keep, other))
            if new in self.stats:
                # As in waterz: the joined edge keeps the lower of the two scores in the queue and
                # is re-scored from the joined statistics when it reaches the front.
                stats = self._combine(self.stats[new], stats)
                score = min(score, self.scores[new])
                self.stale.add(new)
            else:
                self.neighbours[keep].add(other)
                self.neighbours[other].add(keep)
            self.stats[new], self.scores[new] = stats, score
            heapq.heappush(self.heap, (score, *new))
        self.neighbours[gone] = set()

    def labels(self) -> np.ndarray:
        """Each fragment's current region, as the index of its root fragment."""
        roots = self.parent.copy()
        while True:
            nxt = roots[roots]
            if np.array_equal(nxt, roots):
                return roots
            roots = nxt


def _agglomerate_numpy(
    affinities: np.ndarray, fragments: np.ndarray, thresholds: list[float], scoring: str
) -> list[np.ndarray]:
    ids, index = np.unique(fragments, return_inverse=True)
    index = index.reshape(fragments.shape)
    u, v, values = region_adjacency_edges(index, affinities)
    graph = _RegionGraph(len(ids), u, v, values, scoring)
    results = []
    for threshold in thresholds:
        while (edge := graph.next_merge(threshold)) is not None:
            graph.merge(*edge)
        results.append(_relabel(graph.labels()[index]))
    return results


def _agglomerate_waterz(
    waterz: Any, affinities: np.ndarray, fragments: np.ndarray, thresholds: list[float], scoring: str
) -> list[np.ndarray]:
    affs = np.ascontiguousarray(affinities, dtype=np.float32)
    # A new array with ids 1..N: waterz sizes its tables by the largest id, relabels the fragments
    # it is given in place and yields that same array for every threshold (so each is copied).
    segmentation = _relabel(fragments)
    with _quiet_stdout():
        stream = waterz.agglomerate(
            affs,
            thresholds,
            fragments=segmentation,
            scoring_function=WATERZ_SCORING[scoring],
            discretize_queue=_WATERZ_QUEUE_BINS,
        )
        # The work happens while the generator is iterated, so inside the redirection.
        return [_relabel(result) for result in stream]


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Ids 1..N in order of first appearance in the sorted ids, as uint64."""
    _, inverse = np.unique(labels, return_inverse=True)
    return (inverse.reshape(labels.shape) + 1).astype(np.uint64)


def agglomerate(
    affinities: np.ndarray,
    fragments: np.ndarray,
    thresholds: float | Sequence[float] = (0.5,),
    *,
    scoring: Literal["median", "mean"] = "median",
    method: Literal["auto", "waterz", "skimage"] = "auto",
) -> list[np.ndarray]:
    """Merge fragments greedily by their boundary affinity, for one or several thresholds.

    Args:
        affinities: float (3, Z, Y, X) in [0, 1], channels (z, y, x).
        fragments: integer (Z, Y, X) fragment ids (``watershed_fragments``), >= 1.
        thresholds: merge while the lowest edge score, 1 - median (or mean) boundary affinity, is
            below the threshold; one segmentation per threshold.
        scoring: 'median' (TokenUnify's waterz setting) or 'mean' boundary affinity.
        method: 'waterz' (C++), 'skimage' (the NumPy implementation here, which needs only
            scikit-image and SciPy for the fragments), or 'auto': waterz when it is installed.

    Returns:
        one uint64 (Z, Y, X) segmentation per threshold, in the order given, ids 1..N.
    """
    affinities = _check_affinities(affinities)
    fragments = np.asarray(fragments)
    if fragments.shape != affinities.shape[1:]:
        raise ValueError(
            f"fragments shape {fragments.shape} differs from the affinities' volume {affinities.shape[1:]}"
        )
    if fragments.dtype.kind not in "iu":
        raise TypeError(f"fragments must be integer ids, got dtype {fragments.dtype}")
    _check_choice("scoring", scoring, tuple(WATERZ_SCORING))
    _check_choice("method", method, ("auto", "waterz", "skimage"))
    values = [float(thresholds)] if np.isscalar(thresholds) else [float(t) for t in thresholds]
    if not values or not all(0 <= t <= 1 for t in values):
        raise ValueError(f"thresholds must be one or more numbers in [0, 1], got {thresholds!r}")
    order = sorted(range(len(values)), key=values.__getitem__)
    ascending = [values[i] for i in order]

    waterz = None if method == "skimage" else _import_waterz()
    if method == "waterz" and waterz is None:
        raise ImportError("method='waterz' needs waterz (pip install waterz); or use method='skimage'")
    if waterz is not None:
        results = _agglomerate_waterz(waterz, affinities, fragments, ascending, scoring)
    else:
        if method == "auto":
            _logger.info("waterz is not installed: agglomerating with the NumPy region graph (slower)")
        results = _agglomerate_numpy(affinities, fragments, ascending, scoring)
    by_threshold = [None] * len(values)
    for position, result in zip(order, results, strict=True):
        by_threshold[position] = result
    return by_threshold


def segment_affinities(
    affinities: np.ndarray,
    threshold: float = 0.5,
    *,
    method: Literal["auto", "waterz", "skimage"] = "auto",
    scoring: Literal["median", "mean"] = "median",
    mode: Literal["2d", "3d"] = "2d",
    seed_method: Literal["maxima_distance", "minima"] = "maxima_distance",
    boundary_threshold: float = 0.5,
    min_seed_distance: int = 3,
) -> np.ndarray:
    """Affinities (3, Z, Y, X) -> uint64 (Z, Y, X) segmentation: ``watershed_fragments`` then
    ``agglomerate`` at one threshold. The arguments are those of the two functions."""
    fragments = watershed_fragments(
        affinities,
        mode=mode,
        seed_method=seed_method,
        boundary_threshold=boundary_threshold,
        min_seed_distance=min_seed_distance,
    )
    return agglomerate(affinities, fragments, threshold, scoring=scoring, method=method)[0]
