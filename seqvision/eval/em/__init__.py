"""EM neuron segmentation (docs/EM.md).

* ``affinity``: affinity targets from neuron ids, the class-balanced loss, ``AffinityModel``.
* ``checkpoint``: segmenter files that name their architecture (``SegmenterConfig``).
* ``finetune``: fine-tuning the segmenter on the shared loop (``seqvision finetune-seg``).
* ``infer``: sliding-window affinities with Gaussian blending, ``segment`` and ``evaluate`` on files
  (``seqvision segment`` / ``seqvision eval-seg``).
* ``postprocess``: watershed fragments and agglomeration (waterz, or a NumPy fallback).
* ``metrics``: variation of information (split / merge) and adapted Rand error.
* ``figure``: raw, affinities, segmentation and ground truth in one picture.
* ``probe``: a linear probe of boundary voxels on an encoder's frozen features.
* ``demo``: the label-efficiency experiment, TokenUnify-initialised against scratch over labelled
  budgets and seeds, and the probe, on synthetic volumes (``seqvision demo``).
"""

from .affinity import AffinityLoss, AffinityModel, affinity_forward, affinity_targets
from .checkpoint import (
    CHECKPOINT_FORMAT,
    SegmenterConfig,
    load_segmenter,
    read_segmenter_config,
    save_segmenter,
)
from .figure import save_segmentation_figure
from .finetune import SEGMENTER_FILE, SegmentationJob, finetune, load_config, prepare, run
from .infer import AFFINITIES_KEY, SegmentResult, evaluate, predict_affinities, segment, write_evaluation
from .metrics import (
    SegmentationScores,
    adapted_rand_error,
    contingency_table,
    evaluate_segmentation,
    variation_of_information,
)
from .postprocess import agglomerate, boundary_map, segment_affinities, watershed_fragments, waterz_available

__all__ = [
    "AFFINITIES_KEY",
    "CHECKPOINT_FORMAT",
    "SEGMENTER_FILE",
    "AffinityLoss",
    "AffinityModel",
    "SegmentResult",
    "SegmentationJob",
    "SegmentationScores",
    "SegmenterConfig",
    "adapted_rand_error",
    "affinity_forward",
    "affinity_targets",
    "agglomerate",
    "boundary_map",
    "contingency_table",
    "evaluate",
    "evaluate_segmentation",
    "finetune",
    "load_config",
    "load_segmenter",
    "predict_affinities",
    "prepare",
    "read_segmenter_config",
    "run",
    "save_segmentation_figure",
    "save_segmenter",
    "segment",
    "segment_affinities",
    "variation_of_information",
    "watershed_fragments",
    "waterz_available",
    "write_evaluation",
]
