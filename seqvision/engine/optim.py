"""The optimizer and the learning-rate schedule every training job uses.

Optimizer: AdamW, no weight decay on biases, norm weights (every parameter with fewer than two
dimensions) and the names that any submodule's ``no_weight_decay()`` lists. Schedule: linear warmup
for ``warmup_steps``, then a half-cycle cosine from ``lr`` down to ``min_lr`` at ``steps``
(``lr_factor``), stepped once per optimizer step whatever the number of processes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from .config import LoopConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "lr_scale_of", "no_weight_decay_names"]


def no_weight_decay_names(model: nn.Module) -> set[str]:
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
    skip = no_weight_decay_names(model)
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
