"""The linear probe against slow, obvious references: boundary voxels by a loop over neighbours,
ROC AUC by counting pairs, and a probe that must separate separable data."""

import numpy as np
import pytest
import torch

from seqvision.eval.em.probe import (
    LinearProbe,
    boundary_voxels,
    encoder_features,
    probe_scores,
    sample_balanced,
    stack_levels,
)


def _boundary_loop(labels):
    z_size, y_size, x_size = labels.shape
    out = np.zeros(labels.shape, dtype=bool)
    for z in range(z_size):
        for y in range(y_size):
            for x in range(x_size):
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < y_size and 0 <= nx < x_size and labels[z, ny, nx] != labels[z, y, x]:
                        out[z, y, x] = True
    return out


def test_boundary_voxels_match_a_loop_over_in_plane_neighbours():
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 4, size=(3, 7, 9)).astype(np.uint64)
    labels[1] = 5  # a section inside one neuron has no boundary, whatever its neighbours in z
    expected = _boundary_loop(labels)
    assert not expected[1].any()
    np.testing.assert_array_equal(boundary_voxels(labels), expected)


def test_auc_counts_correctly_ranked_pairs_with_ties_as_half():
    rng = np.random.default_rng(1)
    logits = rng.integers(0, 6, size=301).astype(np.float64)  # many ties
    target = rng.random(301) < 0.3
    positive, negative = logits[target], logits[~target]
    pairs = (positive[:, None] > negative[None, :]).sum() + 0.5 * (
        positive[:, None] == negative[None, :]
    ).sum()
    scores = probe_scores(logits, target)
    assert scores.auc == pytest.approx(pairs / (positive.size * negative.size), abs=1e-12)
    recall = 0.5 * ((positive > 0).mean() + (negative <= 0).mean())
    assert scores.balanced_accuracy == pytest.approx(recall)
    assert (scores.n_boundary, scores.n_interior) == (positive.size, negative.size)


def test_a_probe_separates_linearly_separable_voxels_and_ignores_noise_channels():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2000, 5, generator=generator) * torch.tensor([1.0, 50.0, 0.01, 3.0, 1.0])
    target = features[:, 0] + features[:, 3] / 3 > 0.2  # one direction, badly scaled channels around it
    probe = LinearProbe.fit(features, target)
    fresh = torch.randn(1000, 5, generator=generator) * torch.tensor([1.0, 50.0, 0.01, 3.0, 1.0])
    scores = probe.scores(fresh, (fresh[:, 0] + fresh[:, 3] / 3 > 0.2).numpy())
    assert scores.auc > 0.995 and scores.balanced_accuracy > 0.95
    direction = probe.weight / probe.std
    assert abs(direction[1]) < 0.05 * abs(direction[0]) and abs(direction[2]) < 0.05 * abs(direction[0]) * 100


def test_sample_balanced_draws_each_class_without_replacement_from_the_seed():
    target = np.zeros((4, 10, 10), dtype=bool)
    target[:, 0] = True  # 40 boundary voxels
    picks = sample_balanced(target, 30, seed=3)
    flat = target.ravel()
    assert flat[picks].sum() == 30 and (~flat[picks]).sum() == 30 and len(set(picks.tolist())) == 60
    np.testing.assert_array_equal(picks, sample_balanced(target, 30, seed=3))
    assert flat[sample_balanced(target, 100, seed=3)].sum() == 40  # fewer when a class is smaller
    with pytest.raises(ValueError, match="no boundary voxels"):
        sample_balanced(np.zeros((2, 2, 2), dtype=bool), 5, seed=0)


def test_encoder_features_are_upsampled_levels_on_the_voxel_grid():
    import torch.nn.functional as F

    from seqvision.vision.em import EMMambaEncoder

    encoder = EMMambaEncoder(dims=(4, 8, 8, 8), depths=(1, 0, 0, 0), chunk_size=64)
    raw = np.random.default_rng(4).integers(0, 256, size=(16, 32, 32), dtype=np.uint8)
    levels = encoder_features(encoder, raw)
    assert [tuple(level.shape) for level in levels] == [(c, 16, 32, 32) for c in (4, 8, 8, 8)]
    assert encoder.training  # its mode is restored
    with torch.no_grad():  # the same thing by hand: uint8 scaled to [0, 1], eval mode, trilinear
        encoder.eval()
        direct = encoder.forward_intermediates(
            torch.from_numpy(raw).float()[None, None] / 255, intermediates_only=True
        )
    for level, coarse in zip(levels, direct, strict=True):
        torch.testing.assert_close(level, F.interpolate(coarse, size=(16, 32, 32), mode="trilinear")[0])
    rows = stack_levels(levels)
    assert rows.shape == (16 * 32 * 32, 28)
    torch.testing.assert_close(rows[:, 4:12], stack_levels(levels, [1]))
    with pytest.raises(ValueError, match=r"raw must be \(Z, Y, X\)"):
        encoder_features(encoder, raw[0])
