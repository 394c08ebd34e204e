"""Fine-tuning the EM affinity segmenter: a YAML config -> ``EMSegMamba`` -> the shared loop -> a checkpoint.

``finetune(config)`` reads a config with three sections,

``model``   ``SegmenterConfig`` fields (``encoder_name``, ``encoder_kwargs``, ``hidden_size``,
            ``out_chans``, ``kernel_size``) and ``pretrained_encoder``: the ``encoder.safetensors``
            that ``seqvision pretrain`` exported (loaded strictly: every key and shape must match
            the encoder the other fields build), or null to start from random weights;
``data``    ``raw`` and ``labels``: one spec or a list each, one label volume per raw volume
            (``"sample_A_20160501.hdf:volumes/raw"`` and ``"...hdf:volumes/labels/neuron_ids"``;
            HDF5, zarr, TIFF, .npy); when both are empty, one synthetic volume and its neuron ids
            from ``synthetic_em_volume(**synthetic)``. ``crop_size`` (divisible by 16 on every
            axis), ``augment`` (true, false or ``EMAugment`` arguments) and the other
            ``EMCropDataset`` options (``samples_per_epoch``, ``voxel_size``, ``pad``, ``scaling``,
            ``in_memory``); its seed is the training seed;
``train``   ``LoopConfig`` fields,

builds the segmenter (after seeding, so every process and every initialisation, pretrained or
not, starts from the same decoder weights), wraps it in an ``AffinityModel`` (class-balanced affinity
loss), trains it with ``seqvision.engine.train`` (``forward=affinity_forward``: checkpoints,
``resume="latest"``, NaN policy, logging as in pretraining) and finally writes
``<output_dir>/segmenter.safetensors`` with ``save_segmenter``, atomically: ``load_segmenter`` and
``seqvision segment`` read it.

``prepare`` and ``run`` are the two halves: the first reads the config and builds
the model and the data (where every mistake in the config or the inputs shows up), the second trains.
"""

from __future__ import annotations

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

from seqvision.data.synthetic import synthetic_volume
from seqvision.data.volumes import EMAugment, EMCropDataset
from seqvision.engine import LoopConfig, LoopState, TrainingJob, compose_finetune, run_folder, train_job
from seqvision.engine.config import UNSET, Schema, load_sections
from seqvision.eval.em.affinity import AffinityModel, affinity_forward
from seqvision.eval.em.checkpoint import SegmenterConfig, save_segmenter
from seqvision.vision.em import EMSegMamba

_logger = logging.getLogger(__name__)

SEGMENTER_FILE = "segmenter.safetensors"
_DATA_KEYS = ("raw", "labels", "synthetic", "crop_size", "augment", "samples_per_epoch", "voxel_size")
_DATA_KEYS += ("pad", "scaling", "in_memory")
# SegmenterConfig fills the model section's defaults itself (it is also the checkpoint's metadata).
_SCHEMA: Schema = {
    "model": dict.fromkeys(("pretrained_encoder", *SegmenterConfig.__dataclass_fields__), UNSET),
    "data": dict.fromkeys(_DATA_KEYS, UNSET),
    "train": None,
}
_DEFAULT_CROP = (16, 160, 160)  # TokenUnify's crops, EMSegMamba's default input


