"""Measurement helpers shared by the benchmarks: fresh-process peak memory, timing, tables, files.

Peak memory on the CPU is the peak resident set size (RSS) of the process, read from
``/proc/self/status``, above a baseline taken right after the peak counter is reset through
``/proc/self/clear_refs`` (Linux only). A measurement resets the counter once its inputs (and model)
exist, so the peak above the baseline is what the measured call itself allocated. Because RSS only
ever counts one process, every measurement runs in a fresh process (``run_in_fresh_process``):
memory kept by the allocator or by caches from an earlier measurement cannot hide or inflate the
next one.

The scripts in ``benchmarks/`` import these helpers through ``benchmarks/_measure.py``, which
re-exports them (and puts the checkout on ``sys.path`` first).
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import re
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from seqvision.utils.extras import require
from seqvision.utils.machine import cpu_name

__all__ = [
    "CLEAR_REFS",
    "FRESH_PROCESS_PRELOAD",
    "SLOW_CALL_S",
    "agg_pyplot",
    "cpu_busy_fraction",
    "cpu_name",
    "markdown_table",
    "median_time",
    "memory_kib",
    "peak_memory_supported",
    "reset_peak_memory",
    "run_in_fresh_process",
    "timed_call",
]

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
# A call slower than this is timed once: repeating it would not make its time more exact, only the
# sweep longer.
SLOW_CALL_S = 5.0
# Modules the template process of ``run_in_fresh_process`` imports once (see there). Only third-party
# libraries: seqvision itself is imported by each child, after it took the parent's sys.path, so a
# benchmark measures the seqvision its parent sees (a checkout, not another installed copy).
FRESH_PROCESS_PRELOAD = ("torch", "timm")


def peak_memory_supported() -> bool:
    """Whether this system lets a process reset and read its peak RSS (Linux ``/proc``)."""
    return CLEAR_REFS.exists() and STATUS.exists()


def memory_kib() -> tuple[int, int]:
    """Return ``(peak, current)`` resident set size of this process in KiB (VmHWM, VmRSS)."""
    status = STATUS.read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmHWM", "VmRSS"))


def reset_peak_memory() -> int:
    """Reset the peak-RSS counter to the current RSS and return that RSS (KiB), the baseline.

    Garbage is collected first so that objects already unreachable do not count in the baseline
    and then get freed during the measured call, which would hide part of its allocations.
    """
    gc.collect()
    CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS (see proc(5))
    return memory_kib()[1]


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot (Linux ``/proc/stat``), or None elsewhere.

    Busy is everything but idle and I/O wait; guest time is already inside user time.
    """
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def cpu_busy_fraction(interval_s: float = 0.5) -> float:
    """Fraction of all CPUs' time spent busy (not idle or waiting on I/O) over the next ``interval_s``
    (NaN where ``cpu_ticks`` is unknown).

    Called while the benchmark itself is idle, it tells how much other processes use the CPUs.
    That matters more than it seems: PyTorch's OpenMP threads wait for each other at the end of
    every parallel region, so one busy core can slow a 2-thread forward pass several times over.
    """
    before = cpu_ticks()
    time.sleep(interval_s)
    after = cpu_ticks()
    if before is None or after is None:
        return math.nan
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def timed_call(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
    """Call ``fn(*args, **kwargs)`` once and return its result and its wall time in seconds."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int, first_s: float, slow_s: float = SLOW_CALL_S) -> float:
    """Median wall time of ``repeats`` calls of ``fn()``, after a first (warm-up) call that took ``first_s``.

    When the first call took ``slow_s`` seconds or more it is the measurement: warm-up effects are
    small against a call that long, and repeating it would multiply the length of the sweep.
    """
    if first_s >= slow_s:
        return first_s
    times = []
    for _ in range(repeats):
        _, seconds = timed_call(fn)
        times.append(seconds)
    return statistics.median(times)


def fresh_process_context() -> multiprocessing.context.BaseContext:
    """The ``forkserver`` context with torch and timm preloaded, or ``spawn`` where forkserver is missing."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Takes effect when the fork server starts (the first call); a server already running keeps its list.
    context.set_forkserver_preload(list(FRESH_PROCESS_PRELOAD))
    return context


def run_in_fresh_process(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run ``fn(*args, **kwargs)`` in a new process and return its result.

    The process is forked from a template (multiprocessing's fork server) that was started from
    scratch and has imported ``FRESH_PROCESS_PRELOAD`` and nothing else: every call starts without
    the parent's heap, threads and caches, as a ``spawn``-ed process would, but without paying the
    seconds of importing torch and timm again. ``fn`` is pickled by reference, so it must be a
    top-level function of an importable module; a function of the script being run works too, as
    the child re-imports the script under the name ``__mp_main__``.

    A child that dies (killed by the kernel when memory runs out) raises
    ``concurrent.futures.process.BrokenProcessPool``.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=fresh_process_context()) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Format string cells as a markdown table whose columns are padded to a common width."""
    rows = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def agg_pyplot():
    """Return ``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    matplotlib = require("matplotlib", "bench", "the benchmark plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
