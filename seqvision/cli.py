"""``seqvision <command>``: thin entry points that parse arguments and call one library function."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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


def _synth_em(args: argparse.Namespace) -> int:
    from seqvision.pretrain import synthetic_em_volume, write_cremi

    output = Path(args.output)
    if not output.parent.is_dir():
        print(f"seqvision synth-em: {output.parent}: no such folder", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        raw, labels = synthetic_em_volume(
            tuple(args.shape),
            seed=args.seed,
            voxel_size=tuple(args.voxel_size),
            missing_sections=args.missing_sections,
            progress=True,
        )
    except ValueError as err:
        print(f"seqvision synth-em: {err}", file=sys.stderr)
        return 2
    write_cremi(output, raw, labels, resolution=tuple(args.voxel_size))
    blank = sum(int(section.min() == section.max()) for section in raw)
    print(
        f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s: "
        f"raw {'x'.join(map(str, raw.shape))} uint8 at {'x'.join(f'{v:g}' for v in args.voxel_size)} nm, "
        f"{int(labels.max())} neuron ids, missing sections: {blank} (seed {args.seed})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqvision", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="compare every form of every operator with its recurrent form")
    check.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=_check)
    synth = commands.add_parser(
        "synth-em", help="write a synthetic EM volume with its neuron ids as a CREMI-layout HDF5 file"
    )
    synth.add_argument("output", help="the .h5 file to write (replaced atomically if it exists)")
    synth.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=[32, 256, 256])
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), default=[40.0, 4.0, 4.0], help="in nm"
    )
    synth.add_argument(
        "--missing-sections", type=int, default=None, help="sections to blank (default: one per 32)"
    )
    synth.set_defaults(run=_synth_em)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
