"""The Accelerate training loop shared by every seqvision pipeline.

``train(model, dataset, config)`` trains any module whose forward returns a dict with a scalar
``"loss"`` on any map-style dataset, for ``config.steps`` optimizer steps, on whatever
``accelerate launch`` / ``torchrun`` started (one CPU process, several gloo ranks, DDP or FSDP on
GPUs). What it does, in order, for every step:

1. ``grad_accum`` micro-batches of ``batch_size`` samples per process, each under
   ``accelerator.accumulate`` (DDP's gradient all-reduce runs on the last one only). The model is
   called as ``forward(model, batch, step)``, by default ``model(batch[config.input_key], step=step)``;
   other pipelines pass their own ``forward``.
2. Every scalar entry of the returned dict is averaged over the processes (one small all-reduce),
   which is also how a NaN or infinite loss on *any* rank is seen by *all* ranks: they stop or skip
   together instead of deadlocking at the next collective.
3. On the last micro-batch: gradients clipped to ``clip_grad_norm`` (the norm is logged), THEN the
   optimizer steps (the TokenUnify reference clips after the step, so the update it means to bound
   goes through unclipped), then the LR scheduler. A non-finite gradient norm is handled like a
   non-finite loss (except under fp16, where the gradient scaler skips such steps itself).
4. Every ``log_every`` steps the window's mean losses, the LR and the gradient norm go to the
   trackers (TensorBoard by default); every ``save_every`` steps and at the end, a checkpoint.

Optimizer: AdamW, no weight decay on biases, norm weights (every parameter with fewer than two
dimensions) and the names that any submodule's ``no_weight_decay()`` lists. Schedule: linear warmup
for ``warmup_steps``, then a half-cycle cosine from ``lr`` down to ``min_lr`` at ``steps``
(``lr_factor``), stepped once per optimizer step whatever the number of processes.

Checkpoints (``CheckpointManager``) are ``<output_dir>/checkpoints/step_<8 digits>/``, written by
``accelerator.save_state`` into a temporary sibling folder ``.tmp-step_<...>``, completed by a
``trainer_state.json`` written last, then renamed into place: a checkpoint folder either is
complete or does not exist under its final name, and ``resume="latest"`` only considers folders
holding the marker. The names are managed here rather than by Accelerate's
``automatic_checkpoint_naming``, which writes straight into the final folder, numbers folders by
save count instead of step, and has ``load_state()`` pick the highest number whether or not that
save finished.

Resume restores what ``save_state`` holds (model, optimizer, scheduler, gradient scaler, the
random, numpy and torch RNG states of every process, Accelerate's accumulation counter) plus the
loop's own state (step, skipped steps, samples seen). The data position is recomputed from the
samples seen: the epoch is set on the data loader (and through it on the dataset's ``set_epoch``)
and the batches already used in that epoch are skipped by index with
``accelerator.skip_first_batches``, without loading them. With a dataset whose item ``i`` of epoch
``e`` depends only on ``(seed, e, i)`` (``EMCropDataset``) and a data loader whose order is a pure
function of the epoch (in order, or Accelerate's seedable sampler with ``shuffle=True``), a resumed
run on the CPU reaches bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from seqvision.utils.checks import check_int

__all__ = [
    "CHECKPOINT_MARKER",
    "CheckpointManager",
    "LoopConfig",
    "LoopState",
    "NonFiniteLossError",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "forward_batch",
    "gather_outputs",
    "lr_factor",
    "lr_scale_of",
    "resolve_mixed_precision",
    "train",
]

_logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "trainer_state.json"
"""Written last into a checkpoint folder; a folder without it is an interrupted save."""

_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_STATE_FORMAT = 1
_LR_REFERENCE_BATCH = 256  # lr x global batch / 256: the MAE / TokenUnify scaling rule


# ---------------------------------------------------------------------------------------------- config


@dataclass
class LoopConfig:
    """Everything the loop needs besides the model and the data.

    Batches are counted per process: one optimizer step sees ``batch_size x grad_accum x processes``
    samples (the global batch).

    Args:
        steps: optimizer steps of the whole run (the LR schedule ends here).
        batch_size: samples per micro-batch and process.
        grad_accum: micro-batches accumulated into one optimizer step.
        lr: peak learning rate; with ``scale_lr`` it is multiplied by global batch / 256.
        scale_lr: apply the linear scaling rule above (TokenUnify's lr = 1e-3 x batch / 256).
        weight_decay: AdamW's decoupled weight decay on the weight matrices and kernels.
        betas: AdamW's (beta1, beta2).
        warmup_steps: linear warmup from lr / warmup_steps to lr.
        min_lr: the LR the cosine ends at, in the same units as the (scaled) lr.
        clip_grad_norm: clip the global gradient 2-norm to this before each optimizer step;
            None: no clipping (the norm is still measured and logged).
        mixed_precision: 'auto' ('bf16' on a GPU that supports it, else 'no'; or what
            ``accelerate launch --mixed_precision`` set), 'no', 'bf16' or 'fp16'.
        seed: seeds model-side randomness (offset by the process index) and the data order.
        save_every: write a checkpoint every this many steps (and always at the last step).
        keep_last: how many complete checkpoints to keep; None keeps all.
        log_every: log mean losses, LR and gradient norm every this many steps.
        output_dir: checkpoints in ``checkpoints/``, TensorBoard logs in ``logs/``.
        num_workers: DataLoader worker processes per training process.
        nan_policy: what a NaN or infinite loss or gradient norm does: 'stop' raises
            ``NonFiniteLossError`` naming the step; 'skip' drops that step's update (its batches and
            its place in the LR schedule are used up), counts it and logs it.
        input_key: the batch entry the default ``forward`` passes to the model.
        shuffle: draw each epoch's order from (seed, epoch) instead of reading the dataset in order.
        find_unused_parameters: tell DDP that some parameters may get no gradient in a step (a
            model whose active losses change with the step, e.g. TokenUnify's 'alternate' schedule).
        log_with: an Accelerate tracker ('tensorboard', 'wandb', ...) or None for no tracker.
        project_name: the run name under which the trackers log.
        lr_scales: LR multipliers by parameter-name prefix, e.g. ``{"encoder.": 0.1}`` to fine-tune
            a pretrained encoder ten times slower than a new head; the longest matching prefix wins,
            other parameters get 1. Warmup and cosine scale every group alike.
        eval_every: call ``train``'s ``evaluate`` every this many steps (and always at the last
            step); None: only at the last step.
    """

    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-3
    scale_lr: bool = False
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr: float = 0.0
    clip_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    save_every: int = 1000
    keep_last: int | None = 3
    log_every: int = 10
    output_dir: str = "runs/train"
    num_workers: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"
    input_key: str = "raw"
    shuffle: bool = False
    find_unused_parameters: bool = False
    log_with: str | None = "tensorboard"
    project_name: str = "train"
    lr_scales: dict[str, float] | None = None
    eval_every: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.output_dir = str(self.output_dir)
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "seed", "num_workers"):
            check_int(name, getattr(self, name), 0)
        if self.keep_last is not None:
            check_int("keep_last", self.keep_last, 1)
        if self.eval_every is not None:
            check_int("eval_every", self.eval_every, 1)
        if self.lr_scales is not None:
            if not isinstance(self.lr_scales, Mapping) or not all(
                isinstance(k, str) and isinstance(v, int | float) and v > 0 for k, v in self.lr_scales.items()
            ):
                raise ValueError(
                    "lr_scales must map parameter-name prefixes to multipliers > 0 (freeze a module "
                    f"in the model instead of scaling its LR to 0), got {self.lr_scales!r}"
                )
            self.lr_scales = {k: float(v) for k, v in self.lr_scales.items()}
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(
                f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}"
            )
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoopConfig:
        """Build from a mapping (a YAML section); an unknown key is an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LoopState:
    """The loop's own resumable state, saved as ``trainer_state.json`` in every checkpoint.

    ``step`` counts finished optimizer steps (skipped ones included); ``samples_seen`` counts the
    samples drawn by all processes, which is what places the data loader on resume.
    """

    step: int = 0
    skipped_steps: int = 0
    samples_seen: int = 0


