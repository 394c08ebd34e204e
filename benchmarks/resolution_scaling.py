"""Throughput and peak memory of vision backbones against image size, on the CPU.

    python benchmarks/resolution_scaling.py [--models MODEL[:chunk|:streaming] ...]
                                            [--sizes 224 448 896 1344] [--chunk-size 64]
                                            [--chunk-tokens 256] [--repeats 3] [--threads N]
                                            [--out benchmarks/out]

Every model is made with ``timm.create_model(name, pretrained=False, dynamic_img_size=True)``
(``import seqvision`` registers the ``vir_*``, ``lightnet_*``, ``vim_*`` and ``vmamba_*`` models; nothing is
downloaded) and run in eval mode under ``torch.no_grad``, float32, batch 1, on square images of
each ``--sizes``. A model name may end with how to call the model, which also names its rows:

    MODEL              ``m(x)``
    MODEL:chunk        ``m.set_retention_form("chunk", chunk_size=--chunk-size)`` before ``m.eval()``,
                       then ``m(x)`` (ViR's chunkwise retention)
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
call takes 5 s or more it is the single timed call. Prints a markdown table and the targets, and
writes ``resolution_scaling.csv`` and ``resolution_scaling.png`` (throughput and peak memory against
image size, log scales) to ``--out``.

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
import functools
import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _measure import (
    CLEAR_REFS,
    agg_pyplot,
    cpu_busy_fraction,
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

REFERENCE = "vit_small_patch16_224"
VIR_CHUNK = "vir_small_patch16_224:chunk"
VIR_STREAMING = "vir_small_patch16_224:streaming"
LIGHTNET = "lightnet_small_patch16_224"
VIM = "vim_small_patch16_224"
VMAMBA = "vmamba_tiny_224"
DEFAULT_MODELS = (VIR_CHUNK, VIR_STREAMING, LIGHTNET, VIM, VMAMBA, REFERENCE, "deit_small_patch16_224")
DEFAULT_SIZES = (224, 448, 896, 1344)
BUSY_WARNING = 0.1  # CPU use by other processes above which the times are not trustworthy


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _forward_streaming(model: torch.nn.Module, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    return model.forward_streaming(x, chunk_tokens=chunk_tokens)


def _set_chunk_form(model: torch.nn.Module, chunk_size: int) -> None:
    model.set_retention_form("chunk", chunk_size=chunk_size)


@dataclass(frozen=True)
class ModelSpec:
    """A timm model and how to call it: one row of the results per image size.

    ``prepare`` and ``call`` travel to the child process by pickling, so they must be top-level
    functions (or ``functools.partial`` of them).
    """

    label: str  # names the rows in the table, the CSV and the plot
    model_name: str  # timm name, created with dynamic_img_size=True
    call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = _forward
    prepare: Callable[[torch.nn.Module], None] | None = None  # applied before model.eval()
    required: str | None = None  # model method the call needs, checked for a clear error
    description: str = "m(x)"


def parse_spec(text: str, chunk_size: int, chunk_tokens: int) -> ModelSpec:
    """Turn a ``--models`` entry, ``NAME`` or ``NAME:chunk`` or ``NAME:streaming``, into a ModelSpec."""
    name, _, how = text.partition(":")
    if how in ("", "forward"):
        return ModelSpec(name, name)
    if how == "chunk":
        return ModelSpec(
            f"{name}:chunk",
            name,
            prepare=functools.partial(_set_chunk_form, chunk_size=chunk_size),
            required="set_retention_form",
            description=f'm.set_retention_form("chunk", chunk_size={chunk_size}); m(x)',
        )
    if how == "streaming":
        return ModelSpec(
            f"{name}:streaming",
            name,
            call=functools.partial(_forward_streaming, chunk_tokens=chunk_tokens),
            required="forward_streaming",
            description=f"m.forward_streaming(x, chunk_tokens={chunk_tokens})",
        )
    raise ValueError(f"{text!r}: the call after ':' must be 'chunk' or 'streaming'")


def import_seqvision() -> str | None:
    """Import seqvision, which registers its models in timm; return why it failed, or None."""
    try:
        import seqvision  # noqa: F401
    except Exception as e:  # a broken seqvision must not stop measuring timm's own models
        return f"{type(e).__name__}: {e}"
    return None


def measure(spec: ModelSpec, img_size: int, repeats: int, threads: int) -> dict:
    """Run in a child process: time and peak memory of ``spec`` on one ``img_size`` image."""
    import timm

    torch.set_num_threads(threads)
    import_seqvision()  # in every child alike, so all models run in the same kind of process
    torch.manual_seed(0)
    model = timm.create_model(spec.model_name, pretrained=False, dynamic_img_size=True)
    if spec.required and not hasattr(model, spec.required):
        raise TypeError(f"{spec.label}: {type(model).__name__} has no {spec.required}()")
    if spec.prepare is not None:
        spec.prepare(model)
    model.eval()
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    weights = itertools.chain(model.parameters(), model.buffers())
    weights_mib = sum(t.numel() * t.element_size() for t in weights) / 2**20
    patch_size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch_size, int):
        patch_size = (patch_size, patch_size)
    tokens = (img_size // patch_size[0]) * (img_size // patch_size[1]) if patch_size else None

    with torch.no_grad():
        baseline = reset_peak_memory()  # the weights and the image exist: only the forward pass counts
        out, first = timed_call(spec.call, model, x)
        if out.ndim != 2 or out.shape[0] != 1:  # a call returning features would not be comparable
            raise RuntimeError(f"{spec.label}: expected logits of shape (1, classes), got {tuple(out.shape)}")
        del out
        time_s = median_time(lambda: spec.call(model, x), repeats, first)
        peak, _ = memory_kib()  # the peak over the warm-up and the timed calls
    return {
        "model": spec.label,
        "timm_name": spec.model_name,
        "call": spec.description,
        "img_size": img_size,
        "threads": threads,
        "tokens": tokens,
        "weights_mib": weights_mib,
        "time_s": time_s,
        "images_per_s": 1 / time_s,
        "peak_mib": (peak - baseline) / 1024,
    }


def run_all(specs: list[ModelSpec], sizes: list[int], repeats: int, threads: int) -> list[dict]:
    cases = [(spec, size) for size in sizes for spec in specs]
    results = []
    with tqdm(cases, desc="resolution", unit="case") as progress:
        for spec, size in progress:
            progress.set_postfix_str(f"{spec.label} {size}px")
            results.append(run_in_fresh_process(measure, spec, size, repeats, threads))
    by_key = {(r["model"], r["img_size"]): r for r in results}
    for r in results:
        ref = by_key[(REFERENCE, r["img_size"])]
        r["throughput_vs_vit"] = r["images_per_s"] / ref["images_per_s"]
        r["memory_vs_vit"] = r["peak_mib"] / max(ref["peak_mib"], 1e-9)
    return results


def format_table(results: list[dict]) -> str:
    header = (
        "model",
        "px",
        "tokens",
        "weights MiB",
        "time ms",
        "img/s",
        "vs vit_small",
        "peak MiB",
        "mem vs vit_small",
    )
    rows = [
        (
            r["model"],
            str(r["img_size"]),
            "-" if r["tokens"] is None else str(r["tokens"]),
            f"{r['weights_mib']:.1f}",
            f"{r['time_s'] * 1e3:.1f}",
            f"{r['images_per_s']:.2f}",
            f"{r['throughput_vs_vit']:.2f}x",
            f"{r['peak_mib']:.1f}",
            f"{r['memory_vs_vit']:.3f}",
        )
        for r in results
    ]
    return markdown_table(header, rows)


def targets(results: list[dict]) -> list[str]:
    by_key = {(r["model"], r["img_size"]): r for r in results}
    checks = [
        ("vir_small (chunk form) throughput at 896 px >= 1.5x vit_small's", (VIR_CHUNK, 896),
         lambda r: r["throughput_vs_vit"] >= 1.5, lambda r: f"{r['throughput_vs_vit']:.2f}x"),
        ("vir_small forward_streaming peak memory at 1344 px <= 0.5x vit_small's", (VIR_STREAMING, 1344),
         lambda r: r["memory_vs_vit"] <= 0.5, lambda r: f"{r['memory_vs_vit']:.3f}x"),
        ("lightnet_small at 896 px: throughput >= 2x and peak memory <= 0.5x vit_small's", (LIGHTNET, 896),
         lambda r: r["throughput_vs_vit"] >= 2 and r["memory_vs_vit"] <= 0.5,
         lambda r: f"{r['throughput_vs_vit']:.2f}x throughput, {r['memory_vs_vit']:.3f}x memory"),
    ]  # fmt: skip
    lines = []
    for name, key, ok, fmt in checks:
        if key in by_key:  # a target is only judged when its model was measured at its size
            r = by_key[key]
            lines.append(f"{'MET   ' if ok(r) else 'MISSED'}  {name}: measured {fmt(r)}")
    return lines


def plot(results: list[dict], path: Path, threads: int) -> None:
    plt = agg_pyplot()
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = list(dict.fromkeys(r["model"] for r in results))
    sizes = sorted({r["img_size"] for r in results})
    for label in labels:
        rs = [r for r in results if r["model"] == label]
        xs = [r["img_size"] for r in rs]
        axes[0].loglog(xs, [r["images_per_s"] for r in rs], "o-", label=label)
        # log axes cannot show 0 or below; a peak that small is noise anyway
        axes[1].loglog(xs, [max(r["peak_mib"], 1e-2) for r in rs], "o-", label=label)
    axes[0].set_title("throughput (images/s, batch 1)")
    axes[1].set_title("peak memory above the weights (MiB)")
    for ax in axes:
        ax.set_xlabel("image size (px)")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured sizes as x ticks
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"resolution scaling on CPU ({threads} threads, float32, forward, no_grad)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


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

    try:
        specs = [parse_spec(m, args.chunk_size, args.chunk_tokens) for m in [REFERENCE, *args.models]]
    except ValueError as e:
        parser.error(str(e))
    specs = list({spec.label: spec for spec in specs}.values())  # the reference once, first
    import timm

    import_error = import_seqvision()
    missing = sorted({s.model_name for s in specs if not timm.is_model(s.model_name)})
    if missing:  # fail before the sweep rather than in its middle
        why = f"`import seqvision` failed: {import_error}" if import_error else "not registered in timm"
        parser.error(f"unknown model(s) {', '.join(missing)} ({why})")
    args.out.mkdir(parents=True, exist_ok=True)
    busy = cpu_busy_fraction()
    if busy > BUSY_WARNING:
        print(
            f"warning: the CPUs are {busy:.0%} busy before the sweep (other processes); "
            "the times will be slow and noisy (fewer --threads can help)",
            file=sys.stderr,
        )

    results = run_all(specs, args.sizes, args.repeats, args.threads)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
        "float32, no_grad, batch 1"
    )
    for spec in specs:
        print(f"  {spec.label}: {spec.description}")
    print(format_table(results))
    print("\n".join(targets(results)))
    write_csv_atomic(results, args.out / "resolution_scaling.csv")
    plot(results, args.out / "resolution_scaling.png", args.threads)
    print(f"wrote {args.out / 'resolution_scaling.csv'} and {args.out / 'resolution_scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