def load_config(
    config: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a fine-tuning config (YAML file or mapping) and apply ``"section.key=value"`` overrides.

    Sections ``model``, ``data`` and ``train``; an unknown section, model option or data option is
    a ValueError that lists the known ones (``LoopConfig`` checks the ``train`` keys).
    """
    return load_sections(config, overrides, schema=_SCHEMA)


# ---------------------------------------------------------------------------------------------- model


def build_segmenter(model: Mapping[str, Any]) -> tuple[SegmenterConfig, EMSegMamba]:
    """The segmenter a config's ``model`` section describes, with its pretrained encoder if named.

    Returns:
        ``(config, segmenter)``: the ``SegmenterConfig`` (what ``save_segmenter`` records) and a new
        ``EMSegMamba`` in training mode. Raises FileNotFoundError for a missing encoder file and
        ValueError (naming the file, the keys that differ and the architecture the export was
        pretrained with) for an encoder of another architecture.
    """
    model = dict(model)
    pretrained = model.pop("pretrained_encoder", None)
    config = SegmenterConfig.from_dict(model)
    if pretrained is None:
        return config, config.build()
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained_encoder: {path}: no such file (the encoder.safetensors that seqvision "
            "pretrain writes; null trains from scratch)"
        )
    try:
        segmenter = config.build(pretrained_encoder=path)
    except ValueError as err:
        raise ValueError(_encoder_mismatch(path, config, err)) from err
    _logger.info("initialised the encoder from %s", path)
    return config, segmenter


def _encoder_mismatch(path: Path, config: SegmenterConfig, err: ValueError) -> str:
    """The error for an encoder export that does not fit the config, with what the export says it is."""
    message = (
        f"model.pretrained_encoder: {path} does not fit model.encoder_name={config.encoder_name!r}, "
        f"encoder_kwargs={config.to_dict()['encoder_kwargs']}: {err}"
    )
    metadata = _export_metadata(path)
    if "encoder" in metadata:
        message += (
            f". The export was pretrained as {metadata['encoder']!r} with encoder_kwargs "
            f"{metadata.get('encoder_kwargs', '{}')}: give the same ones here"
        )
    return message


def _export_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of an encoder export ({} for other files)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return dict(file.metadata() or {})
    except (SafetensorError, OSError):
        return {}


# ----------------------------------------------------------------------------------------------- data


def _spec_list(value: Any) -> list:
    """One volume (a spec, a path or an array) or a list of them -> a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str | os.PathLike) or hasattr(value, "shape") else list(value)


def _check_crop(crop_size: Sequence[int], multiple: int) -> tuple[int, int, int]:
    crop = tuple(crop_size)
    if len(crop) != 3 or not all(isinstance(c, int) and c > 0 and c % multiple == 0 for c in crop):
        raise ValueError(
            f"data.crop_size must be three positive ints divisible by {multiple} (the encoder's "
            f"reduction on every axis), got {crop_size!r}"
        )
    return crop


def build_segmentation_dataset(data: Mapping[str, Any], seed: int, multiple: int = 16) -> EMCropDataset:
    """The labelled ``EMCropDataset`` a config's ``data`` section describes.

    Items are ``{"raw": float32 (1, z, y, x) in [0, 1], "labels": int64 (z, y, x)}``, the crops of
    ``data.crop_size`` (checked to be divisible by ``multiple``, the encoder's reduction).
    """
    data = dict(data)
    raw, labels = _spec_list(data.pop("raw", None)), _spec_list(data.pop("labels", None))
    synthetic = data.pop("synthetic", None)
    crop = _check_crop(data.pop("crop_size", _DEFAULT_CROP), multiple)
    augment = data.pop("augment", True)
    if isinstance(augment, Mapping):
        augment = EMAugment(**augment)
    if raw and len(labels) != len(raw):
        raise ValueError(
            f"data.labels: fine-tuning needs one label volume per raw volume, got {len(labels)} for "
            f"{len(raw)} (e.g. 'sample_A_20160501.hdf:volumes/labels/neuron_ids')"
        )
    if labels and not raw:
        raise ValueError("data.labels given without data.raw: name the raw volume of each label volume")
    if not raw:
        volume, neuron_ids, synthetic = synthetic_volume(synthetic)
        _logger.info("data: no volumes given, fine-tuning on a synthetic volume %s", synthetic)
        raw, labels = [volume], [neuron_ids]
        if "voxel_size" in synthetic:
            data.setdefault("voxel_size", synthetic["voxel_size"])
    return EMCropDataset(raw, labels, crop_size=crop, seed=seed, augment=augment, **data)


