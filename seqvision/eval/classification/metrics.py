"""Classification metrics and their files: top-k accuracy, mean class accuracy, confusion matrix.

Shared by every pipeline that predicts one class per sample (video recognition, image
classification). The inputs are the gathered predictions of the whole evaluation set, so each
sample is counted once however many processes evaluated it (``seqvision.engine.gather_outputs``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqvision.utils.extras import require
from seqvision.utils.io import atomic_path, write_json_atomic

__all__ = [
    "ClassificationReport",
    "classification_report",
    "confusion_matrix",
    "save_confusion_figure",
    "write_predictions_csv",
    "write_report_files",
    "write_report_json",
]


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    index = labels.long() * num_classes + predicted.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class ClassificationReport:
    """The scores of one evaluation.

    ``top1``/``top5`` are fractions of the scored samples; ``mean_class_accuracy`` is the mean over
    the classes that occur in the labels of each class's recall (UCF101's customary second number);
    ``skipped`` counts samples that could not be read and were not scored.
    """

    top1: float
    top5: float
    mean_class_accuracy: float
    samples: int
    skipped: int = 0
    confusion: list[list[int]] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        """The scalar scores (what a tracker logs)."""
        return {k: float(v) for k, v in asdict(self).items() if k != "confusion"}


def classification_report(
    probs: torch.Tensor, labels: torch.Tensor, *, valid: torch.Tensor | None = None
) -> ClassificationReport:
    """Score class probabilities (or any scores ranked alike) against labels.

    Args:
        probs: (N, K) per-sample class scores.
        labels: (N,) int true classes in [0, K).
        valid: (N,) bool or 0/1; samples with 0 are counted as skipped and not scored.
    """
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"probs must be (N, K) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    num_classes = probs.shape[1]
    keep = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.bool()
    probs, labels = probs[keep].float(), labels[keep].long()
    skipped = int((~keep).sum())
    if len(labels) == 0:
        nan = float("nan")
        return ClassificationReport(nan, nan, nan, 0, skipped, [[0] * num_classes] * num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    k = min(5, num_classes)
    top = probs.topk(k, dim=1).indices
    top1 = (top[:, 0] == labels).float().mean().item()
    top5 = (top == labels[:, None]).any(dim=1).float().mean().item()
    matrix = confusion_matrix(top[:, 0], labels, num_classes)
    support = matrix.sum(dim=1)
    present = support > 0
    recall = matrix.diagonal()[present].float() / support[present].float()
    return ClassificationReport(top1, top5, recall.mean().item(), len(labels), skipped, matrix.tolist())


def write_predictions_csv(
    path: str | os.PathLike,
    names: Sequence[str],
    labels: torch.Tensor,
    probs: torch.Tensor,
    classes: Sequence[str],
    *,
    valid: torch.Tensor | None = None,
    top: int = 5,
) -> Path:
    """One row per sample: name, true class, predicted class, its probability, the top classes.

    Written atomically. Unreadable samples (``valid`` 0) are listed with an empty prediction.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "label", "predicted", "probability", "correct", f"top{top}"])
    k = min(top, probs.shape[1])
    values, indices = probs.float().topk(k, dim=1)
    for row, name in enumerate(names):
        label = classes[int(labels[row])]
        if valid is not None and not bool(valid[row]):
            writer.writerow([name, label, "", "", "", "unreadable"])
            continue
        best = int(indices[row, 0])
        ranked = " ".join(
            f"{classes[int(i)]}:{float(v):.4f}" for v, i in zip(values[row], indices[row], strict=True)
        )
        writer.writerow(
            [
                name,
                label,
                classes[best],
                f"{float(values[row, 0]):.6f}",
                int(best == int(labels[row])),
                ranked,
            ]
        )
    with atomic_path(path) as temporary:
        temporary.write_text(buffer.getvalue())
    return Path(path)


def save_confusion_figure(
    path: str | os.PathLike, confusion: Sequence[Sequence[int]], classes: Sequence[str], *, title: str = ""
) -> Path:
    """A PNG of the row-normalised confusion matrix (rows: true class), written atomically.

    Class names label the axes up to 40 classes; beyond that the ticks would be unreadable and are
    left out (UCF101's 101 classes show as a heat map whose diagonal is what a person looks at).
    """
    matplotlib = require("matplotlib", "classification", "the confusion matrix picture")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = min(max(6.0, 4 + 0.3 * len(classes)), 16.0)
    figure, axes = plt.subplots(figsize=(size, size), dpi=100)
    image = axes.imshow(normalised, vmin=0, vmax=1, cmap="viridis")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    if len(classes) <= 40:
        axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        axes.set_yticks(range(len(classes)), classes, fontsize=7)
        if len(classes) <= 12:
            for i in range(len(classes)):
                for j in range(len(classes)):
                    if matrix[i, j]:
                        axes.text(j, i, int(matrix[i, j]), ha="center", va="center", color="w", fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title or "confusion matrix", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary)
    plt.close(figure)
    return Path(path)


def write_report_json(path: str | os.PathLike, report: ClassificationReport, classes: Sequence[str]) -> Path:
    """The report (scores, confusion matrix, class names) as JSON, atomically."""
    return write_json_atomic(path, {**asdict(report), "classes": list(classes)})


def write_report_files(
    folder: str | os.PathLike,
    report: ClassificationReport,
    names: Sequence[str],
    labels: torch.Tensor,
    probs: torch.Tensor,
    classes: Sequence[str],
    *,
    valid: torch.Tensor | None = None,
    title: str = "",
) -> dict[str, Path]:
    """An evaluation's files in ``folder``, each atomically: ``metrics.json`` (the report),
    ``predictions.csv`` (one row per sample: name, label, prediction, probabilities) and
    ``confusion.png``. ``labels`` (N,), ``probs`` (N, classes), ``valid`` (N,) bool. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "metrics": write_report_json(folder / "metrics.json", report, classes),
        "predictions": write_predictions_csv(
            folder / "predictions.csv", names, labels, probs, classes, valid=valid
        ),
        "confusion": save_confusion_figure(folder / "confusion.png", report.confusion, classes, title=title),
    }
