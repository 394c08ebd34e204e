"""Compile every Triton kernel launch the GPU session makes, for a GPU that is not here.

    python benchmarks/kernels_compile.py                              # sm_90 (H100 / H200), all workloads
    python benchmarks/kernels_compile.py --workloads checks kernels --lengths 1024
    python benchmarks/kernels_compile.py --triton-site /tmp/triton36  # another Triton (see below)

The interpreter proves what the kernels compute, not that they compile for the card, nor what they
cost there. This script answers the second question without a GPU, so that a lent GPU's minutes are
not spent finding it out:

1. **Record.** With ``TRITON_INTERPRET=1`` the workloads of ``benchmarks/gpu_session.sh`` run on the
   CPU with every Triton launch recorded and not executed (its output buffers are zero-filled, so
   what follows stays finite): ``checks`` (the correctness part of kernels_gpu.py, float32 and
   bfloat16), ``kernels`` (its timed cases at ``--lengths`` and head dims 64 / 128, bfloat16, batch 1)
   and ``models`` (``timm.create_model`` of the benchmarked recurrent models at ``--sizes``, float32,
   one image, eval and a training step, with SEQVISION_BACKEND=triton). A launch is the kernel, its
   argument types, its integer arguments (Triton specialises on 1 and on divisibility by 16), its
   constexprs and its ``num_warps`` / ``num_stages``; bfloat16 gets the tensor-core ``DOT`` mode the
   GPU runs (the interpreter substitutes tf32 for it).
2. **Compile.** Each distinct launch goes through Triton's own JIT path (``JITFunction.warmup``) with an
   offline driver that reports an ``sm_<arch>`` target, in a subprocess without the interpreter, so
   specialisation and options are exactly those of a real launch; ``--triton-site DIR`` puts another
   Triton first on that subprocess's path (``pip install --target DIR triton==3.6.0``: the version the
   lent H200 had).
3. **Read ptxas's report.** ``ptxas -v`` (Triton runs it; TRITON_DUMP_PTXAS_LOG=1 prints it, and a
   fresh Triton cache makes it run for every kernel) gives registers per thread, the bytes of
   register spill stores and loads, and static shared memory; Triton's metadata gives the shared
   memory the launch adds. A launch fails if it does not compile, asks for more shared memory than
   a block may have (``--max-shared``: 232,448 bytes on sm_90) or more registers than an SM holds
   (65,536); spills and the occupancy they leave (resident warps per SM, of 64) are reported.

Prints a table (launches alike in every printed column grouped, with their number) and a line per
kernel, writes ``kernels_compile.csv`` (one row per distinct launch) to ``--out`` and exits 1 if any
launch fails. Numbers are compile-time facts, not timings. About 3 minutes and 9 GB of memory on 2
CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from _measure import markdown_table

WORKLOADS = ("checks", "kernels", "models")
MODELS = (
    "vir_small_patch16_224",
    "lightnet_small_patch16_224",
    "vim_small_patch16_224",
    "vim_tiny_patch16_224",
    "vmamba_tiny_224",
)
SIZES = (224, 1248)
LENGTHS = (256, 1024, 4096, 16384, 65536)
HEAD_DIMS = (64, 128)
# The modules whose kernels launch; each has a _new_output seam for its output buffers.
_KERNEL_MODULES = (
    "seqvision.kernels.scan_orders",
    "seqvision.kernels.linear_recurrence",
    "seqvision.kernels.linear_attention.triton",
    "seqvision.kernels.selective_scan.triton",
)
# Hopper (sm_90, H100 / H200): a block may use 227 KiB of shared memory (the opt-in maximum); an SM
# holds 64 K registers, 2,048 threads and 228 KiB of shared memory, 1 KiB of it reserved per block.
MAX_SHARED = 232_448
REGISTERS_PER_SM = 65_536
THREADS_PER_SM = 2_048
SHARED_PER_SM = 233_472
SHARED_RESERVED_PER_BLOCK = 1_024
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_SHARED = re.compile(r"(\d+) bytes smem")


# ------------------------------------------------------------------------------------------------
# 1. record (under the interpreter)
# ------------------------------------------------------------------------------------------------


def _describe(value) -> dict:
    """A JSON description of one launch argument, enough to rebuild what Triton specialises on."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if isinstance(value, tl.constexpr):
        return _describe(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"a launch argument of type {type(value).__name__} cannot be recorded")


