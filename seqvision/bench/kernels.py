"""Time and peak memory of seqvision's operators: every PyTorch form on the CPU, Triton on CUDA.

Behind ``seqvision bench kernels`` and ``benchmarks/kernels_cpu.py``.

CPU (``run_cpu``): linear_attention with a per-head (retention) decay, B=1, H=6, Dk=Dv=64, in its
recurrent, parallel and chunk forms; selective_scan with B=1, D=256, N=16, input-dependent B and C,
D skip, z gate, softplus, in its recurrent and chunk forms. Forward pass under ``torch.no_grad``,
float32. Each measurement runs in a fresh process: after the inputs exist the peak-RSS counter is
reset (``/proc/self/clear_refs``) and the peak above that baseline is what the operator itself
allocated. Time is the median of ``repeats`` runs after one warm-up run (a single run when it takes
over 5 s). Ratios are taken against the recurrent (and the parallel) form measured in the same run.

CUDA (``run_gpu``): the correctness checks and the timing of ``benchmarks/kernels_gpu.py`` (Triton
kernels against their memory floor, the bytes they must move at the copy bandwidth measured in the
same run, and against flash-linear-attention / mamba-ssm where they import, with issue 19's targets
marked met or missed), loaded from the source tree this package belongs to; its logic is not repeated
here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from seqvision.bench.measure import (
    agg_pyplot,
    markdown_table,
    median_time,
    memory_kib,
    reset_peak_memory,
    run_in_fresh_process,
    timed_call,
)
from seqvision.utils.io import save_figure_atomic, write_csv_atomic

__all__ = [
    "FORMS",
    "GPU_SCRIPT",
    "KernelsReport",
    "bench_kernels",
    "bench_kernels_cpu",
    "bench_kernels_gpu",
    "cpu_header",
    "cpu_targets",
    "format_checks",
    "format_cpu_table",
    "format_gpu_table",
    "format_kernels_report",
    "gpu_targets",
    "gpu_unavailable",
    "load_gpu_script",
    "make_inputs",
    "measure_form",
    "plot_cpu",
    "plot_gpu",
    "resolve_kernels_device",
    "run_cpu",
    "run_gpu",
]

FORMS = {"linear_attention": ("recurrent", "parallel", "chunk"), "selective_scan": ("recurrent", "chunk")}
# The GPU benchmark is a script of the source tree (benchmarks/ is not installed with the package).
GPU_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_gpu.py"


# ------------------------------------------------------------------------------------------------
# CPU: every form, fresh process per measurement
# ------------------------------------------------------------------------------------------------


def make_inputs(op: str, L: int, seed: int = 0) -> tuple[tuple, dict]:
    """Positional and keyword arguments of one ``op`` call on a sequence of length ``L``."""
    g = torch.Generator().manual_seed(seed)
    if op == "linear_attention":
        H, D = 6, 64
        q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
        gamma = 1 - torch.exp(torch.linspace(torch.tensor(1 / 32).log(), torch.tensor(1 / 512).log(), H))
        return (q, k, v, gamma.log()), {}
    D, N = 256, 16
    u, z = torch.randn(1, D, L, generator=g), torch.randn(1, D, L, generator=g)
    delta = torch.randn(1, D, L, generator=g) - 2  # softplus(delta) ~ 0.13, a typical Mamba step
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(D, 1)  # S4D-real initialisation
    B, C = torch.randn(1, N, L, generator=g), torch.randn(1, N, L, generator=g)
    return (u, delta, A, B, C), {"D": torch.ones(D), "z": z, "delta_softplus": True}


def measure_form(op: str, form: str, L: int, repeats: int, threads: int | None = None) -> dict:
    """Run in a child process: peak memory of one call, then the median time of ``repeats`` calls."""
    import seqvision.kernels as K

    if threads is not None:
        torch.set_num_threads(threads)
    fn = getattr(K, op)
    args, kwargs = make_inputs(op, L)
    kwargs["form"] = form
    with torch.no_grad():
        baseline = reset_peak_memory()  # the inputs exist: only the operator's allocations count
        out, first = timed_call(fn, *args, **kwargs)
        peak, _ = memory_kib()
        del out
        time_s = median_time(lambda: fn(*args, **kwargs), repeats, first)
    return {
        "op": op,
        "form": form,
        "L": L,
        "time_s": time_s,
        "peak_mib": (peak - baseline) / 1024,
    }


def run_cpu(
    ops: Sequence[str],
    lengths: Sequence[int],
    repeats: int,
    threads: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Measure every form of every op at every length (each in a fresh process); add the ratio columns."""
    from tqdm import tqdm

    cases = [(op, form, L) for op in ops for L in lengths for form in FORMS[op]]
    results = [
        run_in_fresh_process(measure_form, op, form, L, repeats, threads)
        for op, form, L in tqdm(cases, desc="kernels", unit="case", disable=not progress)
    ]
    by_key = {(r["op"], r["form"], r["L"]): r for r in results}
    for r in results:
        rec = by_key[(r["op"], "recurrent", r["L"])]
        r["speedup_vs_recurrent"] = rec["time_s"] / r["time_s"]
        r["memory_vs_recurrent"] = r["peak_mib"] / max(rec["peak_mib"], 1e-9)
        par = by_key.get((r["op"], "parallel", r["L"]))
        r["memory_vs_parallel"] = r["peak_mib"] / par["peak_mib"] if par else float("nan")
    return results


