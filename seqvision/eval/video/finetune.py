"""Video recognition fine-tuning and evaluation: a YAML config -> a clip classifier -> the shared loop.

``finetune(config)`` reads a config with four sections,

``model``   ``name``: any timm or seqvision model that maps clips to logits (``lrcn_resnet18``,
            ``lrcn_vir_small``, ``lightnet_small_video_patch16_224``, ...), ``kwargs`` passed to
            ``timm.create_model`` (for LRCN: ``lstm_hidden``, ``freeze_encoder``,
            ``pretrained_encoder``, ``encoder_chunk``, ``encoder_kwargs``, ...), ``pretrained``
            (timm's weights of the whole model), ``encoder_lr_scale`` (the LR multiplier of the
            parameters under ``encoder.``: fine-tune a pretrained frame encoder slower than the
            LSTM), ``clip_layout`` ('auto': channels first for 3-D patch embeddings, LightNet's
            video variant; time first otherwise) and ``label_smoothing``;
``data``    ``train`` and ``val``: where the videos are (``load_video_list`` arguments: a folder per
            class, a ``path,label`` CSV/TSV, a Kinetics annotation CSV, a UCF101 split file),
            the clip (``num_frames``, ``sampling``: 'uniform' TSN segments, 'dense' consecutive
            frames with ``stride``, 'random'), the crop ``size`` and eval ``resize``, ``mean``/``std``
            (default: the model's pretrained cfg) and ``max_unreadable_fraction``;
``eval``    ``num_clips`` x ``num_crops`` views per video whose predictions are averaged
            (``average``: 'prob' averages softmax probabilities, 'score' the logits),
            ``batch_size`` (videos), ``num_workers``;
``train``   ``LoopConfig`` fields (``eval_every`` evaluates on ``data.val`` during training),

trains a ``ClassifierWithLoss`` around the model with ``seqvision.engine.train`` (the loop
of pretraining and segmentation: checkpoints, ``resume='latest'``, mixed precision, progress,
TensorBoard), evaluates with every view of every validation video (``gather_outputs``: each video
counted exactly once over any number of processes), and writes into ``output_dir``:
``model.safetensors`` (weights, config and class names: ``seqvision eval-video`` needs nothing else),
``config.yaml``, and under ``eval/`` ``metrics.json``, ``predictions.csv`` and ``confusion.png``.

Unreadable videos (corrupt, empty, zero frames) are skipped by the datasets with a warning; the
training count is printed at the end of every epoch, summed over processes, and evaluation reports
the videos it could not score.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator, PartialState
from accelerate.utils import reduce, set_seed
from torch.utils.data import DataLoader

from seqvision.data.video import VideoClipDataset, load_video_list
from seqvision.engine import LoopConfig, LoopState, TrainingJob, TrainResult, compose_finetune, gather_outputs
from seqvision.engine.config import UNSET, Schema, load_sections
from seqvision.engine.job import (
    evaluate_on_every_process,
    evaluation_config,
    evaluation_loader,
    run_folder,
    train_job,
)
from seqvision.engine.model_file import (
    EVAL_DIR,
    MODEL_FILE,
    evaluation_folder,
    export_at_train_end,
    read_model_file,
)
from seqvision.eval.classification.classifier import ClassifierWithLoss, classifier_forward
from seqvision.eval.classification.metrics import (
    ClassificationReport,
    classification_report,
    write_report_files,
)

_logger = logging.getLogger(__name__)

TASK = "video"
_SCHEMA: Schema = {
    "model": dict.fromkeys(
        ("name", "kwargs", "pretrained", "encoder_lr_scale", "clip_layout", "label_smoothing"), UNSET
    ),
    "data": {
        "train": UNSET,
        "val": UNSET,
        "num_frames": 16,
        "sampling": "uniform",
        "stride": 1,
        "size": 224,
        "resize": None,
        "mean": None,
        "std": None,
        "max_unreadable_fraction": 0.1,
        "hflip": True,
        "crop_scale": [0.08, 1.0],
        "crop_ratio": [3 / 4, 4 / 3],
    },
    "eval": {
        "num_clips": 1,
        "num_crops": 1,
        "sampling": None,
        "average": "prob",
        "batch_size": 2,
        "num_workers": 0,
    },
    "train": None,
}


def load_config(
    config: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a video config (YAML file or mapping), apply ``"section.key=value"`` overrides, fill defaults.

    An unknown section or option is a ValueError listing the known ones.
    """
    values = load_sections(config, overrides, schema=_SCHEMA)
    if not values["model"].get("name"):
        raise ValueError("config: model.name is required (e.g. lrcn_resnet18)")
    if values["eval"]["average"] not in ("prob", "score"):
        raise ValueError(f"eval.average must be 'prob' or 'score', got {values['eval']['average']!r}")
    return values


