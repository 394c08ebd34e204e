"""What every training job shares, and nothing that knows a model or a task.

* :mod:`~seqvision.engine.loop` - ``train``: the Accelerate loop (micro-batches, all-reduced losses,
  NaN policy, clipping, logging, evaluation every ``eval_every`` steps), ``gather_outputs``.
* :mod:`~seqvision.engine.checkpoint` - ``CheckpointManager``: atomic, resumable checkpoints;
  ``LoopState``.
* :mod:`~seqvision.engine.optim` - AdamW without weight decay on biases, norms and listed names;
  warmup + half-cycle cosine.
* :mod:`~seqvision.engine.config` - YAML sections, ``--set`` overrides, ``LoopConfig`` (the ``train``
  section).
* :mod:`~seqvision.engine.job` - ``TrainingJob`` (what a task prepares and trains), the run folder,
  evaluation on every process.
* :mod:`~seqvision.engine.model_file` - a fine-tuned model's weights, config and task extras in one
  file.
"""

from .checkpoint import CHECKPOINT_MARKER, CheckpointManager, LoopState
from .config import CONFIG_FILE, LoopConfig, apply_overrides, load_sections, write_config
from .job import (
    TrainingJob,
    compose_finetune,
    evaluate_on_every_process,
    evaluation_config,
    evaluation_loader,
    run_folder,
    train_job,
)
from .loop import (
    NonFiniteLossError,
    TrainResult,
    forward_batch,
    gather_outputs,
    resolve_mixed_precision,
    train,
)
from .model_file import (
    EVAL_DIR,
    MODEL_FILE,
    ModelFile,
    evaluation_folder,
    export_at_train_end,
    read_model_file,
    save_model_file,
)
from .optim import build_optimizer, build_scheduler, lr_factor, lr_scale_of

__all__ = [
    "CHECKPOINT_MARKER",
    "CONFIG_FILE",
    "EVAL_DIR",
    "MODEL_FILE",
    "CheckpointManager",
    "LoopConfig",
    "LoopState",
    "ModelFile",
    "NonFiniteLossError",
    "TrainResult",
    "TrainingJob",
    "apply_overrides",
    "build_optimizer",
    "build_scheduler",
    "compose_finetune",
    "evaluate_on_every_process",
    "evaluation_config",
    "evaluation_folder",
    "evaluation_loader",
    "export_at_train_end",
    "forward_batch",
    "gather_outputs",
    "load_sections",
    "lr_factor",
    "lr_scale_of",
    "read_model_file",
    "resolve_mixed_precision",
    "run_folder",
    "save_model_file",
    "train",
    "train_job",
    "write_config",
]
