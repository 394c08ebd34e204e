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
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from seqvision.pretrain.config import CONFIG_FILE, write_config
from seqvision.pretrain.loop import LoopConfig, TrainResult, resolve_mixed_precision, train
from seqvision.utils.checks import is_main_process

from .model_file import ModelFile

__all__ = [
    "FinetuneJob",
    "evaluate_on_every_process",
    "evaluation_config",
    "evaluation_loader",
    "run_folder",
    "train_job",
]

Result = TypeVar("Result")


class FinetuneJob(Protocol):
    """What ``train_job`` reads of a pipeline's prepared job."""

    config: dict[str, Any]
    model: nn.Module
    train_set: Dataset
    val_set: Dataset | None
    loop: LoopConfig

    @property
    def output_dir(self) -> Path: ...


def run_folder(job: FinetuneJob) -> Path:
    """Create the job's output folder and write its config there (from the first process); return it."""
    output = job.output_dir
    output.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_config(output / CONFIG_FILE, job.config)
    return output


def train_job(
    job: FinetuneJob,
    resume: str | os.PathLike | None,
    *,
    forward: Callable[..., Any],
    evaluate: Callable[..., dict[str, float]],
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
