"""Image classification fine-tuning and evaluation: a YAML config -> any timm or seqvision model -> the loop.

``finetune(config)`` reads a config with four sections,

``model``   ``name`` (any registered model: ``vir_small_patch16_224``, ``lightnet_tiny_patch16_224``,
            ``vim_tiny_patch16_224``, ``resnet50``, ...), ``kwargs`` for ``timm.create_model``
            (``img_size``, ``drop_path_rate``, ...), ``pretrained`` (timm's weights, or
            ``pretrained_cfg_overlay: {file: ...}`` in ``kwargs`` for a local file),
            ``layer_decay`` (layer-wise LR decay: the model's ``group_matcher`` numbers its layers
            from the stem to the head, and layer i of n learns at ``lr * layer_decay ** (n - 1 - i)``),
            ``ema_decay`` (timm's ``ModelEmaV3`` of the weights, with its warm-up, evaluated and saved
            alongside), ``label_smoothing``;
``data``    ``train`` and ``val``: a folder per class (ImageFolder layout) or a ``path,label``
            CSV/TSV list (``{source: list.csv, root: images/}``); the transforms come from timm's
            data pipeline (``resolve_data_config`` from the model's pretrained cfg, overridden by
            ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``; then
            ``create_transform`` with ``scale``, ``ratio``, ``hflip``, ``color_jitter``,
            ``auto_augment``, ``re_prob``); ``mixup``, ``cutmix``, ``mixup_prob``,
            ``mixup_switch_prob`` (timm's ``Mixup``; off at 0); ``max_unreadable_fraction``;
``eval``    ``batch_size``, ``num_workers``;
``train``   ``LoopConfig`` fields (``eval_every`` evaluates during training),

trains a ``ClassifierWithLoss`` on the shared loop (checkpoints and resume — the EMA included —,
mixed precision, progress, TensorBoard), evaluates on ``data.val`` with ``gather_outputs`` (each
image counted once over any number of processes) and writes ``model.safetensors`` (and
``model_ema.safetensors``), ``config.yaml`` and ``eval/`` (``metrics.json``, ``predictions.csv``,
``confusion.png``), like video recognition, whose reporting it shares.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image, UnidentifiedImageError
from timm.data import Mixup, create_transform, resolve_data_config
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset

from seqvision.data.video import UnreadableDatasetError, VideoRecord, load_video_list
from seqvision.engine import LoopConfig, LoopState, TrainingJob, TrainResult, compose_finetune, gather_outputs
from seqvision.engine.config import load_sections
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
    save_model_file,
)
from seqvision.eval.classification.classifier import ClassifierWithLoss
from seqvision.eval.classification.metrics import (
    ClassificationReport,
    classification_report,
    write_report_files,
)

_logger = logging.getLogger(__name__)

TASK = "classification"
EMA_FILE = "model_ema.safetensors"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_MODEL_DEFAULTS: dict[str, Any] = {
    "name": None,
    "kwargs": {},
    "pretrained": False,
    "layer_decay": None,
    "ema_decay": None,
    "label_smoothing": 0.1,
}
_DATA_DEFAULTS: dict[str, Any] = {
    "train": None,
    "val": None,
    "input_size": None,
    "interpolation": None,
    "mean": None,
    "std": None,
    "crop_pct": None,
    "crop_mode": None,
    "scale": [0.08, 1.0],
    "ratio": [3 / 4, 4 / 3],
    "hflip": 0.5,
    "color_jitter": 0.4,
    "auto_augment": None,
    "re_prob": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "max_unreadable_fraction": 0.01,
}
_EVAL_DEFAULTS: dict[str, Any] = {"batch_size": 64, "num_workers": 0}


def load_config(
    config: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a classification config (YAML file or mapping), apply ``"section.key=value"`` overrides and
    fill in the defaults; an unknown section or option is a ValueError listing the known ones."""
    values = load_sections(
        config,
        overrides,
        schema={"model": _MODEL_DEFAULTS, "data": _DATA_DEFAULTS, "eval": _EVAL_DEFAULTS, "train": None},
    )
    if not values["model"]["name"]:
        raise ValueError("config: model.name is required (e.g. vir_tiny_patch16_224)")
    decay = values["model"]["layer_decay"]
    if decay is not None and not 0 < float(decay) <= 1:
        raise ValueError(f"model.layer_decay must be in (0, 1] or null, got {decay!r}")
    ema = values["model"]["ema_decay"]
    if ema is not None and not 0 < float(ema) < 1:
        raise ValueError(f"model.ema_decay must be in (0, 1) or null, got {ema!r}")
    return values