@dataclass
class TrainResult:
    """What ``train`` returns (the same on every process).

    ``history`` holds one dict per logged step: ``step``, the mean of every loss entry over the steps
    since the previous log (averaged over processes), ``lr``, ``grad_norm``, ``skipped_steps``.
    ``evaluations`` holds ``{"step": ..., **metrics}`` for every call of ``train``'s ``evaluate``.
    """

    state: LoopState
    output_dir: Path
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite loss or gradient norm under ``nan_policy='stop'``."""

    def __init__(self, step: int, what: str, last_checkpoint: Path | None):
        self.step = step
        saved = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        super().__init__(
            f"{what} at step {step}; training stopped before updating the weights and {saved} "
            "(lower the lr, check the data, or set nan_policy='skip')"
        )


# ----------------------------------------------------------------------------- optimizer and schedule


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names (relative to ``model``) that any submodule's ``no_weight_decay()`` lists.

    timm models list names relative to themselves; a wrapper (TokenUnify around its encoder) sees
    them under the submodule's prefix, so every submodule is asked, not only the top one.
    """
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            names |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
    return names


def lr_scale_of(name: str, lr_scales: Mapping[str, float] | None) -> float:
    """The LR multiplier of parameter ``name``: the value of the longest prefix of it in ``lr_scales``."""
    matches = [prefix for prefix in lr_scales or () if name.startswith(prefix)]
    return lr_scales[max(matches, key=len)] if matches else 1.0


