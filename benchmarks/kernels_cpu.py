"""Time and peak memory of every form of linear_attention and selective_scan on the CPU.

    python benchmarks/kernels_cpu.py [--ops linear_attention selective_scan] [--lengths 1024 4096 16384]
                                     [--repeats 3] [--out benchmarks/out]

The measurement is ``seqvision.bench.kernels`` (also behind ``seqvision bench kernels``).
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
import sys
from pathlib import Path

from _measure import peak_memory_supported

from seqvision.bench.kernels import FORMS, bench_kernels_cpu, cpu_header, cpu_targets, format_cpu_table


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

    results, files = bench_kernels_cpu(args.ops, args.lengths, args.repeats, args.out)
    print(cpu_header())
    print(format_cpu_table(results))
    print("\n".join(cpu_targets(results)))
    print(f"wrote {files['csv']} and {files['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
