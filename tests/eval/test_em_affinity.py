"""Affinity targets, the balanced affinity loss and AffinityModel (also under the shared training loop)."""

import numpy as np
import pytest
import torch

from seqvision.data import EMCropDataset, synthetic_em_volume
from seqvision.engine import LoopConfig, train
from seqvision.eval.em import AffinityLoss, AffinityModel, affinity_forward, affinity_targets


def test_targets_of_a_hand_made_volume():
    # Z = 2 sections of 2 x 3; ids: section 0 [[1 1 2] [1 1 2]], section 1 [[1 3 2] [1 1 2]].
    labels = np.array([[[1, 1, 2], [1, 1, 2]], [[1, 3, 2], [1, 1, 2]]], dtype=np.uint64)
    target, mask = affinity_targets(labels)
    assert target.shape == mask.shape == (3, 2, 2, 3) and target.dtype == np.float32
    # z: section 1 against section 0; section 0 has no predecessor (masked).
    np.testing.assert_array_equal(target[0, 1], [[1, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(mask[0], [np.zeros((2, 3)), np.ones((2, 3))])
    # y: row 1 against row 0.
    np.testing.assert_array_equal(target[1, :, 1], [[1, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(target[1, :, 0], 0)
    np.testing.assert_array_equal(mask[1, :, 0], 0)
    # x: column c against c - 1.
    np.testing.assert_array_equal(target[2, 0], [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(target[2, 1], [[0, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(mask[2, :, :, 0], 0)
    np.testing.assert_array_equal(mask[2, :, :, 1:], 1)


def test_background_edges_are_masked_out():
    labels = np.array([[[0, 0, 1, 1, 0, 2, 2]]], dtype=np.int64)
    target, mask = affinity_targets(labels)
    # x edges at positions 1..6 join (0,0) (0,1) (1,1) (1,0) (0,2) (2,2).
    np.testing.assert_array_equal(mask[2, 0, 0], [0, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(target[2, 0, 0], [0, 0, 0, 1, 0, 0, 1])
    # Another ignore id, or none: then 0 is an ordinary neuron.
    target, mask = affinity_targets(labels, ignore_label=None)
    np.testing.assert_array_equal(mask[2, 0, 0], [0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(target[2, 0, 0], [0, 1, 0, 1, 0, 0, 1])
    _, mask = affinity_targets(labels, ignore_label=2)
    np.testing.assert_array_equal(mask[2, 0, 0], [0, 1, 1, 1, 1, 0, 0])


def test_tensor_batches_match_numpy():
    labels = np.random.default_rng(0).integers(0, 4, (2, 3, 5, 6))
    target, mask = affinity_targets(torch.from_numpy(labels))
    assert target.shape == (2, 3, 3, 5, 6) and target.dtype == torch.float32
    for b in range(2):
        expected_target, expected_mask = affinity_targets(labels[b].astype(np.uint64))
        np.testing.assert_array_equal(target[b].numpy(), expected_target)
        np.testing.assert_array_equal(mask[b].numpy(), expected_mask)


def test_targets_reject_bad_labels():
    with pytest.raises(ValueError, match=r"\(\.\.\., Z, Y, X\)"):
        affinity_targets(np.ones((4, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="integer neuron ids"):
        affinity_targets(np.ones((2, 4, 4), dtype=np.float32))


def test_balanced_loss_gives_each_class_half_the_weight():
    # One sample, one channel, four masked edges: one boundary (0) and three inside (1).
    target = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]).reshape(1, 1, 1, 1, 5)
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 1, 1, 5)
    weights = AffinityLoss(clip=(0.01, 0.99)).weights(target, mask).flatten()
    # f = 3/4 positives: positives 1 / (2 * 3/4) = 2/3 each, the negative 1 / (2 * 1/4) = 2.
    np.testing.assert_allclose(weights.numpy(), [2, 2 / 3, 2 / 3, 2 / 3, 0], rtol=1e-6)
    pred = torch.tensor([0.5, 1.0, 1.0, 0.0, 0.3]).reshape(1, 1, 1, 1, 5)
    # (2 * 0.25 + 2/3 * 1) / 4 masked edges; the masked-out edge's error does not count.
    assert AffinityLoss(clip=(0.01, 0.99))(pred, target, mask).item() == pytest.approx((0.5 + 2 / 3) / 4)
    assert AffinityLoss(balance=False)(pred, target, mask).item() == pytest.approx(1.25 / 4)
    assert AffinityLoss()(target, target, mask).item() == 0.0


def test_balance_weights_are_clipped_for_crops_without_boundaries():
    target = torch.ones(1, 1, 1, 2, 2)
    weights = AffinityLoss(clip=(0.05, 0.95)).weights(target, torch.ones_like(target))
    torch.testing.assert_close(weights, torch.full_like(target, 0.5 / 0.95))
    with pytest.raises(ValueError, match="clip"):
        AffinityLoss(clip=(0.0, 0.5))


def test_affinity_model_returns_a_differentiable_loss(tiny_config):
    torch.manual_seed(0)
    model = AffinityModel(tiny_config.build())
    labels = torch.randint(1, 4, (2, 16, 32, 32))
    out = model({"raw": torch.rand(2, 1, 16, 32, 32), "labels": labels}, step=0)
    assert set(out) == {"loss", "mse", "boundary_fraction"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.segmenter.head.weight.grad is not None
    with pytest.raises(KeyError, match="'raw' and 'labels'"):
        model({"raw": torch.rand(2, 1, 16, 32, 32)})
    with pytest.raises(ValueError, match=r"\(B, Z, Y, X\)"):
        model({"raw": torch.rand(2, 1, 16, 32, 32), "labels": labels[:, :8]})


def test_affinity_model_trains_under_the_shared_loop(tmp_path, tiny_config):
    raw, labels = synthetic_em_volume((16, 48, 48), seed=0)
    data = EMCropDataset(raw, labels, crop_size=(16, 32, 32), samples_per_epoch=4, augment=False)
    torch.manual_seed(0)
    model = AffinityModel(tiny_config.build())
    config = LoopConfig(steps=2, batch_size=2, lr=1e-3, log_every=1, log_with=None, output_dir=tmp_path)
    result = train(model, data, config, forward=affinity_forward)
    assert result.state.step == 2
    assert all(np.isfinite(entry["loss"]) and 0 < entry["boundary_fraction"] < 1 for entry in result.history)
