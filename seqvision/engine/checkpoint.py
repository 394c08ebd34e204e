"""Checkpoints: atomic, resumable, pruned.

Checkpoints (``CheckpointManager``) are ``<output_dir>/checkpoints/step_<8 digits>/``, written by
``accelerator.save_state`` into a temporary sibling folder ``.tmp-step_<...>``, completed by a
``trainer_state.json`` written last, then renamed into place: a checkpoint folder either is
complete or does not exist under its final name, and ``resume="latest"`` only considers folders
holding the marker. The names are managed here rather than by Accelerate's
``automatic_checkpoint_naming``, which writes straight into the final folder, numbers folders by
save count instead of step, and has ``load_state()`` pick the highest number whether or not that
save finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator

from .config import LoopConfig

__all__ = [
    "CHECKPOINT_MARKER",
    "CheckpointManager",
    "LoopState",
    "check_finite_parameters",
    "load_checkpoint",
]

_logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "trainer_state.json"
"""Written last into a checkpoint folder; a folder without it is an interrupted save."""

_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_STATE_FORMAT = 1


@dataclass
class LoopState:
    """The loop's own resumable state, saved as ``trainer_state.json`` in every checkpoint.

    ``step`` counts finished optimizer steps (skipped ones included); ``samples_seen`` counts the
    samples drawn by all processes, which is what places the data loader on resume.
    """

    step: int = 0
    skipped_steps: int = 0
    samples_seen: int = 0


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


def load_checkpoint(accelerator: Accelerator, path: Path, config: LoopConfig) -> LoopState:
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


def check_finite_parameters(accelerator: Accelerator, model: nn.Module, step: int) -> None:
    """Refuse to checkpoint weights holding NaN or inf (on any process)."""
    bad = torch.zeros((), device=accelerator.device)
    for param in model.parameters():
        if not torch.isfinite(param.detach()).all():
            bad += 1
    if accelerator.reduce(bad, "sum").item() > 0:
        raise RuntimeError(f"the weights hold NaN or infinite values at step {step}; not saving a checkpoint")
