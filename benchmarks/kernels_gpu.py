"""Check and time seqvision's Triton kernels against the PyTorch reference, on a CUDA machine.

    python benchmarks/kernels_gpu.py [--lengths 1024 4096 16384 65536] [--tokens 65536] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --check-only     # the correctness part, on a CPU

Correctness: every operator that has a Triton kernel runs on fresh random inputs in float32 and
bfloat16 (float16 under the interpreter, which has no bfloat16 arithmetic), forward and backward,
against the PyTorch reference in float32; the table gives the largest relative error of the output
and of every gradient. Kernel output buffers are poisoned with NaN first, so an element a kernel
does not write fails the check.

Timing (CUDA only): ``triton.testing.do_bench`` medians of the forward and of forward + backward,
for sequence lengths L with batch x L held at ``--tokens``:

* ``cross_scan`` of a (B, 96, h, w) map with h w = L, against a device-to-device copy of the same
  output size (reported as the fraction of copy bandwidth the fused gather reaches);
* ``linear_recurrence`` along the sequence axis of (B, L, 384) with a per-channel gate, against the
  PyTorch chunk form.

Operators without a Triton kernel yet (linear_attention, selective_scan) are listed as such; the
comparison with flash-linear-attention and mamba-ssm belongs with their kernels. Prints one table
and writes ``kernels_gpu.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _measure import markdown_table, write_csv_atomic

import seqvision.kernels as K
from seqvision.kernels._common import triton_interpreted
from seqvision.kernels.check import relative_error

scan_orders = importlib.import_module("seqvision.kernels.scan_orders")
recurrence = importlib.import_module("seqvision.kernels.linear_recurrence")

WITHOUT_KERNEL = ("linear_attention", "selective_scan")


def _poison_outputs() -> None:
    """Make every Triton output buffer in this process start as NaN, so unwritten elements show."""

    def nan_buffer(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    scan_orders._new_output = nan_buffer
    recurrence._new_output = lambda like: nan_buffer(like.shape, like)


def _compare(
    name: str, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dtype: torch.dtype
) -> dict:
    """Run ``fn`` on the Triton backend in ``dtype`` and on the PyTorch one in float32; compare the
    output and the gradient of every input for one random upstream gradient."""
    ours_in = [x.detach().to(dtype).requires_grad_() for x in inputs]
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    ours = fn(*ours_in, backend="triton")
    reference = fn(*ref_in, backend="torch")
    upstream = torch.randn_like(reference)
    # A gate that multiplies nothing (a one-step sequence) gets a zero gradient, not None.
    ours_grads = torch.autograd.grad(
        ours, ours_in, upstream.to(dtype), allow_unused=True, materialize_grads=True
    )
    ref_grads = torch.autograd.grad(reference, ref_in, upstream, allow_unused=True, materialize_grads=True)
    errors = [relative_error(ours.float(), reference)]
    errors += [relative_error(g.float(), r) for g, r in zip(ours_grads, ref_grads, strict=True)]
    finite = all(torch.isfinite(t).all() for t in (ours, *ours_grads))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2 if dtype == torch.bfloat16 else 3e-3
    worst = max(errors)
    return {"op": name, "dtype": str(dtype).removeprefix("torch."), "max_rel_error": worst,
            "tolerance": tolerance, "ok": finite and worst <= tolerance}  # fmt: skip


def check(device: torch.device) -> list[dict]:
    """Correctness rows for every operator with a Triton kernel, on small odd shapes."""
    _poison_outputs()
    dtypes = [torch.float32, torch.float16 if triton_interpreted() else torch.bfloat16]
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    for dtype in dtypes:
        for grid in ((7, 9), (3, 5, 6)):
            x = randn(2, 5, *grid)
            rows.append(_compare(f"cross_scan {grid}", K.cross_scan, [x], dtype))
            y = randn(2, 2 * len(grid), 5, x[0, 0].numel())
            merge = functools.partial(_cross_merge_on, grid=grid)
            rows.append(_compare(f"cross_merge {grid}", merge, [y], dtype))
        for length, reverse in ((1, False), (17, True), (100, False)):
            x = randn(3, length, 10)
            log_a = -torch.rand(3, length, 10, generator=g).to(device) - 0.01

            scan = functools.partial(_scan_on, reverse=reverse)
            rows.append(_compare(f"linear_recurrence L={length} reverse={reverse}", scan, [x, log_a], dtype))
    return rows


def _cross_merge_on(y: torch.Tensor, grid: tuple[int, ...], backend: str) -> torch.Tensor:
    return K.cross_merge(y, grid, backend=backend)


def _scan_on(x: torch.Tensor, log_a: torch.Tensor, backend: str, reverse: bool) -> torch.Tensor:
    return K.linear_recurrence(x, log_a.float(), 1, reverse, backend=backend)


def _bench(fn: Callable[..., torch.Tensor], *args, grad: torch.Tensor | None = None, **kwargs) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)``, followed by its backward when ``grad`` is given."""
    from triton.testing import do_bench

    def run():
        out = fn(*args, **kwargs)
        if grad is not None:
            out.backward(grad)

    return do_bench(run, return_mode="median")


