"""``seqvision check``: every form of every operator against its recurrent form."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .common import format_table

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def check(args: argparse.Namespace) -> int:
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
    failed = sum(not r.ok for r in rows)
    print(format_table(table))
    print(f"\n{len(rows) - failed} of {len(rows)} checks within tolerance ({args.dtype}, seed {args.seed})")
    return 1 if failed else 0


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser("check", help="compare every form of every operator with its recurrent form")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=check)
