"""``seqvision finetune-cls`` and ``seqvision eval-cls`` (docs/CLASSIFICATION.md)."""

from __future__ import annotations

from typing import Any

from .common import TaskCommands, format_table, written


def format_metrics(metrics: dict[str, float], what: str = "validation") -> str:
    """top-1 / top-5 / mean class accuracy as a two-column table (also the video commands')."""
    rows = [("metric", what)]
    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("mean_class_accuracy", "mean class acc.")):
        rows.append((label, f"{100 * metrics[key]:.2f} %"))
    rows.append(("scored", str(int(metrics["samples"]))))
    rows.append(("unreadable", str(int(metrics["skipped"]))))
    return format_table(rows)


def report(outcome: Any) -> list[str]:
    """An evaluation's metrics and files: ``classification.evaluate`` returns (report, classes, files)."""
    scores, _, files = outcome
    return [format_metrics(scores.metrics(), "evaluation"), *written(files)]


COMMANDS = TaskCommands(
    task="classification",
    train="finetune-cls",
    train_help="fine-tune an image classifier (any timm or seqvision model) on an ImageFolder or list",
    example_config="configs/finetune/cls_vir_tiny.yaml",
    example_set="model.layer_decay=0.75",
    evaluate="eval-cls",
    evaluate_help="top-1/top-5 of a fine-tuned image classifier",
    checkpoint="its model.safetensors or model_ema.safetensors",
    data="images to evaluate",
    evaluate_set="eval.batch_size=128",
    format_metrics=format_metrics,
    report=report,
)
add_parsers = COMMANDS.add_parsers
