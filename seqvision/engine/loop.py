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

import functools
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from .checkpoint import CheckpointManager, LoopState, check_finite_parameters, load_checkpoint
from .config import LoopConfig
from .optim import build_optimizer, build_scheduler

__all__ = [
    "LoopConfig",
    "LoopState",
    "NonFiniteLossError",
    "TrainResult",
    "forward_batch",
    "gather_outputs",
    "resolve_mixed_precision",
    "train",
]

_logger = logging.getLogger(__name__)

_LR_REFERENCE_BATCH = 256  # lr x global batch / 256: the MAE / TokenUnify scaling rule


# ---------------------------------------------------------------------------------------------- result


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
    after_optimizer_step: Callable[[nn.Module, int], None] | None = None


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
                        run.after_optimizer_step(accelerator.unwrap_model(run.model), step + 1)
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
    after_optimizer_step: Callable[[nn.Module, int], None] | None = None,
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
            not skipped, with the unwrapped model and the number of that step (1 for the first;
            restored on resume), before that step's checkpoint is written: the place for an EMA of
            the weights (which goes in ``checkpoint_objects``).
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
    state = load_checkpoint(accelerator, start, config) if start is not None else LoopState()
    if str(resume) == "latest" and start is None:
        _logger.info("resume='latest': no checkpoint under %s, starting from step 0", checkpoints.root)
    if accelerator.is_main_process:
        checkpoints.remove_unfinished()
    if config.log_with == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        _logger.warning(
            "train.log_with is 'tensorboard' but tensorboard is not installed (pip install "
            "'seqvision[tensorboard]'): training logs to the console only"
        )
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
        total=config.steps,
        initial=state.step,
        desc="train",
        disable=not (config.progress and accelerator.is_local_main_process),
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
                check_finite_parameters(accelerator, run.model, state.step)
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
