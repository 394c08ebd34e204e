"""A linear probe of neuron boundaries on frozen encoder features: what an encoder knows before fine-tuning.

A segmenter has to find the membranes between neurons. Whether an encoder's features already say
where they are is measured without training the encoder: its multi-scale features are frozen,
upsampled to the voxel grid, and a logistic regression (one weight per feature channel, nothing
more) is fitted to tell boundary voxels from interior ones on a labelled volume, then scored on
other volumes by ROC AUC (threshold-free: 0.5 is chance, 1 a perfect ranking) and balanced
accuracy. The same probe on a randomly initialised encoder of the same architecture, and on the raw
intensity alone, says how much of that is the pretraining's doing.

* ``boundary_voxels``: the target, from neuron ids (a voxel whose in-plane neighbour is another neuron).
* ``encoder_features``: an encoder's skip outputs, upsampled to the input's grid, per level.
* ``LinearProbe.fit`` / ``LinearProbe.scores``: the logistic regression and its scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqvision.eval.em.affinity import affinity_targets
from seqvision.eval.em.postprocess import boundary_map
from seqvision.utils.checks import check_positive_int
from seqvision.utils.extras import require

mannwhitneyu = require("scipy.stats", "em", "the probe's ROC AUC").mannwhitneyu

__all__ = [
    "LinearProbe",
    "ProbeScores",
    "boundary_voxels",
    "encoder_features",
    "probe_scores",
    "sample_balanced",
    "stack_levels",
]


def boundary_voxels(labels: np.ndarray) -> np.ndarray:
    """Boundary voxels of a neuron segmentation: bool (Z, Y, X), true where one of the (up to four)
    in-plane neighbours of a voxel carries another id; sections are independent, as the
    post-processing treats them (``boundary_map`` of the true affinities, '2d')."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X), got shape {labels.shape}")
    target, _ = affinity_targets(labels, ignore_label=None)
    return boundary_map(target, mode="2d", reduce="min") > 0.5


@torch.no_grad()
def encoder_features(encoder: nn.Module, raw: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
    """An EM encoder's skip outputs on one volume, each upsampled (trilinear) to the volume's grid.

    Args:
        encoder: an ``EMMamba`` (any model with ``forward_intermediates(x, intermediates_only=True)``
            returning channels-first levels); run in eval mode, its mode restored after.
        raw: (Z, Y, X): uint8 / uint16 (scaled by the dtype's range) or float in [0, 1]; every size
            divisible by the encoder's reduction.

    Returns:
        one float32 (C_i, Z, Y, X) tensor per level, shallowest first, on the CPU.
    """
    volume = torch.as_tensor(np.asarray(raw) if not torch.is_tensor(raw) else raw)
    if volume.dim() != 3:
        raise ValueError(f"raw must be (Z, Y, X), got shape {tuple(volume.shape)}")
    if not volume.is_floating_point():
        volume = volume.float() / float(torch.iinfo(volume.dtype).max)
    parameter = next(encoder.parameters())
    x = volume.to(parameter.device, parameter.dtype)[None, None]
    training = encoder.training
    encoder.eval()
    try:
        levels = encoder.forward_intermediates(x, intermediates_only=True)
    finally:
        encoder.train(training)
    grid = tuple(volume.shape)
    return [F.interpolate(level.float(), size=grid, mode="trilinear")[0].cpu() for level in levels]


def sample_balanced(target: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Flat indices of ``per_class`` boundary and ``per_class`` interior voxels of ``target`` (bool),
    drawn without replacement (fewer when a class has fewer voxels); a fixed function of ``seed``."""
    check_positive_int("per_class", per_class)
    rng = np.random.default_rng(seed)
    flat = np.asarray(target).ravel()
    picks = []
    for value in (True, False):
        where = np.flatnonzero(flat == value)
        if where.size == 0:
            raise ValueError(f"target has no {'boundary' if value else 'interior'} voxels to sample")
        picks.append(rng.choice(where, size=min(per_class, where.size), replace=False))
    return np.concatenate(picks)


@dataclass(frozen=True)
class ProbeScores:
    """How well a probe separates boundary from interior voxels of one or more volumes."""

    auc: float  # ROC AUC: the chance that a boundary voxel scores above an interior one
    balanced_accuracy: float  # mean of the boundary and interior recalls at probability 0.5
    n_boundary: int
    n_interior: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "auc": self.auc,
            "balanced_accuracy": self.balanced_accuracy,
            "n_boundary": self.n_boundary,
            "n_interior": self.n_interior,
        }


@dataclass(frozen=True)
class LinearProbe:
    """A logistic regression on standardised features: p(boundary) = sigmoid(w . (f - mean) / std + b)."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    weight: torch.Tensor  # (C,)
    bias: float

    @classmethod
    def fit(
        cls, features: torch.Tensor, target: torch.Tensor, *, weight_decay: float = 1e-3, max_iter: int = 200
    ) -> LinearProbe:
        """Fit on (N, C) features and (N,) bool targets by L-BFGS on the mean logistic loss plus
        ``weight_decay`` / 2 x |w|^2 (a convex problem: the optimum does not depend on the start).

        Train on a balanced sample (``sample_balanced``) so that 0.5 is the natural threshold.
        """
        if features.dim() != 2 or target.shape != features.shape[:1]:
            shapes = f"{tuple(features.shape)} and {tuple(target.shape)}"
            raise ValueError(f"features must be (N, C) and target (N,), got {shapes}")
        x = features.double()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
        x = (x - mean) / std
        y = target.double()
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * weight_decay * w.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls(mean.float(), std.float(), w.detach().float(), float(b.detach()))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N,) logits."""
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias

    def scores(self, features: torch.Tensor, target: np.ndarray | torch.Tensor) -> ProbeScores:
        """ROC AUC and balanced accuracy on (N, C) features against (N,) bool targets."""
        return probe_scores(self.logits(features), target)


def probe_scores(logits: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> ProbeScores:
    """ROC AUC and balanced accuracy (at logit 0) of (N,) logits against (N,) bool targets."""
    logits = np.asarray(logits, dtype=np.float64).ravel()
    target = np.asarray(target, dtype=bool).ravel()
    if logits.shape != target.shape:
        raise ValueError(f"logits and target must have the same length, got {logits.size} and {target.size}")
    positive, negative = logits[target], logits[~target]
    if positive.size == 0 or negative.size == 0:
        raise ValueError("target must hold both boundary and interior voxels to score a probe")
    # Mann-Whitney's U of the positives counts the (positive, negative) pairs ranked right, ties half.
    auc = float(mannwhitneyu(positive, negative).statistic) / (positive.size * negative.size)
    balanced = 0.5 * (float((positive > 0).mean()) + float((negative <= 0).mean()))
    return ProbeScores(auc, balanced, int(positive.size), int(negative.size))


def stack_levels(levels: Sequence[torch.Tensor], which: Sequence[int] | None = None) -> torch.Tensor:
    """Per-level (C_i, Z, Y, X) features -> (Z * Y * X, sum C_i) voxel rows of the ``which`` levels."""
    chosen = [levels[i] for i in (range(len(levels)) if which is None else which)]
    if len(chosen) == 1:
        return chosen[0].flatten(1).T  # a view: no copy of a large volume's features
    return torch.cat([level.flatten(1) for level in chosen]).T
