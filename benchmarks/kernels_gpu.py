"""Check and time seqvision's Triton kernels against the PyTorch reference and peer kernels, on CUDA.

    python benchmarks/kernels_gpu.py [--lengths 1024 4096 16384 65536] [--tokens 65536] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --check-only     # the correctness part, on a CPU

Correctness: every Triton kernel (cross_scan, cross_merge, linear_recurrence, linear_attention with
each decay shape, causal and not, selective_scan with each B / C layout) runs on fresh random inputs
in float32 and bfloat16 (float16 under the interpreter, which cannot multiply bfloat16 tiles),
forward and backward, against the PyTorch reference in float32; the table gives the largest relative
error of the output and of every gradient. Kernel output buffers are poisoned with NaN first, so an
element a kernel does not write fails the check.

Timing (CUDA only): ``triton.testing.do_bench`` medians of the forward and of forward + backward,
for sequence lengths L with batch x L held at ``--tokens``, in bfloat16 except where noted:

* ``cross_scan`` of a (B, 96, h, w) map with h w = L, against a device-to-device copy of the same
  output size: the fraction of copy bandwidth the fused gather reaches (target >= 70 %);
* ``linear_recurrence`` along the sequence axis of (B, L, 384) with a per-channel gate, float32;
* ``linear_attention``, 8 heads of 64 / 64, for a per-head constant decay (retention), a per-head
  data-dependent decay (Mamba-2) and a per-key decay (GLA), against flash-linear-attention's
  ``chunk_simple_gla`` / ``chunk_gla`` when fla imports (target: fwd+bwd >= 1.0x fla at L >= 4096);
* ``selective_scan``, D = 768, N = 16, input-dependent B and C, softplus, D and z, against
  mamba-ssm's ``selective_scan_fn`` when it imports; and always against the PyTorch chunk form
  (target >= 20x).

Every row also gives the ratio to the PyTorch chunk reference. Prints one table and writes
``kernels_gpu.csv`` to ``--out``. ``--smoke`` runs the timing code on the CPU through the interpreter
on tiny shapes with a wall clock instead of do_bench: its numbers mean nothing, it proves the code runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _measure import markdown_table

import seqvision.kernels as K
from seqvision.kernels import triton_interpreted
from seqvision.kernels.check import relative_error
from seqvision.utils.io import write_csv_atomic

scan_orders = importlib.import_module("seqvision.kernels.scan_orders")
recurrence = importlib.import_module("seqvision.kernels.linear_recurrence")
attention = importlib.import_module("seqvision.kernels.linear_attention.triton")
selective = importlib.import_module("seqvision.kernels.selective_scan.triton")

TARGETS = {
    "cross_scan": "copy bandwidth >= 70 %",
    "linear_attention": "fwd+bwd >= 1.0x fla at L >= 4096",
    "selective_scan": "fwd+bwd >= 20x the PyTorch chunk form",
}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _poison_outputs() -> None:
    """Make every Triton output buffer in this process start as NaN, so unwritten elements show."""

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    scan_orders._new_output = lambda shape, like: nan_buffer(shape, like.dtype, like.device)
    recurrence._new_output = lambda like: nan_buffer(like.shape, like.dtype, like.device)
    attention._new_output = lambda shape, like, dtype=None: nan_buffer(
        shape, dtype or like.dtype, like.device
    )
    selective._new_output = nan_buffer


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------


def _compare(
    name: str,
    fn: Callable[..., torch.Tensor],
    inputs: list[torch.Tensor],
    dtype: torch.dtype,
    generator: torch.Generator,
) -> dict:
    """Run ``fn`` on the Triton backend in ``dtype`` and on the PyTorch one in float32; compare the
    output and the gradient of every input for one random upstream gradient."""
    ours_in = [x.detach().to(dtype).requires_grad_() for x in inputs]
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    ours = fn(*ours_in, backend="triton")
    reference = fn(*ref_in, backend="torch")
    # From the run's seeded generator too, and rounded to ``dtype`` for both sides: the reference then
    # differs from the kernel only by the kernel's arithmetic, not by a finer upstream gradient.
    upstream = torch.randn(reference.shape, generator=generator).to(reference.device).to(dtype)
    # A gate that multiplies nothing (a one-step sequence) gets a zero gradient, not None.
    ours_grads = torch.autograd.grad(ours, ours_in, upstream, allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(
        reference, ref_in, upstream.float(), allow_unused=True, materialize_grads=True
    )
    errors = [relative_error(ours.float(), reference)]
    errors += [relative_error(g.float(), r) for g, r in zip(ours_grads, ref_grads, strict=True)]
    finite = all(torch.isfinite(t).all() for t in (ours, *ours_grads))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2 if dtype == torch.bfloat16 else 3e-3
    worst = max(errors)
    return {"op": name, "dtype": _name(dtype), "max_rel_error": worst,
            "tolerance": tolerance, "ok": finite and worst <= tolerance}  # fmt: skip


def check(device: torch.device, seed: int = 0) -> list[dict]:
    """Correctness rows for every operator with a Triton kernel, on small odd shapes."""
    _poison_outputs()
    dtypes = [torch.float32, torch.float16 if triton_interpreted() else torch.bfloat16]
    rows = []
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def log_gates(*shape):
        return (-torch.rand(*shape, generator=g) - 0.01).to(device)

    for dtype in dtypes:
        for grid in ((7, 9), (3, 5, 6)):
            x = randn(2, 5, *grid)
            rows.append(_compare(f"cross_scan {grid}", K.cross_scan, [x], dtype, g))
            y = randn(2, 2 * len(grid), 5, x[0, 0].numel())
            merge = functools.partial(_cross_merge_on, grid=grid)
            rows.append(_compare(f"cross_merge {grid}", merge, [y], dtype, g))
        for length, reverse in ((1, False), (17, True), (100, False)):
            x = randn(3, length, 10)
            scan = functools.partial(_scan_on, reverse=reverse)
            name = f"linear_recurrence L={length} reverse={reverse}"
            rows.append(_compare(name, scan, [x, log_gates(3, length, 10)], dtype, g))
        B, H, L, Dk, Dv = 1, 2, 41, 32, 24
        qkv = [randn(B, H, L, Dk), randn(B, H, L, Dk), randn(B, H, L, Dv)]
        for causal in (True, False):
            # A per-head constant decay is a fixed buffer in the models (ViR): no gradient asked.
            retention = functools.partial(_attention_on, causal=causal, fixed_decay=log_gates(H))
            rows.append(
                _compare(f"linear_attention per-head constant causal={causal}", retention, qkv, dtype, g)
            )
            plain = functools.partial(_attention_on, causal=causal)
            rows.append(_compare(f"linear_attention no decay causal={causal}", plain, qkv, dtype, g))
            for shape, label in (((B, H, L), "per-head data-dependent"), ((B, H, L, Dk), "per-key")):
                decayed = functools.partial(_attention_on, causal=causal)
                name = f"linear_attention {label} causal={causal}"
                rows.append(_compare(name, decayed, [*qkv, log_gates(*shape)], dtype, g))
        batch, dim, L, N = 2, 6, 41, 5
        for layout, bc_shape in (
            ("fixed", (dim, N)),
            ("shared", (batch, N, L)),
            ("grouped", (batch, 3, N, L)),
        ):
            inputs = [randn(batch, dim, L), randn(batch, dim, L), -torch.rand(dim, N, generator=g).to(device)]
            inputs += [randn(*bc_shape), randn(*bc_shape), randn(dim), randn(batch, dim, L), randn(dim)]
            rows.append(_compare(f"selective_scan B, C {layout}", _selective_on, inputs, dtype, g))
    return rows


def _cross_merge_on(y: torch.Tensor, grid: tuple[int, ...], backend: str) -> torch.Tensor:
    return K.cross_merge(y, grid, backend=backend)


def _scan_on(x: torch.Tensor, log_a: torch.Tensor, backend: str, reverse: bool) -> torch.Tensor:
    return K.linear_recurrence(x, log_a.float(), 1, reverse, backend=backend)


def _attention_on(q, k, v, log_decay=None, *, backend, causal=True, fixed_decay=None):
    gates = fixed_decay if log_decay is None else log_decay.float()
    return K.linear_attention(q, k, v, gates, causal=causal, backend=backend)


def _selective_on(u, delta, A, B, C, D, z, delta_bias, *, backend):
    A, D, delta_bias = A.float(), D.float(), delta_bias.float()
    return K.selective_scan(u, delta, A, B.float(), C.float(), D, z, delta_bias, True, backend=backend)


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def _bench(fn: Callable[..., torch.Tensor], *args, grad: torch.Tensor | None = None, **kwargs) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)``, followed by its backward when ``grad`` is given.

    Tuple outputs (o, final_state) are reduced to their first element."""

    def run():
        out = fn(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if grad is not None:
            out.backward(grad)

    if not torch.cuda.is_available() or triton_interpreted():  # --smoke: one wall-clock run
        start = time.perf_counter()
        run()
        return 1e3 * (time.perf_counter() - start)
    from triton.testing import do_bench

    return do_bench(run, return_mode="median")


def _row(
    op, variant, length, batch, fwd, both, both_ref, peer=None, peer_both=math.nan, copy=math.nan
) -> dict:
    return {
        "op": op,
        "variant": variant,
        "L": length,
        "batch": batch,
        "fwd_ms": fwd,
        "fwd_bwd_ms": both,
        "reference_fwd_bwd_ms": both_ref,
        "vs_reference": both_ref / both,
        "peer": peer or "",
        "peer_fwd_bwd_ms": peer_both,
        "vs_peer": peer_both / both,
        "copy_bandwidth_fraction": copy,
    }


def _time_cross_scan(length, batch, device, channels=96):
    side = int(length**0.5)
    x = torch.randn(batch, channels, side, length // side, device=device, requires_grad=True)
    out = K.cross_scan(x, backend="triton").detach()
    grad = torch.randn_like(out)
    fwd = _bench(K.cross_scan, x, backend="triton")
    copy = _bench(torch.Tensor.copy_, torch.empty_like(out), out)
    both = _bench(K.cross_scan, x, backend="triton", grad=grad)
    both_ref = _bench(K.cross_scan, x, backend="torch", grad=grad)
    return [_row("cross_scan", "2-D, 4 routes", length, batch, fwd, both, both_ref, copy=copy / fwd)]


def _time_linear_recurrence(length, batch, device, channels=384):
    h = torch.randn(batch, length, channels, device=device, requires_grad=True)
    log_a = -torch.rand(1, 1, channels, device=device)
    grad = torch.randn_like(h)
    fwd = _bench(K.linear_recurrence, h, log_a, 1, backend="triton")
    both = _bench(K.linear_recurrence, h, log_a, 1, backend="triton", grad=grad)
    both_ref = _bench(K.linear_recurrence, h, log_a, 1, backend="torch", grad=grad)
    return [_row("linear_recurrence", "float32, constant gate", length, batch, fwd, both, both_ref)]


def _fla():
    """flash-linear-attention's chunk kernels, or None where fla does not import."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return {"simple_gla": chunk_simple_gla, "gla": chunk_gla}


def _time_linear_attention(length, batch, device, heads=8, dim=64, dtype=torch.bfloat16):
    fla = _fla()
    rows = []
    q, k, v = (torch.randn(batch, heads, length, dim, device=device, dtype=dtype) for _ in range(3))
    grad = torch.randn_like(v)
    # fla's layout is (B, T, H, D); the transposes are made once, outside the timed region.
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grad_t = grad.transpose(1, 2).contiguous()
    gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(heads, device=device, dtype=torch.float32)))
    per_step = (-torch.rand(batch, heads, length, device=device) * 0.1).requires_grad_()
    per_key = (-torch.rand(batch, heads, length, dim, device=device) * 0.1).requires_grad_()
    per_step_t, per_key_t = (
        x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (per_step, per_key)
    )
    cases = (
        ("per-head constant", gamma, "chunk_simple_gla(g_gamma)",
         lambda: functools.partial(fla["simple_gla"], q_t, k_t, v_t, g_gamma=gamma)),
        ("per-head data-dependent", per_step, "chunk_simple_gla(g)",
         lambda: functools.partial(fla["simple_gla"], q_t, k_t, v_t, g=per_step_t)),
        ("per-key", per_key, "chunk_gla", lambda: functools.partial(fla["gla"], q_t, k_t, v_t, per_key_t)),
    )  # fmt: skip
    for variant, log_decay, peer_name, peer_call in cases:
        fwd = _bench(K.linear_attention, q, k, v, log_decay, backend="triton")
        both = _bench(K.linear_attention, q, k, v, log_decay, backend="triton", grad=grad)
        both_ref = _bench(K.linear_attention, q, k, v, log_decay, backend="torch", grad=grad)
        peer_both = _bench(peer_call(), grad=grad_t) if fla is not None else math.nan
        rows.append(
            _row("linear_attention", f"{variant}, {_name(dtype)}", length, batch, fwd, both, both_ref,
                 peer=f"fla {peer_name}" if fla is not None else "fla not installed", peer_both=peer_both)
        )  # fmt: skip
    return rows


def _mamba_ssm():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def _time_selective_scan(length, batch, device, dim=768, n=16, dtype=torch.bfloat16):
    peer = _mamba_ssm()
    u, delta, z = (torch.randn(batch, dim, length, device=device, dtype=dtype) for _ in range(3))
    A = -torch.rand(dim, n, device=device) - 0.5
    B, C = (torch.randn(batch, n, length, device=device, dtype=dtype) for _ in range(2))
    D, delta_bias = torch.randn(dim, device=device), torch.randn(dim, device=device)
    args = [x.requires_grad_() for x in (u, delta, A, B, C, D, z, delta_bias)]
    grad = torch.randn_like(u)
    call = functools.partial(K.selective_scan, *args, delta_softplus=True)
    fwd = _bench(call, backend="triton")
    both = _bench(call, backend="triton", grad=grad)
    both_ref = _bench(call, backend="torch", grad=grad)
    peer_both = math.nan
    if peer is not None:
        peer_both = _bench(peer, *args, delta_softplus=True, grad=grad)
    name = "mamba-ssm selective_scan_fn" if peer is not None else "mamba-ssm not installed"
    variant = f"D {dim}, N {n}, {_name(dtype)}"
    return [_row("selective_scan", variant, length, batch, fwd, both, both_ref, name, peer_both)]


def time_kernels(lengths: list[int], tokens: int, device: torch.device, small: bool = False) -> list[dict]:
    """Timing rows for every kernel and length (``small``: tiny widths, for --smoke)."""
    widths = {"channels": 4} if small else {}
    rows = []
    for length in lengths:
        batch = max(1, tokens // length)
        rows += _time_cross_scan(length, batch, device, **widths)
        rows += _time_linear_recurrence(length, batch, device, **widths)
        if small:
            rows += _time_linear_attention(length, batch, device, heads=1, dim=16, dtype=torch.float16)
            rows += _time_selective_scan(length, batch, device, dim=4, n=4, dtype=torch.float16)
        else:
            rows += _time_linear_attention(length, batch, device)
            rows += _time_selective_scan(length, batch, device)
    return rows


def _format_timings(rows: list[dict]) -> str:
    def ratio(x):
        return "-" if math.isnan(x) else f"{x:.2f}x"

    return markdown_table(
        ("kernel", "variant", "L", "batch", "fwd ms", "fwd+bwd ms", "vs PyTorch chunk", "peer", "vs peer",
         "of copy bandwidth"),
        [(r["op"], r["variant"], str(r["L"]), str(r["batch"]), f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}",
          ratio(r["vs_reference"]), r["peer"] or "-", ratio(r["vs_peer"]),
          "-" if math.isnan(r["copy_bandwidth_fraction"]) else f"{100 * r['copy_bandwidth_fraction']:.0f} %")
         for r in rows],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--tokens", type=int, default=65536, help="batch x L, held constant")
    parser.add_argument(
        "--check-only", action="store_true", help="correctness only (runs under the interpreter)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run the timing code on tiny CPU shapes (interpreter; no numbers)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the correctness inputs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not triton_interpreted()
    if not cuda and not triton_interpreted():
        parser.error(
            "needs a CUDA device, or TRITON_INTERPRET=1 (set before triton is imported) with --check-only"
        )
    if not cuda and not (args.check_only or args.smoke):
        parser.error("timing needs a CUDA device; under the interpreter pass --check-only")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"torch {torch.__version__}, device {name}", flush=True)

    failed = 0
    if not args.smoke:
        rows = check(device, args.seed)
        table = [
            (r["op"], r["dtype"], f"{r['max_rel_error']:.2e}", f"{r['tolerance']:.0e}",
             "ok" if r["ok"] else "FAIL")
            for r in rows
        ]  # fmt: skip
        print(markdown_table(("kernel", "dtype", "max rel. error (output, grads)", "tolerance", ""), table))
        failed = sum(not r["ok"] for r in rows)
        print(f"{len(rows) - failed} of {len(rows)} kernel checks within tolerance", flush=True)
    if not args.check_only:
        lengths, tokens = ([16, 40], 40) if args.smoke else (args.lengths, args.tokens)
        timings = time_kernels(lengths, tokens, device, small=args.smoke)
        print(_format_timings(timings))
        print("targets: " + "; ".join(f"{op}: {target}" for op, target in TARGETS.items()))
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(timings, args.out / "kernels_gpu.csv")
        print(f"wrote {args.out / 'kernels_gpu.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
