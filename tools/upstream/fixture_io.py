"""What every upstream-fixture script shares: where the authors' checkout is, stubbing the imports
that need CUDA, and writing a fixture.

A fixture is one safetensors file, ``tests/vision/fixtures/<name>.safetensors``:

* tensors ``state_dict.<key>``: the state dict of the authors' model, under the authors' own keys;
* tensors ``input.<name>`` and ``output.<name>``: what was fed to their model and what it returned;
* metadata (strings): ``upstream_repo``, ``upstream_commit``, ``script`` (the tools/ script that
  wrote it), ``config`` (JSON: the tiny architecture and the seed), ``notes``.

Nothing of the authors' code is written: only the numbers their code produced. The scripts run
against a checkout of the authors' repository given with ``--upstream``, read-only.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import subprocess
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from seqvision.utils.io import atomic_path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "vision" / "fixtures"


def upstream_commit(checkout: Path) -> str:
    """The commit of the authors' checkout (a git work tree or bare git directory)."""
    out = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@contextlib.contextmanager
def stub_modules(*names: str, **attributes: Mapping[str, object]) -> Iterator[None]:
    """Make ``import name`` succeed for CUDA-only packages the authors import unguarded.

    Each stub module is empty except for ``attributes[name]`` (dots in the name written as '__'),
    so any use of a missing symbol fails loudly instead of silently running other code.
    """
    saved = {name: sys.modules.get(name) for name in names}
    try:
        for name in names:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
            module.__path__ = []  # a package, so submodules can be stubbed too
            for key, value in attributes.get(name.replace(".", "__"), {}).items():
                setattr(module, key, value)
            sys.modules[name] = module
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def save_fixture(
    name: str,
    *,
    state_dict: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    outputs: Mapping[str, torch.Tensor],
    upstream_repo: str,
    upstream_commit: str,
    script: str,
    config: Mapping[str, object],
    notes: str = "",
) -> Path:
    """Write ``tests/vision/fixtures/<name>.safetensors`` (temporary file, then rename)."""
    tensors = {}
    for prefix, group in (("state_dict", state_dict), ("input", inputs), ("output", outputs)):
        for key, value in group.items():
            tensors[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous().clone()
    metadata = {
        "upstream_repo": upstream_repo,
        "upstream_commit": upstream_commit,
        "script": script,
        "config": json.dumps(dict(config), sort_keys=True),
        "notes": notes,
    }
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{name}.safetensors"
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path
