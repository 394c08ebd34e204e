"""Boundary maps, watershed fragments and agglomeration, with waterz and with the NumPy fallback."""

import logging

import numpy as np
import pytest
from scipy import ndimage as ndi

import seqvision.eval.em.postprocess as em_postprocess
from seqvision.data import synthetic_em_volume
from seqvision.eval.em import (
    affinity_targets,
    agglomerate,
    boundary_map,
    evaluate_segmentation,
    segment_affinities,
    watershed_fragments,
    waterz_available,
)
from seqvision.eval.em.postprocess import region_adjacency_edges

METHODS = ["waterz", "skimage"]


@pytest.fixture(scope="module")
def volume():
    """A synthetic volume, its true affinities, and noisy affinities (smooth noise, std 0.2)."""
    raw, labels = synthetic_em_volume((16, 128, 128), seed=0)
    true = affinity_targets(labels, ignore_label=None)[0]
    rng = np.random.default_rng(0)
    noise = np.stack([ndi.gaussian_filter(rng.standard_normal(labels.shape), (0, 1, 1)) for _ in range(3)])
    noisy = np.clip(true + 0.2 * noise / noise.std(), 0, 1).astype(np.float32)
    return raw, labels, true, noisy


def test_waterz_is_installed_here():
    # The waterz tests below would otherwise only test the fallback twice.
    assert waterz_available()


# ---------------------------------------------------------------------------------------- boundary map


def test_boundary_map_marks_both_sides_of_a_cut_edge():
    labels = np.array([[[1, 1, 1, 2, 2]] * 3], dtype=np.uint64)  # one section, an x boundary
    affinities = affinity_targets(labels)[0]
    expected = np.array([[0, 0, 1, 1, 0]] * 3, dtype=np.float32)
    np.testing.assert_array_equal(boundary_map(affinities)[0], expected)
    # 'mean': the cut edge is one of the 3 (at the volume's side) or 4 edges of a voxel.
    mean = boundary_map(affinities, reduce="mean")[0]
    np.testing.assert_allclose(mean[1], [0, 0, 1 / 4, 1 / 4, 0])
    np.testing.assert_allclose(mean[0], [0, 0, 1 / 3, 1 / 3, 0])


def test_boundary_map_2d_ignores_z_and_3d_does_not():
    labels = np.ones((3, 4, 4), dtype=np.uint64)
    labels[2] = 2  # a z boundary between sections 1 and 2
    affinities = affinity_targets(labels)[0]
    assert boundary_map(affinities, "2d").max() == 0
    np.testing.assert_array_equal(boundary_map(affinities, "3d").max(axis=(1, 2)), [0, 1, 1])


# ------------------------------------------------------------------------------------------- fragments


@pytest.mark.parametrize("mode", ["2d", "3d"])
@pytest.mark.parametrize("seed_method", ["maxima_distance", "minima"])
def test_fragments_of_true_affinities_stay_inside_neurons(volume, mode, seed_method):
    _, labels, true, _ = volume
    fragments = watershed_fragments(true, mode=mode, seed_method=seed_method)
    assert fragments.dtype == np.uint64 and fragments.shape == labels.shape
    ids = np.unique(fragments)
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    scores = evaluate_segmentation(fragments, labels)
    assert scores.voi_merge < 0.01  # (almost) no fragment spans two neurons
    if mode == "2d":  # fragments never cross sections
        for z in range(1, len(fragments)):
            assert not np.intersect1d(fragments[z], fragments[z - 1]).size


def test_a_blank_section_becomes_one_fragment():
    affinities = np.zeros((3, 2, 6, 6), dtype=np.float32)  # everything boundary
    fragments = watershed_fragments(affinities)
    np.testing.assert_array_equal(np.unique(fragments[0]), [1])
    np.testing.assert_array_equal(np.unique(fragments[1]), [2])


# ---------------------------------------------------------------------------------------- agglomeration


def test_region_adjacency_edges_of_a_small_volume():
    fragments = np.array([[[1, 1, 2], [3, 3, 2]]], dtype=np.uint64)
    affinities = np.zeros((3, 1, 2, 3), dtype=np.float32)
    affinities[1, 0, 1] = [0.1, 0.2, 0.9]  # y edges: (1,3) (1,3) (2,2)
    affinities[2, 0, :, 1:] = [[0.8, 0.3], [0.7, 0.4]]  # x edges: (1,1) (1,2) / (3,3) (3,2)
    u, v, values = region_adjacency_edges(fragments, affinities)
    np.testing.assert_array_equal(u, [1, 1, 1, 2])
    np.testing.assert_array_equal(v, [2, 3, 3, 3])
    np.testing.assert_allclose(values, [0.3, 0.1, 0.2, 0.4])