# ----------------------------------------------------------------------------------------------- data


def _image_list(spec: Any, name: str, classes: Sequence[str] | None) -> tuple[list[VideoRecord], list[str]]:
    """``data.train`` / ``data.val`` (a class-folder tree or ``{source, root}`` of a list) -> records."""
    if isinstance(spec, str | os.PathLike):
        spec = {"source": str(spec)}
    if not isinstance(spec, Mapping) or not spec.get("source"):
        raise ValueError(
            f"data.{name} must be a folder per class or {{source: <list.csv>, root: <folder>}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - {"source", "root"})
    if unknown:
        raise ValueError(f"data.{name}: unknown key(s) {unknown}; known: ['root', 'source']")
    return load_video_list(
        spec["source"], root=spec.get("root"), classes=classes, extensions=IMAGE_EXTENSIONS
    )


class ImageClassDataset(Dataset):
    """Labelled images through a (timm) transform.

    Training item: ``{"image": float32 (C, H, W), "label": int64, "index": int64, "unreadable": int64}``,
    its augmentation drawn from generators seeded by ``(seed, epoch, index)`` (``set_epoch``), so
    DataLoader workers and resumed runs see the same images as an uninterrupted run. An image that
    cannot be read is warned about once, remembered, and replaced by the next readable one
    (``unreadable`` counts the skipped); more than ``max_unreadable_fraction`` of them is an
    ``UnreadableDatasetError``. Evaluation item: the same with ``"valid"`` (0 for an unreadable
    image, whose pixels are zeros) instead of ``"unreadable"``, so every image is accounted for.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        train: bool,
        input_size: Sequence[int],
        max_unreadable_fraction: float = 0.01,
        seed: int = 0,
    ):
        if not records:
            raise ValueError("records: need at least one image")
        self.records, self.transform, self.train = list(records), transform, train
        self.input_size = tuple(input_size)
        self.max_unreadable_fraction = max_unreadable_fraction
        self._unreadable: dict[Path, str] = {}
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws (the training loop calls it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> torch.Tensor | None:
        path = self.records[index].path
        if path in self._unreadable:
            return None
        try:
            with Image.open(path) as image:
                if not self.train:
                    return self.transform(image.convert("RGB"))
                # timm's transforms draw from Python's and torch's global generators: seed private
                # copies from (seed, epoch, index), leaving the callers' streams untouched.
                state = random.getstate()
                try:
                    with torch.random.fork_rng(devices=[]):
                        item_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
                        random.seed(item_seed)
                        torch.manual_seed(item_seed)
                        return self.transform(image.convert("RGB"))
                finally:
                    random.setstate(state)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            self._unreadable[path] = f"{type(err).__name__}: {err}"
            _logger.warning("%s: unreadable image, skipped (%s)", path, self._unreadable[path])
            fraction = len(self._unreadable) / len(self)
            if self.train and fraction > self.max_unreadable_fraction:
                raise UnreadableDatasetError(
                    f"{len(self._unreadable)} of {len(self)} images ({fraction:.1%}) are unreadable, more "
                    f"than max_unreadable_fraction={self.max_unreadable_fraction:g}"
                ) from err
            return None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not self.train:
            image = self._load(index)
            valid = image is not None
            return {
                "image": image if valid else torch.zeros(self.input_size),
                "label": torch.tensor(self.records[index].label),
                "index": torch.tensor(index),
                "valid": torch.tensor(int(valid)),
            }
        for skipped in range(len(self)):
            position = (index + skipped) % len(self)
            image = self._load(position)
            if image is not None:
                return {
                    "image": image,
                    "label": torch.tensor(self.records[position].label),
                    "index": torch.tensor(position),
                    "unreadable": torch.tensor(skipped),
                }
        raise UnreadableDatasetError(f"all {len(self)} images are unreadable (see the warnings)")


def _data_config(data: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """timm's data config of ``model`` (its pretrained cfg), with the config's overrides."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    overrides = {k: data[k] for k in keys if data[k]}
    if overrides.get("input_size") is not None:
        overrides["input_size"] = tuple(overrides["input_size"])
    return resolve_data_config(overrides, model=model)


def build_transforms(data: Mapping[str, Any], data_config: Mapping[str, Any]) -> tuple[Callable, Callable]:
    """timm's training and evaluation transforms for ``data_config`` and the config's augmentation."""
    train = create_transform(
        **data_config,
        is_training=True,
        scale=tuple(data["scale"]),
        ratio=tuple(data["ratio"]),
        hflip=data["hflip"],
        color_jitter=data["color_jitter"],
        auto_augment=data["auto_augment"],
        re_prob=data["re_prob"],
    )
    return train, create_transform(**data_config, is_training=False)


# ---------------------------------------------------------------------------------------------- model


def build_classifier(model: Mapping[str, Any], num_classes: int, *, download: bool = True) -> nn.Module:
    """The timm model a config's ``model`` section names, with ``num_classes`` outputs."""
    kwargs = dict(model.get("kwargs") or {})
    try:
        return timm.create_model(
            model["name"],
            pretrained=bool(model["pretrained"]) and download,
            num_classes=num_classes,
            **kwargs,
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model.name: {err}") from err
        raise


def layer_decay_scales(model: nn.Module, decay: float, prefix: str = "") -> dict[str, float]:
    """LR multipliers for layer-wise decay: ``{prefix + parameter name: decay ** (n - 1 - layer)}``.

    The layers are the model's ``group_matcher(coarse=False)`` groups, numbered from the stem (0) to
    the head (n - 1), as timm's ``param_groups_layer_decay`` numbers them: the head learns at the full
    LR, each layer below it ``decay`` times slower than the one above.
    """
    from timm.models import group_parameters

    if not callable(getattr(model, "group_matcher", None)):
        raise ValueError(
            f"model.layer_decay needs a model with group_matcher(); {type(model).__name__} has none"
        )
    groups = group_parameters(model, model.group_matcher(coarse=False))  # layer id -> names
    last = max(groups)
    return {f"{prefix}{name}": decay ** (last - layer) for layer, names in groups.items() for name in names}


def _update_ema(ema: ModelEmaV3, model: nn.Module, step: int) -> None:
    """timm's EMA update at optimizer step ``step`` (its warm-up reads the step, restored on resume)."""
    device = next(model.parameters()).device
    if next(ema.module.parameters()).device != device:  # the loop moved the model after the EMA was made
        ema.to(device)
    ema.update(model, step)


# ----------------------------------------------------------------------------------------- evaluation


def _predict(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    logits = model(batch["image"])["logits"].float()
    return {
        "probs": logits.softmax(-1),
        "label": batch["label"],
        "index": batch["index"],
        "valid": batch["valid"],
    }


def run_evaluation(
    accelerator: Accelerator, model: nn.Module, loader: DataLoader, dataset: ImageClassDataset
) -> tuple[ClassificationReport, dict[str, torch.Tensor]]:
    """Predict every image of a prepared loader (each counted once over all processes) and score them."""
    gathered = gather_outputs(accelerator, model, loader, _predict, desc="eval images")
    order = gathered["index"].argsort()
    gathered = {k: v[order] for k, v in gathered.items()}
    if gathered["index"].tolist() != list(range(len(dataset))):
        raise RuntimeError(f"evaluation gathered {len(order)} images, expected each of {len(dataset)} once")
    return classification_report(gathered["probs"], gathered["label"], valid=gathered["valid"]), gathered


def write_evaluation(
    folder: str | os.PathLike,
    report: ClassificationReport,
    gathered: Mapping[str, torch.Tensor],
    dataset: ImageClassDataset,
    classes: Sequence[str],
) -> dict[str, Path]:
    """``metrics.json``, ``predictions.csv`` and ``confusion.png`` in ``folder``, atomically."""
    names = [str(record.path) for record in dataset.records]
    title = f"top-1 {report.top1:.3f}, top-5 {report.top5:.3f} ({report.samples} images)"
    return write_report_files(
        folder, report, names, gathered["label"], gathered["probs"], classes,
        valid=gathered["valid"], title=title,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- train


@dataclass(kw_only=True)
class ClassificationJob(TrainingJob):
    """A fine-tuning run, built and checked but not started (``prepare``)."""

    model: ClassifierWithLoss
    train_set: ImageClassDataset
    val_set: ImageClassDataset | None = None
    classes: list[str]
    mixup: Mixup | None
    ema: ModelEmaV3 | None


def prepare(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> ClassificationJob:
    """Read the config, list the images, build the model, transforms, datasets, mixup and EMA.

    Every mistake in the config or the data lists is raised here, before training; call on every
    process.
    """
    values = load_config(config, overrides)
    if output_dir is not None:
        values["train"]["output_dir"] = str(output_dir)
    model_section, data = values["model"], values["data"]
    train_records, classes = _image_list(data["train"], "train", None)
    seed = int(values["train"].get("seed", 0))
    set_seed(seed)  # the same initial head on every process
    network = build_classifier(model_section, len(classes))
    if model_section["layer_decay"] is not None:
        scales = layer_decay_scales(network, float(model_section["layer_decay"]), prefix="model.")
        values["train"]["lr_scales"] = {**(values["train"].get("lr_scales") or {}), **scales}
    loop = LoopConfig.from_dict(values["train"])
    data_config = _data_config(data, network)
    train_transform, eval_transform = build_transforms(data, data_config)
    size = data_config["input_size"]
    fraction = data["max_unreadable_fraction"]
    train_set = ImageClassDataset(
        train_records,
        train_transform,
        train=True,
        input_size=size,
        max_unreadable_fraction=fraction,
        seed=seed,
    )
    val_set = None
    if data.get("val"):
        val_records, _ = _image_list(data["val"], "val", classes)
        val_set = ImageClassDataset(val_records, eval_transform, train=False, input_size=size)
    mixup = None
    smoothing = float(model_section["label_smoothing"])
    if data["mixup"] > 0 or data["cutmix"] > 0:
        if loop.batch_size % 2:
            raise ValueError(
                "mixup / cutmix pair the images of a batch: train.batch_size must be even, "
                f"got {loop.batch_size}"
            )
        mixup = Mixup(
            mixup_alpha=data["mixup"],
            cutmix_alpha=data["cutmix"],
            prob=data["mixup_prob"],
            switch_prob=data["mixup_switch_prob"],
            label_smoothing=smoothing,
            num_classes=len(classes),
        )
        smoothing = 0.0  # already in mixup's soft targets
    model = ClassifierWithLoss(network, clip_layout="image", label_smoothing=smoothing)
    ema = None
    if model_section["ema_decay"]:
        # timm's EMA with its warm-up: the decay grows as 1 - (1 + step) ** -3/4 up to ema_decay, so
        # the first averages are not dominated by the random initialisation.
        ema = ModelEmaV3(
            network, decay=float(model_section["ema_decay"]), use_warmup=True, warmup_power=3 / 4
        )
    # Recorded as resolved, so that evaluation preprocesses exactly as training did.
    values["data"] = {**data, **{k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}}
    resolved = {**values, "train": loop.to_dict()}
    if model_section["layer_decay"] is not None:
        del resolved["train"]["lr_scales"]  # one entry per parameter; model.layer_decay rebuilds them
    return ClassificationJob(
        config=resolved,
        model=model,
        train_set=train_set,
        val_set=val_set,
        classes=list(classes),
        loop=loop,
        mixup=mixup,
        ema=ema,
    )


def run(
    job: ClassificationJob,
    resume: str | os.PathLike | None = None,
    *,
    on_step_end: Callable[[LoopState, dict[str, float]], None] | None = None,
) -> tuple[Path, TrainResult]:
    """Train a prepared job, evaluate it and save the model (and its EMA); call on every process.

    Returns:
        ``(<output_dir>/model.safetensors, TrainResult)``; ``TrainResult.evaluations`` holds top1,
        top5, mean_class_accuracy, samples, skipped (and ``ema_top1``, ``ema_top5`` with an EMA).
    """
    output = run_folder(job.output_dir, job.config)
    network = job.model.model
    _logger.info(
        "%s: %.2f M parameters, %d classes, %d training images%s%s%s",
        job.config["model"]["name"],
        sum(p.numel() for p in network.parameters()) / 1e6,
        len(job.classes),
        len(job.train_set),
        f", {len(job.val_set)} validation images" if job.val_set is not None else "",
        ", mixup/cutmix" if job.mixup else "",
        f", EMA {job.ema.decay:g}" if job.ema else "",
    )
    prepared: dict[str, Any] = {}

    def forward(model: nn.Module, batch: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        if job.mixup is not None:
            images, labels = job.mixup(images, labels)
        outputs = model(images, labels)
        return {
            "loss": outputs["loss"],
            "accuracy": outputs["accuracy"],
            "unreadable": batch["unreadable"].sum().float(),
        }

    def evaluate(accelerator: Accelerator, model: nn.Module, state: LoopState) -> dict[str, float]:
        if "val" not in prepared:
            prepared["val"] = accelerator.prepare(evaluation_loader(job.val_set, job.config["eval"]))
        report, gathered = run_evaluation(accelerator, model, prepared["val"], job.val_set)
        metrics = report.metrics()
        if job.ema is not None:
            ema_model = ClassifierWithLoss(job.ema.module, clip_layout="image").to(accelerator.device)
            ema_report, _ = run_evaluation(accelerator, ema_model, prepared["val"], job.val_set)
            metrics.update(ema_top1=ema_report.top1, ema_top5=ema_report.top5)
        if state.step == job.loop.steps and accelerator.is_main_process:
            files = write_evaluation(output / EVAL_DIR, report, gathered, job.val_set, job.classes)
            _logger.info("wrote %s", ", ".join(str(p) for p in files.values()))
        return metrics

    path = output / MODEL_FILE
    sections = {k: job.config[k] for k in ("model", "data", "eval")}
    export = export_at_train_end(
        path, task=TASK, submodule="model", config=sections, extra=lambda: {"classes": job.classes}
    )

    def on_train_end(accelerator: Accelerator, model: nn.Module, state: LoopState) -> None:
        export(accelerator, model, state)
        if job.ema is not None and accelerator.is_main_process:
            extra = {"classes": job.classes, "steps": state.step, "ema_decay": job.ema.decay}
            save_model_file(job.ema.module, output / EMA_FILE, task=TASK, config=sections, extra=extra)

    result = train_job(
        job,
        resume,
        forward=forward,
        on_step_end=on_step_end,
        on_train_end=on_train_end,
        evaluate=evaluate,
        checkpoint_objects=[job.ema] if job.ema is not None else (),
        # The wrapper's classifier: the EMA averages the same module the file saves.
        after_optimizer_step=(
            (lambda wrapper, step: _update_ema(job.ema, wrapper.model, step)) if job.ema is not None else None
        ),
    )
    return path, result


finetune = compose_finetune(prepare, run, "Fine-tune an image classifier as ``config`` says")


def evaluate(
    checkpoint: str | os.PathLike,
    *,
    data: str | os.PathLike | Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    mixed_precision: str = "auto",
) -> tuple[ClassificationReport, list[str], dict[str, Path]]:
    """Evaluate a fine-tuned model file (``model.safetensors`` or ``model_ema.safetensors``, or a run
    folder) on its validation images (or ``data``); call on every process.

    Returns:
        ``(report, classes, files)``; ``files`` is empty on processes other than the main one.
    """
    saved = read_model_file(checkpoint, TASK)
    classes = list(saved.extra["classes"])
    values = evaluation_config(
        saved,
        load_config,
        overrides,
        data,
        no_data="no images to evaluate: give data (a folder or list) or train with data.val set",
    )
    network = build_classifier(values["model"], len(classes), download=False)
    network.load_state_dict(saved.state, strict=True)
    model = ClassifierWithLoss(network, clip_layout="image").eval()
    data_config = _data_config(values["data"], network)
    _, eval_transform = build_transforms(values["data"], data_config)
    records, _ = _image_list(values["data"]["val"], "val", classes)
    dataset = ImageClassDataset(records, eval_transform, train=False, input_size=data_config["input_size"])
    (report, _), files = evaluate_on_every_process(
        model,
        evaluation_loader(dataset, values["eval"]),
        mixed_precision=mixed_precision,
        run=lambda accelerator, model, loader: run_evaluation(accelerator, model, loader, dataset),
        write=lambda folder, result: write_evaluation(folder, *result, dataset, classes),
        folder=evaluation_folder(checkpoint, output_dir),
    )
    return report, classes, files
