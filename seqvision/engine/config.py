"""Experiment configs: YAML sections, command-line overrides, and the ``train`` section's schema.

A config is a mapping of named sections (``model``, ``data``, ``train``, ...), each a mapping.
``load_sections`` reads one from a YAML file (or copies a mapping), applies command-line overrides
``"section.key=value"`` and refuses unknown sections and, where the caller lists them, unknown keys:
a typo is an error, never a silently ignored setting. ``write_config`` records the config as run.
``LoopConfig`` is the ``train`` section every job shares, typed and checked.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from seqvision.utils.checks import check_int
from seqvision.utils.io import write_text_atomic

__all__ = [
    "CONFIG_FILE",
    "UNSET",
    "LoopConfig",
    "Schema",
    "TypedSection",
    "apply_overrides",
    "load_sections",
    "write_config",
]

CONFIG_FILE = "config.yaml"
"""The name under which a run records its config (overrides applied) in its output folder."""


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``"a.b.c=value"`` strings to the nested mapping ``values`` in place; returns it.

    Values are parsed as YAML (``train.steps=20``, ``model.crop_size=[16,32,32]``,
    ``train.keep_last=null``); a dotted key creates the nested mappings it names.
    """
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} must look like section.key=value")
        *parents, leaf = key.split(".")
        node = values
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {name!r} is not a section")
        node[leaf] = yaml.safe_load(text)
    return values


class _Unset:
    """The default of a key a section allows without a default value (``UNSET``)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""In a section schema: the key is allowed and stays absent unless the config gives it."""

Schema = Mapping[str, Mapping[str, Any] | None]
"""Per allowed section, its keys with their defaults (``UNSET`` for none), or None for a section
checked elsewhere (``train``, which ``LoopConfig.from_dict`` checks and fills)."""


def load_sections(
    config: str | os.PathLike | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    schema: Schema,
) -> dict[str, Any]:
    """Read a YAML file (or deep-copy a mapping), apply overrides, check the sections against
    ``schema`` and fill in its defaults.

    Every config section of seqvision is described this one way: a mapping from each allowed key to
    its default (``UNSET``: allowed, absent unless given), or None where a typed dataclass checks the
    section (``LoopConfig`` for ``train``).

    Args:
        config: a YAML file or a mapping of sections.
        overrides: ``"section.key=value"`` strings (see ``apply_overrides``).
        schema: the allowed sections and their keys and defaults (see ``Schema``).

    Returns:
        a new dict with every section present and its defaults filled in. Raises
        FileNotFoundError for a missing file and ValueError for an unknown section or key, a section
        that is not a mapping, a bad override.
    """
    if isinstance(config, Mapping):
        values = copy.deepcopy(dict(config))
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config: {path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config: {path} must hold a mapping with sections {tuple(schema)}")
    apply_overrides(values, overrides)
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ValueError(f"config: unknown section(s) {unknown}; expected {list(schema)}")
    for section, keys in schema.items():
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ValueError(f"config: section {section!r} must be a mapping, got {values[section]!r}")
        if keys is None:
            continue
        unknown = sorted(set(values[section]) - set(keys))
        if unknown:
            raise ValueError(f"config: unknown {section} option(s) {unknown}; known: {sorted(keys)}")
        defaults = {k: copy.deepcopy(v) for k, v in keys.items() if v is not UNSET}
        values[section] = {**defaults, **values[section]}
    return values


def write_config(path: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """Write a config as YAML, atomically (a temporary sibling renamed into place).

    The values go through JSON first, so that tuples become lists and paths strings, which
    ``yaml.safe_dump`` can write and ``load_sections`` reads back.
    """
    plain = json.loads(json.dumps(dict(values), default=str))
    return write_text_atomic(path, yaml.safe_dump(plain, sort_keys=False))


class TypedSection:
    """A config section whose schema is a dataclass (``LoopConfig``, the EM ``SegmenterConfig``):
    its fields are the keys, their defaults the defaults and ``__post_init__`` the checks."""

    section_name: ClassVar[str] = "config"  # how errors name the section

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """Build from a mapping (a YAML section, JSON); an unknown key is an error that lists the
        known ones."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.section_name} option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass
class LoopConfig(TypedSection):
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
        progress: show a tqdm bar over the steps (main process only); false for runs launched in
            bulk that report progress their own way (``seqvision demo``).
    """

    section_name: ClassVar[str] = "training"

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
    progress: bool = True

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
