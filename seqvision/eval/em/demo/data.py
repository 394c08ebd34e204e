"""The demo's volumes, drawn once and written as .npy files that the runs' configs name.

* the **corpus**: ``corpus_volumes`` unlabelled volumes for pretraining, each drawn with its own
  parameters (``corpus_parameters``), so that the encoder sees many kinds of tissue, not one;
* the **pool**: one labelled volume with ``synthetic_em_volume``'s default parameters, cut into a
  grid of labelled crops (tiles); a budget of ``b`` crops is ``b`` of them (``budget_tiles``);
* the **test volumes**: labelled volumes with the default parameters, never trained on.

Their seeds are fixed offsets (``CORPUS_SEED``, ``POOL_SEED``, ``TEST_SEED``), so that every demo
run, whatever its settings, draws the same tissue.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqvision.data.synthetic import synthetic_em_volume
from seqvision.eval.em.demo.settings import DemoSettings
from seqvision.utils.io import atomic_path

__all__ = [
    "CORPUS_SEED",
    "POOL_SEED",
    "TEST_SEED",
    "DemoData",
    "budget_tiles",
    "corpus_parameters",
    "write_demo_data",
]

_logger = logging.getLogger(__name__)

CORPUS_SEED = 1000  # corpus volume i: seed CORPUS_SEED + i; its parameters: rng(CORPUS_SEED)
POOL_SEED = 2000
TEST_SEED = 3000  # test volume j: seed TEST_SEED + j


def corpus_parameters(count: int, seed: int = CORPUS_SEED) -> list[dict[str, Any]]:
    """``synthetic_em_volume`` arguments for ``count`` volumes, each drawn around the defaults
    (cell size 300 nm, elongation 4, membrane 16 nm, 20 organelles per um^3, blur 12 / 5 nm, noise
    0.03, one missing section per 32) from ranges wide enough to give visibly different tissue."""
    rng = np.random.default_rng(seed)
    parameters = []
    for i in range(count):
        blur_yx = float(rng.uniform(3.0, 8.0))
        parameters.append(
            {
                "seed": seed + i,
                "cell_size_nm": float(rng.uniform(200.0, 450.0)),
                "elongation": float(rng.uniform(2.5, 6.0)),
                "membrane_width_nm": float(rng.uniform(10.0, 24.0)),
                "organelle_density": float(rng.uniform(5.0, 40.0)),
                "blur_sigma_nm": [float(rng.uniform(0.0, 24.0)), blur_yx, blur_yx],
                "noise": float(rng.uniform(0.01, 0.06)),
                "missing_sections": int(rng.integers(0, 3)),
            }
        )
    return parameters


def budget_tiles(n_tiles: int, budget: int, seed: int) -> list[int]:
    """The tiles (indices into the pool's grid) of a budget: the first ``budget`` of a permutation
    drawn from ``seed``, so a seed's smaller budgets are subsets of its larger ones."""
    if not 1 <= budget <= n_tiles:
        raise ValueError(f"budget must be in [1, {n_tiles}] (the pool's labelled crops), got {budget}")
    order = np.random.default_rng(seed).permutation(n_tiles)
    return sorted(int(i) for i in order[:budget])


@dataclass(frozen=True)
class DemoData:
    """Where ``write_demo_data`` put the volumes: .npy files, raw uint8 and labels uint32 (Z, Y, X)."""

    corpus: list[Path]  # raw only
    corpus_parameters: list[dict[str, Any]]
    tiles: list[tuple[Path, Path]]  # (raw, labels) per labelled crop, in grid order (z, y, x)
    tests: list[tuple[Path, Path]]  # (raw, labels) per test volume
    pool: tuple[Path, Path]  # the whole labelled pool, which the probe is fitted on


def _save(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as temporary:
        np.save(temporary, array)
    return path


def _save_labelled(folder: Path, name: str, raw: np.ndarray, labels: np.ndarray) -> tuple[Path, Path]:
    # uint32 holds any id of these volumes and halves the files next to uint64.
    return _save(folder / f"{name}_raw.npy", raw), _save(
        folder / f"{name}_labels.npy", labels.astype(np.uint32)
    )


def _tiles(shape: tuple[int, ...], crop: tuple[int, ...]) -> list[tuple[slice, ...]]:
    starts = [range(0, s - c + 1, c) for s, c in zip(shape, crop, strict=True)]
    return [
        tuple(slice(o, o + c) for o, c in zip(origin, crop, strict=True))
        for origin in itertools.product(*starts)
    ]


def write_demo_data(folder: Path, settings: DemoSettings) -> DemoData:
    """Draw the corpus, the labelled pool (and its tiles) and the test volumes into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = corpus_parameters(settings.corpus_volumes)
    corpus = []
    for i, values in enumerate(parameters):
        raw, _ = synthetic_em_volume(settings.corpus_shape, **values)
        corpus.append(_save(folder / f"corpus_{i:02d}.npy", raw))
    raw, labels = synthetic_em_volume(settings.pool_shape, seed=POOL_SEED)
    pool = _save_labelled(folder, "pool", raw, labels)
    tiles = [
        _save_labelled(folder, f"tile_{i:03d}", raw[region], labels[region])
        for i, region in enumerate(_tiles(settings.pool_shape, settings.labelled_crop))
    ]
    tests = []
    for j in range(settings.test_volumes):
        raw, labels = synthetic_em_volume(settings.test_shape, seed=TEST_SEED + j)
        tests.append(_save_labelled(folder, f"test_{j}", raw, labels))
    _logger.info(
        "demo data: %d corpus volumes %s, a labelled pool %s in %d crops %s, %d test volumes %s",
        len(corpus),
        settings.corpus_shape,
        settings.pool_shape,
        len(tiles),
        settings.labelled_crop,
        len(tests),
        settings.test_shape,
    )
    return DemoData(corpus, parameters, tiles, tests, pool)
