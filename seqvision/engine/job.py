"""What the fine-tuning pipelines (classification, video, captioning) share around the training loop.

A pipeline prepares a *job* (its model wrapped with the loss, datasets, ``LoopConfig`` and config
sections) and trains it with ``train_job``; its evaluation command rebuilds the model from the
model file, reads the run's config back with ``evaluation_config`` and runs the pipeline's own
evaluation through ``evaluate_on_every_process``. The pipeline-specific parts (datasets, forward,
metrics, output files) stay in each pipeline's module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from seqvision.utils.checks import is_main_process

from .config import CONFIG_FILE, LoopConfig, write_config
from .loop import TrainResult, resolve_mixed_precision, train
from .model_file import ModelFile

__all__ = [
    "TrainingJob",
    "compose_finetune",
    "evaluate_on_every_process",
    "evaluation_config",
    "evaluation_loader",
    "run_folder",
    "train_job",
]

Result = TypeVar("Result")


@dataclass(kw_only=True)
class TrainingJob:
    """A training run built and checked but not started: what a task's ``prepare`` returns and its
    ``run`` trains with ``train_job``. A task subclasses it with what else its run needs (classes,
    a vocabulary, an EMA) and narrows the types."""

    config: dict[str, Any]  # the config as run: overrides applied, every default filled in
    model: nn.Module  # returns {"loss": ...} from its forward
    train_set: Dataset
    loop: LoopConfig
    val_set: Dataset | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.loop.output_dir)


def compose_finetune(
    prepare: Callable[..., TrainingJob], run: Callable[..., Any], description: str, name: str = "finetune"
) -> Callable[..., Any]:
    """A task's ``finetune(config, resume=None, *, output_dir=None, overrides=(), on_step_end=None)``
    (or under another ``name``): ``prepare`` then ``run``, documented by ``description``."""

    def finetune(
        config: str | os.PathLike | Mapping[str, Any],
        resume: str | os.PathLike | None = None,
        *,
        output_dir: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
        on_step_end: Callable[..., None] | None = None,
    ) -> Any:
        job = prepare(config, output_dir=output_dir, overrides=overrides)
        return run(job, resume, on_step_end=on_step_end)

    finetune.__module__ = prepare.__module__
    finetune.__name__ = finetune.__qualname__ = name
    finetune.__doc__ = (
        f"{description}; call on every process of a launch. ``prepare(config, output_dir=,"
        " overrides=)`` then ``run(job, resume, on_step_end=)``; see those for the arguments."
    )
    return finetune


def run_folder(output_dir: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Create a run's output folder and record its config there as ``config.yaml`` (from the first
    process); return the folder. Every training job (pretraining, every fine-tuning pipeline) starts so."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_config(output / CONFIG_FILE, config)
    return output


def train_job(
    job: TrainingJob,
    resume: str | os.PathLike | None,
    *,
    forward: Callable[..., Any] | None = None,
    evaluate: Callable[..., dict[str, float]] | None = None,
    **loop_options: Any,
) -> TrainResult:
    """``train`` a prepared job on the shared loop, on every process.

    ``evaluate`` runs only where the job has a validation set; the config's model and data
    sections become the run's hyper-parameters (TensorBoard). ``loop_options`` go to ``train``
    unchanged (``on_step_end``, ``on_train_end``, ``checkpoint_objects``, ...).
    """
    return train(
        job.model,
        job.train_set,
        job.loop,
        resume=resume,
        forward=forward,
        evaluate=evaluate if job.val_set is not None else None,
        hparams={"model": job.config["model"], "data": job.config["data"]},
        **loop_options,
    )


def evaluation_config(
    saved: ModelFile,
    load_config: Callable[[Mapping[str, Any], Sequence[str]], dict[str, Any]],
    overrides: Sequence[str],
    data: str | os.PathLike | Mapping[str, Any] | None,
    *,
    no_data: str,
) -> dict[str, Any]:
    """The config a model file was trained with, checked again by the pipeline's ``load_config``.

    ``overrides`` (``"eval.batch_size=8"``) apply on top; ``data``, when given, replaces the
    validation data. Raises ``ValueError(no_data)`` when there is then nothing to evaluate.
    """
    values = load_config({**saved.config, "train": {}}, overrides)
    if data is not None:
        values["data"]["val"] = data if isinstance(data, Mapping) else str(data)
    if not values["data"].get("val"):
        raise ValueError(no_data)
    return values


def evaluation_loader(dataset: Dataset, evaluation: Mapping[str, Any]) -> DataLoader:
    """The evaluation DataLoader of an ``eval`` config section: in order, ``batch_size`` and
    ``num_workers`` as configured (``gather_outputs`` then counts every sample once)."""
    return DataLoader(dataset, batch_size=evaluation["batch_size"], num_workers=evaluation["num_workers"])


def evaluate_on_every_process(
    model: nn.Module,
    loader: DataLoader,
    *,
    mixed_precision: str,
    run: Callable[[Accelerator, nn.Module, DataLoader], Result],
    write: Callable[[Path, Result], dict[str, Path]],
    folder: Path,
) -> tuple[Result, dict[str, Path]]:
    """Evaluate on every process, write the files on the main one.

    ``model`` and ``loader`` are prepared by a new ``Accelerator`` (data split over the
    processes); ``run(accelerator, model, loader)`` computes the result under ``torch.no_grad``
    on every process (it gathers what it needs); ``write(folder, result)`` runs on the main
    process only. Returns ``(result, files)``; ``files`` is empty on the other processes.
    """
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision))
    prepared_model, prepared_loader = accelerator.prepare(model, loader)
    with torch.no_grad():
        result = run(accelerator, prepared_model, prepared_loader)
    files: dict[str, Path] = {}
    if accelerator.is_main_process:
        files = write(folder, result)
    accelerator.wait_for_everyone()
    return result, files
