"""Small stand-ins for the training-loop tests: a dataset with EMCropDataset's contract and two models.

Also a script: ``python loop_toys.py OUTPUT_DIR STEPS [BATCH_SIZE]`` trains ``ToyRegressor`` on
``ToyVolumes`` with the loop (used under ``torchrun`` by the multi-process test).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
from torch.utils.data import Dataset


class ToyVolumes(Dataset):
    """Random (1, 4, 4, 4) volumes; item ``i`` of epoch ``e`` depends only on (seed, e, i)."""

    def __init__(self, samples_per_epoch: int = 10, seed: int = 0):
        self.samples_per_epoch, self.seed, self.epoch = samples_per_epoch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 100_003 + index)
        return {"raw": torch.rand(1, 4, 4, 4, generator=generator), "index": torch.tensor(index)}


class ToyMasked(nn.Module):
    """Masked reconstruction with random masks from the global torch RNG (as TokenUnify draws them).

    ``nan_at``: steps (0-based) whose loss is NaN; ``loss_scale`` multiplies the loss.
    """

    def __init__(self, nan_at: tuple[int, ...] = (), loss_scale: float = 1.0, random_masks: bool = True):
        super().__init__()
        self.proj = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 64)
        self.nan_at, self.loss_scale, self.random_masks = set(nan_at), loss_scale, random_masks

    def forward(self, volume: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        x = volume.flatten(1)
        keep = (torch.rand_like(x) > 0.5).to(x.dtype) if self.random_masks else torch.ones_like(x)
        error = (self.out(torch.relu(self.norm(self.proj(x * keep)))) - x) ** 2
        loss = self.loss_scale * error.mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "masked": (error * (1 - keep)).mean().detach()}


class ToyRegressor(nn.Module):
    """Deterministic (no RNG) linear reconstruction with a ``no_weight_decay`` list."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.gain = nn.Parameter(torch.ones(1, 64))

    def no_weight_decay(self) -> set[str]:
        return {"gain"}

    def forward(self, volume: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        x = volume.flatten(1)
        return {"loss": ((self.lin(x) * self.gain - x.flip(1)) ** 2).mean()}


def evaluate_indices(accelerator, model, state, samples: int = 7) -> dict[str, float]:
    """Gather the indices of an odd-sized evaluation set (so the processes' shares are uneven) and
    print them: every index must come back exactly once, on every process."""
    from torch.utils.data import DataLoader

    from seqvision.engine import gather_outputs

    loader = accelerator.prepare(DataLoader(ToyVolumes(samples), batch_size=2))
    gathered = gather_outputs(
        accelerator,
        model,
        loader,
        lambda m, batch: {
            "index": batch["index"],
            "loss": m(batch["raw"], 0)["loss"].expand(len(batch["index"])),
        },
    )
    print(f"eval indices={sorted(gathered['index'].tolist())}")
    return {"loss": gathered["loss"].mean().item(), "videos": len(gathered["index"])}


def _main(output_dir: str, steps: int, batch_size: int) -> None:
    from accelerate.utils import set_seed

    from seqvision.engine import LoopConfig, train

    set_seed(0)
    config = LoopConfig(
        steps=steps,
        batch_size=batch_size,
        lr=1e-2,
        save_every=2,
        log_every=1,
        output_dir=output_dir,
        log_with=None,
    )
    result = train(ToyRegressor(), ToyVolumes(16), config, evaluate=evaluate_indices)
    print(
        f"done step={result.state.step} samples={result.state.samples_seen} loss={result.history[-1]['loss']}"
    )


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2)