@contextlib.contextmanager
def recording_launches() -> Iterator[list[dict]]:
    """Within the block, Triton launches are recorded into the yielded list and not executed.

    Needs TRITON_INTERPRET=1 (set before triton is imported). Output buffers (each kernel module's
    ``_new_output``) are zero-filled, so the unexecuted kernels leave finite values downstream; the
    bfloat16 ``DOT`` mode is the GPU's, not the interpreter's tf32 stand-in."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from seqvision.kernels import _triton

    launches: list[dict] = []

    def record(self, *args, grid, warmup, **kwargs):
        described = {
            "kernel": f"{self.fn.__module__}:{self.fn.__qualname__}",
            "args": [_describe(a) for a in args],
            "kwargs": {k: _describe(v) for k, v in sorted(kwargs.items())},
        }
        launches.append(described)

    outputs = {m: m._new_output for m in map(importlib.import_module, _KERNEL_MODULES)}

    def zeroed(original):
        def new_output(*args, **kwargs):
            buffers = original(*args, **kwargs)
            for buffer in buffers if isinstance(buffers, (tuple, list)) else (buffers,):
                buffer.zero_()
            return buffers

        return new_output

    original_run, original_interpreted = InterpretedFunction.run, _triton.triton_interpreted
    InterpretedFunction.run = record
    _triton.triton_interpreted = lambda: False  # dot_mode: bfloat16 tiles on tensor cores, as on the GPU
    for module, original in outputs.items():
        module._new_output = zeroed(original)
    try:
        with torch.random.fork_rng():
            yield launches
    finally:
        InterpretedFunction.run, _triton.triton_interpreted = original_run, original_interpreted
        for module, original in outputs.items():
            module._new_output = original


def _checks_workload() -> None:
    import kernels_gpu
    import torch

    # kernels_gpu.check picks float16 under the interpreter (which cannot multiply bfloat16 tiles);
    # the GPU runs bfloat16, so that is what is compiled.
    original = kernels_gpu.triton_interpreted
    kernels_gpu.triton_interpreted = lambda: False
    try:
        kernels_gpu.check(torch.device("cpu"))
    finally:
        kernels_gpu.triton_interpreted = original


def _kernels_workload(lengths, head_dims) -> None:
    import kernels_gpu
    import torch

    # tokens=1: batch 1 at every length (the batch changes the grid, not the compiled kernel).
    kernels_gpu.time_kernels(list(lengths), 1, torch.device("cpu"), head_dims=list(head_dims), rep_ms=1)


def _models_workload(models, sizes) -> None:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from seqvision.bench.models import create_model

    before = os.environ.get("SEQVISION_BACKEND")
    os.environ["SEQVISION_BACKEND"] = "triton"  # "auto" on CPU tensors would take the PyTorch forms
    try:
        cells = [(name, size) for name in models for size in sizes]
        for name, size in tqdm(cells, desc="recording models", unit="model"):
            model, _ = create_model(name, size)
            x = torch.randn(1, 3, size, size)
            model.eval()
            with torch.no_grad():
                model(x)
            model.train()
            F.cross_entropy(model(x), torch.zeros(1, dtype=torch.long)).backward()
    finally:
        if before is None:
            del os.environ["SEQVISION_BACKEND"]
        else:
            os.environ["SEQVISION_BACKEND"] = before


def record_workloads(workloads, lengths, head_dims, models, sizes) -> list[dict]:
    """Run ``workloads`` with launches recorded; returns the distinct launches, each with the
    workloads that made it (``"workloads"``) and how often (``"count"``)."""
    distinct: dict[str, dict] = {}
    runners = {
        "checks": _checks_workload,
        "kernels": lambda: _kernels_workload(lengths, head_dims),
        "models": lambda: _models_workload(models, sizes),
    }
    for workload in workloads:
        with recording_launches() as launches:
            runners[workload]()
        for launch in launches:
            key = json.dumps(launch, sort_keys=True)
            entry = distinct.setdefault(key, {**launch, "workloads": [], "count": 0})
            entry["count"] += 1
            if workload not in entry["workloads"]:
                entry["workloads"].append(workload)
        print(f"recorded {len(launches)} launches of {workload}", flush=True)
    return list(distinct.values())


# ------------------------------------------------------------------------------------------------
# 2. compile (no interpreter; in a subprocess)
# ------------------------------------------------------------------------------------------------


def _offline_driver(arch: int):
    """Enough of a CUDA driver for ``JITFunction.warmup``: a target, a device and a stream."""
    import torch
    from triton.backends.compiler import GPUTarget

    class OfflineDriver:
        target = GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

    return OfflineDriver()


def _rebuild(description: dict):
    import torch
    import triton.language as tl
    from triton.runtime.jit import MockTensor

    if "tensor" in description:
        pointer = MockTensor(getattr(torch, description["tensor"]))
        if not description["aligned"]:
            pointer.data_ptr = lambda: 2  # an address Triton must not assume 16-byte aligned
        return pointer
    if "tl_dtype" in description:
        return getattr(tl, description["tl_dtype"])
    return description["value"]


def compile_launch(launch: dict, ptxas_reports: dict[str, dict]) -> dict:
    """Compile one recorded launch with the active (offline) driver; its resource usage or why it
    failed. ``ptxas_reports`` maps a compiled kernel's hash to what ptxas said of it: launches that
    differ only where Triton does not specialise share one compilation, and ptxas speaks once."""
    import triton

    module, name = launch["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    args = [_rebuild(a) for a in launch["args"]]
    kwargs = {k: _rebuild(v) for k, v in launch["kwargs"].items()}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1 prints ptxas -v here
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    except Exception as e:  # a kernel that does not compile is a finding, not the end of the run
        lines = str(e).strip().splitlines() or [""]
        return {"error": f"{type(e).__name__}: {lines[-1][:300]}"}
    report = _ptxas_report(log.getvalue())
    if report is not None:
        ptxas_reports[compiled.metadata.hash] = report
    report = ptxas_reports.get(compiled.metadata.hash)
    if report is None:
        return {"error": "ptxas printed no resource report (was the kernel in Triton's cache?)"}
    return {
        "triton": triton.__version__,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        **{k: v for k, v in report.items() if k != "static_shared"},
        # Triton's shared memory is allocated at launch (dynamic), ptxas's is static: a block needs both.
        "shared_bytes": compiled.metadata.shared + report["static_shared"],
    }


def _ptxas_report(log: str) -> dict | None:
    """Registers, spills and static shared memory from ``ptxas -v``'s report of one kernel."""
    registers = PTXAS_REGISTERS.search(log)
    spills = PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        return None
    shared = PTXAS_SHARED.search(log)
    stack, stores, loads = map(int, spills.groups())
    return {"registers": int(registers.group(1)), "spill_store_bytes": stores, "spill_load_bytes": loads,
            "stack_bytes": stack, "static_shared": int(shared.group(1)) if shared else 0}  # fmt: skip


