"""Affinity targets, the class-balanced affinity loss, and the trainable affinity model.

Nearest-neighbour affinities (TokenUnify, after Turaga et al. and the waterz / "superhuman" line of
work) describe a segmentation by its edges: channel c of voxel (z, y, x) is 1 when the voxel and its
predecessor along axis c ((z - 1, y, x), (z, y - 1, x), (z, y, x - 1) for c = 0, 1, 2) carry the same
neuron id, and 0 where the id changes (a boundary). The first voxel along an axis has no
predecessor; its edge is masked out, as is every edge that touches a voxel labelled
``ignore_label`` (0, "no label", by default; ``EMCropDataset`` also pads with 0).

``AffinityModel`` wraps a segmenter (``EMSegMamba`` or any module returning (B, 3, Z, Y, X)
affinities) with ``AffinityLoss`` into the module the shared training loop trains: a batch dict in,
a dict with a scalar ``"loss"`` out. Pass ``forward=affinity_forward`` to ``seqvision.pretrain``'s
``train`` so that the whole batch (raw and labels) reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = ["AffinityLoss", "AffinityModel", "affinity_forward", "affinity_targets", "slice_along"]

_AXES = (-3, -2, -1)  # z, y, x: the channel order of the affinities


def slice_along(axis: int, start: int | None, stop: int | None) -> tuple[Any, ...]:
    """Index of positions start:stop along a negative ``axis`` of an array of any rank (-3, -2, -1:
    z, y, x of a volume)."""
    return (Ellipsis, slice(start, stop), *([slice(None)] * (-axis - 1)))


def affinity_targets(
    labels: np.ndarray | torch.Tensor, ignore_label: int | None = 0
) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour affinity targets and their mask from a label volume.

    Args:
        labels: integer neuron ids (..., Z, Y, X), a numpy array (any integer dtype, uint64
            included) or a tensor (e.g. a batch (B, Z, Y, X) from ``EMCropDataset``).
        ignore_label: id of unlabelled voxels; edges touching one are masked. None: every id counts.

    Returns:
        ``(target, mask)``, both float32 (..., 3, Z, Y, X), channels (z, y, x), of the input's kind
        (and device): target 1 where a voxel and its predecessor share an id, 0 elsewhere; mask 1 on
        the edges that count (both ends labelled, and the predecessor inside the volume).
    """
    is_tensor = torch.is_tensor(labels)
    if not is_tensor:
        labels = np.asarray(labels)
    if labels.ndim < 3:
        raise ValueError(f"labels must be (..., Z, Y, X), got shape {tuple(labels.shape)}")
    integer = (
        not (labels.is_floating_point() or labels.is_complex()) if is_tensor else labels.dtype.kind in "iu"
    )
    if not integer:
        raise TypeError(f"labels must hold integer neuron ids, got dtype {labels.dtype}")
    shape = (*labels.shape[:-3], 3, *labels.shape[-3:])
    if is_tensor:
        target = torch.zeros(shape, dtype=torch.float32, device=labels.device)
        mask = torch.zeros(shape, dtype=torch.float32, device=labels.device)
    else:
        target, mask = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    for channel, axis in enumerate(_AXES):
        after, before = labels[slice_along(axis, 1, None)], labels[slice_along(axis, None, -1)]
        same = after == before
        if ignore_label is None:
            valid = torch.ones_like(same) if is_tensor else np.ones_like(same)
        else:
            valid = (after != ignore_label) & (before != ignore_label)
        target[..., channel, :, :, :][slice_along(axis, 1, None)] = same & valid
        mask[..., channel, :, :, :][slice_along(axis, 1, None)] = valid
    return target, mask


