"""Image classification (docs/CLASSIFICATION.md), and the classification tools the video pipeline
and ``seqvision bench digits`` share.

* ``classifier``: ``ClassifierWithLoss``, a classifier with its cross-entropy as one module.
* ``metrics``: top-1 / top-5, mean class accuracy, the confusion matrix PNG, predictions CSV.
* ``finetune``: fine-tuning any timm or seqvision model on an ImageFolder or list and evaluating it
  (``seqvision finetune-cls`` / ``seqvision eval-cls``).
"""

from .classifier import ClassifierWithLoss, classifier_forward
from .finetune import (
    IMAGE_EXTENSIONS,
    ClassificationJob,
    ImageClassDataset,
    evaluate,
    finetune,
    layer_decay_scales,
    load_config,
    prepare,
    run,
    run_evaluation,
    write_evaluation,
)
from .metrics import ClassificationReport, classification_report, confusion_matrix

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassificationJob",
    "ClassificationReport",
    "ClassifierWithLoss",
    "ImageClassDataset",
    "classification_report",
    "classifier_forward",
    "confusion_matrix",
    "evaluate",
    "finetune",
    "layer_decay_scales",
    "load_config",
    "prepare",
    "run",
    "run_evaluation",
    "write_evaluation",
]
