"""``seqvision finetune-caption`` and ``seqvision eval-caption`` (docs/CAPTIONING.md)."""

from __future__ import annotations

from typing import Any

from .common import TaskCommands, format_table, written


def format_metrics(metrics: dict[str, float]) -> str:
    """BLEU-1..4, METEOR (or why it was skipped), ROUGE-L and CIDEr as a two-column table."""
    rows = [("metric", "value")]
    names = (("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"))
    names += (("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"))
    for key, label in names:
        rows.append(
            (label, f"{metrics[key]:.4f}" if key in metrics else "skipped (eval.meteor=false or no java)")
        )
    rows.append(("captioned", str(int(metrics["samples"]))))
    rows.append(("unreadable", str(int(metrics["skipped"]))))
    return format_table(rows)


def report(outcome: Any) -> list[str]:
    """An evaluation's scores and files: ``captioning.evaluate`` returns (evaluation, files)."""
    result, files = outcome
    scores = result.scores.table() if result.scores else "no caption could be scored"
    counts = f"{len(result.predictions)} captioned, {len(result.skipped)} unreadable"
    return [scores, counts, *written(files)]


COMMANDS = TaskCommands(
    task="captioning",
    train="finetune-caption",
    train_help="fine-tune an LRCN captioner on COCO-style image or video captions",
    example_config="configs/finetune/caption_lrcn_coco.yaml",
    example_set="eval.method=sample",
    evaluate="eval-caption",
    evaluate_help="BLEU/METEOR/ROUGE-L/CIDEr of a fine-tuned captioner, predictions and a picture",
    checkpoint="its model.safetensors",
    data="a caption file to caption and score",
    evaluate_set="eval.beam_size=5",
    format_metrics=format_metrics,
    report=report,
)
add_parsers = COMMANDS.add_parsers
