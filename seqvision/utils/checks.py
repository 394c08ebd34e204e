"""The one set of argument checks: each raises an error that names the argument, what was expected
and what came, so every layer of seqvision answers bad input in the same words."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "check_int",
    "check_positive_int",
    "is_main_process",
    "positive_int",
    "state_mismatch",
]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (a NumPy integer is accepted; a bool is not); else
    ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1; else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1, else a usage error (exit status 2) quoting the text."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def is_main_process() -> bool:
    """Whether this process is rank 0 of a distributed launch (``torchrun`` / ``accelerate launch``
    set ``RANK``) or runs alone. For the work before an ``Accelerator`` exists (logging set-up,
    messages that one process should print)."""
    return int(os.environ.get("RANK", "0")) == 0


def state_mismatch(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor], limit: int = 6) -> str:
    """'' when ``state`` has exactly the keys and shapes of ``expected``, else what differs.

    The answer names the missing keys, the unexpected keys and the shape differences ("file vs
    model"), at most ``limit`` of each with the total, e.g.
    ``"missing keys: head.weight; shapes: stem.weight (8, 1, 3) vs (16, 1, 3)"``.
    """

    def show(names: list[str]) -> str:
        return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = [
        f"{label} {show(names)}"
        for label, names in (
            ("missing keys:", missing),
            ("unexpected keys:", unexpected),
            ("shapes:", shapes),
        )
        if names
    ]
    return "; ".join(problems)