def build_optimizer(model: nn.Module, config: LoopConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with a weight-decayed group of matrices and kernels and a group of everything else.

    Biases, norm weights, scalars and gates (parameters with fewer than 2 dimensions) and the names
    from ``no_weight_decay()`` (e.g. Mamba's A_log, D) get no weight decay: decaying them pulls
    scales and decays towards zero instead of regularising the model. With ``config.lr_scales``
    each of the two groups is split further by LR multiplier; every group records its multiplier
    as ``"lr_scale"`` (its ``"lr"`` is the peak times that). Frozen parameters are left out.
    """
    lr = config.lr if lr is None else lr
    skip = _no_weight_decay_names(model)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        groups.setdefault((decay, lr_scale_of(name, config.lr_scales)), []).append(param)
    # Decayed groups first, then by falling multiplier: without lr_scales, [decay, no decay].
    order = sorted(groups, key=lambda key: (not key[0], -key[1]))
    if not order:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return torch.optim.AdamW(
        [
            {
                "params": groups[key],
                "weight_decay": config.weight_decay if key[0] else 0.0,
                "lr": lr * key[1],
                "lr_scale": key[1],
            }
            for key in order
        ],
        lr=lr,
        betas=config.betas,
    )


def lr_factor(step: int, steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """The LR multiplier of optimizer step ``step`` (0-based): linear warmup, then half-cycle cosine.

    Warmup: (step + 1) / warmup_steps for step < warmup_steps, so the first step already moves the
    weights and the last warmup step reaches the peak. Then
    min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2 with t = (step - warmup) / (steps - warmup)
    going from 0 (the peak) towards 1 (min_ratio).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: LoopConfig, lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over ``lr_factor``; ``lr`` is the peak the optimizer was built with."""
    if config.min_lr > lr:
        raise ValueError(f"min_lr ({config.min_lr}) is above the scaled peak lr ({lr})")
    factor = functools.partial(
        lr_factor, steps=config.steps, warmup_steps=config.warmup_steps, min_ratio=config.min_lr / lr
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------ accelerator


def resolve_mixed_precision(setting: str) -> str | None:
    """'auto' -> 'bf16' where the process will train on a GPU with bfloat16, else 'no'.

    When ``accelerate launch`` set ACCELERATE_MIXED_PRECISION, 'auto' returns None so that the
    launcher's choice applies. ACCELERATE_USE_CPU=1 keeps a process on the CPU even where CUDA
    exists. (Nothing here may touch Accelerate's ``PartialState`` before the ``Accelerator`` is
    built: it is a per-process singleton, and creating it without ``cpu=True`` first would make a
    ``torchrun`` launch on the CPU a set of unconnected single processes.)
    """
    if setting != "auto":
        return setting
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    return "bf16" if not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _build_accelerator(config: LoopConfig) -> Accelerator:
    output_dir = Path(config.output_dir)
    project = ProjectConfiguration(
        project_dir=str(output_dir), logging_dir=str(output_dir / "logs"), automatic_checkpoint_naming=False
    )
    # sync_with_dataloader=False: a step is always grad_accum micro-batches, also across an epoch
    # boundary, so the step count alone fixes the data position and the accumulation counter.
    accumulation = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
    return Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_plugin=accumulation,
        # Accelerate would otherwise step the scheduler once per process per step; the schedule
        # here is in optimizer steps, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=config.shuffle, data_seed=config.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
        log_with=config.log_with,
        project_config=project,
    )


def _check_launch(accelerator: Accelerator) -> None:
    """Refuse a multi-process launch that Accelerate runs as unconnected single processes (they would
    all write the same checkpoints): torchrun on a CPU-only machine without ACCELERATE_USE_CPU=1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched as {world_size} processes (WORLD_SIZE) but Accelerate runs "
            f"{accelerator.num_processes}; without GPUs set ACCELERATE_USE_CPU=1 (gloo ranks on the CPU)"
        )


def _inherit_no_split_modules(model: nn.Module) -> None:
    """Give a wrapper its submodules' ``_no_split_modules``: FSDP's transformer auto-wrap policy
    (Accelerate's ``TRANSFORMER_BASED_WRAP`` without class names) reads it on the top module only."""
    if getattr(model, "_no_split_modules", None):
        return
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    if names:
        model._no_split_modules = tuple(names)


def _build_dataloader(
    dataset: Dataset, config: LoopConfig, collate_fn: Callable | None, pin_memory: bool
) -> DataLoader:
    if len(dataset) < config.batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} samples, fewer than one batch ({config.batch_size})"
        )
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=config.shuffle,
        num_workers=config.num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        # Equal micro-batches on every process, and a step is always grad_accum full ones.
        drop_last=True,
        # The loader's own generator draws the worker base seed, so creating an iterator (also the
        # one that skips batches on resume) never advances the global torch RNG the model uses.
        generator=torch.Generator().manual_seed(config.seed),
    )


