"""Summaries over seeds: mean and spread, and the paired comparison pretrained - scratch with a t interval.

Both initialisations of a seed share the labelled crops, the decoder's initial weights and the data
order, so their difference isolates the encoder's initialisation: the comparison is paired, and
its interval comes from the spread of the per-seed differences (Student's t with n - 1 degrees of
freedom), not from the spread of either arm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from seqvision.utils.extras import require

student_t = require("scipy.stats", "em", "the demo's confidence intervals").t

__all__ = ["PairedDifference", "Spread", "paired_difference", "spread", "verdict"]


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (n - 1; NaN for one value), minimum and maximum of n values."""

    mean: float
    sd: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def spread(values: Sequence[float]) -> Spread:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("spread needs at least one value")
    sd = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return Spread(float(array.mean()), sd, float(array.min()), float(array.max()), int(array.size))


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over paired values: its mean, sd, confidence interval and how often ``a < b``."""

    mean: float
    sd: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    a_lower: int  # pairs where a < b (lower is better for VOI and ARAND)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """The mean of ``a_i - b_i`` with its two-sided Student-t interval (NaN bounds for n = 1)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"a and b must be paired 1-D sequences of equal length, got shapes {a.shape} and {b.shape}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    difference = a - b
    n = difference.size
    mean = float(difference.mean())
    if n > 1:
        sd = float(difference.std(ddof=1))
        half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    else:
        sd = half = math.nan
    return PairedDifference(mean, sd, mean - half, mean + half, confidence, n, int((difference < 0).sum()))


def verdict(difference: PairedDifference) -> str:
    """'helped', 'hurt' or 'no detectable difference' for a difference pretrained - scratch of a
    lower-is-better score: helped when the whole interval is below 0, hurt when above."""
    if difference.ci_high < 0:
        return "helped"
    if difference.ci_low > 0:
        return "hurt"
    return "no detectable difference"
