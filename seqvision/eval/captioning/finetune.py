"""Image and video captioning fine-tuning and evaluation: a YAML config -> an LRCN captioner -> the loop.

``finetune(config)`` reads a config with four sections,

``model``   ``LRCNCaptioner`` arguments: ``encoder`` (any timm or seqvision backbone name),
            ``encoder_kwargs``, ``pretrained_encoder`` (true: timm's ImageNet weights; or a local
            file), ``freeze_encoder``, ``encoder_chunk``, ``hidden`` (the paper: 1000), ``variant``
            ('factored' LRCN2f, 'unfactored' LRCN2u, 'single' LRCN1u), ``embed_dim``, ``dropout``,
            ``tie_weights``, ``video_features`` ('mean' or 'per_step'); and ``encoder_lr_scale``
            (the LR multiplier of the parameters under ``encoder.``);
``data``    ``train`` and ``val``: ``{captions: <file>, root: <folder>, split: <name or null>}``
            (a COCO captions or Karpathy JSON with its image folder, or a video-caption CSV/TSV or
            MSR-VTT-style JSON with its video folder; ``format`` 'auto' tells them apart), the
            vocabulary (``min_count``, ``max_vocab``), ``max_len`` (training captions are cut to it,
            with a count), the picture (``size``, ``resize``, ``crop_scale``, ``crop_ratio``,
            ``hflip``, ``mean``/``std``), the clip (``num_frames``, ``sampling``, ``stride``) and
            ``max_unreadable_fraction``;
``eval``    decoding (``method``: 'beam', 'greedy' or 'sample'; ``beam_size``, ``length_penalty``,
            ``temperature``, ``top_k``, ``max_len``), metrics (``meteor``: null = when java is on
            PATH; ``tokenizer``: 'simple' or 'ptb'), ``batch_size``, ``num_workers`` and ``grid``
            (pictures in the PNG);
``train``   ``LoopConfig`` fields,

builds the word vocabulary from the training captions, trains a ``CaptionerWithLoss`` (teacher
forcing, cross-entropy over the words) with ``seqvision.engine.train`` (checkpoints, resume,
mixed precision, progress, TensorBoard), generates a caption for every validation picture on every
process (``gather_outputs``: each counted once) and scores them with pycocoevalcap (BLEU-1..4,
ROUGE-L and CIDEr always, METEOR when java is found, reported as skipped otherwise). Into
``output_dir`` go ``model.safetensors`` (weights, config and the vocabulary: a model always decodes
with the words it was trained with), ``config.yaml``, and under ``eval/``: ``metrics.json``,
``predictions.json`` (COCO results format) and ``captions.png`` (pictures with generated and
reference captions).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from seqvision.data.captions import (
    CaptionDataset,
    CaptionRecord,
    load_coco_captions,
    load_video_captions,
    references,
)
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
)
from seqvision.eval.captioning.metrics import (
    CaptionScores,
    caption_scores,
    save_caption_grid,
    write_coco_results,
)
from seqvision.eval.captioning.vocab import Vocabulary
from seqvision.utils.io import write_json_atomic
from seqvision.vision.captioner import LRCNCaptioner, caption_loss, shift_tokens

_logger = logging.getLogger(__name__)

TASK = "caption"
_MODEL_DEFAULTS: dict[str, Any] = {
    "encoder": "resnet18",
    "encoder_kwargs": {},
    "pretrained_encoder": False,
    "freeze_encoder": False,
    "encoder_chunk": None,
    "hidden": 1000,
    "variant": "factored",
    "embed_dim": None,
    "dropout": 0.5,
    "tie_weights": False,
    "video_features": "mean",
    "encoder_lr_scale": 1.0,
}
_DATA_DEFAULTS: dict[str, Any] = {
    "format": "auto",
    "train": None,
    "val": None,
    "min_count": 1,
    "max_vocab": None,
    "max_len": 20,
    "size": 224,
    "resize": 256,
    "crop_scale": [0.5, 1.0],
    "crop_ratio": [3 / 4, 4 / 3],
    "hflip": False,
    "mean": None,
    "std": None,
    "num_frames": 8,
    "sampling": "uniform",
    "stride": 1,
    "max_unreadable_fraction": 0.1,
}
_EVAL_DEFAULTS: dict[str, Any] = {
    "method": "beam",
    "beam_size": 3,
    "length_penalty": 1.0,
    "temperature": 1.0,
    "top_k": None,
    "max_len": 20,
    "meteor": None,
    "tokenizer": "simple",
    "batch_size": 8,
    "num_workers": 0,
    "grid": 8,
}
# What every caption file needs besides its path: where its pictures are and which split to use.
_SOURCE_KEYS = {"captions", "root", "split"}


def load_config(
    config: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a captioning config (YAML file or mapping), apply ``"section.key=value"`` overrides and
    fill in the defaults; an unknown section or option is a ValueError listing the known ones."""
    values = load_sections(
        config,
        overrides,
        schema={"model": _MODEL_DEFAULTS, "data": _DATA_DEFAULTS, "eval": _EVAL_DEFAULTS, "train": None},
    )
    if values["data"]["format"] not in ("auto", "coco", "video"):
        raise ValueError(f"data.format must be 'auto', 'coco' or 'video', got {values['data']['format']!r}")
    if values["eval"]["method"] not in ("beam", "greedy", "sample"):
        raise ValueError(
            f"eval.method must be 'beam', 'greedy' or 'sample', got {values['eval']['method']!r}"
        )
    return values


