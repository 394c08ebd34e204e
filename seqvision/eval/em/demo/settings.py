"""The demo's sizes, budgets and seeds: ``QUICK`` (a smoke test), ``DEFAULT`` (``seqvision demo``)
and ``FULL`` (``seqvision demo --full``, for a GPU).

Every number here was fixed before any result of the experiment was seen; docs/EM.md reports what
they gave, whichever way it went.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from seqvision.utils.checks import check_int

__all__ = ["DEFAULT", "FULL", "QUICK", "DemoSettings"]

_REDUCTION = 16  # EMSegMamba's encoder halves every axis four times


def _check_shape(name: str, shape: tuple[int, ...], multiple: int = 1) -> None:
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 and s % multiple == 0 for s in shape):
        raise ValueError(
            f"{name} must be three positive ints (Z, Y, X) divisible by {multiple}, got {shape!r}"
        )


@dataclass(frozen=True)
class DemoSettings:
    """Sizes (Z, Y, X voxels at CREMI's 40 x 4 x 4 nm), budgets and seeds of ``run_demo``.

    Args:
        corpus_volumes: unlabelled synthetic volumes TokenUnify pretrains on, each drawn with its own
            cell size, elongation, membrane width, organelle density, blur, noise and missing sections.
        corpus_shape: the shape of each of them.
        pool_shape: the labelled volume (default parameters, like the test volumes) that the labelled
            crops are cut from, a grid of ``labelled_crop`` tiles.
        labelled_crop: one labelled crop, the unit of a budget.
        budgets: how many labelled crops each fine-tuning run sees, ascending; a seed's crops for
            a budget include its crops for every smaller budget.
        seeds: one fine-tuning run per (initialisation, budget, seed); the seed picks the crops, the
            decoder's initial weights and the data order, shared by both initialisations.
        test_volumes: held-out labelled volumes (default parameters) every run is scored on.
        test_shape: their shape (divisible by 16).
        pretrain_steps: TokenUnify steps (batch 2 of the tiny config's 16 x 32 x 32 crops).
        finetune_steps: steps of every fine-tuning run, whatever its budget (batch 2).
        finetune_crop: fine-tuning crops, drawn inside the labelled crops (divisible by 16).
        window: the sliding window of inference (divisible by 16).
        overlap: the windows' overlap, a fraction of the window.
        thresholds: agglomeration thresholds scored; the first is the table's.
        probe_voxels: boundary and interior voxels (each) the linear probe is fitted on.
        threads: torch's intra-op threads in every run.
    """

    corpus_volumes: int
    corpus_shape: tuple[int, int, int]
    pool_shape: tuple[int, int, int]
    labelled_crop: tuple[int, int, int]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    test_volumes: int
    test_shape: tuple[int, int, int]
    pretrain_steps: int
    finetune_steps: int
    finetune_crop: tuple[int, int, int] = (16, 32, 32)
    window: tuple[int, int, int] = (32, 128, 128)
    overlap: float = 0.25
    thresholds: tuple[float, ...] = (0.5, 0.3, 0.7)
    probe_voxels: int = 16000
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("corpus_volumes", "test_volumes", "pretrain_steps", "finetune_steps", "probe_voxels"):
            check_int(name, getattr(self, name), 1)
        check_int("threads", self.threads, 1)
        _check_shape("corpus_shape", self.corpus_shape)
        _check_shape("pool_shape", self.pool_shape)
        for name in ("test_shape", "finetune_crop", "window"):
            _check_shape(name, getattr(self, name), _REDUCTION)
        _check_shape("labelled_crop", self.labelled_crop)
        if any(c < f for c, f in zip(self.labelled_crop, self.finetune_crop, strict=True)):
            raise ValueError(
                f"labelled_crop {self.labelled_crop} must hold a fine-tuning crop {self.finetune_crop}"
            )
        if any(p % c for p, c in zip(self.pool_shape, self.labelled_crop, strict=True)):
            raise ValueError(
                f"pool_shape {self.pool_shape} must be a whole grid of labelled_crop {self.labelled_crop}"
            )
        if any(p < t for p, t in zip(self.pool_shape, self.test_shape, strict=True)):
            # The probe is fitted on a test_shape corner of the pool.
            raise ValueError(f"pool_shape {self.pool_shape} must hold a test_shape {self.test_shape} volume")
        if any(c < f for c, f in zip(self.corpus_shape, (16, 32, 32), strict=True)):
            raise ValueError(f"corpus_shape {self.corpus_shape} must hold the pretraining crop (16, 32, 32)")
        budgets = tuple(self.budgets)
        if (
            not budgets
            or any(not isinstance(b, int) or b < 1 for b in budgets)
            or list(budgets) != sorted(set(budgets))
        ):
            raise ValueError(f"budgets must be ascending distinct ints >= 1, got {self.budgets!r}")
        if budgets[-1] > self.n_tiles:
            raise ValueError(
                f"budgets: the largest ({budgets[-1]}) exceeds the {self.n_tiles} labelled crops of "
                f"{self.labelled_crop} in pool_shape {self.pool_shape}"
            )
        seeds = tuple(self.seeds)
        if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct ints >= 0, got {self.seeds!r}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if not self.thresholds or not all(0 < t < 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be one or more numbers in (0, 1), got {self.thresholds!r}")

    @property
    def n_tiles(self) -> int:
        """How many labelled crops the pool holds."""
        return math.prod(p // c for p, c in zip(self.pool_shape, self.labelled_crop, strict=True))

    @property
    def n_runs(self) -> int:
        """Fine-tuning runs: two initialisations x budgets x seeds."""
        return 2 * len(self.budgets) * len(self.seeds)


# A smoke test of the whole chain in well under a minute; its numbers mean nothing.
QUICK = DemoSettings(
    corpus_volumes=2,
    corpus_shape=(16, 64, 64),
    pool_shape=(16, 64, 128),
    labelled_crop=(16, 32, 32),
    budgets=(1, 2),
    seeds=(0, 1),
    test_volumes=1,
    test_shape=(16, 64, 64),
    pretrain_steps=10,
    finetune_steps=10,
    window=(16, 64, 64),
    thresholds=(0.5, 0.3),
    probe_voxels=500,
)

# `seqvision demo`: about 7 minutes on 2 CPU cores (two runs at a time, one thread each; docs/EM.md).
# The pretraining corpus (8 x 32 x 128 x 128 = 4.2 M voxels) is four times the largest labelled set
# (16 x 16 x 64 x 64 = 1.0 M voxels); a budget of 1 crop is 65,536 labelled voxels.
DEFAULT = DemoSettings(
    corpus_volumes=8,
    corpus_shape=(32, 128, 128),
    pool_shape=(32, 256, 256),
    labelled_crop=(16, 64, 64),
    budgets=(1, 4, 16),
    seeds=(0, 1, 2),
    test_volumes=2,
    test_shape=(32, 128, 128),
    pretrain_steps=400,
    finetune_steps=100,
)

# `seqvision demo --full`: the grid for a GPU (hours on a CPU): more volumes, budgets, seeds and steps.
FULL = DemoSettings(
    corpus_volumes=16,
    corpus_shape=(32, 256, 256),
    pool_shape=(64, 256, 256),
    labelled_crop=(16, 64, 64),
    budgets=(1, 2, 4, 8, 16, 32),
    seeds=(0, 1, 2, 3, 4),
    test_volumes=4,
    test_shape=(32, 256, 256),
    pretrain_steps=3000,
    finetune_steps=500,
)