# ---------------------------------------------------------------------------------------------- train


@dataclass(kw_only=True)
class SegmentationJob(TrainingJob):
    """A fine-tuning run, built and checked but not started (``prepare``); no validation set."""

    segmenter_config: SegmenterConfig
    model: AffinityModel
    train_set: EMCropDataset


def prepare(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> SegmentationJob:
    """Read the config, build the segmenter (pretrained encoder loaded) and the labelled dataset.

    Every problem with the config or its files (unknown options, missing files, an encoder export
    of another architecture, a bad crop size) is raised here, before any training starts, as a
    FileNotFoundError, ValueError or TypeError. Call on every process of a launch.
    """
    values = load_config(config, overrides)
    if output_dir is not None:
        values["train"]["output_dir"] = str(output_dir)
    loop = LoopConfig.from_dict(values["train"])
    # Same seed on every process and for every initialisation: the decoder starts from the same
    # weights whether the encoder is pretrained or not, so runs differ only in the encoder.
    set_seed(loop.seed)
    segmenter_config, segmenter = build_segmenter(values["model"])
    dataset = build_segmentation_dataset(values["data"], loop.seed, segmenter.encoder.reduction)
    resolved = {**values, "train": loop.to_dict()}
    return SegmentationJob(
        config=resolved,
        segmenter_config=segmenter_config,
        model=AffinityModel(segmenter),
        train_set=dataset,
        loop=loop,
    )


def _segmenter_state(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full segmenter state dict from the prepared ``AffinityModel``; call on every process."""
    if accelerator.distributed_type == DistributedType.FSDP:
        # The shards are gathered by a collective: every process calls this, the main one gets all.
        full = accelerator.get_state_dict(model) or {}
        return {k.removeprefix("segmenter."): v for k, v in full.items() if k.startswith("segmenter.")}
    return accelerator.unwrap_model(model).segmenter.state_dict()


def run(
    job: SegmentationJob,
    resume: str | os.PathLike | None = None,
    *,
    on_step_end: Callable[[LoopState, dict[str, float]], None] | None = None,
) -> Path:
    """Train a prepared job with the shared loop and save the segmenter; call on every process.

    Args:
        job: from ``prepare``.
        resume: None, 'latest' (the newest complete checkpoint in the output folder, or a fresh
            start) or a checkpoint folder.
        on_step_end: passed to the loop (called after every step with the state and, on log steps,
            the logged means: ``loss``, ``mse``, ``boundary_fraction``, ``lr``, ``grad_norm``).

    Returns:
        ``<output_dir>/segmenter.safetensors`` (written by the main process, atomically).
    """
    output = run_folder(job.output_dir, job.config)
    segmenter = job.model.segmenter
    source = job.config["model"].get("pretrained_encoder") or "scratch (random weights)"
    _logger.info(
        "EMSegMamba on %s: %.2f M parameters (encoder %.2f M, from %s), crops %s, %d labelled volume(s)",
        job.segmenter_config.encoder_name,
        sum(p.numel() for p in segmenter.parameters()) / 1e6,
        sum(p.numel() for p in segmenter.encoder.parameters()) / 1e6,
        source,
        job.train_set.crop_size,
        len(job.train_set.volumes),
    )
    path = output / SEGMENTER_FILE

    def on_train_end(accelerator: Accelerator, prepared: nn.Module, state: LoopState) -> None:
        weights = _segmenter_state(accelerator, prepared)
        if accelerator.is_main_process:
            save_segmenter(weights, path, job.segmenter_config)
            _logger.info("wrote the segmenter (step %d) to %s", state.step, path)
        accelerator.wait_for_everyone()

    train_job(job, resume, forward=affinity_forward, on_step_end=on_step_end, on_train_end=on_train_end)
    return path


finetune = compose_finetune(prepare, run, "Fine-tune an EM affinity segmenter as ``config`` says")