# ----------------------------------------------------------------------------------------------- data


def _caption_format(path: Path, declared: str) -> str:
    """'coco' for an image-caption JSON (COCO or Karpathy: it has ``images``), else 'video'."""
    if declared != "auto":
        return declared
    if path.suffix.lower() != ".json":
        return "video"
    try:
        head = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON caption file: {err}") from err
    return "coco" if isinstance(head, dict) and "images" in head else "video"


def load_caption_records(
    spec: Any, name: str, declared_format: str = "auto"
) -> tuple[list[CaptionRecord], str]:
    """``data.train`` / ``data.val`` -> (records, 'coco' | 'video').

    ``spec`` is ``{captions: file, root: folder, split: name}`` (``root`` defaults to the file's
    folder) or just the caption file's path.
    """
    if isinstance(spec, str | os.PathLike):
        spec = {"captions": str(spec)}
    if not isinstance(spec, Mapping) or not spec.get("captions"):
        raise ValueError(
            f"data.{name} must be a caption file or a mapping {{captions: <file>, root: <folder>, "
            f"split: <name>}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - _SOURCE_KEYS)
    if unknown:
        raise ValueError(f"data.{name}: unknown key(s) {unknown}; known: {sorted(_SOURCE_KEYS)}")
    path = Path(spec["captions"])
    if not path.is_file():
        raise FileNotFoundError(f"data.{name}.captions: {path}: no such file")
    root = spec.get("root") or path.parent
    kind = _caption_format(path, declared_format)
    reader = load_coco_captions if kind == "coco" else load_video_captions
    records, missing = reader(path, root, split=spec.get("split"))
    if missing:
        _logger.warning("data.%s: %d listed file(s) missing under %s, skipped", name, missing, root)
    return records, kind


def _dataset(
    records: list[CaptionRecord], vocab: Vocabulary | None, data: Mapping[str, Any], *, train: bool, seed: int
) -> CaptionDataset:
    return CaptionDataset(
        records,
        vocab,
        train=train,
        max_len=data["max_len"],
        size=data["size"],
        resize=data["resize"],
        crop_scale=tuple(data["crop_scale"]),
        crop_ratio=tuple(data["crop_ratio"]),
        hflip=data["hflip"],
        num_frames=data["num_frames"],
        sampling=data["sampling"],
        stride=data["stride"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        seed=seed,
        max_unreadable_fraction=data["max_unreadable_fraction"],
    )


# ---------------------------------------------------------------------------------------------- model


def build_model(model: Mapping[str, Any], vocab_size: int, *, download: bool = True) -> LRCNCaptioner:
    """The ``LRCNCaptioner`` a config's ``model`` section describes.

    ``download=False`` (rebuilding a fine-tuned model, whose weights come from its file) turns
    ``pretrained_encoder: true`` off.
    """
    kwargs = {k: v for k, v in model.items() if k not in ("encoder", "encoder_lr_scale")}
    if not download and kwargs.get("pretrained_encoder") is True:
        kwargs["pretrained_encoder"] = False
    kwargs["encoder_kwargs"] = dict(kwargs.get("encoder_kwargs") or {})
    return LRCNCaptioner(model["encoder"], vocab_size, **kwargs)


class CaptionerWithLoss(nn.Module):
    """A captioner and its teacher-forced word cross-entropy, as the module the training loop drives.

    ``forward(visual, tokens)``: ``tokens`` (B, L + 2) ``[BOS, words, EOS, PAD...]``; the columns past
    the batch's longest caption are dropped (no LSTM steps spent on padding), the captioner sees
    ``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]``. Returns ``loss`` (mean over real words)
    and ``word_accuracy``.
    """

    def __init__(self, captioner: LRCNCaptioner):
        super().__init__()
        self.captioner = captioner

    def forward(self, visual: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pad = self.captioner.pad_id
        longest = int((tokens != pad).sum(dim=1).max())
        inputs, targets = shift_tokens(tokens[:, : max(longest, 2)])
        logits = self.captioner(visual, inputs)
        real = targets != pad
        accuracy = ((logits.detach().argmax(-1) == targets) & real).sum() / real.sum().clamp(min=1)
        return {"loss": caption_loss(logits, targets, pad), "word_accuracy": accuracy.float()}


# ----------------------------------------------------------------------------------------- evaluation


@dataclass
class CaptionEvaluation:
    """Generated captions of one evaluation, their references and scores."""

    scores: CaptionScores | None  # None when no picture could be read
    predictions: dict[str, str]  # key -> generated caption (readable pictures only)
    references: dict[str, list[str]]
    skipped: list[str] = field(default_factory=list)  # keys of unreadable pictures

    def metrics(self) -> dict[str, float]:
        """The scalar scores (what a tracker logs); METEOR only when it was computed."""
        values = {"samples": float(len(self.predictions)), "skipped": float(len(self.skipped))}
        if self.scores is not None:
            for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"):
                value = getattr(self.scores, name)
                if value is not None:
                    values[name] = float(value)
        return values


def _generation_kwargs(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("method", "beam_size", "length_penalty", "temperature", "top_k", "max_len")
    return {k: evaluation[k] for k in keys}


def generate_captions(
    accelerator: Accelerator,
    model: nn.Module,
    loader: DataLoader,
    dataset: CaptionDataset,
    vocab: Vocabulary,
    evaluation: Mapping[str, Any],
) -> dict[int, str | None]:
    """Generate a caption for every record of a prepared loader, gathered from every process.

    Returns ``{record index: caption}`` on every process, None for unreadable pictures.
    """
    captioner = accelerator.unwrap_model(model)
    captioner = captioner.captioner if isinstance(captioner, CaptionerWithLoss) else captioner
    generate = _generation_kwargs(evaluation)
    width = generate["max_len"]
    generator = torch.Generator(device=accelerator.device).manual_seed(0)

    def predict(_: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with accelerator.autocast():
            extra = {"generator": generator} if generate["method"] == "sample" else {}
            ids, _scores = captioner.generate(batch[dataset.input_key], **generate, **extra)
        # Fixed width, so that the processes' tensors can be gathered.
        padded = ids.new_full((ids.shape[0], width), captioner.pad_id)
        padded[:, : ids.shape[1]] = ids
        return {"ids": padded, "index": batch["index"], "valid": batch["valid"]}

    gathered = gather_outputs(accelerator, model, loader, predict, desc="captions")
    captions: dict[int, str | None] = {}
    for ids, index, valid in zip(gathered["ids"], gathered["index"], gathered["valid"], strict=True):
        captions[int(index)] = vocab.decode(ids.tolist()) if bool(valid) else None
    if sorted(captions) != list(range(len(dataset))):
        raise RuntimeError(
            f"evaluation gathered {len(captions)} records, expected each of {len(dataset)} once"
        )
    return captions


def score_captions(
    captions: Mapping[int, str | None], dataset: CaptionDataset, evaluation: Mapping[str, Any]
) -> CaptionEvaluation:
    """Score the generated captions of the readable records against their references."""
    refs = references(dataset.records)
    keys = [dataset.records[i].key for i in range(len(dataset))]
    predictions = {keys[i]: text for i, text in captions.items() if text is not None}
    skipped = [keys[i] for i, text in captions.items() if text is None]
    if not predictions:
        return CaptionEvaluation(None, {}, {}, skipped)
    used = {key: refs[key] for key in predictions}
    scores = caption_scores(predictions, used, meteor=evaluation["meteor"], tokenizer=evaluation["tokenizer"])
    return CaptionEvaluation(scores, predictions, used, skipped)


def write_evaluation(
    folder: str | os.PathLike,
    result: CaptionEvaluation,
    dataset: CaptionDataset,
    evaluation: Mapping[str, Any],
) -> dict[str, Path]:
    """``metrics.json``, ``predictions.json`` (COCO results), ``captions.png`` in ``folder``, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        **(result.scores.to_dict() if result.scores else {}),
        "samples": len(result.predictions),
        "unreadable": result.skipped,
        "decoding": _generation_kwargs(evaluation),
    }
    files = {
        "metrics": write_json_atomic(folder / "metrics.json", metrics),
        "predictions": write_coco_results(folder / "predictions.json", result.predictions),
    }
    shown = [i for i, record in enumerate(dataset.records) if record.key in result.predictions]
    shown = shown[: evaluation["grid"]]
    if shown:
        pictures = [dataset[i][dataset.input_key] for i in shown]
        keys = [dataset.records[i].key for i in shown]
        cider = f", CIDEr {result.scores.cider:.3f}" if result.scores else ""
        files["grid"] = save_caption_grid(
            folder / "captions.png",
            pictures,
            [result.predictions[k] for k in keys],
            [result.references[k] for k in keys],
            title=f"{evaluation['method']} decoding{cider}",
            mean=dataset.mean,
            std=dataset.std,
        )
    return files


def _evaluate_on_main(
    accelerator: Accelerator, captions: Mapping[int, str | None], dataset: CaptionDataset, evaluation: Mapping
) -> CaptionEvaluation:
    """Score on the main process only (METEOR starts a java process) and share the result."""
    result = [score_captions(captions, dataset, evaluation) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(result)
    return result[0]


# ---------------------------------------------------------------------------------------------- train


@dataclass(kw_only=True)
class CaptionJob(TrainingJob):
    """A fine-tuning run, built and checked but not started (``prepare``)."""

    model: CaptionerWithLoss
    vocab: Vocabulary
    train_set: CaptionDataset
    val_set: CaptionDataset | None = None


def _normalisation(data: Mapping[str, Any], captioner: LRCNCaptioner) -> tuple[list[float], list[float]]:
    """``data.mean``/``data.std``, or the frame encoder's pretrained cfg (ImageNet for most)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(captioner.encoder, "pretrained_cfg", None) or {}
    mean = data.get("mean") or cfg.get("mean") or IMAGENET_DEFAULT_MEAN
    std = data.get("std") or cfg.get("std") or IMAGENET_DEFAULT_STD
    return [float(m) for m in mean], [float(s) for s in std]


def prepare(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> CaptionJob:
    """Read the config and the caption files, build the vocabulary, the captioner and the datasets.

    Every problem with the config or the data (unknown options, missing files, a caption file with
    no usable pair, an empty vocabulary) is raised here, before training. Call on every process.
    """
    values = load_config(config, overrides)
    if output_dir is not None:
        values["train"]["output_dir"] = str(output_dir)
    model_section, data = values["model"], values["data"]
    scale = float(model_section["encoder_lr_scale"])
    if scale != 1.0:
        values["train"]["lr_scales"] = {**(values["train"].get("lr_scales") or {}), "encoder.": scale}
    loop = LoopConfig.from_dict(values["train"])
    train_records, kind = load_caption_records(data["train"], "train", data["format"])
    captions = [caption for record in train_records for caption in record.captions]
    vocab = Vocabulary.build(captions, min_count=data["min_count"], max_size=data["max_vocab"])
    set_seed(loop.seed)  # the same initial decoder on every process
    captioner = build_model(model_section, len(vocab))
    if captioner.video_features == "per_step" and kind != "video":
        raise ValueError("model.video_features='per_step' needs video captions; images have one frame")
    mean, std = _normalisation(data, captioner)
    data = values["data"] = {**data, "mean": mean, "std": std}
    train_set = _dataset(train_records, vocab, data, train=True, seed=loop.seed)
    val_set = None
    if data.get("val"):
        val_records, _ = load_caption_records(data["val"], "val", data["format"])
        val_set = _dataset(val_records, None, data, train=False, seed=loop.seed)
    _logger.info(
        "vocabulary: %d words (min_count %d) from %d training captions of %d %s",
        len(vocab),
        data["min_count"],
        len(captions),
        len(train_records),
        "videos" if kind == "video" else "images",
    )
    resolved = {**values, "train": loop.to_dict()}
    return CaptionJob(
        config=resolved,
        model=CaptionerWithLoss(captioner),
        vocab=vocab,
        train_set=train_set,
        val_set=val_set,
        loop=loop,
    )


def run(
    job: CaptionJob,
    resume: str | os.PathLike | None = None,
    *,
    on_step_end: Callable[[LoopState, dict[str, float]], None] | None = None,
) -> tuple[Path, TrainResult]:
    """Train a prepared job, evaluate it and save the model; call on every process.

    Returns:
        ``(<output_dir>/model.safetensors, TrainResult)``; ``TrainResult.evaluations`` holds the
        validation scores (bleu_1..4, rouge_l, cider, meteor when computed, samples, skipped).
    """
    output = run_folder(job.output_dir, job.config)
    captioner = job.model.captioner
    _logger.info(
        "LRCN captioner (%s, %s): %.2f M parameters (%.2f M trainable); %d training pairs, "
        "%d truncated to %d words",
        job.config["model"]["variant"],
        job.config["model"]["encoder"],
        sum(p.numel() for p in captioner.parameters()) / 1e6,
        sum(p.numel() for p in captioner.parameters() if p.requires_grad) / 1e6,
        len(job.train_set),
        job.train_set.truncated_count,
        job.config["data"]["max_len"],
    )
    evaluation = job.config["eval"]
    prepared: dict[str, DataLoader] = {}
    input_key = job.train_set.input_key

    def forward(model: nn.Module, batch: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
        outputs = model(batch[input_key], batch["tokens"])
        return {**outputs, "unreadable": batch["unreadable"].sum().float()}

    def evaluate(accelerator: Accelerator, model: nn.Module, state: LoopState) -> dict[str, float]:
        if "val" not in prepared:
            prepared["val"] = accelerator.prepare(evaluation_loader(job.val_set, evaluation))
        captions = generate_captions(accelerator, model, prepared["val"], job.val_set, job.vocab, evaluation)
        result = _evaluate_on_main(accelerator, captions, job.val_set, evaluation)
        if state.step == job.loop.steps and accelerator.is_main_process:
            files = write_evaluation(output / EVAL_DIR, result, job.val_set, evaluation)
            _logger.info("wrote %s", ", ".join(str(p) for p in files.values()))
        return result.metrics()

    path = output / MODEL_FILE

    on_train_end = export_at_train_end(
        path,
        task=TASK,
        submodule="captioner",
        config={k: job.config[k] for k in ("model", "data", "eval")},
        extra=lambda: {"vocab": job.vocab.to_dict()},
    )

    result = train_job(
        job,
        resume,
        forward=forward,
        on_step_end=on_step_end,
        on_train_end=on_train_end,
        evaluate=evaluate,
    )
    return path, result


finetune = compose_finetune(prepare, run, "Fine-tune an LRCN captioner as ``config`` says")


def evaluate(
    checkpoint: str | os.PathLike,
    *,
    data: str | os.PathLike | Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    mixed_precision: str = "auto",
) -> tuple[CaptionEvaluation, dict[str, Path]]:
    """Caption and score a fine-tuned model's validation data (or ``data``); call on every process.

    Args:
        checkpoint: ``model.safetensors`` written by ``finetune`` or its run folder.
        data: a caption file or ``{captions, root, split}``; default the run's ``data.val``.
        output_dir: for ``metrics.json``, ``predictions.json``, ``captions.png`` (default
            ``<run folder>/eval``).
        overrides: e.g. ``"eval.method=sample"``, ``"eval.beam_size=5"``.

    Returns:
        ``(evaluation, files)``; ``files`` is empty on processes other than the main one.
    """
    saved = read_model_file(checkpoint, TASK)
    vocab = Vocabulary.from_dict(saved.extra["vocab"])
    values = evaluation_config(
        saved,
        load_config,
        overrides,
        data,
        no_data="no captions to evaluate: give data (a caption file) or train with data.val set",
    )
    captioner = build_model(values["model"], len(vocab), download=False)
    captioner.load_state_dict(saved.state, strict=True)
    model = CaptionerWithLoss(captioner).eval()
    records, _ = load_caption_records(values["data"]["val"], "val", values["data"]["format"])
    dataset = _dataset(records, None, values["data"], train=False, seed=0)
    evaluation = values["eval"]

    def run(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> CaptionEvaluation:
        captions = generate_captions(accelerator, model, loader, dataset, vocab, evaluation)
        return _evaluate_on_main(accelerator, captions, dataset, evaluation)

    return evaluate_on_every_process(
        model,
        evaluation_loader(dataset, evaluation),
        mixed_precision=mixed_precision,
        run=run,
        write=lambda folder, result: write_evaluation(folder, result, dataset, evaluation),
        folder=evaluation_folder(checkpoint, output_dir),
    )
