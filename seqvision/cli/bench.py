"""``seqvision bench models | kernels | digits`` (docs/PERFORMANCE.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from seqvision.utils.checks import positive_int

from .common import csv_list, usage_error


def _mode(text: str) -> str:
    if text not in ("eval", "train"):
        raise ValueError(text)
    return text


def _bench_models(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from seqvision.bench import models

    if args.smoke:
        vars(args).update(models.SMOKE)
    if args.fill_batch and args.batch_sizes:
        return usage_error("bench models", ValueError("--fill-batch and --batch-sizes exclude each other"))
    try:
        device = models.resolve_device(args.device)
        specs = models.resolve_specs(args.models, args.peer, args.chunk_size, args.chunk_tokens)
    except ValueError as err:
        return usage_error("bench models", err)
    max_memory_gib, max_call_s = models.default_limits(device)
    result = models.bench_models(
        specs,
        args.sizes,
        [args.fill_batch] if args.fill_batch else args.batch_sizes or ([1, 32] if device == "cuda" else [1]),
        args.modes,
        args.out,
        peer=specs[0].label,
        device=device,
        repeats=args.repeats,
        threads=args.threads,
        max_memory_gib=args.max_memory_gib or max_memory_gib,
        max_call_s=args.max_call_seconds or max_call_s,
        count_operations=not args.no_flops,
        report=lambda line: tqdm.write(line, file=sys.stderr),
        fill=bool(args.fill_batch),
    )
    print(models.format_report(result))
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    from seqvision.bench import kernels

    try:
        device = kernels.resolve_kernels_device(args.device, args.smoke)
        if device == "cuda":
            kernels.load_gpu_script()  # benchmarks/kernels_gpu.py of the source tree
    except (ValueError, FileNotFoundError) as err:
        return usage_error("bench kernels", err)
    result = kernels.bench_kernels(
        device, args.out, ops=args.ops, lengths=args.lengths, repeats=args.repeats, threads=args.threads,
        tokens=args.tokens, smoke=args.smoke, check=not args.no_check, head_dims=args.head_dims,
        reference=args.reference,
    )  # fmt: skip
    print(kernels.format_kernels_report(result))
    return 1 if result.failed_checks else 0


def _bench_digits(args: argparse.Namespace) -> int:
    from seqvision.bench import digits

    return digits.run_from_args(args)


def add_parsers(commands: Any) -> None:
    """``seqvision bench models`` and ``seqvision bench kernels`` (docs/PERFORMANCE.md)."""
    from seqvision.bench.kernels import FORMS
    from seqvision.bench.models import DEFAULT_MODELS, DEFAULT_PEER

    bench = commands.add_parser("bench", help="benchmarks: backbones against a peer, operator forms")
    which = bench.add_subparsers(dest="benchmark", required=True)
    models = which.add_parser(
        "models",
        help="throughput, peak memory and FLOPs of backbones against a peer model by image size",
        description="Each (model, size, batch, mode) cell runs in a fresh process; the peer is measured "
        "in the same run and every ratio divides by it. Prints a markdown table, writes CSV and PNG. "
        "On the CPU the default batch size is 1 (eval and train): batch 32 at 896 px takes minutes "
        "per call on 2 cores; cells estimated over --max-call-seconds or --max-memory-gib are skipped.",
    )
    models.add_argument(
        "--models", type=csv_list(str, "model names"), default=list(DEFAULT_MODELS), metavar="M1,M2"
    )
    models.add_argument("--peer", default=DEFAULT_PEER, help="the reference model (default: %(default)s)")
    models.add_argument("--sizes", type=csv_list(positive_int, "positive integers"), default=[224, 896])
    models.add_argument(
        "--batch-sizes",
        type=csv_list(positive_int, "positive integers"),
        default=None,
        help="default: 1 on the CPU, 1,32 on CUDA",
    )
    models.add_argument(
        "--fill-batch",
        type=positive_int,
        default=None,
        metavar="START",
        help="instead of --batch-sizes: each cell runs the largest power of two <= START whose memory and "
        "time per call (estimated from the model's smaller cells) fit --max-memory-gib and "
        "--max-call-seconds, halved on out-of-memory; the table gives the batch used",
    )
    models.add_argument("--modes", type=csv_list(_mode, "modes (eval, train)"), default=["eval", "train"])
    models.add_argument("--repeats", type=positive_int, default=3, help="timed calls after the warm-up")
    models.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    models.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    models.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_models"))
    models.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="default: 8 on the CPU (half the available memory if less), 90%% of the GPU's",
    )
    models.add_argument(
        "--max-call-seconds", type=float, default=None, help="default: 120 on the CPU, none on CUDA"
    )
    models.add_argument("--chunk-size", type=positive_int, default=64, help="chunk_size of MODEL:chunk")
    models.add_argument(
        "--chunk-tokens", type=positive_int, default=256, help="chunk_tokens of MODEL:streaming"
    )
    models.add_argument("--no-flops", action="store_true", help="do not count operations")
    models.add_argument(
        "--smoke", action="store_true", help="seconds: vir_tiny vs vit_tiny, 32/64 px, batch 1/2, 1 repeat"
    )
    models.set_defaults(run=_bench_models)
    kernels = which.add_parser(
        "kernels",
        help="every operator form on the CPU, or the Triton kernels on CUDA, with ratio tables",
        description="CPU: time and peak memory of every form (fresh process each) against the recurrent "
        "and parallel forms. CUDA: benchmarks/kernels_gpu.py's checks and timings (Triton against the "
        "memory floor, the copy bandwidth measured in the same run, and fla / mamba-ssm where "
        "installed, with issue 19's targets met or missed). Prints a table, writes CSV and PNG.",
    )
    kernels.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    kernels.add_argument("--ops", nargs="+", choices=list(FORMS), default=list(FORMS), help="CPU only")
    kernels.add_argument(
        "--lengths",
        type=csv_list(positive_int, "positive integers"),
        default=None,
        help="default: 1024,4096,16384 (CPU), 256,1024,4096,16384,65536 (CUDA)",
    )
    kernels.add_argument("--repeats", type=positive_int, default=3, help="CPU: timed calls after the warm-up")
    kernels.add_argument("--threads", type=positive_int, default=None, help="CPU: torch threads")
    kernels.add_argument("--tokens", type=positive_int, default=65536, help="CUDA: batch x L, held constant")
    kernels.add_argument(
        "--head-dims",
        type=csv_list(positive_int, "positive integers"),
        default=None,
        help="CUDA: linear_attention head dims, heads = 512 / head dim (default: 64,128)",
    )
    kernels.add_argument(
        "--reference", action="store_true", help="CUDA: also time the PyTorch chunk forms (slow)"
    )
    kernels.add_argument("--no-check", action="store_true", help="CUDA: skip the correctness checks")
    kernels.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_kernels"))
    kernels.add_argument(
        "--smoke", action="store_true", help="seconds: tiny lengths, 1 repeat (numbers meaningless)"
    )
    kernels.set_defaults(run=_bench_kernels)
    from seqvision.bench.digits import add_arguments as add_digits_arguments

    digits = which.add_parser(
        "digits",
        help="test accuracy of every backbone trained from scratch on scikit-learn's digits (CPU)",
        description="One shared recipe, several seeds, each seqvision model judged against the best timm "
        "peer of its size; prints a markdown table, writes CSV, JSON and PNG.",
    )
    add_digits_arguments(digits)
    digits.set_defaults(run=_bench_digits)