@pytest.mark.parametrize("method", METHODS)
def test_merges_follow_the_median_boundary_affinity(method):
    # Fragments 1 | 2 | 3 along x; between 1 and 2 the x affinities are 0.9 (strong), between 2 and
    # 3 one row is 0.9 and two rows are 0.2 (median 0.2).
    fragments = np.repeat(np.array([1, 1, 2, 2, 3, 3], dtype=np.uint64)[None, None], 3, axis=1)
    affinities = np.ones((3, 1, 3, 6), dtype=np.float32)
    affinities[2, 0, :, 2] = 0.9
    affinities[2, 0, :, 4] = [0.9, 0.2, 0.2]
    low, mid, high = agglomerate(affinities, fragments, [0.05, 0.5, 0.9], method=method)
    assert len(np.unique(low)) == 3  # 1 - 0.9 = 0.1 is above 0.05: nothing merges
    np.testing.assert_array_equal(mid[0, 0], [1, 1, 1, 1, 2, 2])  # only 1-2 (score 0.1 < 0.5)
    assert len(np.unique(high)) == 1  # 2-3 scores 1 - 0.2 = 0.8 < 0.9
    mean = agglomerate(affinities, fragments, 0.5, scoring="mean", method=method)[0]
    assert len(np.unique(mean)) == 2  # mean of 2-3 is 0.43: score 0.57, not merged at 0.5


@pytest.mark.parametrize("method", METHODS)
def test_thresholds_come_back_in_the_order_given(volume, method):
    noisy = volume[3]
    fragments = watershed_fragments(noisy[:, :4])
    results = agglomerate(noisy[:, :4], fragments, [0.7, 0.1, 0.4], method=method)
    counts = [len(np.unique(r)) for r in results]
    assert counts[1] >= counts[2] >= counts[0]  # a higher threshold merges more
    assert all(r.dtype == np.uint64 and r.min() == 1 for r in results)


@pytest.mark.parametrize("method", METHODS)
def test_true_affinities_recover_the_segmentation(volume, method):
    _, labels, true, _ = volume
    segmentation = segment_affinities(true, method=method)
    scores = evaluate_segmentation(segmentation, labels)
    assert scores.voi_sum < 0.05 and scores.arand < 0.01, scores


@pytest.mark.parametrize("method", METHODS)
def test_noisy_affinities_beat_the_trivial_baselines(volume, method):
    raw, labels, _, noisy = volume
    segmentation = segment_affinities(noisy, method=method)
    voi = evaluate_segmentation(segmentation, labels).voi_sum
    all_one = evaluate_segmentation(np.ones_like(labels), labels).voi_sum
    # Connected components of the thresholded raw (membranes are dark), at its best threshold.
    components = min(
        evaluate_segmentation(ndi.label(raw > threshold)[0], labels).voi_sum for threshold in (80, 100, 120)
    )
    assert voi < 0.5 and voi < 0.25 * min(all_one, components), (voi, all_one, components)


def test_without_waterz_auto_falls_back_to_the_numpy_merge(volume, monkeypatch, caplog):
    noisy = volume[3]
    fragments = watershed_fragments(noisy)
    expected = agglomerate(noisy, fragments, 0.5, method="skimage")[0]
    monkeypatch.setattr(em_postprocess, "_import_waterz", lambda: None)
    assert not waterz_available()
    with caplog.at_level(logging.INFO, logger="seqvision.eval.em.postprocess"):
        result = agglomerate(noisy, fragments, 0.5)[0]
    np.testing.assert_array_equal(result, expected)
    assert "waterz is not installed" in caplog.text
    with pytest.raises(ImportError, match="pip install waterz"):
        agglomerate(noisy, fragments, 0.5, method="waterz")


def test_waterz_prints_nothing(volume, capfd):
    _, _, true, _ = volume
    agglomerate(true[:, :2], watershed_fragments(true[:, :2]), 0.5, method="waterz")
    assert capfd.readouterr().out == ""


def test_bad_affinities_and_arguments_are_clear_errors():
    good = np.ones((3, 2, 4, 4), dtype=np.float32)
    fragments = np.ones((2, 4, 4), dtype=np.uint64)
    nan = good.copy()
    nan[0, 1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        watershed_fragments(nan)
    with pytest.raises(ValueError, match=r"\(3, Z, Y, X\)"):
        boundary_map(good[0])
    with pytest.raises(TypeError, match="floating point"):
        boundary_map(good.astype(np.uint8))
    with pytest.raises(ValueError, match="fragments shape"):
        agglomerate(good, fragments[:1])
    with pytest.raises(ValueError, match="thresholds"):
        agglomerate(good, fragments, [0.5, 1.5])
    with pytest.raises(ValueError, match="method must be one of"):
        agglomerate(good, fragments, method="multicut")
    with pytest.raises(ValueError, match="seed_method"):
        watershed_fragments(good, seed_method="grid")
    with pytest.raises(ValueError, match="min_seed_distance"):
        watershed_fragments(good, min_seed_distance=0)
