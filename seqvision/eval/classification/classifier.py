"""``ClassifierWithLoss``: any classifier and its cross-entropy, as one module the training loop drives.

The loss is computed inside the module's forward so that Accelerate's mixed-precision autocast
covers it and the logits never leave the forward in bfloat16 to a float32 loss outside it.
Shared by video recognition and image classification fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ClassifierWithLoss", "classifier_forward"]


class ClassifierWithLoss(nn.Module):
    """Wrap ``model`` (inputs -> (B, K) logits) with a cross-entropy loss.

    Args:
        model: the classifier (an ``LRCN``, a timm image model, a LightNet video model).
        clip_layout: how clips reach the model. Datasets yield (B, T, C, H, W); 'BTCHW' passes that
            on (LRCN), 'BCTHW' moves the channels first (LightNet's video variant, 3-D patch
            embeddings), 'image' passes (B, C, H, W) images unchanged.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        model: nn.Module,
        clip_layout: Literal["BTCHW", "BCTHW", "image"] = "BTCHW",
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if clip_layout not in ("BTCHW", "BCTHW", "image"):
            raise ValueError(f"clip_layout must be 'BTCHW', 'BCTHW' or 'image', got {clip_layout!r}")
        self.model, self.clip_layout, self.label_smoothing = model, clip_layout, label_smoothing

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of (B, T, C, H, W) clips, or of (B, C, H, W) images for 'image'."""
        if self.clip_layout == "BCTHW":
            inputs = inputs.transpose(1, 2)
        return self.model(inputs)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"logits": (B, K)}``, plus ``"loss"`` and ``"accuracy"`` (scalars) when labels (B,) are given.

        ``labels`` may also be (B, K) soft targets (mixup); accuracy then compares with their argmax.
        """
        logits = self.logits(inputs)
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            hard = labels.argmax(dim=1) if labels.ndim == 2 else labels
            outputs["accuracy"] = (logits.detach().argmax(dim=1) == hard).float().mean()
        return outputs


def classifier_forward(
    model: nn.Module, batch: Mapping[str, Any], step: int, input_key: str = "video"
) -> dict[str, torch.Tensor]:
    """The training loop's ``forward`` for ``ClassifierWithLoss``: loss, accuracy and, when the
    batch has them, the number of unreadable samples skipped to fill it (``"unreadable"``)."""
    outputs = model(batch[input_key], batch["label"])
    outputs = {"loss": outputs["loss"], "accuracy": outputs["accuracy"]}
    if "unreadable" in batch:
        outputs["unreadable"] = batch["unreadable"].sum().float()
    return outputs
