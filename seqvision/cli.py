"""``seqvision <command>``: thin entry points that parse arguments and call one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _check(args: argparse.Namespace) -> int:
    from seqvision.kernels.check import run_checks

    rows = run_checks(dtype=_DTYPES[args.dtype], seed=args.seed)
    header = ("operator", "case", "form", "rel. error", "tolerance", "ms", "")
    table = [header] + [
        (
            r.operator,
            r.case,
            r.form,
            f"{r.rel_error:.2e}",
            f"{r.tolerance:.0e}",
            f"{r.milliseconds:.1f}",
            "ok" if r.ok else "FAIL",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not r.ok for r in rows)
    lines.append(
        f"\n{len(rows) - failed} of {len(rows)} checks within tolerance ({args.dtype}, seed {args.seed})"
    )
    print("\n".join(lines))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqvision", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="compare every form of every operator with its recurrent form")
    check.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