def format_cpu_table(results: Sequence[dict]) -> str:
    """The markdown table of ``run_cpu``'s rows: each form against the recurrent and parallel ones."""
    header = (
        "operator",
        "L",
        "form",
        "time ms",
        "speed-up vs rec.",
        "peak MiB",
        "mem vs rec.",
        "mem vs par.",
    )
    rows = []
    for r in results:
        rows.append(
            (
                r["op"],
                str(r["L"]),
                r["form"],
                f"{r['time_s'] * 1e3:.1f}",
                f"{r['speedup_vs_recurrent']:.2f}x",
                f"{r['peak_mib']:.1f}",
                f"{r['memory_vs_recurrent']:.2f}",
                "-"
                if r["memory_vs_parallel"] != r["memory_vs_parallel"]
                else f"{r['memory_vs_parallel']:.3f}",
            )
        )
    return markdown_table(header, rows)


def cpu_targets(results: Sequence[dict]) -> list[str]:
    """``MET`` / ``MISSED`` lines for the CPU targets whose cells were measured."""
    by_key = {(r["op"], r["form"], r["L"]): r for r in results}
    la, ss = "linear_attention", "selective_scan"
    checks = [
        (f"{la} chunk at L=4096 >= 5x faster than recurrent", (la, "chunk", 4096),
         "speedup_vs_recurrent", lambda x: x >= 5, "{:.1f}x"),
        (f"{la} chunk peak memory at L=16384 <= 1/8 of parallel", (la, "chunk", 16384),
         "memory_vs_parallel", lambda x: x <= 1 / 8, "{:.4f} of parallel"),
        (f"{ss} chunk at L=4096 >= 10x faster than recurrent", (ss, "chunk", 4096),
         "speedup_vs_recurrent", lambda x: x >= 10, "{:.1f}x"),
    ]  # fmt: skip
    lines = []
    for name, key, field, ok, fmt in checks:
        if key in by_key:
            value = by_key[key][field]
            lines.append(f"{'MET   ' if ok(value) else 'MISSED'}  {name}: measured {fmt.format(value)}")
    return lines