def _micro_batches(accelerator: Accelerator, loader: DataLoader, start: int) -> Iterator[Any]:
    """Yield micro-batches forever, epoch after epoch, starting at per-process batch ``start``.

    The epoch is set on the loader every time (Accelerate's loader passes it to the sampler and to
    the dataset's ``set_epoch``); on resume the batches already used are skipped by index.
    """
    epoch, offset = divmod(start, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, offset) if offset else loader
        epoch, offset = epoch + 1, 0


# ---------------------------------------------------------------------------------------- checkpoints


class CheckpointManager:
    """Atomic, step-named checkpoints under ``root`` with a keep-last-N limit.

    Layout: ``root/step_00000100/`` holds what ``accelerator.save_state`` writes (model.safetensors,
    optimizer.bin, scheduler.bin, random_states_<rank>.pkl, ...) and ``trainer_state.json``
    (``LoopState`` and the batch layout), which is written last. Saving goes through
    ``root/.tmp-step_00000100/`` and one rename, so readers never see a partial checkpoint under a
    final name. ``root`` must be on a file system every process sees (as for Accelerate's own
    ``save_state``): every rank writes its RNG state into the same folder.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int | None = None):
        self.root = Path(root)
        self.keep_last = keep_last

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first; unfinished folders are left out with a warning."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _CHECKPOINT_NAME.match(path.name)
            if not (match and path.is_dir()):
                continue
            if (path / CHECKPOINT_MARKER).is_file():
                found.append((int(match.group(1)), path))
            else:
                _logger.warning("ignoring %s: it has no %s (an interrupted save)", path, CHECKPOINT_MARKER)
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        checkpoints = self.complete()
        return checkpoints[-1] if checkpoints else None

    def resolve(self, resume: str | os.PathLike | None) -> Path | None:
        """None -> None; 'latest' -> the newest complete checkpoint or None; a path -> that checkpoint."""
        if resume is None:
            return None
        if str(resume) == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / CHECKPOINT_MARKER).is_file():
            raise ValueError(
                f"resume: {path} is not a complete checkpoint (no {CHECKPOINT_MARKER}); "
                f"complete ones under {self.root}: {[p.name for p in self.complete()] or 'none'}"
            )
        return path

    def remove_unfinished(self) -> None:
        """Delete temporary folders that interrupted saves left (main process, before training)."""
        if not self.root.is_dir():
            return
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            _logger.warning("removing %s, left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)

    def save(self, accelerator: Accelerator, state: LoopState, extra: Mapping[str, Any]) -> Path:
        """Write a checkpoint of ``state.step``; call on every process. Returns the final folder."""
        final = self.root / self.name(state.step)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank has written its RNG state into tmp
        if accelerator.is_main_process:
            _fsync_tree(tmp)
            _write_json(
                tmp / CHECKPOINT_MARKER, {"format": _STATE_FORMAT, **dataclasses.asdict(state), **extra}
            )
            if final.exists():  # the same step saved before (a resume from an older checkpoint)
                stale = self.root / f"{_TMP_PREFIX}old-{final.name}"
                os.replace(final, stale)
                shutil.rmtree(stale)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        checkpoints = [path for path in self.complete() if path != keep]
        for path in checkpoints[: max(0, len(checkpoints) + 1 - self.keep_last)]:
            _logger.info("removing checkpoint %s (keep_last=%d)", path, self.keep_last)
            shutil.rmtree(path)


def _write_json(path: Path, values: Mapping[str, Any]) -> None:
    with path.open("w") as f:
        json.dump(values, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so the marker never lands before the data it vouches for."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_checkpoint(accelerator: Accelerator, path: Path, config: LoopConfig) -> LoopState:
    """Restore ``accelerator.save_state``'s contents and return the loop state saved with them."""
    accelerator.load_state(str(path))
    saved = json.loads((path / CHECKPOINT_MARKER).read_text())
    state = LoopState(**{f.name: saved[f.name] for f in dataclasses.fields(LoopState)})
    layout = {"batch_size": config.batch_size, "grad_accum": config.grad_accum}
    layout["num_processes"] = accelerator.num_processes
    changed = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if changed:
        _logger.warning(
            "resuming %s with another batch layout %s (saved, now): the data continues after the "
            "%d samples seen, but the run is no longer identical to an uninterrupted one",
            path,
            changed,
            state.samples_seen,
        )
    if state.step > config.steps:
        raise ValueError(f"resume: {path} is at step {state.step}, beyond this run's steps={config.steps}")
    _logger.info("resumed from %s at step %d", path, state.step)
    return state


