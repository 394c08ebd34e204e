"""TokenUnify pretraining on EM volumes: a YAML config -> model + data -> the shared loop -> encoder weights.

``pretrain(config)`` reads a config with three sections,

``model``   keyword arguments of ``TokenUnify`` (``encoder`` is a registered ``emmamba_*`` name;
            ``encoder_kwargs`` go to ``timm.create_model``, e.g. smaller ``dims`` / ``depths``);
``data``    ``volumes``: raw EM volumes (paths or ``"file.h5:volumes/raw"`` strings; HDF5, zarr, TIFF,
            .npy); when empty, one synthetic volume from ``synthetic_em_volume(**synthetic)``.
            ``augment``: true, false or ``EMAugment`` arguments. The other keys go to
            ``EMCropDataset`` (``samples_per_epoch``, ``voxel_size``, ``pad``, ``scaling``,
            ``in_memory``); its crop size is the model's and its seed the training seed;
``train``   ``LoopConfig`` fields (steps, batch size, optimizer, schedule, checkpoints, ...),

builds ``TokenUnify`` (after seeding, so every process starts from the same weights) and an
``EMCropDataset``, runs ``seqvision.engine.train`` and finally writes the encoder's weights to
``<output_dir>/encoder.safetensors`` under timm's keys, atomically:
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), **encoder_kwargs)``
loads them, and so does ``create_em_segmenter(name, pretrained_encoder=...)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import save_file

from seqvision.data.synthetic import synthetic_volume
from seqvision.data.volumes import EMAugment, EMCropDataset
from seqvision.engine import (
    LoopConfig,
    LoopState,
    TrainingJob,
    TrainResult,
    compose_finetune,
    run_folder,
    train_job,
)
from seqvision.engine.config import CONFIG_FILE, UNSET, Schema, load_sections
from seqvision.pretrain.tokenunify import OBJECTIVES, TokenUnify
from seqvision.utils.io import atomic_path

__all__ = [
    "CONFIG_FILE",
    "ENCODER_FILE",
    "PretrainJob",
    "build_dataset",
    "export_encoder",
    "load_config",
    "prepare",
    "pretrain",
    "run",
]

_logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"
# The model section is TokenUnify's keyword arguments (checked by its constructor); the train section
# LoopConfig's fields.
_SCHEMA: Schema = {
    "model": None,
    "data": dict.fromkeys(
        ("volumes", "synthetic", "augment", "samples_per_epoch", "voxel_size", "pad", "scaling", "in_memory"),
        UNSET,
    ),
    "train": None,
}


# --------------------------------------------------------------------------------------------- config


def load_config(config: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> dict:
    """Read a YAML file (or copy a mapping) and apply ``"section.key=value"`` overrides.

    Override values are parsed as YAML (``train.steps=20``, ``model.crop_size=[16,32,32]``,
    ``train.keep_last=null``); a dotted key creates the nested mappings it names. Only the sections
    ``model``, ``data`` and ``train`` are allowed, so that a typo is an error, not an ignored key.
    """
    return load_sections(config, overrides, schema=_SCHEMA)


# ------------------------------------------------------------------------------------------ model, data


def build_dataset(data: Mapping[str, Any], crop_size: Sequence[int], seed: int) -> EMCropDataset:
    """The ``EMCropDataset`` a config's ``data`` section describes (a synthetic volume when it names none)."""
    data = dict(data)
    volumes = data.pop("volumes", None) or []
    synthetic = data.pop("synthetic", None)
    augment = data.pop("augment", True)
    if isinstance(augment, Mapping):
        augment = EMAugment(**augment)
    if not volumes:
        raw, _, synthetic = synthetic_volume(synthetic)
        _logger.info("data: no volumes given, training on a synthetic volume %s", synthetic)
        volumes = [raw]
        if "voxel_size" in synthetic:
            data.setdefault("voxel_size", synthetic["voxel_size"])
    return EMCropDataset(volumes, crop_size=tuple(crop_size), seed=seed, augment=augment, **data)


