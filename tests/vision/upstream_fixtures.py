"""Reading the fixtures made by the authors' own code (``tools/upstream/``; format in
``tools/upstream/fixture_io.py``): their state dict under their keys, an input, their outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class UpstreamFixture:
    state_dict: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    config: dict
    upstream_repo: str
    upstream_commit: str


def load_fixture(name: str) -> UpstreamFixture:
    groups: dict[str, dict[str, torch.Tensor]] = {"state_dict": {}, "input": {}, "output": {}}
    with safe_open(str(FIXTURES / f"{name}.safetensors"), framework="pt") as f:
        meta = f.metadata()
        for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
            group, _, rest = key.partition(".")
            groups[group][rest] = f.get_tensor(key)
    return UpstreamFixture(
        groups["state_dict"],
        groups["input"],
        groups["output"],
        json.loads(meta["config"]),
        meta["upstream_repo"],
        meta["upstream_commit"],
    )


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """max |actual - expected| <= rtol * max |expected| (the fixtures' float32 tolerance)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rtol, f"relative error {error:.3g} > {rtol}"