def _check_finite_parameters(accelerator: Accelerator, model: nn.Module, step: int) -> None:
    """Refuse to checkpoint weights holding NaN or inf (on any process)."""
    bad = torch.zeros((), device=accelerator.device)
    for param in model.parameters():
        if not torch.isfinite(param.detach()).all():
            bad += 1
    if accelerator.reduce(bad, "sum").item() > 0:
        raise RuntimeError(f"the weights hold NaN or infinite values at step {step}; not saving a checkpoint")


# ----------------------------------------------------------------------------------------------- step


def forward_batch(model: nn.Module, batch: Mapping[str, Any], step: int, input_key: str = "raw") -> Any:
    """The default ``forward``: ``model(batch[input_key], step=step)``.

    For TokenUnify, ``batch["raw"]`` is (B, 1, Z, Y, X) in [0, 1] and ``step`` selects the active
    objectives. Another pipeline passes ``forward=lambda model, batch, step: model(**batch)`` or
    any callable returning a dict with a scalar ``"loss"``.
    """
    if input_key not in batch:
        raise KeyError(f"the batch has no {input_key!r} entry (it has {sorted(batch)}); set input_key")
    return model(batch[input_key], step=step)


def _loss_entries(outputs: Any) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """The loss to backpropagate, and every scalar tensor entry stacked (for logging and NaN checks)."""
    if not isinstance(outputs, Mapping) or "loss" not in outputs:
        raise TypeError(
            f"the model's forward must return a dict with a 'loss' entry, got {type(outputs).__name__}"
        )
    loss = outputs["loss"]
    if not (torch.is_tensor(loss) and loss.numel() == 1):
        raise TypeError(f"outputs['loss'] must be a scalar tensor, got {loss!r}")
    # Sorted names: every process stacks the same entries in the same order before the all-reduce.
    names = sorted(k for k, v in outputs.items() if torch.is_tensor(v) and v.numel() == 1)
    values = torch.stack([outputs[k].detach().float().reshape(()) for k in names])
    return loss, names, values