class AffinityLoss(nn.Module):
    """Class-balanced, masked mean squared error between predicted and target affinities.

    loss = sum(w * mask * (pred - target)^2) / sum(mask). With ``balance``, w is computed per sample
    and channel from the fraction f of positive (1) targets among the masked edges: 1 / (2 f) on
    positives and 1 / (2 (1 - f)) on negatives, so both classes weigh half (boundaries are a few
    percent of the edges and would otherwise be drowned out). f is clipped to ``clip`` so that a crop
    inside one neuron does not put an unbounded weight on its few boundary edges.

    forward(pred (B, C, Z, Y, X) in [0, 1], target, mask of the same shape) -> scalar (float32).
    """

    def __init__(self, balance: bool = True, clip: tuple[float, float] = (0.05, 0.95)) -> None:
        super().__init__()
        low, high = (float(c) for c in clip)
        if not 0 < low <= high < 1:
            raise ValueError(f"clip must be (low, high) with 0 < low <= high < 1, got {clip!r}")
        self.balance = balance
        self.clip = (low, high)

    @torch.no_grad()
    def weights(self, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-edge weights (B, C, Z, Y, X), zero where the mask is."""
        if not self.balance:
            return mask
        dims = tuple(range(2, target.dim()))
        count = mask.sum(dims, keepdim=True).clamp_min(1.0)
        positive = ((target * mask).sum(dims, keepdim=True) / count).clamp(*self.clip)
        return torch.where(target > 0.5, 0.5 / positive, 0.5 / (1 - positive)) * mask

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or mask.shape != target.shape or pred.dim() < 3:
            raise ValueError(
                f"pred, target and mask must have one shape (B, C, Z, Y, X), got {tuple(pred.shape)}, "
                f"{tuple(target.shape)} and {tuple(mask.shape)}"
            )
        # float32 under autocast: a bf16 sum over a whole batch of squared errors loses digits.
        pred, target, mask = pred.float(), target.float(), mask.float()
        weights = self.weights(target, mask)
        return (weights * (pred - target) ** 2).sum() / mask.sum().clamp_min(1.0)


class AffinityModel(nn.Module):
    """A segmenter and its affinity loss: what the training loop fine-tunes.

    forward(batch, step=None) takes ``batch["raw"]`` float (B, 1, Z, Y, X) in [0, 1] and
    ``batch["labels"]`` integer (B, Z, Y, X) and returns ``{"loss": weighted loss, "mse": plain
    masked MSE, "boundary_fraction": fraction of masked edges that are boundaries}`` (scalars; the
    loop logs all three). ``step`` is accepted for the loop's calling convention and unused.

    Args:
        segmenter: module mapping (B, 1, Z, Y, X) to (B, 3, Z, Y, X); when it has
            ``forward_logits`` (``EMSegMamba``), the sigmoid is applied here in float32.
        loss: an ``AffinityLoss`` (default: balanced).
        ignore_label: the unlabelled id, masked out of the targets.
    """

    def __init__(self, segmenter: nn.Module, loss: AffinityLoss | None = None, ignore_label: int | None = 0):
        super().__init__()
        if not isinstance(segmenter, nn.Module):
            raise TypeError(f"segmenter must be an nn.Module, got {type(segmenter).__name__}")
        self.segmenter = segmenter
        self.loss = AffinityLoss() if loss is None else loss
        self.ignore_label = ignore_label

    def predict(self, raw: torch.Tensor) -> torch.Tensor:
        """Affinities in [0, 1], float32 (B, 3, Z, Y, X)."""
        if hasattr(self.segmenter, "forward_logits"):
            return torch.sigmoid(self.segmenter.forward_logits(raw).float())
        return self.segmenter(raw).float()

    def forward(self, batch: Mapping[str, torch.Tensor], step: int | None = None) -> dict[str, torch.Tensor]:
        if not isinstance(batch, Mapping) or "raw" not in batch or "labels" not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(
                f"batch must be a dict with 'raw' and 'labels' (EMCropDataset with labels), got {found}"
            )
        raw, labels = batch["raw"], batch["labels"]
        if raw.dim() != 5 or labels.shape != (raw.shape[0], *raw.shape[2:]):
            raise ValueError(
                f"batch['raw'] must be (B, 1, Z, Y, X) and batch['labels'] (B, Z, Y, X), got "
                f"{tuple(raw.shape)} and {tuple(labels.shape)}"
            )
        target, mask = affinity_targets(labels, self.ignore_label)
        pred = self.predict(raw)
        if pred.shape != target.shape:
            raise ValueError(f"the segmenter returned {tuple(pred.shape)}, expected {tuple(target.shape)}")
        count = mask.sum().clamp_min(1.0)
        with torch.no_grad():
            mse = ((pred - target) ** 2 * mask).sum() / count
            boundary_fraction = ((1 - target) * mask).sum() / count
        return {"loss": self.loss(pred, target, mask), "mse": mse, "boundary_fraction": boundary_fraction}


def affinity_forward(model: nn.Module, batch: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
    """The ``forward`` to give ``seqvision.pretrain``'s ``train`` for an ``AffinityModel``: the
    whole batch dict goes to the model (the loop's default passes only ``batch['raw']``)."""
    return model(batch, step=step)
