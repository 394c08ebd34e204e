"""``seqvision finetune-video`` and ``seqvision eval-video`` (docs/VIDEO.md)."""

from __future__ import annotations

from typing import Any

from .classification import format_metrics
from .common import TaskCommands, written


def report(outcome: Any) -> list[str]:
    """An evaluation's metrics and files: ``video.evaluate`` returns (evaluation, classes, files)."""
    result, _, files = outcome
    return [format_metrics(result.report.metrics(), "evaluation"), *written(files)]


COMMANDS = TaskCommands(
    task="video",
    train="finetune-video",
    train_help="fine-tune a clip classifier (LRCN, LightNet video, ...) on a video folder or list",
    example_config="configs/finetune/video_lrcn_resnet18_ucf101.yaml",
    example_set="train.steps=100",
    evaluate="eval-video",
    evaluate_help="top-1/top-5 of a fine-tuned video model, K clips x crops per video",
    checkpoint="its model.safetensors",
    data="videos to evaluate",
    evaluate_set="eval.num_clips=10",
    format_metrics=format_metrics,
    report=report,
)
add_parsers = COMMANDS.add_parsers