# ---------------------------------------------------------------------------------------------- model


def build_model(
    model: Mapping[str, Any], num_classes: int, *, pretrained: bool | None = None
) -> ClassifierWithLoss:
    """The clip classifier a config's ``model`` section describes, wrapped with its loss.

    ``pretrained`` overrides ``model.pretrained`` (evaluation rebuilds without downloading:
    the weights come from the fine-tuned file).
    """
    kwargs = dict(model.get("kwargs") or {})
    use_pretrained = bool(model.get("pretrained", False)) if pretrained is None else pretrained
    if pretrained is False and kwargs.get("pretrained_encoder"):
        kwargs["pretrained_encoder"] = False  # the weights come from the fine-tuned file: no download
    try:
        network = timm.create_model(
            model["name"], pretrained=use_pretrained, num_classes=num_classes, **kwargs
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model.name: {err}") from err
        raise
    layout = model.get("clip_layout", "auto")
    if layout == "auto":
        # LightNet's video variant embeds 3-D tubelets from (B, C, T, H, W); LRCN folds time itself.
        layout = "BCTHW" if getattr(network, "video", False) else "BTCHW"
    return ClassifierWithLoss(
        network, clip_layout=layout, label_smoothing=float(model.get("label_smoothing", 0.0))
    )


def _normalisation(
    data: Mapping[str, Any], network: nn.Module
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``data.mean``/``data.std``, or the model's pretrained cfg (ImageNet's for most backbones)."""
    cfg = getattr(network, "pretrained_cfg", None) or {}
    mean = data.get("mean") or cfg.get("mean") or timm.data.IMAGENET_DEFAULT_MEAN
    std = data.get("std") or cfg.get("std") or timm.data.IMAGENET_DEFAULT_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ----------------------------------------------------------------------------------------------- data


def _source(spec: Any, name: str) -> dict[str, Any]:
    """``data.train`` / ``data.val``: a path (folder, list file) or ``load_video_list`` arguments."""
    if isinstance(spec, str | os.PathLike):
        return {"source": str(spec)}
    if isinstance(spec, Mapping) and (spec.get("source") or spec.get("split_file")):
        unknown = sorted(set(spec) - {"source", "root", "split_file"})
        if unknown:
            raise ValueError(f"data.{name}: unknown key(s) {unknown}; known: source, root, split_file")
        return dict(spec)
    raise ValueError(
        f"data.{name} must be a path (a folder per class, a CSV/TSV list, a Kinetics CSV) or a mapping "
        f"with 'source' (and optionally 'root') or, for UCF101, 'split_file' and 'root', got {spec!r}"
    )


def build_video_dataset(
    data: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None,
    split: str,
    *,
    classes: Sequence[str] | None,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
) -> VideoClipDataset:
    """The training clips (``evaluation`` None) or the evaluation views of ``data[split]``.

    ``classes``: the class list that fixes label ids (the training set's for evaluation).
    """
    records, found = load_video_list(**_source(data.get(split), split), classes=classes)
    common = dict(
        num_frames=data["num_frames"],
        stride=data["stride"],
        size=data["size"],
        mean=tuple(mean),
        std=tuple(std),
        seed=seed,
        max_unreadable_fraction=data["max_unreadable_fraction"],
    )
    if data.get("resize"):
        common["resize"] = data["resize"]
    if evaluation is None:
        dataset = VideoClipDataset(
            records,
            sampling=data["sampling"],
            train=True,
            hflip=data["hflip"],
            crop_scale=tuple(data["crop_scale"]),
            crop_ratio=tuple(data["crop_ratio"]),
            **common,
        )
    else:
        dataset = VideoClipDataset(
            records,
            sampling=evaluation.get("sampling") or data["sampling"],
            train=False,
            num_clips=evaluation["num_clips"],
            num_crops=evaluation["num_crops"],
            **common,
        )
    dataset.classes = list(found)
    return dataset


# ----------------------------------------------------------------------------------------- evaluation


@dataclass
class VideoEvaluation:
    """The gathered predictions of one evaluation and their report."""

    report: ClassificationReport
    probs: torch.Tensor  # (N, K) averaged over the views of each video
    labels: torch.Tensor  # (N,)
    valid: torch.Tensor  # (N,) bool: False for a video that could not be read
    names: list[str] = field(default_factory=list)  # the video paths, in dataset order


def predict_views(
    model: nn.Module, batch: Mapping[str, torch.Tensor], average: str = "prob"
) -> dict[str, torch.Tensor]:
    """Class probabilities of each video from all its views.

    ``batch["video"]`` is (B, V, T, C, H, W): V = clips x crops views, flattened into the batch for one
    forward; the (B, V, K) logits are averaged over V as softmax probabilities ('prob') or as logits
    ('score', then one softmax). Returns ``probs`` (B, K) float32 and ``label``, ``index``, ``valid`` (B,).
    """
    video = batch["video"]
    B, V = video.shape[:2]
    logits = model(video.flatten(0, 1))["logits"].float().reshape(B, V, -1)
    probs = logits.softmax(-1).mean(1) if average == "prob" else logits.mean(1).softmax(-1)
    return {"probs": probs, "label": batch["label"], "index": batch["index"], "valid": batch["valid"]}


def run_evaluation(
    accelerator: Accelerator, model: nn.Module, loader: DataLoader, dataset: VideoClipDataset, average: str
) -> VideoEvaluation:
    """Predict every video of a prepared loader (each counted once over all processes) and score them."""
    gathered = gather_outputs(
        accelerator, model, loader, lambda m, batch: predict_views(m, batch, average), desc="eval videos"
    )
    order = gathered["index"].argsort()  # dataset order, whatever the processes' interleaving
    probs, labels, valid = gathered["probs"][order], gathered["label"][order], gathered["valid"][order].bool()
    indices = gathered["index"][order].tolist()
    if indices != list(range(len(dataset))):
        raise RuntimeError(f"evaluation gathered {len(indices)} videos, expected each of {len(dataset)} once")
    report = classification_report(probs, labels, valid=valid)
    names = [str(dataset.records[i].path) for i in indices]
    return VideoEvaluation(report, probs, labels, valid, names)


def write_evaluation(
    folder: str | os.PathLike, evaluation: VideoEvaluation, classes: Sequence[str]
) -> dict[str, Path]:
    """``metrics.json``, ``predictions.csv`` and ``confusion.png`` in ``folder``, each atomically."""
    report = evaluation.report
    title = (
        f"top-1 {report.top1:.3f}, mean class accuracy {report.mean_class_accuracy:.3f} "
        f"({report.samples} videos)"
    )
    return write_report_files(
        folder, report, evaluation.names, evaluation.labels, evaluation.probs, classes,
        valid=evaluation.valid, title=title,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- train


@dataclass(kw_only=True)
class VideoJob(TrainingJob):
    """A fine-tuning run, built and checked but not started (``prepare``)."""

    model: ClassifierWithLoss
    train_set: VideoClipDataset
    val_set: VideoClipDataset | None = None
    classes: list[str]


def prepare(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> VideoJob:
    """Read the config, list the videos, build the model and the datasets; no training yet.

    Every mistake in the config or the data lists (unknown options, missing folders, unknown class
    names in the validation list, an unknown model) is raised here. Call on every process.
    """
    values = load_config(config, overrides)
    if output_dir is not None:
        values["train"]["output_dir"] = str(output_dir)
    model_section, data = values["model"], values["data"]
    scale = model_section.get("encoder_lr_scale")
    if scale is not None and float(scale) != 1.0:
        values["train"]["lr_scales"] = {**(values["train"].get("lr_scales") or {}), "encoder.": float(scale)}
    loop = LoopConfig.from_dict(values["train"])
    records, classes = load_video_list(**_source(data.get("train"), "train"))
    del records  # listed again by build_video_dataset; here only the classes matter
    set_seed(loop.seed)  # the same initial head on every process and for every run of this config
    model = build_model(model_section, len(classes))
    mean, std = _normalisation(data, model.model)
    train_set = build_video_dataset(data, None, "train", classes=classes, mean=mean, std=std, seed=loop.seed)
    val_set = None
    if data.get("val"):
        val_set = build_video_dataset(
            data, values["eval"], "val", classes=classes, mean=mean, std=std, seed=loop.seed
        )
    values["data"] = {**data, "mean": list(mean), "std": list(std)}
    resolved = {**values, "train": loop.to_dict()}
    return VideoJob(
        config=resolved, model=model, train_set=train_set, val_set=val_set, classes=list(classes), loop=loop
    )


class _UnreadableCounter:
    """Counts the unreadable training videos the batches report and prints the count per epoch.

    Each process counts what its own batches skipped; at an epoch boundary (the same step on every
    process, so the sum over processes is a safe collective) the total is logged as a warning.
    """

    def __init__(self, samples_per_epoch: int, steps: int):
        self.samples_per_epoch, self.steps = samples_per_epoch, steps
        self.epoch = 0
        self.epoch_count = 0.0
        self.total = 0

    def add(self, batch: Mapping[str, Any]) -> None:
        if "unreadable" in batch:
            self.epoch_count += float(batch["unreadable"].sum())

    def on_step_end(self, state: LoopState, logged: Mapping[str, float]) -> None:
        epoch = state.samples_seen // self.samples_per_epoch  # samples_seen counts every process
        if epoch == self.epoch and state.step < self.steps:
            return
        count = self.epoch_count
        if PartialState().num_processes > 1:
            count = reduce(torch.tensor(count, device=PartialState().device), "sum").item()
        self.total += int(count)
        if count:
            _logger.warning(
                "epoch %d: %d unreadable video(s) skipped (%d in all); the warnings above name them",
                self.epoch + 1,
                int(count),
                self.total,
            )
        self.epoch, self.epoch_count = epoch, 0.0


def run(
    job: VideoJob,
    resume: str | os.PathLike | None = None,
    *,
    on_step_end: Callable[[LoopState, dict[str, float]], None] | None = None,
) -> tuple[Path, TrainResult]:
    """Train a prepared job with the shared loop, evaluate it and save the model; call on every process.

    Returns:
        ``(<output_dir>/model.safetensors, TrainResult)``; ``TrainResult.evaluations`` holds the
        validation metrics (top1, top5, mean_class_accuracy, samples, skipped) of every evaluation.
    """
    output = run_folder(job.output_dir, job.config)
    network = job.model.model
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    _logger.info(
        "%s: %.2f M parameters (%.2f M trainable), %d classes, %d training videos%s",
        job.config["model"]["name"],
        sum(p.numel() for p in network.parameters()) / 1e6,
        trainable / 1e6,
        len(job.classes),
        len(job.train_set),
        f", {len(job.val_set)} validation videos" if job.val_set is not None else "",
    )
    counter = _UnreadableCounter(len(job.train_set), job.loop.steps)
    evaluation = job.config["eval"]
    prepared_loader: dict[str, DataLoader] = {}

    def forward(model: nn.Module, batch: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
        counter.add(batch)
        return classifier_forward(model, batch, step, input_key="video")

    def evaluate(accelerator: Accelerator, model: nn.Module, state: LoopState) -> dict[str, float]:
        if "val" not in prepared_loader:
            prepared_loader["val"] = accelerator.prepare(evaluation_loader(job.val_set, evaluation))
        result = run_evaluation(
            accelerator, model, prepared_loader["val"], job.val_set, evaluation["average"]
        )
        if state.step == job.loop.steps and accelerator.is_main_process:
            files = write_evaluation(output / EVAL_DIR, result, job.classes)
            _logger.info("wrote %s", ", ".join(str(p) for p in files.values()))
        return result.report.metrics()

    def step_end(state: LoopState, logged: dict[str, float]) -> None:
        counter.on_step_end(state, logged)
        if on_step_end is not None:
            on_step_end(state, logged)

    path = output / MODEL_FILE

    on_train_end = export_at_train_end(
        path,
        task=TASK,
        submodule="model",
        config={k: job.config[k] for k in ("model", "data", "eval")},
        extra=lambda: {"classes": job.classes},
    )

    result = train_job(
        job,
        resume,
        forward=forward,
        on_step_end=step_end,
        on_train_end=on_train_end,
        evaluate=evaluate,
    )
    return path, result


finetune = compose_finetune(prepare, run, "Fine-tune a clip classifier as ``config`` says")


def evaluate(
    checkpoint: str | os.PathLike,
    *,
    data: str | os.PathLike | Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    mixed_precision: str = "auto",
) -> tuple[VideoEvaluation, list[str], dict[str, Path]]:
    """Evaluate a fine-tuned model file on its validation list (or ``data``); call on every process.

    Args:
        checkpoint: ``model.safetensors`` written by ``finetune`` or its run folder.
        data: the videos to evaluate (a path or a ``load_video_list`` mapping); default the
            ``data.val`` the model was trained with.
        output_dir: where ``metrics.json``, ``predictions.csv`` and ``confusion.png`` go (default
            ``<run folder>/eval``).
        overrides: ``"eval.num_clips=10"``-style changes of the ``eval`` (and ``data``) sections.

    Returns:
        ``(evaluation, classes, files)``; ``files`` is empty on processes other than the main one.
    """
    saved = read_model_file(checkpoint, TASK)
    classes = list(saved.extra["classes"])
    values = evaluation_config(
        saved,
        load_config,
        overrides,
        data,
        no_data="no videos to evaluate: give data (the videos) or train with data.val set",
    )
    model = build_model(values["model"], len(classes), pretrained=False)
    model.model.load_state_dict(saved.state, strict=True)
    model.eval()
    dataset = build_video_dataset(
        values["data"],
        values["eval"],
        "val",
        classes=classes,
        mean=values["data"]["mean"],
        std=values["data"]["std"],
        seed=0,
    )
    average = values["eval"]["average"]
    result, files = evaluate_on_every_process(
        model,
        evaluation_loader(dataset, values["eval"]),
        mixed_precision=mixed_precision,
        run=lambda accelerator, model, loader: run_evaluation(accelerator, model, loader, dataset, average),
        write=lambda folder, result: write_evaluation(folder, result, classes),
        folder=evaluation_folder(checkpoint, output_dir),
    )
    return result, classes, files
