"""Self-check: every form of every operator against its recurrent form on fresh random inputs.

``seqvision check`` prints the rows this module produces. It is the quickest way to see on a new
machine (or a new backend) that the operators agree with their ground truth.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .linear_attention import linear_attention
from .linear_recurrence import linear_recurrence
from .scan_orders import ORDERS, cross_merge, cross_scan, flatten, unflatten
from .selective_scan import selective_scan

# Largest relative error accepted per dtype: float64 should agree to rounding; float32 loses digits
# in long sums of decayed terms, so it gets a looser bound.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass(frozen=True)
class CheckResult:
    operator: str
    case: str
    form: str
    rel_error: float
    tolerance: float
    milliseconds: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """max |x - reference| / max |reference| (absolute error when the reference is all zero)."""
    scale = reference.abs().max().item()
    return (x - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def run_checks(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[CheckResult]:
    """Compare every form with the recurrent one; returns one row per (operator, case, form)."""
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be one of {tuple(TOLERANCE)}, got {dtype}")
    generator = torch.Generator().manual_seed(seed)
    return [
        *_linear_attention_rows(dtype, generator),
        *_selective_scan_rows(dtype, generator),
        *_linear_recurrence_rows(dtype, generator),
        *_scan_order_rows(dtype, generator),
    ]


def _timed(fn: Callable, *args, **kwargs) -> tuple:
    """Call ``fn(*args, **kwargs)``; return its result and the wall time in milliseconds."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1e3


def _linear_attention_rows(dtype, generator) -> Iterator[CheckResult]:
    B, H, L, Dk, Dv = 2, 3, 67, 16, 8
    q, k, v = (torch.randn(B, H, L, d, dtype=dtype, generator=generator) for d in (Dk, Dk, Dv))
    decays = {
        "no decay": None,
        "per-head constant": -torch.rand(H, dtype=dtype, generator=generator),
        "per-head data-dependent": -3 * torch.rand(B, H, L, dtype=dtype, generator=generator),
        "per-key data-dependent": -3 * torch.rand(B, H, L, Dk, dtype=dtype, generator=generator),
    }
    tol = TOLERANCE[dtype]
    for name, log_decay in decays.items():
        for causal in (True, False):
            case = f"{name}, {'causal' if causal else 'non-causal'}"
            reference, ms = _timed(linear_attention, q, k, v, log_decay, causal=causal, form="recurrent")
            yield CheckResult("linear_attention", case, "recurrent", 0.0, tol, ms)
            for form in ("parallel", "chunk"):
                out, ms = _timed(
                    linear_attention, q, k, v, log_decay, causal=causal, form=form, chunk_size=16
                )
                yield CheckResult("linear_attention", case, form, relative_error(out, reference), tol, ms)
        whole = linear_attention(q, k, v, log_decay, form="recurrent")
        streamed, ms = _timed(_streamed, q, k, v, log_decay)
        case = f"{name}, streamed in 3 pieces"
        yield CheckResult("linear_attention", case, "chunk", relative_error(streamed, whole), tol, ms)


def _streamed(q, k, v, log_decay, cuts=(10, 41)) -> torch.Tensor:
    """Run the chunk form piece by piece, carrying the state between pieces."""
    outputs, state = [], None
    bounds = (0, *cuts, q.shape[2])
    for start, stop in itertools.pairwise(bounds):
        piece = slice(start, stop)
        decay = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, :, piece]
        o, state = linear_attention(
            q[:, :, piece],
            k[:, :, piece],
            v[:, :, piece],
            decay,
            initial_state=state,
            output_final_state=True,
        )
        outputs.append(o)
    return torch.cat(outputs, dim=2)


def _selective_scan_rows(dtype, generator) -> Iterator[CheckResult]:
    batch, D, L, N, G = 2, 8, 67, 4, 2

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=generator)

    u, delta, z = randn(batch, D, L), randn(batch, D, L), randn(batch, D, L)
    A = -5 * torch.rand(D, N, dtype=dtype, generator=generator)
    skip, bias = randn(D), randn(D)
    variants = {
        "fixed B, C": (randn(D, N), randn(D, N)),
        "input-dependent B, C": (randn(batch, N, L), randn(batch, N, L)),
        f"grouped B, C (G={G})": (randn(batch, G, N, L), randn(batch, G, N, L)),
    }
    tol = TOLERANCE[dtype]
    for name, (B, C) in variants.items():
        kwargs = dict(D=skip, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
        (reference, last), ms = _timed(selective_scan, u, delta, A, B, C, **kwargs, form="recurrent")
        yield CheckResult("selective_scan", name, "recurrent", 0.0, tol, ms)
        (out, out_last), ms = _timed(selective_scan, u, delta, A, B, C, **kwargs, chunk_size=16)
        error = max(relative_error(out, reference), relative_error(out_last, last))
        yield CheckResult("selective_scan", name, "chunk", error, tol, ms)


def _linear_recurrence_rows(dtype, generator) -> Iterator[CheckResult]:
    x = torch.randn(2, 5, 67, 3, dtype=dtype, generator=generator)
    gates = {
        "constant gate per line": -torch.rand(1, 5, 1, 3, dtype=dtype, generator=generator),
        "gate per step": -3 * torch.rand(2, 5, 67, 3, dtype=dtype, generator=generator),
    }
    tol = TOLERANCE[dtype]
    for name, log_a in gates.items():
        for reverse in (False, True):
            case = f"{name}, {'reverse' if reverse else 'forward'}"
            reference, ms = _timed(linear_recurrence, x, log_a, 2, reverse, form="recurrent")
            yield CheckResult("linear_recurrence", case, "recurrent", 0.0, tol, ms)
            out, ms = _timed(linear_recurrence, x, log_a, 2, reverse, chunk_size=16)
            yield CheckResult("linear_recurrence", case, "chunk", relative_error(out, reference), tol, ms)


def _round_trip(x: torch.Tensor, order: str) -> torch.Tensor:
    return unflatten(flatten(x, order), x.shape[2:], order)


def _scan_order_rows(dtype, generator) -> Iterator[CheckResult]:
    tol = TOLERANCE[dtype]
    for grid in ((5, 7), (3, 4, 5)):
        x = torch.randn(2, 3, *grid, dtype=dtype, generator=generator)
        for order in ORDERS:
            back, ms = _timed(_round_trip, x, order)
            yield CheckResult(
                "scan_orders", f"{len(grid)}-D round trip", order, relative_error(back, x), tol, ms
            )
        y = torch.randn_like(cross_scan(x))
        scanned, ms = _timed(cross_scan, x)
        lhs, rhs = (scanned * y).sum(), (x * cross_merge(y, grid)).sum()
        error = (lhs - rhs).abs().item() / max(lhs.abs().item(), 1e-300)
        yield CheckResult("scan_orders", f"{len(grid)}-D cross_merge adjoint", "cross_scan", error, tol, ms)