def _needs_unused_parameters(model: TokenUnify) -> bool:
    """Whether some parameters miss a gradient on some steps (DDP must then look for them)."""
    return model.schedule != "joint" or set(model.objectives) != set(OBJECTIVES)


# --------------------------------------------------------------------------------------------- export


def _encoder_state(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    if accelerator.distributed_type == DistributedType.FSDP:
        # The shards are gathered by a collective: every process calls this, the main one gets all.
        full = accelerator.get_state_dict(model)
        return {k.removeprefix("encoder."): v for k, v in (full or {}).items() if k.startswith("encoder.")}
    return accelerator.unwrap_model(model).encoder_state_dict()


def export_encoder(
    accelerator: Accelerator, model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str]
) -> Path:
    """Write the encoder's weights (timm keys) to ``path`` as safetensors; call on every process.

    The main process writes a temporary file next to ``path`` and renames it, so an existing export
    is replaced only by a complete one.
    """
    path = Path(path)
    state = _encoder_state(accelerator, model)
    if accelerator.is_main_process:
        # Own contiguous CPU copies: safetensors refuses tensors that share storage.
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata={"format": "pt", **metadata})
        _logger.info("wrote the encoder's weights (%d tensors) to %s", len(tensors), path)
    accelerator.wait_for_everyone()
    return path


# ------------------------------------------------------------------------------------------- pretrain


@dataclass(kw_only=True)
class PretrainJob(TrainingJob):
    """A pretraining run, built and checked but not started (``prepare``); no validation set."""

    encoder: str  # the registered encoder's name
    model: TokenUnify
    train_set: EMCropDataset


def prepare(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> PretrainJob:
    """Read the config, build ``TokenUnify`` and open the volumes; call on every process of a launch.

    Every problem with the config or its files (unknown options, a missing or unreadable volume, a
    crop larger than a volume) is raised here, before any training starts, as a FileNotFoundError,
    ValueError or TypeError.
    """
    values = load_config(config, overrides)
    if output_dir is not None:
        values["train"]["output_dir"] = str(output_dir)
    model_args = dict(values["model"])
    encoder = model_args.setdefault("encoder", "emmamba_base")
    if not isinstance(encoder, str):
        raise ValueError(f"config: model.encoder must be a registered encoder name, got {encoder!r}")
    loop = LoopConfig.from_dict(values["train"])
    # Same seed on every process: identical initial weights (the loop then offsets the seed per rank).
    set_seed(loop.seed)
    model = TokenUnify(**model_args)
    if "find_unused_parameters" not in values["train"]:
        loop.find_unused_parameters = _needs_unused_parameters(model)
    dataset = build_dataset(values["data"], model.crop_size, loop.seed)
    resolved = {**values, "model": model_args, "train": loop.to_dict()}
    return PretrainJob(config=resolved, encoder=encoder, model=model, train_set=dataset, loop=loop)


def run(
    job: PretrainJob,
    resume: str | os.PathLike | None = None,
    *,
    on_step_end: Callable[[LoopState, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a prepared job on the shared loop and export the encoder; call on every process.

    Returns the loop's ``TrainResult``; the encoder weights are at ``result.output_dir /
    ENCODER_FILE`` and the config as run at ``result.output_dir / CONFIG_FILE``.
    """
    output = run_folder(job.output_dir, job.config)
    model = job.model
    _logger.info(
        "TokenUnify on %s: %.2f M parameters (encoder %.2f M), %d tokens per crop %s",
        job.encoder,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.encoder.parameters()) / 1e6,
        model.num_tokens,
        model.crop_size,
    )
    encoder_kwargs = job.config["model"].get("encoder_kwargs") or {}
    metadata = {"encoder": job.encoder, "encoder_kwargs": json.dumps(encoder_kwargs)}

    def on_train_end(accelerator: Accelerator, prepared: nn.Module, state: LoopState) -> None:
        export_encoder(accelerator, prepared, output / ENCODER_FILE, {**metadata, "step": str(state.step)})

    return train_job(job, resume, on_step_end=on_step_end, on_train_end=on_train_end)


pretrain = compose_finetune(prepare, run, "Pretrain a TokenUnify encoder as ``config`` says", name="pretrain")