@dataclass
class _Window:
    """Running sums of the logged values between two log steps.

    Entries are counted one by one: a model may report an objective on some steps only.
    """

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    lr: float = math.nan  # the LR of the window's last step (the scheduler already points past it)

    def add(self, entries: Mapping[str, float]) -> None:
        for name, value in entries.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        means = {name: total / self.counts[name] for name, total in self.sums.items()}
        if self.grad_norms:
            means["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        return means


@dataclass
class _Run:
    """The prepared objects of one training run (model, optimizer, scheduler and loader wrapped by
    ``accelerator.prepare``)."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    forward: Callable[[nn.Module, Any, int], Any]
    config: LoopConfig
    lr: float  # the peak LR, scaled when config.scale_lr
    global_batch: int  # samples per optimizer step over all processes
    after_optimizer_step: Callable[[nn.Module], None] | None = None


def _prepare_run(
    model: nn.Module,
    dataset: Dataset,
    config: LoopConfig,
    forward: Callable[[nn.Module, Any, int], Any] | None,
    collate_fn: Callable | None,
) -> _Run:
    """Build the accelerator, optimizer, schedule and loader, and let Accelerate wrap them."""
    accelerator = _build_accelerator(config)
    _check_launch(accelerator)
    global_batch = config.batch_size * config.grad_accum * accelerator.num_processes
    lr = config.lr * global_batch / _LR_REFERENCE_BATCH if config.scale_lr else config.lr
    optimizer = build_optimizer(model, config, lr)
    scheduler = build_scheduler(optimizer, config, lr)
    loader = _build_dataloader(dataset, config, collate_fn, pin_memory=accelerator.device.type == "cuda")
    if accelerator.distributed_type == DistributedType.FSDP:
        _inherit_no_split_modules(model)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if len(loader) == 0:
        raise ValueError(
            f"the dataset ({len(dataset)} samples) holds no full batch of {config.batch_size} per process "
            f"on {accelerator.num_processes} processes"
        )
    forward = forward or functools.partial(forward_batch, input_key=config.input_key)
    return _Run(accelerator, model, optimizer, scheduler, loader, forward, config, lr, global_batch)


def _train_step(
    run: _Run, batches: Iterator[Any], step: int, window: _Window, last_checkpoint: Path | None
) -> bool:
    """Run optimizer step ``step`` (0-based) over ``grad_accum`` micro-batches; False if it was skipped.

    Under ``nan_policy='skip'`` a non-finite micro-batch loss (on any process) stops the backward
    passes of the step and its update is dropped; the scheduler still steps, so the LR stays a
    function of the step.
    """
    accelerator, config = run.accelerator, run.config
    problem = None
    for micro in range(config.grad_accum):
        batch = next(batches)
        with accelerator.accumulate(run.model):
            loss, names, values = _loss_entries(run.forward(run.model, batch, step))
            # The mean over processes doubles as the NaN check: one non-finite rank makes it non-finite.
            entries = dict(zip(names, accelerator.reduce(values, "mean").tolist(), strict=True))
            if problem is None and not math.isfinite(entries["loss"]):
                problem = f"loss is {entries['loss']} (micro-batch {micro + 1} of {config.grad_accum})"
                if config.nan_policy == "stop":
                    raise NonFiniteLossError(step + 1, problem, last_checkpoint)
            if problem is None:
                accelerator.backward(loss)
                window.add(entries)
            if accelerator.sync_gradients:
                if problem is None:
                    problem = _clip_gradients(run, window)
                    if problem is not None and config.nan_policy == "stop":
                        raise NonFiniteLossError(step + 1, problem, last_checkpoint)
                group = run.optimizer.param_groups[0]
                window.lr = group["lr"] / group["lr_scale"]  # the schedule's LR, before multipliers
                if problem is None:
                    run.optimizer.step()
                    if run.after_optimizer_step is not None:
                        run.after_optimizer_step(accelerator.unwrap_model(run.model))
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
    if problem is not None:
        _logger.warning("step %d skipped: %s", step + 1, problem)
    return problem is None


def _clip_gradients(run: _Run, window: _Window) -> str | None:
    """Clip the gradients (before the optimizer step); return a problem if their norm is not finite.

    Without ``clip_grad_norm`` the norm is measured with an infinite limit, which scales by exactly 1.
    Under fp16 an infinite norm is the gradient scaler's business: it skips that step and lowers its
    scale, as it is designed to while it searches for the largest scale that does not overflow.
    """
    max_norm = run.config.clip_grad_norm if run.config.clip_grad_norm is not None else math.inf
    norm = run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    if norm is None:  # DeepSpeed clips inside its engine and may not report the norm
        return None
    norm = float(norm)
    if not math.isfinite(norm):
        return None if run.accelerator.scaler is not None else f"gradient norm is {norm}"
    window.grad_norms.append(norm)
    return None


# ----------------------------------------------------------------------------------------------- train


def train(
    model: nn.Module,
    dataset: Dataset,
    config: LoopConfig,
    *,
    resume: str | os.PathLike | None = None,
    forward: Callable[[nn.Module, Any, int], Any] | None = None,
    collate_fn: Callable | None = None,
    on_step_end: Callable[[LoopState, dict[str, float]], None] | None = None,
    on_train_end: Callable[[Accelerator, nn.Module, LoopState], None] | None = None,
    evaluate: Callable[[Accelerator, nn.Module, LoopState], Mapping[str, float]] | None = None,
    checkpoint_objects: Sequence[Any] = (),
    after_optimizer_step: Callable[[nn.Module], None] | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` for ``config.steps`` optimizer steps; call on every process.

    Args:
        model: an ``nn.Module``; ``forward(model, batch, step)`` must return a dict with a scalar
            ``"loss"`` (other scalar entries are averaged and logged too). Build it after
            ``accelerate.utils.set_seed(config.seed)`` for a reproducible initialisation (DDP
            copies rank 0's weights to the other ranks anyway).
        dataset: a map-style dataset; ``set_epoch(epoch)`` is called on it when it has one. For a
            bit-identical resume its item ``i`` of epoch ``e`` must depend only on (``e``, ``i``).
        config: a ``LoopConfig``.
        resume: None (start fresh), 'latest' (the newest complete checkpoint under
            ``<output_dir>/checkpoints``, or fresh when there is none) or a checkpoint folder.
        forward: how a batch reaches the model; default ``forward_batch`` with ``config.input_key``.
        collate_fn: the DataLoader's collate function (default: PyTorch's).
        on_step_end: called on every process after every step with the loop state and, on log
            steps, the logged values (else an empty dict). An exception raised here ends training.
        on_train_end: called on every process after the last checkpoint, with the accelerator, the
            prepared model and the final state: the place for exports (write on the main process
            only; under FSDP, ``accelerator.get_state_dict(model)`` is a collective).
        evaluate: called on every process every ``config.eval_every`` steps and after the last
            one, with the accelerator, the prepared model (in eval mode, under ``torch.no_grad``)
            and the state; it returns metrics (the same on every process: gather with
            ``gather_outputs``), which are logged as ``eval/<name>``, passed to ``on_step_end``
            with the same prefix and kept in ``TrainResult.evaluations``.
        checkpoint_objects: more objects with ``state_dict()`` / ``load_state_dict()`` saved in every
            checkpoint and restored on resume (e.g. an EMA of the weights), through Accelerate's
            ``register_for_checkpointing``.
        after_optimizer_step: called on every process right after each optimizer step that was
            not skipped, with the unwrapped model, before that step's checkpoint is written: the
            place for an EMA of the weights (which goes in ``checkpoint_objects``).
        hparams: extra values recorded with the tracker's hyper-parameters (e.g. the model config).

    Returns:
        A ``TrainResult``. Raises ``NonFiniteLossError`` (policy 'stop') without saving the bad step.
    """
    run = _prepare_run(model, dataset, config, forward, collate_fn)
    run.after_optimizer_step = after_optimizer_step
    accelerator = run.accelerator
    if checkpoint_objects:
        accelerator.register_for_checkpointing(*checkpoint_objects)
    checkpoints = CheckpointManager(Path(config.output_dir) / "checkpoints", config.keep_last)
    start = checkpoints.resolve(resume)
    # Per process, so that random masks and noise differ between ranks; a resume then replaces
    # these states with the saved ones.
    set_seed(config.seed, device_specific=True)
    state = _load_checkpoint(accelerator, start, config) if start is not None else LoopState()
    if str(resume) == "latest" and start is None:
        _logger.info("resume='latest': no checkpoint under %s, starting from step 0", checkpoints.root)
    if accelerator.is_main_process:
        checkpoints.remove_unfinished()
    if config.log_with:
        tracked = _flat_hparams({**config.to_dict(), **(hparams or {})})
        accelerator.init_trackers(config.project_name, config=tracked)
    _logger.info(
        "training %d steps from step %d: %d process(es), global batch %d, peak lr %.3g, mixed precision %s",
        config.steps,
        state.step,
        accelerator.num_processes,
        run.global_batch,
        run.lr,
        accelerator.mixed_precision,
    )

    layout = {"batch_size": config.batch_size, "grad_accum": config.grad_accum}
    layout["num_processes"] = accelerator.num_processes
    batches = _micro_batches(
        accelerator, run.loader, state.samples_seen // (config.batch_size * accelerator.num_processes)
    )
    history: list[dict[str, float]] = []
    evaluations: list[dict[str, float]] = []
    last_checkpoint, window = start, _Window()
    progress = tqdm(
        total=config.steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
    )
    run.model.train()
    try:
        while state.step < config.steps:
            done = _train_step(run, batches, state.step, window, last_checkpoint)
            state.step += 1
            state.skipped_steps += not done
            state.samples_seen += run.global_batch
            progress.update(1)
            logged = {}
            if state.step % config.log_every == 0 or state.step == config.steps:
                logged = _log(accelerator, window, state)
                history.append(logged)
                progress.set_postfix(loss=f"{logged.get('loss', math.nan):.4g}", lr=f"{logged['lr']:.3g}")
                window = _Window()
            if state.step % config.save_every == 0 or state.step == config.steps:
                _check_finite_parameters(accelerator, run.model, state.step)
                last_checkpoint = checkpoints.save(accelerator, state, layout)
            if evaluate is not None and (
                state.step == config.steps or (config.eval_every and state.step % config.eval_every == 0)
            ):
                metrics = _evaluate(accelerator, run.model, state, evaluate)
                evaluations.append(metrics)
                logged = {**logged, **{f"eval/{k}": v for k, v in metrics.items() if k != "step"}}
            if on_step_end is not None:
                on_step_end(state, logged)
        if on_train_end is not None:
            on_train_end(accelerator, run.model, state)
    finally:
        progress.close()
        batches.close()
        accelerator.end_training()
    return TrainResult(state, Path(config.output_dir), last_checkpoint, history, evaluations)


def _evaluate(
    accelerator: Accelerator,
    model: nn.Module,
    state: LoopState,
    evaluate: Callable[[Accelerator, nn.Module, LoopState], Mapping[str, float]],
) -> dict[str, float]:
    """Run ``evaluate`` with the model in eval mode and without gradients, log and return its metrics."""
    model.eval()
    try:
        with torch.no_grad():
            metrics = {k: float(v) for k, v in evaluate(accelerator, model, state).items()}
    finally:
        model.train()
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
    _logger.info("eval at step %d: %s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return {"step": state.step, **metrics}


def gather_outputs(
    accelerator: Accelerator,
    model: nn.Module,
    loader: DataLoader,
    predict: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]],
    *,
    desc: str = "eval",
) -> dict[str, torch.Tensor]:
    """Run ``predict(model, batch)`` over a loader and gather its outputs from every process.

    ``loader`` must have gone through ``accelerator.prepare``: it then splits the data between the
    processes, and ``accelerator.gather_for_metrics`` drops the samples it repeated to give every
    process equally many, so every sample is counted exactly once. ``predict`` returns tensors
    with the batch on dim 0 (per-sample predictions, labels, indices).

    Returns:
        ``{name: tensor}`` concatenated over the whole dataset, in loader order, on every process
        (on the CPU).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        gathered = accelerator.gather_for_metrics(dict(predict(model, batch)))
        for name, value in gathered.items():
            parts.setdefault(name, []).append(value.detach().cpu())
    if not parts:
        raise ValueError("the evaluation loader yielded no batch")
    return {name: torch.cat(values) for name, values in parts.items()}


def _log(accelerator: Accelerator, window: _Window, state: LoopState) -> dict[str, float]:
    """Send the window's means, the LR of its last step and the skipped-step count to the trackers."""
    values = {"step": state.step, **window.means(), "lr": window.lr, "skipped_steps": state.skipped_steps}
    accelerator.log({f"train/{k}": v for k, v in values.items() if k != "step"}, step=state.step)
    _logger.info(
        "step %d: %s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "step")
    )
    return values


def _flat_hparams(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {name: int | float | str | bool}, what TensorBoard's hparams accept."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
