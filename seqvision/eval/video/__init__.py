"""Video recognition (docs/VIDEO.md): a clip classifier (LRCN, LightNet's video model, any timm
model over clips) fine-tuned on decord clips and evaluated with K clips x crops per video
(``seqvision finetune-video`` / ``seqvision eval-video``). The video lists, frame sampling and
decoding are :mod:`seqvision.data.video`."""

from .finetune import (
    VideoEvaluation,
    VideoJob,
    build_model,
    evaluate,
    finetune,
    load_config,
    prepare,
    run,
    run_evaluation,
    write_evaluation,
)

__all__ = [
    "VideoEvaluation",
    "VideoJob",
    "build_model",
    "evaluate",
    "finetune",
    "load_config",
    "prepare",
    "run",
    "run_evaluation",
    "write_evaluation",
]