def compile_main(launches_path: Path, arch: int, results_path: Path) -> None:
    from triton.runtime.driver import driver

    driver.set_active(_offline_driver(arch))
    from tqdm import tqdm

    launches = json.loads(launches_path.read_text())
    ptxas_reports: dict[str, dict] = {}
    results = [
        compile_launch(launch, ptxas_reports) for launch in tqdm(launches, desc="compiling", unit="kernel")
    ]
    results_path.write_text(json.dumps(results))


def compile_all(launches: list[dict], arch: int, triton_site: Path | None, workdir: Path) -> list[dict]:
    """Compile ``launches`` in a subprocess without the interpreter (and with ``triton_site`` first on
    its path); returns one result per launch."""
    launches_path, results_path = workdir / "launches.json", workdir / "compiled.json"
    launches_path.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEQVISION_BACKEND")}
    # A fresh cache, so that every kernel is compiled here and ptxas reports on it.
    env.update(TRITON_CACHE_DIR=str(workdir / "triton_cache"), TRITON_DUMP_PTXAS_LOG="1")
    paths = [str(Path(__file__).parent), *([str(triton_site)] if triton_site else [])]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, __file__, "--compile-only", str(launches_path), "--arch", str(arch),
               "--results", str(results_path)]  # fmt: skip
    subprocess.run(command, env=env, check=True)
    return json.loads(results_path.read_text())


# ------------------------------------------------------------------------------------------------
# 3. report
# ------------------------------------------------------------------------------------------------


def _constants(launch: dict) -> str:
    """The launch's keyword arguments (constexprs and launch options), short."""
    return " ".join(f"{k}={v.get('value', v.get('tl_dtype'))}" for k, v in launch["kwargs"].items()
                    if k not in ("num_warps", "num_stages"))  # fmt: skip


def _dtypes(launch: dict) -> str:
    return "/".join(sorted({a["tensor"] for a in launch["args"] if "tensor" in a}))


def judge(result: dict, max_shared: int) -> tuple[str, int]:
    """(verdict, warps per SM) for one compiled launch: the warps that can be resident on one SM,
    as whole blocks, given its registers, threads and shared memory (the occupancy, out of 64)."""
    if "error" in result:
        return "FAILED: " + result["error"], 0
    threads = 32 * result["num_warps"]
    shared = result["shared_bytes"] + SHARED_RESERVED_PER_BLOCK
    blocks = min(
        REGISTERS_PER_SM // max(1, result["registers"] * threads),
        THREADS_PER_SM // threads,
        SHARED_PER_SM // shared,
    )
    if result["shared_bytes"] > max_shared:
        return f"FAILED: asks {result['shared_bytes']} B of shared memory, a block may have {max_shared}", 0
    if blocks == 0:
        return f"FAILED: {result['registers']} registers x {threads} threads exceed an SM's registers", 0
    return ("ok, spills" if result["spill_store_bytes"] else "ok"), blocks * result["num_warps"]