def plot_cpu(results: Sequence[dict], path: Path, threads: int | None = None) -> None:
    """Time and peak memory of every form against L (log-log), one column per operator."""
    plt = agg_pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, op in enumerate(FORMS):
        if not any(r["op"] == op for r in results):
            axes[0, col].set_visible(False)
            axes[1, col].set_visible(False)
            continue
        for form in FORMS[op]:
            rs = [r for r in results if r["op"] == op and r["form"] == form]
            Ls = [r["L"] for r in rs]
            axes[0, col].loglog(Ls, [r["time_s"] * 1e3 for r in rs], "o-", label=form)
            axes[1, col].loglog(Ls, [max(r["peak_mib"], 1e-2) for r in rs], "o-", label=form)
        axes[0, col].set_title(f"{op}: time (ms)")
        axes[1, col].set_title(f"{op}: peak memory above inputs (MiB)")
        for ax in axes[:, col]:
            ax.set_xlabel("sequence length L")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    threads = threads or torch.get_num_threads()
    fig.suptitle(f"seqvision kernels on CPU ({threads} threads, float32, forward)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# CUDA: benchmarks/kernels_gpu.py
# ------------------------------------------------------------------------------------------------


@functools.cache
def load_gpu_script(path: Path = GPU_SCRIPT) -> ModuleType:
    """Import ``benchmarks/kernels_gpu.py`` (its check, timing and table functions) as a module.

    Raises FileNotFoundError where the package is not run from a source tree that has the script.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the GPU kernel benchmark is a script of seqvision's source tree (benchmarks/ is "
            "not installed with the package); run it from a checkout"
        )
    folder = str(path.parent)
    added = folder not in sys.path
    if added:  # the script imports its helpers as `from _measure import ...`, as when run directly
        sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location("_seqvision_bench_kernels_gpu", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # pickling and dataclasses look modules up by name
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("_seqvision_bench_kernels_gpu", None)
        raise
    finally:
        if added:
            sys.path.remove(folder)
    return module


def gpu_unavailable(smoke: bool = False) -> str | None:
    """Why ``run_gpu`` cannot run here, or None: it needs CUDA, or Triton's interpreter with ``smoke``."""
    from seqvision.kernels import triton_interpreted

    if torch.cuda.is_available() and not triton_interpreted():
        return None
    if smoke and triton_interpreted():
        return None
    return (
        "--device cuda: no CUDA device here (torch.cuda.is_available() is False); timing the Triton "
        "kernels needs one (--smoke also runs under TRITON_INTERPRET=1, set before triton is imported)"
    )


def run_gpu(
    lengths: Sequence[int],
    tokens: int,
    *,
    smoke: bool = False,
    check: bool = True,
    head_dims: Sequence[int] | None = None,
    reference: bool = False,
    on_length=None,
) -> tuple[list[dict], list[dict], str]:
    """The correctness rows (``check``), the timing rows and the device name, from kernels_gpu.py.

    On CUDA it times at ``lengths`` with batch x L = ``tokens``, linear_attention at ``head_dims``
    (default 64 and 128), and with ``reference`` the PyTorch chunk forms too; ``on_length`` gets the
    rows so far after each length. Without CUDA it runs only under Triton's interpreter
    (TRITON_INTERPRET=1 before triton is imported), and then only the ``smoke`` timing: tiny shapes
    whose numbers mean nothing, to prove the code runs.
    """
    from seqvision.kernels import triton_interpreted

    reason = gpu_unavailable(smoke)
    if reason:
        raise RuntimeError(reason)
    script = load_gpu_script()
    cuda = torch.cuda.is_available() and not triton_interpreted()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    checks = script.check(device) if check else []
    if smoke:  # the same tiny shapes as `kernels_gpu.py --smoke`
        lengths, tokens, head_dims = [16, 40], 40, None
    timings = script.time_kernels(
        list(lengths), tokens, device, small=smoke, head_dims=head_dims, reference=reference,
        on_length=on_length,
    )  # fmt: skip
    return checks, timings, name


def format_gpu_table(timings: Sequence[dict]) -> str:
    """kernels_gpu.py's table: fwd and fwd+bwd ms, the fractions of the memory floor, the peer, the
    issue's target per row (met / missed), and the copy bandwidth the floor divides by."""
    return load_gpu_script()._format_timings(list(timings))


def gpu_targets(timings: Sequence[dict]) -> list[str]:
    """kernels_gpu.py's summary: one MET / MISSED / NOT MEASURED line per target of issue 19."""
    return load_gpu_script().target_summary(list(timings))


def format_checks(checks: Sequence[dict]) -> str:
    """The correctness rows as a markdown table and a count of those within tolerance."""
    return load_gpu_script().format_checks(list(checks))


def plot_gpu(timings: Sequence[dict], path: Path, device_name: str) -> None:
    """fwd+bwd time against L per operator: each Triton variant (solid), its memory floor (dashed)
    and its peer kernel where one ran (dotted)."""
    plt = agg_pyplot()
    timings = [r for r in timings if r["status"] == "ok"]
    ops = list(dict.fromkeys(r["op"] for r in timings))
    cols = 2
    n_rows = max(1, math.ceil(len(ops) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(12, 4.5 * n_rows), squeeze=False)
    for ax, op in zip(axes.flat, ops, strict=False):
        for variant in dict.fromkeys(r["variant"] for r in timings if r["op"] == op):
            rs = sorted(
                (r for r in timings if (r["op"], r["variant"]) == (op, variant)), key=lambda r: r["L"]
            )
            Ls = [r["L"] for r in rs]
            (line,) = ax.loglog(Ls, [r["fwd_bwd_ms"] for r in rs], "o-", label=f"triton {variant}")
            color = line.get_color()
            ax.loglog(Ls, [r["floor_fwd_bwd_ms"] for r in rs], "s--", color=color, label="memory floor")
            peer = [r["peer_fwd_bwd_ms"] for r in rs]
            if not all(math.isnan(p) for p in peer):
                ax.loglog(Ls, peer, "^:", color=color, label=rs[0]["peer"])
            reference = [r["reference_fwd_bwd_ms"] for r in rs]
            if not all(math.isnan(t) for t in reference):
                ax.loglog(Ls, reference, "x-.", color=color, alpha=0.5, label="PyTorch chunk")
        ax.set_title(f"{op}: fwd+bwd ms (batch x L constant)")
        ax.set_xlabel("sequence length L")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops) :]:
        ax.set_visible(False)
    fig.suptitle(f"seqvision Triton kernels on {device_name}")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


