"""Throughput and peak memory of vision backbones against image size, on the CPU.

    python benchmarks/resolution_scaling.py [--models MODEL[:chunk|:streaming] ...]
                                            [--sizes 224 448 896 1344] [--chunk-size 64]
                                            [--chunk-tokens 256] [--repeats 3] [--threads N]
                                            [--out benchmarks/out]

The measurement is ``seqvision.bench.models`` (also behind ``seqvision bench models``, which adds
batch sizes, training steps, FLOPs and CUDA); this script keeps the original sweep: batch 1, eval
under ``torch.no_grad``, float32, every model made with ``timm.create_model(name, pretrained=False,
dynamic_img_size=True)`` (``import seqvision`` registers the ``vir_*``, ``lightnet_*``, ``vim_*`` and
``vmamba_*`` models; nothing is downloaded), on square images of each ``--sizes``. A model name may
end with how to call the model, which also names its rows:

    MODEL              ``m(x)``
    MODEL:chunk        ``m.set_retention_form("chunk", chunk_size=--chunk-size)`` first, then ``m(x)``
                       (ViR's chunkwise retention)
    MODEL:streaming    ``m.forward_streaming(x, chunk_tokens=--chunk-tokens)`` (ViR's chunkwise
                       streaming inference; returns logits like ``m(x)``)

The default ``--models`` are ``vir_small_patch16_224:chunk vir_small_patch16_224:streaming
lightnet_small_patch16_224 vim_small_patch16_224 vmamba_tiny_224 vit_small_patch16_224
deit_small_patch16_224``.
``vit_small_patch16_224`` is the reference of the ratio columns and is always measured.

Each (model, size) runs in a fresh process. After the model and the input image exist, the peak-RSS
counter is reset (``/proc/self/clear_refs``, Linux only), so the peak above that baseline, over the
warm-up and the timed calls, is what the forward pass allocates on top of the weights: activations
and workspace. Time is the median of ``--repeats`` calls after one warm-up call; when the warm-up
call takes 5 s or more it is the single timed call. A cell that fails is reported and the sweep goes
on. Prints a markdown table and the targets, and writes ``resolution_scaling.csv`` and
``resolution_scaling.png`` (throughput and peak memory against image size, log scales) to ``--out``.

Targets (each judged only when its model was measured at its size):
    1. at 896 px, vir_small_patch16_224:chunk throughput >= 1.5x vit_small's;
    2. at 1344 px, vir_small_patch16_224:streaming peak memory <= 0.5x vit_small's;
    3. at 896 px, lightnet_small_patch16_224 throughput >= 2x and peak memory <= 0.5x vit_small's.

Columns:
    model            model name, with ``:chunk`` / ``:streaming`` for those calls
    px               image height and width
    tokens           patch tokens, (px / patch size)²
    weights MiB      parameters and buffers of the model (below the baseline, not in peak MiB)
    time ms          median time of one forward pass
    img/s            throughput, 1 / time (batch 1)
    vs vit_small     throughput over vit_small_patch16_224's at the same size
    peak MiB         peak RSS above the baseline: activations and workspace of the forward pass
    mem vs vit_small peak MiB over vit_small_patch16_224's at the same size
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from _measure import CLEAR_REFS, cpu_busy_fraction, markdown_table, peak_memory_supported

from seqvision.bench.models import plot_models, resolve_specs, run_sweep
from seqvision.utils.io import write_csv_atomic

REFERENCE = "vit_small_patch16_224"
VIR_CHUNK = "vir_small_patch16_224:chunk"
VIR_STREAMING = "vir_small_patch16_224:streaming"
LIGHTNET = "lightnet_small_patch16_224"
VIM = "vim_small_patch16_224"
VMAMBA = "vmamba_tiny_224"
DEFAULT_MODELS = (VIR_CHUNK, VIR_STREAMING, LIGHTNET, VIM, VMAMBA, REFERENCE, "deit_small_patch16_224")
DEFAULT_SIZES = (224, 448, 896, 1344)
BUSY_WARNING = 0.1  # CPU use by other processes above which the times are not trustworthy


def _cell(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(results: list[dict]) -> str:
    header = ("model", "px", "tokens", "weights MiB", "time ms", "img/s", "vs vit_small", "peak MiB",
              "mem vs vit_small")  # fmt: skip
    rows = [
        (r["model"], str(r["img_size"]), _cell(r["tokens"], "d"), _cell(r["weights_mib"], ".1f"),
         _cell(r["time_s"] * 1e3, ".1f"), _cell(r["images_per_s"], ".2f"),
         _cell(r["throughput_vs_peer"], ".2f") + ("x" if r["status"] == "ok" else ""),
         _cell(r["peak_mib"], ".1f"), _cell(r["memory_vs_peer"], ".3f"))
        for r in results
    ]  # fmt: skip
    return markdown_table(header, rows)


def targets(results: list[dict]) -> list[str]:
    by_key = {(r["model"], r["img_size"]): r for r in results if r["status"] == "ok"}
    checks = [
        ("vir_small (chunk form) throughput at 896 px >= 1.5x vit_small's", (VIR_CHUNK, 896),
         lambda r: r["throughput_vs_peer"] >= 1.5, lambda r: f"{r['throughput_vs_peer']:.2f}x"),
        ("vir_small forward_streaming peak memory at 1344 px <= 0.5x vit_small's", (VIR_STREAMING, 1344),
         lambda r: r["memory_vs_peer"] <= 0.5, lambda r: f"{r['memory_vs_peer']:.3f}x"),
        ("lightnet_small at 896 px: throughput >= 2x and peak memory <= 0.5x vit_small's", (LIGHTNET, 896),
         lambda r: r["throughput_vs_peer"] >= 2 and r["memory_vs_peer"] <= 0.5,
         lambda r: f"{r['throughput_vs_peer']:.2f}x throughput, {r['memory_vs_peer']:.3f}x memory"),
    ]  # fmt: skip
    lines = []
    for name, key, ok, fmt in checks:
        if key in by_key:  # a target is only judged when its model was measured at its size
            r = by_key[key]
            lines.append(f"{'MET   ' if ok(r) else 'MISSED'}  {name}: measured {fmt(r)}")
    return lines


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL[:CALL]")
    parser.add_argument("--sizes", type=_positive_int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--chunk-size", type=_positive_int, default=64, help="chunk_size of MODEL:chunk")
    parser.add_argument(
        "--chunk-tokens", type=_positive_int, default=256, help="chunk_tokens of MODEL:streaming"
    )
    parser.add_argument("--repeats", type=_positive_int, default=3)
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=torch.get_num_threads(),
        help="torch threads of each measurement (default: %(default)s, torch's default here); "
        "fewer than the CPUs keeps a busy core from stalling every parallel region",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    if not peak_memory_supported():
        parser.error(f"peak memory is reset through {CLEAR_REFS}, which this system lacks (Linux only)")
    try:  # the reference first; unknown models fail here rather than in the middle of the sweep
        specs = resolve_specs(args.models, REFERENCE, args.chunk_size, args.chunk_tokens)
    except ValueError as e:
        parser.error(str(e))
    import timm

    args.out.mkdir(parents=True, exist_ok=True)
    busy = cpu_busy_fraction()
    if busy > BUSY_WARNING:
        print(
            f"warning: the CPUs are {busy:.0%} busy before the sweep (other processes); "
            "the times will be slow and noisy (fewer --threads can help)",
            file=sys.stderr,
        )

    results = run_sweep(
        specs, args.sizes, [1], ["eval"], peer=REFERENCE, repeats=args.repeats, threads=args.threads,
        count_operations=False, report=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    results.sort(key=lambda r: r["img_size"])  # the table groups the models of one size
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
        "float32, no_grad, batch 1"
    )
    for spec in specs:
        print(f"  {spec.label}: {spec.description}")
    print(format_table(results))
    print("\n".join(targets(results)))
    write_csv_atomic(results, args.out / "resolution_scaling.csv")
    title = f"resolution scaling on CPU ({args.threads} threads, float32, forward, no_grad)"
    plot_models(results, args.out / "resolution_scaling.png", title)
    print(f"wrote {args.out / 'resolution_scaling.csv'} and {args.out / 'resolution_scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
