"""Time and peak memory of every form of linear_attention and selective_scan on the CPU.

    python benchmarks/kernels_cpu.py [--ops linear_attention selective_scan] [--lengths 1024 4096 16384]
                                     [--repeats 3] [--out benchmarks/out]

linear_attention: per-head (retention) decay, B=1, H=6, Dk=Dv=64. selective_scan: B=1, D=256, N=16,
input-dependent B and C, D skip, z gate, softplus. Forward pass under torch.no_grad, float32.

Each measurement runs in a fresh process: after the inputs exist, the peak-RSS counter is reset
(/proc/self/clear_refs) and the peak above that baseline is what the operator itself allocated.
Time is the median of ``--repeats`` runs after one warm-up run (a single run when it takes over
5 s). Ratios are taken against the recurrent form measured in the same run. Writes
``kernels_cpu.csv`` and ``kernels_cpu.png`` to ``--out`` and prints the table and the targets.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from _measure import (
    agg_pyplot,
    markdown_table,
    median_time,
    memory_kib,
    peak_memory_supported,
    reset_peak_memory,
    run_in_fresh_process,
    save_figure_atomic,
    timed_call,
    write_csv_atomic,
)
from tqdm import tqdm

FORMS = {"linear_attention": ("recurrent", "parallel", "chunk"), "selective_scan": ("recurrent", "chunk")}


def make_inputs(op: str, L: int, seed: int = 0):
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


def measure(op: str, form: str, L: int, repeats: int) -> dict:
    """Run in a child process: peak memory of one call, then the median time of ``repeats`` calls."""
    import seqvision.kernels as K

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


def run_all(ops: list[str], lengths: list[int], repeats: int) -> list[dict]:
    cases = [(op, form, L) for op in ops for L in lengths for form in FORMS[op]]
    results = [
        run_in_fresh_process(measure, op, form, L, repeats)
        for op, form, L in tqdm(cases, desc="kernels", unit="case")
    ]
    by_key = {(r["op"], r["form"], r["L"]): r for r in results}
    for r in results:
        rec = by_key[(r["op"], "recurrent", r["L"])]
        r["speedup_vs_recurrent"] = rec["time_s"] / r["time_s"]
        r["memory_vs_recurrent"] = r["peak_mib"] / max(rec["peak_mib"], 1e-9)
        par = by_key.get((r["op"], "parallel", r["L"]))
        r["memory_vs_parallel"] = r["peak_mib"] / par["peak_mib"] if par else float("nan")
    return results


def format_table(results: list[dict]) -> str:
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


def targets(results: list[dict]) -> list[str]:
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


def plot(results: list[dict], path: Path) -> None:
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
    fig.suptitle(f"seqvision kernels on CPU ({torch.get_num_threads()} threads, float32, forward)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", nargs="+", choices=list(FORMS), default=list(FORMS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    if not peak_memory_supported():
        parser.error("peak memory is read from /proc/self (Linux only)")
    args.out.mkdir(parents=True, exist_ok=True)

    results = run_all(args.ops, args.lengths, args.repeats)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, float32, no_grad")
    print(format_table(results))
    print("\n".join(targets(results)))
    write_csv_atomic(results, args.out / "kernels_cpu.csv")
    plot(results, args.out / "kernels_cpu.png")
    print(f"wrote {args.out / 'kernels_cpu.csv'} and {args.out / 'kernels_cpu.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