def bench_kernels_cpu(
    ops: Sequence[str], lengths: Sequence[int], repeats: int, out: Path, threads: int | None = None
) -> tuple[list[dict], dict[str, Path]]:
    """``run_cpu`` and its CSV + PNG (``kernels_cpu.csv`` / ``.png`` under ``out``, atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_cpu(ops, lengths, repeats, threads)
    files = {"csv": out / "kernels_cpu.csv", "png": out / "kernels_cpu.png"}
    write_csv_atomic(results, files["csv"])
    plot_cpu(results, files["png"], threads)
    return results, files


def bench_kernels_gpu(
    lengths: Sequence[int],
    tokens: int,
    out: Path,
    *,
    smoke: bool = False,
    check: bool = True,
    head_dims: Sequence[int] | None = None,
    reference: bool = False,
) -> tuple[list[dict], list[dict], str, dict[str, Path]]:
    """``run_gpu`` and its CSV + PNG (``kernels_gpu.csv`` / ``.png`` under ``out``, atomically; the
    CSV is rewritten after every length, so a run cut short keeps what it measured)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "kernels_gpu.csv", "png": out / "kernels_gpu.png"}
    checks, timings, name = run_gpu(
        lengths, tokens, smoke=smoke, check=check, head_dims=head_dims, reference=reference,
        on_length=lambda rows: write_csv_atomic(rows, files["csv"]),
    )  # fmt: skip
    write_csv_atomic(timings, files["csv"])
    plot_gpu(timings, files["png"], name)
    if checks:
        files["checks_csv"] = out / "kernels_gpu_checks.csv"
        write_csv_atomic(checks, files["checks_csv"])
    return checks, timings, name, files