def rows_of(launches: list[dict], results: list[dict], max_shared: int) -> list[dict]:
    rows = []
    for launch, result in zip(launches, results, strict=True):
        verdict, warps = judge(result, max_shared)
        rows.append({
            "kernel": launch["kernel"].split(":")[1], "module": launch["kernel"].split(":")[0],
            "dtypes": _dtypes(launch), "constants": _constants(launch),
            "workloads": "+".join(launch["workloads"]), "launches": launch["count"],
            "triton": result.get("triton", ""), "num_warps": result.get("num_warps", ""),
            "num_stages": result.get("num_stages", ""), "registers": result.get("registers", ""),
            "spill_stores": result.get("spill_store_bytes", ""),
            "spill_loads": result.get("spill_load_bytes", ""), "shared_bytes": result.get("shared_bytes", ""),
            "warps_per_sm": warps, "verdict": verdict,
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["module"], r["kernel"], r["dtypes"], r["constants"]))


def grouped(rows: list[dict], columns: list[str]) -> list[list[str]]:
    """Table rows of ``columns``, one per group of rows alike in them (launches that differ only in
    what Triton specialises on, an integer equal to 1 or divisible by 16), with the group's size."""
    groups: dict[tuple[str, ...], int] = {}
    for row in rows:
        key = tuple(str(row[c]) for c in columns)
        groups[key] = groups.get(key, 0) + 1
    return [[str(count), *key] for key, count in groups.items()]


def summary(rows: list[dict]) -> list[str]:
    """One line per kernel: how many launch variants, the worst registers / spills / shared memory."""
    lines = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        done = [r for r in mine if not r["verdict"].startswith("FAILED")]
        failed = len(mine) - len(done)
        if done:
            worst = max(done, key=lambda r: (r["spill_stores"], r["registers"]))
            lines.append(
                f"{kernel}: {len(mine)} variants, registers {min(r['registers'] for r in done)}-"
                f"{max(r['registers'] for r in done)}, spill stores up to {worst['spill_stores']} B "
                f"({sum(r['spill_stores'] > 0 for r in done)} variants spill), shared memory up to "
                f"{max(r['shared_bytes'] for r in done)} B" + (f"; {failed} FAILED" if failed else "")
            )
        else:
            lines.append(f"{kernel}: {len(mine)} variants, all FAILED")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    add("--lengths", type=int, nargs="+", default=list(LENGTHS), help="kernels workload")
    add("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS), help="kernels workload")
    add("--models", nargs="+", default=list(MODELS), help="models workload")
    add("--sizes", type=int, nargs="+", default=list(SIZES), help="models workload (px)")
    add("--arch", type=int, default=90, help="compute capability to compile for (90: H100, H200)")
    add("--max-shared", type=int, default=MAX_SHARED, help="shared memory one block may have, bytes")
    add("--triton-site", type=Path, help="a folder holding another triton, first on the compile path")
    add("--out", type=Path, default=Path(__file__).parent / "out")
    add("--compile-only", type=Path, help=argparse.SUPPRESS)
    add("--results", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile_only is not None:
        compile_main(args.compile_only, args.arch, args.results)
        return 0
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("records launches under the interpreter: run with TRITON_INTERPRET=1")
    from seqvision.utils.io import write_csv_atomic

    launches = record_workloads(args.workloads, args.lengths, args.head_dims, args.models, args.sizes)
    with tempfile.TemporaryDirectory() as workdir:
        results = compile_all(launches, args.arch, args.triton_site, Path(workdir))
    rows = rows_of(launches, results, args.max_shared)
    columns = ["kernel", "dtypes", "constants", "workloads", "num_warps", "num_stages", "registers",
               "spill_stores", "spill_loads", "shared_bytes", "warps_per_sm", "verdict"]  # fmt: skip
    print(markdown_table(["variants", *columns], grouped(rows, columns)))
    print("\n".join(summary(rows)))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(rows, args.out / "kernels_compile.csv")
    failed = [r for r in rows if r["verdict"].startswith("FAILED")]
    triton_version = next((r["triton"] for r in rows if r["triton"]), "?")
    print(f"{len(rows)} distinct launches compiled for sm_{args.arch} with triton {triton_version}: "
          f"{len(failed)} failed; wrote {args.out / 'kernels_compile.csv'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
