"""Fine-tuning and evaluation pipelines: EM neuron segmentation and video recognition.

- ``em_affinity``: affinity targets from neuron ids, the class-balanced affinity loss and
  ``AffinityModel`` (a segmenter + its loss, the module the training loop fine-tunes).
- ``em_checkpoint``: segmenter checkpoints that name their architecture (``SegmenterConfig``,
  ``save_segmenter`` / ``load_segmenter``).
- ``em_segmentation``: sliding-window inference with Gaussian blending (``predict_affinities``),
  and the file-level ``segment_file`` / ``evaluate_files`` behind ``seqvision segment`` and
  ``seqvision eval-seg``.
- ``em_postprocess``: watershed fragments and agglomeration (waterz, or a NumPy fallback).
- ``em_metrics``: variation of information (split / merge) and adapted Rand error.
- ``em_figure``: a picture of raw, affinities, segmentation and ground truth.
- ``em_finetune``: fine-tuning the segmenter from a YAML config on the shared training loop
  (``finetune_segmenter``, behind ``seqvision finetune-seg``).
- ``em_demo``: pretraining vs scratch end to end on synthetic volumes (``run_demo``, behind
  ``seqvision demo``).

Captioning (docs/CAPTIONING.md):

- ``caption_vocab``: the word vocabulary (built from training captions, stored with the model).
- ``caption_data``: COCO / Karpathy and video caption files, ``CaptionDataset``.
- ``caption_metrics``: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap), results JSON, picture grid.
- ``captioning``: ``finetune_captioner`` / ``evaluate_captioner`` behind ``seqvision
  finetune-caption`` and ``seqvision eval-caption``.

Video recognition (docs/VIDEO.md):

- ``video_data``: video lists (class folders, CSV/TSV, Kinetics CSV, UCF101 splits), frame
  sampling, decord decoding with guards, clip transforms and ``VideoClipDataset``.
- ``video``: ``finetune_video`` / ``evaluate_video`` behind ``seqvision finetune-video`` and
  ``seqvision eval-video``.

Shared by the classification-style pipelines: ``classifier`` (``ClassifierWithLoss``),
``class_metrics`` (top-k, mean class accuracy, confusion matrix, predictions CSV) and
``model_file`` (a fine-tuned model's weights with its config and classes in one file).

See docs/EM.md for running segmentation on CREMI-format data.
"""

from .caption_data import CaptionDataset, CaptionRecord, load_coco_captions, load_video_captions
from .caption_metrics import CaptionScores, caption_scores
from .caption_vocab import Vocabulary, tokenize
from .captioning import evaluate_captioner, finetune_captioner
from .class_metrics import ClassificationReport, classification_report, confusion_matrix
from .classifier import ClassifierWithLoss
from .em_affinity import AffinityLoss, AffinityModel, affinity_forward, affinity_targets
from .em_checkpoint import (
    CHECKPOINT_FORMAT,
    SegmenterConfig,
    load_segmenter,
    read_segmenter_config,
    save_segmenter,
)
from .em_figure import save_segmentation_figure
from .em_finetune import SEGMENTER_FILE, finetune_segmenter, prepare_finetune, run_finetune
from .em_metrics import (
    SegmentationScores,
    adapted_rand_error,
    contingency_table,
    evaluate_segmentation,
    variation_of_information,
)
from .em_postprocess import (
    agglomerate,
    boundary_map,
    segment_affinities,
    watershed_fragments,
    waterz_available,
)
from .em_segmentation import (
    AFFINITIES_KEY,
    SegmentFileResult,
    evaluate_files,
    predict_affinities,
    segment_file,
)
from .model_file import MODEL_FILE, read_model_file, save_model_file
from .video import evaluate_video, finetune_video, prepare_video_finetune, run_video_finetune
from .video_data import VideoClipDataset, VideoRecord, load_video_list, sample_frame_indices

__all__ = [
    "AFFINITIES_KEY",
    "CHECKPOINT_FORMAT",
    "MODEL_FILE",
    "SEGMENTER_FILE",
    "AffinityLoss",
    "AffinityModel",
    "CaptionDataset",
    "CaptionRecord",
    "CaptionScores",
    "ClassificationReport",
    "ClassifierWithLoss",
    "SegmentFileResult",
    "SegmentationScores",
    "SegmenterConfig",
    "VideoClipDataset",
    "VideoRecord",
    "Vocabulary",
    "adapted_rand_error",
    "affinity_forward",
    "affinity_targets",
    "agglomerate",
    "boundary_map",
    "caption_scores",
    "classification_report",
    "confusion_matrix",
    "contingency_table",
    "evaluate_captioner",
    "evaluate_files",
    "evaluate_segmentation",
    "evaluate_video",
    "finetune_captioner",
    "finetune_segmenter",
    "finetune_video",
    "load_coco_captions",
    "load_segmenter",
    "load_video_captions",
    "load_video_list",
    "predict_affinities",
    "prepare_finetune",
    "prepare_video_finetune",
    "read_model_file",
    "read_segmenter_config",
    "run_finetune",
    "run_video_finetune",
    "sample_frame_indices",
    "save_model_file",
    "save_segmentation_figure",
    "save_segmenter",
    "segment_affinities",
    "segment_file",
    "tokenize",
    "variation_of_information",
    "watershed_fragments",
    "waterz_available",
]
