"""Segmentation metrics for EM neuron segmentation: variation of information and adapted Rand error.

Both compare a segmentation S with a ground truth G through their contingency table
n_ij = the number of voxels with ground-truth label i and segment j, over the voxels whose
ground-truth label is not ignored (label 0, "no label", by default; CREMI and waterz's ``evaluate``
do the same). Segment ids are arbitrary uint64 numbers; segment 0 of S is an ordinary segment.

With n = sum_ij n_ij, p_ij = n_ij / n, p_i = sum_j p_ij (ground truth) and q_j = sum_i p_ij
(segmentation), entropies in bits (log2, as CREMI and waterz):

- VOI split = H(S | G) = H(G, S) - H(G): information in S that G does not explain, i.e. how much the
  segmentation over-segments (splits) the ground-truth neurons. 0 when no neuron is split.
- VOI merge = H(G | S) = H(G, S) - H(S): how much it under-segments (merges). 0 when no segment
  spans two neurons; an all-in-one segmentation has VOI merge = H(G).
- VOI sum = split + merge (the "VOI" of TokenUnify's table).
- Rand split (recall) = sum_ij n_ij^2 / sum_i a_i^2 and Rand merge (precision) =
  sum_ij n_ij^2 / sum_j b_j^2, with a_i, b_j the row and column sums (pairs of voxels in the same
  neuron that are also in the same segment, over all same-neuron pairs, and over all same-segment
  pairs; a voxel paired with itself counts, as in waterz).
- Adapted Rand error ARAND = 1 - F, F = 2 * split * merge / (split + merge), in [0, 1].

The table is built slab by slab along z, so volumes larger than memory (HDF5 or zarr datasets,
``LazyVolume``) can be scored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from seqvision.utils.extras import require

scipy_sparse = require("scipy.sparse", "em", "VOI and ARAND")

__all__ = [
    "SegmentationScores",
    "adapted_rand_error",
    "contingency_table",
    "evaluate_segmentation",
    "variation_of_information",
]

# Voxels per slab when a table is built from lazily read volumes: bounds the memory of np.unique.
_SLAB_VOXELS = 1 << 24


@dataclass(frozen=True)
class SegmentationScores:
    """VOI (bits) and adapted Rand error of a segmentation against a ground truth; lower is better."""

    voi_split: float
    voi_merge: float
    arand: float
    rand_split: float
    rand_merge: float
    n_voxels: int
    n_gt_labels: int
    n_segments: int

    @property
    def voi_sum(self) -> float:
        return self.voi_split + self.voi_merge

    def to_dict(self) -> dict[str, float | int]:
        return {**dataclasses.asdict(self), "voi_sum": self.voi_sum}


def _slab_pairs(gt: np.ndarray, seg: np.ndarray, ignore_label: int | None) -> tuple[np.ndarray, ...]:
    """The distinct (gt, seg) label pairs of one slab and their voxel counts."""
    gt, seg = gt.ravel(), seg.ravel()
    if ignore_label is not None:
        keep = gt != ignore_label
        gt, seg = gt[keep], seg[keep]
    gt_labels, gt_index = np.unique(gt, return_inverse=True)
    seg_labels, seg_index = np.unique(seg, return_inverse=True)
    # One int64 code per pair: both indices are < the slab's voxel count, so the product fits.
    code = gt_index.astype(np.int64) * len(seg_labels) + seg_index
    codes, counts = np.unique(code, return_counts=True)
    return gt_labels[codes // len(seg_labels)], seg_labels[codes % len(seg_labels)], counts


def _as_label_array(values: Any, name: str) -> Any:
    """An array or a lazily sliced dataset (anything with shape, dtype and slicing) of integer labels."""
    if not all(hasattr(values, attr) for attr in ("shape", "dtype", "__getitem__")):
        values = np.asarray(values)
    if len(values.shape) == 0:
        raise ValueError(f"{name} must be a label volume, got a scalar")
    dtype = np.dtype(values.dtype)
    if dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integer labels, got dtype {dtype}")
    return values


def contingency_table(
    segmentation: Any, ground_truth: Any, *, ignore_label: int | None = 0
) -> tuple[scipy_sparse.csr_array, np.ndarray, np.ndarray]:
    """The contingency table of two label volumes of the same shape.

    Args:
        segmentation: integer labels, any shape (an array, or an HDF5 / zarr dataset or
            ``LazyVolume``, read slab by slab along the first axis).
        ground_truth: integer labels of the same shape.
        ignore_label: ground-truth label whose voxels are left out (None keeps every voxel).

    Returns:
        ``(table, gt_labels, seg_labels)``: ``table`` a sparse (n_gt, n_seg) int64 array of voxel
        counts, rows ``gt_labels`` and columns ``seg_labels`` (sorted, as found).
    """
    segmentation = _as_label_array(segmentation, "segmentation")
    ground_truth = _as_label_array(ground_truth, "ground_truth")
    if tuple(segmentation.shape) != tuple(ground_truth.shape):
        raise ValueError(
            f"segmentation shape {tuple(segmentation.shape)} differs from ground_truth shape "
            f"{tuple(ground_truth.shape)}"
        )
    shape = tuple(segmentation.shape)
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[1:], dtype=np.int64))))
    parts = [
        _slab_pairs(
            np.asarray(ground_truth[i : i + step]), np.asarray(segmentation[i : i + step]), ignore_label
        )
        for i in range(0, shape[0], step)
    ]
    gt_values = np.concatenate([p[0] for p in parts])
    seg_values = np.concatenate([p[1] for p in parts])
    counts = np.concatenate([p[2] for p in parts]).astype(np.int64)
    if counts.sum() == 0:
        raise ValueError(
            f"ground_truth has no voxel labelled other than the ignored {ignore_label!r}; nothing to score"
        )
    gt_labels, rows = np.unique(gt_values, return_inverse=True)
    seg_labels, cols = np.unique(seg_values, return_inverse=True)
    # COO -> CSR sums the counts that different slabs found for the same pair.
    table = scipy_sparse.coo_array((counts, (rows, cols)), shape=(len(gt_labels), len(seg_labels))).tocsr()
    return table, gt_labels, seg_labels


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _voi_from_table(table: scipy_sparse.csr_array) -> tuple[float, float]:
    n = float(table.sum())
    joint = _entropy(table.data / n)
    h_gt = _entropy(np.asarray(table.sum(axis=1)).ravel() / n)
    h_seg = _entropy(np.asarray(table.sum(axis=0)).ravel() / n)
    # Rounding can leave -1e-16 where the exact value is 0.
    return max(joint - h_gt, 0.0), max(joint - h_seg, 0.0)


def _rand_from_table(table: scipy_sparse.csr_array) -> tuple[float, float, float]:
    # float64 sums: squared counts of a large volume overflow nothing there and lose nothing that matters.
    same_both = float((table.data.astype(np.float64) ** 2).sum())
    same_gt = float((np.asarray(table.sum(axis=1), dtype=np.float64) ** 2).sum())
    same_seg = float((np.asarray(table.sum(axis=0), dtype=np.float64) ** 2).sum())
    split, merge = same_both / same_gt, same_both / same_seg
    return 1.0 - 2.0 * split * merge / (split + merge), split, merge


def variation_of_information(
    segmentation: Any, ground_truth: Any, *, ignore_label: int | None = 0
) -> tuple[float, float]:
    """``(voi_split, voi_merge)`` in bits: H(S | G) and H(G | S). See the module docstring."""
    return _voi_from_table(contingency_table(segmentation, ground_truth, ignore_label=ignore_label)[0])


def adapted_rand_error(
    segmentation: Any, ground_truth: Any, *, ignore_label: int | None = 0
) -> tuple[float, float, float]:
    """``(arand, rand_split, rand_merge)``: 1 - F-score of Rand recall (split) and precision (merge)."""
    return _rand_from_table(contingency_table(segmentation, ground_truth, ignore_label=ignore_label)[0])


def evaluate_segmentation(
    segmentation: Any, ground_truth: Any, *, ignore_label: int | None = 0
) -> SegmentationScores:
    """VOI split / merge / sum and ARAND of ``segmentation`` against ``ground_truth`` from one table.

    Both are integer label volumes of the same shape (arrays or lazily read datasets); ground-truth
    voxels labelled ``ignore_label`` are left out.
    """
    table, gt_labels, seg_labels = contingency_table(segmentation, ground_truth, ignore_label=ignore_label)
    voi_split, voi_merge = _voi_from_table(table)
    arand, rand_split, rand_merge = _rand_from_table(table)
    return SegmentationScores(
        voi_split=voi_split,
        voi_merge=voi_merge,
        arand=arand,
        rand_split=rand_split,
        rand_merge=rand_merge,
        n_voxels=int(table.sum()),
        n_gt_labels=len(gt_labels),
        n_segments=len(seg_labels),
    )
