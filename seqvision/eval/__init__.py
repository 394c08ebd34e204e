"""Evaluation pipelines. For now: EM neuron segmentation.

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

See docs/EM.md for running it on CREMI-format data.
"""

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

__all__ = [
    "AFFINITIES_KEY",
    "CHECKPOINT_FORMAT",
    "SEGMENTER_FILE",
    "AffinityLoss",
    "AffinityModel",
    "SegmentFileResult",
    "SegmentationScores",
    "SegmenterConfig",
    "adapted_rand_error",
    "affinity_forward",
    "affinity_targets",
    "agglomerate",
    "boundary_map",
    "contingency_table",
    "evaluate_files",
    "evaluate_segmentation",
    "finetune_segmenter",
    "load_segmenter",
    "predict_affinities",
    "prepare_finetune",
    "read_segmenter_config",
    "run_finetune",
    "save_segmentation_figure",
    "save_segmenter",
    "segment_affinities",
    "segment_file",
    "variation_of_information",
    "watershed_fragments",
    "waterz_available",
]
