"""One safetensors file per fine-tuned model: the weights plus what it takes to use them again.

A fine-tuning run ends by writing ``<output_dir>/model.safetensors``: the model's full state dict
and, in the header metadata, the pipeline (``task``), the config it was trained with (model and
data sections: architecture, input size, frames) and task extras such as the class names or the
vocabulary. The evaluation commands rebuild the model from the file alone, so a model is always
evaluated with the classes (or words) and the preprocessing it was trained with.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from seqvision.utils.io import atomic_path

__all__ = [
    "EVAL_DIR",
    "MODEL_FILE",
    "ModelFile",
    "evaluation_folder",
    "export_at_train_end",
    "read_model_file",
    "save_model_file",
]

_logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EVAL_DIR = "eval"
"""Where a run's evaluation files go, beside its model file."""
_FORMAT = "seqvision-model/1"


class ModelFile:
    """What ``read_model_file`` returns: ``task``, ``config``, ``extra`` (dicts) and ``state`` (tensors)."""

    def __init__(
        self, task: str, config: dict[str, Any], extra: dict[str, Any], state: dict[str, torch.Tensor]
    ):
        self.task, self.config, self.extra, self.state = task, config, extra, state


def save_model_file(
    weights: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    task: str,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights and their metadata as one safetensors file, atomically.

    Args:
        weights: a module or its state dict (e.g. gathered from FSDP shards).
        path: the ``.safetensors`` file.
        task: the pipeline, e.g. ``"video"``; ``read_model_file`` checks it.
        config: JSON-serialisable sections needed to rebuild the model and its preprocessing.
        extra: JSON-serialisable task data (class names, a vocabulary).
    """
    from safetensors.torch import save_file

    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    # Cloned: tied weights share storage, which safetensors refuses to write twice.
    tensors = {name: value.detach().to("cpu").clone().contiguous() for name, value in state.items()}
    metadata = {
        "format": _FORMAT,
        "task": task,
        "config": json.dumps(config, default=str),
        "extra": json.dumps(dict(extra or {}), default=str),
    }
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return Path(path)


def export_at_train_end(
    path: str | os.PathLike,
    *,
    task: str,
    submodule: str,
    config: Mapping[str, Any],
    extra: Callable[[], Mapping[str, Any]],
) -> Callable[[Any, nn.Module, Any], None]:
    """The training loop's ``on_train_end`` that saves ``<prepared model>.<submodule>`` to ``path``.

    The loop trains a wrapper (a model plus its loss); the file gets the wrapped model's weights.
    Under FSDP the full state dict is gathered by a collective (every process calls the hook), and
    the main process writes it; ``extra()`` is evaluated there (e.g. the class names, the vocabulary).
    """
    from accelerate.utils import DistributedType

    def on_train_end(accelerator: Any, model: nn.Module, state: Any) -> None:
        if accelerator.distributed_type == DistributedType.FSDP:
            full = accelerator.get_state_dict(model) or {}
            weights = {k.removeprefix(f"{submodule}."): v for k, v in full.items()}
        else:
            weights = getattr(accelerator.unwrap_model(model), submodule).state_dict()
        if accelerator.is_main_process:
            save_model_file(weights, path, task=task, config=config, extra={**extra(), "steps": state.step})
            _logger.info("wrote the fine-tuned model (step %d) to %s", state.step, path)
        accelerator.wait_for_everyone()

    return on_train_end


def evaluation_folder(checkpoint: str | os.PathLike, output_dir: str | os.PathLike | None) -> Path:
    """``output_dir``, or ``eval/`` beside the model file (in its run folder)."""
    if output_dir is not None:
        return Path(output_dir)
    checkpoint = Path(checkpoint)
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / EVAL_DIR


def read_model_file(path: str | os.PathLike, task: str) -> ModelFile:
    """Read a file ``save_model_file`` wrote for ``task``; clear errors for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path}: no such file (a run folder or its {MODEL_FILE})")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            state = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint: {path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"checkpoint: {path} is not a seqvision fine-tuned model (metadata format "
            f"{metadata.get('format')!r}, expected {_FORMAT!r})"
        )
    if metadata.get("task") != task:
        raise ValueError(f"checkpoint: {path} holds a {metadata.get('task')!r} model, not a {task!r} one")
    return ModelFile(task, json.loads(metadata["config"]), json.loads(metadata["extra"]), state)