def time_kernels(lengths: list[int], tokens: int, device: torch.device) -> list[dict]:
    rows = []
    for length in lengths:
        batch = max(1, tokens // length)
        side = int(length**0.5)
        x = torch.randn(batch, 96, side, length // side, device=device, requires_grad=True)
        out = K.cross_scan(x, backend="triton").detach()
        grad = torch.randn_like(out)
        fwd = _bench(K.cross_scan, x, backend="triton")
        copy = _bench(torch.Tensor.copy_, torch.empty_like(out), out)
        both = _bench(K.cross_scan, x, backend="triton", grad=grad)
        both_ref = _bench(K.cross_scan, x, backend="torch", grad=grad)
        rows.append(_timing_row("cross_scan", length, batch, fwd, both, both_ref, copy / fwd))

        h = torch.randn(batch, length, 384, device=device, requires_grad=True)
        log_a = -torch.rand(1, 1, 384, device=device)
        grad = torch.randn_like(h)
        fwd = _bench(K.linear_recurrence, h, log_a, 1, backend="triton")
        both = _bench(K.linear_recurrence, h, log_a, 1, backend="triton", grad=grad)
        both_ref = _bench(K.linear_recurrence, h, log_a, 1, backend="torch", grad=grad)
        rows.append(_timing_row("linear_recurrence", length, batch, fwd, both, both_ref, float("nan")))
    return rows


def _timing_row(op, length, batch, fwd, both, both_ref, copy_fraction) -> dict:
    return {
        "op": op,
        "L": length,
        "batch": batch,
        "fwd_ms": fwd,
        "fwd_bwd_ms": both,
        "reference_fwd_bwd_ms": both_ref,
        "vs_reference": both_ref / both,
        "copy_bandwidth_fraction": copy_fraction,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--tokens", type=int, default=65536, help="batch x L, held constant")
    parser.add_argument(
        "--check-only", action="store_true", help="correctness only (runs under the interpreter)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not triton_interpreted()
    if not cuda and not triton_interpreted():
        parser.error(
            "needs a CUDA device, or TRITON_INTERPRET=1 (set before triton is imported) with --check-only"
        )
    if not cuda and not args.check_only:
        parser.error("timing needs a CUDA device; under the interpreter pass --check-only")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"torch {torch.__version__}, device {name}")

    rows = check(device)
    table = [
        (
            r["op"],
            r["dtype"],
            f"{r['max_rel_error']:.2e}",
            f"{r['tolerance']:.0e}",
            "ok" if r["ok"] else "FAIL",
        )
        for r in rows
    ]
    print(markdown_table(("kernel", "dtype", "max rel. error (output, grads)", "tolerance", ""), table))
    print("no Triton kernel yet: " + ", ".join(WITHOUT_KERNEL))
    failed = sum(not r["ok"] for r in rows)
    if not args.check_only:
        timings = time_kernels(args.lengths, args.tokens, device)
        print(markdown_table(
            ("kernel", "L", "batch", "fwd ms", "fwd+bwd ms", "fwd+bwd vs PyTorch", "of copy bandwidth"),
            [(r["op"], str(r["L"]), str(r["batch"]), f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}",
              f"{r['vs_reference']:.1f}x", "-" if r["copy_bandwidth_fraction"] != r["copy_bandwidth_fraction"]
              else f"{100 * r['copy_bandwidth_fraction']:.0f} %") for r in timings],
        ))  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(timings, args.out / "kernels_gpu.csv")
        print(f"wrote {args.out / 'kernels_gpu.csv'}")
    print(f"{len(rows) - failed} of {len(rows)} kernel checks within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