def cpu_header(threads: int | None = None) -> str:
    """The line printed above the CPU table: versions, threads, CPUs."""
    threads = threads or torch.get_num_threads()
    return f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, float32, no_grad"


@dataclass
class KernelsReport:
    """What ``bench_kernels`` measured and wrote (CPU: ``cpu_rows``; CUDA: ``checks`` and ``gpu_rows``)."""

    device: str
    device_name: str
    files: dict[str, Path]
    threads: int | None = None
    cpu_rows: list[dict] = dataclasses.field(default_factory=list)
    checks: list[dict] = dataclasses.field(default_factory=list)
    gpu_rows: list[dict] = dataclasses.field(default_factory=list)

    @property
    def failed_checks(self) -> int:
        return sum(not row["ok"] for row in self.checks)


def resolve_kernels_device(device: str, smoke: bool = False) -> str:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` to the device ``bench_kernels`` runs on; ValueError where
    that device cannot run it (no CUDA, or no peak-RSS counter on the CPU)."""
    from seqvision.bench.measure import peak_memory_supported

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        reason = gpu_unavailable(smoke)
        if reason:
            raise ValueError(reason)
    elif device == "cpu":
        if not peak_memory_supported():
            raise ValueError("peak memory is read from /proc/self (Linux only)")
    else:
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return device


def bench_kernels(
    device: str,
    out: Path,
    *,
    ops: Sequence[str] = tuple(FORMS),
    lengths: Sequence[int] | None = None,
    repeats: int = 3,
    threads: int | None = None,
    tokens: int = 65536,
    smoke: bool = False,
    check: bool = True,
    head_dims: Sequence[int] | None = None,
    reference: bool = False,
) -> KernelsReport:
    """The CPU forms (``device="cpu"``) or the Triton kernels (``"cuda"``), with their CSV and PNG.

    ``lengths`` default to 1024, 4096, 16384 (CPU) and 256, 1024, ..., 65536 (CUDA); ``head_dims``
    (CUDA, linear_attention) to 64 and 128; ``reference`` (CUDA) adds the PyTorch chunk forms' times.
    ``smoke``: 64 and 128 with one repeat on the CPU, kernels_gpu.py's tiny shapes without the checks
    on CUDA.
    """
    if device == "cuda":
        lengths = lengths or [256, 1024, 4096, 16384, 65536]
        checks, timings, name, files = bench_kernels_gpu(
            lengths, tokens, out, smoke=smoke, check=check and not smoke, head_dims=head_dims,
            reference=reference,
        )  # fmt: skip
        return KernelsReport("cuda", name, files, checks=checks, gpu_rows=timings)
    from seqvision.bench.measure import cpu_name

    lengths, repeats = ([64, 128], 1) if smoke else (lengths or [1024, 4096, 16384], repeats)
    rows, files = bench_kernels_cpu(ops, lengths, repeats, out, threads)
    return KernelsReport("cpu", cpu_name(), files, threads=threads, cpu_rows=rows)


def format_kernels_report(report: KernelsReport) -> str:
    """Everything ``seqvision bench kernels`` prints: versions, the ratio table, targets, files."""
    if report.device == "cuda":
        lines = [f"torch {torch.__version__}, device {report.device_name}"]
        if report.checks:
            lines.append(format_checks(report.checks))
        lines.append(format_gpu_table(report.gpu_rows))
        lines += ["targets (issue 19):", *gpu_targets(report.gpu_rows)]
    else:
        lines = [f"{report.device_name}: " + cpu_header(report.threads), format_cpu_table(report.cpu_rows)]
        lines += cpu_targets(report.cpu_rows)
    lines += [f"wrote {path}" for path in report.files.values()]
    return "\n".join(lines)
