"""VOI and adapted Rand error against hand-computed values and against waterz's evaluate."""

import math

import h5py
import numpy as np
import pytest

from seqvision.eval.em import (
    adapted_rand_error,
    contingency_table,
    evaluate_segmentation,
    variation_of_information,
)


def entropy_bits(*probabilities):
    return -sum(p * math.log2(p) for p in probabilities if p > 0)


def random_labels(shape, high, seed):
    return np.random.default_rng(seed).integers(0, high, shape).astype(np.uint64)


def test_perfect_segmentation_scores_zero_whatever_the_ids():
    gt = random_labels((4, 9, 7), 6, seed=0) + 1
    # Another numbering of the same partition, with ids near the top of uint64.
    seg = (np.uint64(2**63) + gt * np.uint64(1000)).astype(np.uint64)
    scores = evaluate_segmentation(seg, gt)
    assert scores.voi_split == pytest.approx(0, abs=1e-12)
    assert scores.voi_merge == pytest.approx(0, abs=1e-12)
    assert scores.arand == pytest.approx(0, abs=1e-12)
    assert scores.rand_split == scores.rand_merge == 1.0


def test_all_merged_has_voi_merge_equal_to_the_ground_truth_entropy():
    gt = np.array([[[1, 1, 1, 2, 2, 3, 3, 3]]], dtype=np.uint64)  # sizes 3, 2, 3 of 8
    split, merge = variation_of_information(np.ones_like(gt), gt)
    assert split == pytest.approx(0, abs=1e-12)
    assert merge == pytest.approx(entropy_bits(3 / 8, 2 / 8, 3 / 8))


def test_all_split_has_voi_split_equal_to_the_conditional_entropy():
    gt = np.array([[[1, 1, 1, 2, 2, 3, 3, 3]]], dtype=np.uint64)
    singletons = np.arange(gt.size, dtype=np.uint64).reshape(gt.shape)
    split, merge = variation_of_information(singletons, gt)
    assert merge == pytest.approx(0, abs=1e-12)
    # H(S | G) = H(S) - H(G) when S refines G; H(S) = log2(8) = 3 bits.
    assert split == pytest.approx(3 - entropy_bits(3 / 8, 2 / 8, 3 / 8))


def test_hand_computed_two_by_two_contingency_table():
    # Contingency (rows gt 1, 2; columns seg 1, 2): [[2, 0], [1, 1]], n = 4.
    gt = np.array([[[1, 1, 2, 2]]], dtype=np.uint64)
    seg = np.array([[[1, 1, 1, 2]]], dtype=np.uint64)
    table, gt_labels, seg_labels = contingency_table(seg, gt)
    np.testing.assert_array_equal(table.toarray(), [[2, 0], [1, 1]])
    np.testing.assert_array_equal(gt_labels, [1, 2])
    np.testing.assert_array_equal(seg_labels, [1, 2])

    # H(G, S) = H(1/2, 1/4, 1/4) = 1.5, H(G) = 1, H(S) = H(3/4, 1/4).
    split, merge = variation_of_information(seg, gt)
    assert split == pytest.approx(0.5)
    assert merge == pytest.approx(1.5 - entropy_bits(3 / 4, 1 / 4))
    # sum n_ij^2 = 6, sum a_i^2 = 8, sum b_j^2 = 10: recall 3/4, precision 3/5, F = 2/3.
    arand, rand_split, rand_merge = adapted_rand_error(seg, gt)
    assert rand_split == pytest.approx(0.75)
    assert rand_merge == pytest.approx(0.6)
    assert arand == pytest.approx(1 / 3)


def test_ground_truth_label_zero_is_ignored():
    gt = np.array([[[0, 0, 1, 1, 2, 2]]], dtype=np.uint64)
    seg = np.array([[[5, 6, 1, 1, 2, 2]]], dtype=np.uint64)  # wrong only where gt is 0
    scores = evaluate_segmentation(seg, gt)
    assert scores.voi_sum == pytest.approx(0, abs=1e-12) and scores.arand == pytest.approx(0, abs=1e-12)
    assert scores.n_voxels == 4
    # ...unless asked to score it: then 0 is one more neuron, split in two.
    assert evaluate_segmentation(seg, gt, ignore_label=None).voi_split > 0


def test_agrees_with_waterz_evaluate(capfd):
    waterz = pytest.importorskip("waterz", reason="waterz ships wheels for Python >= 3.11 only")
    gt = random_labels((6, 20, 20), 5, seed=1)  # includes 0, ignored by both
    seg = random_labels((6, 20, 20), 7, seed=2)
    reference = waterz.evaluate(seg, gt)
    capfd.readouterr()  # waterz prints its results from C++
    scores = evaluate_segmentation(seg, gt)
    assert scores.voi_split == pytest.approx(reference["voi_split"], rel=1e-9)
    assert scores.voi_merge == pytest.approx(reference["voi_merge"], rel=1e-9)
    assert scores.rand_split == pytest.approx(reference["rand_split"], rel=1e-9)
    assert scores.rand_merge == pytest.approx(reference["rand_merge"], rel=1e-9)


def test_lazily_read_volumes_are_scored_in_slabs(tmp_path, monkeypatch):
    import seqvision.eval.em.metrics as em_metrics

    gt = random_labels((10, 12, 12), 9, seed=3)
    seg = random_labels((10, 12, 12), 4, seed=4)
    expected = evaluate_segmentation(seg, gt)
    monkeypatch.setattr(em_metrics, "_SLAB_VOXELS", 300)  # two sections per slab: pairs recur across slabs
    with h5py.File(tmp_path / "v.h5", "w") as file:
        file["gt"], file["seg"] = gt, seg
    with h5py.File(tmp_path / "v.h5", "r") as file:
        scores = evaluate_segmentation(file["seg"], file["gt"])
    assert scores.to_dict() == pytest.approx(expected.to_dict())


def test_bad_inputs_are_clear_errors():
    gt = np.ones((2, 3, 3), dtype=np.uint64)
    with pytest.raises(ValueError, match="differs from ground_truth shape"):
        evaluate_segmentation(np.ones((2, 3, 4), dtype=np.uint64), gt)
    with pytest.raises(TypeError, match="integer labels"):
        evaluate_segmentation(np.ones((2, 3, 3), dtype=np.float32), gt)
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate_segmentation(gt, np.zeros_like(gt))
