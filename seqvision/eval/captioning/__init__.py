"""Image and video captioning (docs/CAPTIONING.md).

* ``vocab``: the word vocabulary, built from training captions and stored with the model.
* ``metrics``: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap), COCO results JSON, a caption grid.
* ``finetune``: fine-tuning an LRCN captioner and evaluating it (``seqvision finetune-caption`` /
  ``seqvision eval-caption``).

The caption files (COCO, Karpathy, video captions) are read by :mod:`seqvision.data.captions`.
"""

from .finetune import (
    CaptionerWithLoss,
    CaptionEvaluation,
    CaptionJob,
    build_model,
    evaluate,
    finetune,
    load_caption_records,
    load_config,
    prepare,
    run,
    write_evaluation,
)
from .metrics import CaptionScores, caption_scores
from .vocab import Vocabulary, tokenize

__all__ = [
    "CaptionEvaluation",
    "CaptionJob",
    "CaptionScores",
    "CaptionerWithLoss",
    "Vocabulary",
    "build_model",
    "caption_scores",
    "evaluate",
    "finetune",
    "load_caption_records",
    "load_config",
    "prepare",
    "run",
    "tokenize",
    "write_evaluation",
]
