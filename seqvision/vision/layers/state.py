"""Checking a state dict against a module's before loading it, so a mismatch is one readable error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["state_mismatch"]


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
