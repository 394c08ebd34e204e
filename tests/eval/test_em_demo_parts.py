"""The demo's pieces on their own: settings checks, the data's seeds and budgets, the statistics."""

import math

import numpy as np
import pytest
from scipy import stats

from seqvision.eval.em.demo import DEFAULT, FULL, QUICK
from seqvision.eval.em.demo.data import budget_tiles, corpus_parameters
from seqvision.eval.em.demo.stats import paired_difference, spread, verdict


def test_shipped_settings_hold_their_promises():
    for settings in (QUICK, DEFAULT, FULL):
        assert settings.budgets[-1] <= settings.n_tiles
    corpus = DEFAULT.corpus_volumes * math.prod(DEFAULT.corpus_shape)
    largest_labelled = DEFAULT.budgets[-1] * math.prod(DEFAULT.labelled_crop)
    assert corpus > largest_labelled  # more unlabelled voxels than any fine-tuning set
    assert DEFAULT.n_runs == 18 and len(DEFAULT.seeds) >= 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budgets": (4, 1)}, "budgets must be ascending"),
        ({"budgets": (1, 99)}, "exceeds the 32 labelled crops"),
        ({"seeds": (0, 0)}, "seeds must be distinct"),
        ({"labelled_crop": (16, 16, 16)}, "must hold a fine-tuning crop"),
        ({"pool_shape": (32, 250, 256)}, "must be a whole grid"),
        ({"test_shape": (32, 120, 128)}, "test_shape must be three positive ints"),
        ({"finetune_steps": 0}, "finetune_steps"),
        ({"thresholds": (1.5,)}, "thresholds"),
    ],
)
def test_bad_settings_name_the_argument(change, message):
    import dataclasses

    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DEFAULT, **change)


def test_budgets_are_nested_per_seed_and_differ_between_seeds():
    for seed in range(5):
        previous: set[int] = set()
        for budget in (1, 4, 16, 32):
            tiles = set(budget_tiles(32, budget, seed))
            assert len(tiles) == budget and previous <= tiles
            previous = tiles
    assert len({tuple(budget_tiles(32, 4, seed)) for seed in range(5)}) > 1
    with pytest.raises(ValueError, match=r"budget must be in \[1, 32\]"):
        budget_tiles(32, 33, 0)


def test_corpus_parameters_vary_reproducibly_around_the_defaults():
    parameters = corpus_parameters(8)
    assert parameters == corpus_parameters(8)
    assert len({p["seed"] for p in parameters}) == 8
    cells = [p["cell_size_nm"] for p in parameters]
    assert min(cells) >= 200 and max(cells) <= 450 and max(cells) - min(cells) > 50
    assert all(0 <= p["missing_sections"] <= 2 and 10 <= p["membrane_width_nm"] <= 24 for p in parameters)


def test_paired_difference_is_the_t_interval_of_the_differences():
    a, b = [1.0, 2.5, 3.0, 0.5], [0.5, 0.5, 1.0, 1.0]
    d = np.subtract(a, b)
    result = paired_difference(a, b)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert result.mean == pytest.approx(d.mean()) and result.sd == pytest.approx(d.std(ddof=1))
    assert (result.ci_low, result.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert result.n == 4 and result.a_lower == 1
    one = paired_difference([1.0], [2.0])
    assert one.mean == -1 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    with pytest.raises(ValueError, match="paired"):
        paired_difference([1.0, 2.0], [1.0])


def test_verdict_needs_the_whole_interval_on_one_side():
    assert verdict(paired_difference([0.1, 0.2, 0.15], [0.5, 0.6, 0.55])) == "helped"
    assert verdict(paired_difference([0.5, 0.6, 0.55], [0.1, 0.2, 0.15])) == "hurt"
    assert verdict(paired_difference([0.1, 0.9, 0.5], [0.5, 0.5, 0.5])) == "no detectable difference"
    assert verdict(paired_difference([0.1], [0.5])) == "no detectable difference"  # one seed: no interval


def test_spread():
    s = spread([1.0, 2.0, 4.0])
    assert (s.mean, s.low, s.high, s.n) == (pytest.approx(7 / 3), 1.0, 4.0, 3)
    assert s.sd == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert math.isnan(spread([3.0]).sd)
