"""Throughput, peak memory and FLOPs of vision backbones against a peer model, by image size.

Behind ``seqvision bench models`` and ``benchmarks/resolution_scaling.py``. One *cell* is a
(model, image size, batch size, mode) combination; every cell runs in a fresh process
(``measure.run_in_fresh_process``) and the peer (by default ``vit_small_patch16_224``) is measured in
the same sweep, so the ratio columns compare models that ran under the same conditions.

Per cell:

* the model is ``timm.create_model(name, pretrained=False, dynamic_img_size=True)`` (``img_size=``
  or no size argument for models that do not take it), float32, on ``batch`` random square images;
* ``eval``: ``model.eval()`` and one forward pass under ``torch.no_grad``;
  ``train``: ``model.train()`` and one optimisation step: forward, cross-entropy of the float32
  logits against fixed labels, backward, ``torch.optim.SGD`` step (plain SGD keeps no per-parameter
  state, so the peak memory is the activations kept for backward plus one copy of the weights for
  the gradients, not an optimiser's moments);
* time: the median of ``repeats`` calls after a warm-up call (CPU: a warm-up call of 5 s or more is
  the single measurement; CUDA: two warm-up calls, for Triton's compilation, then always the
  median, with ``torch.cuda.synchronize`` after each call); throughput = batch / time;
* peak memory above the model's weights, the images and the optimiser: CPU, the peak resident set
  size above a baseline reset once they exist (``/proc/self/clear_refs``); CUDA,
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` above
  ``memory_allocated``;
* operations per image, counted once per (model, size) on one image in eval mode with the PyTorch
  forms of seqvision's operators (``SEQVISION_BACKEND=torch``): ``FlopCounterMode`` FLOPs (matrix
  products, convolutions and attention, see ``count_ops``) and the elementwise operations that
  ``FlopCounterMode`` leaves out, which is where the recurrent scans spend theirs.

Cells run from the smallest batch x pixels up. Before a cell runs, its peak memory and call time are
estimated from the measured cell of the same model and mode nearest in batch x pixels, scaled
linearly in batch x pixels (an underestimate for quadratic attention); a cell estimated over
``max_memory_gib`` (weights + peak) or ``max_call_s`` is skipped, as is one at least as large as a
cell of the same model and mode that ran out of memory. A cell that fails is reported as ``oom`` or
``failed`` with its reason; the sweep goes on.

Filling the card (``fill=True``, ``seqvision bench models --fill-batch START``): each (model, size,
mode) cell picks its own batch, the largest power of two up to START whose estimated memory and call
time (as above) fit the limits, and halves it inside the cell on out-of-memory until it runs; the
batch it ran with is the row's ``batch`` (``batch_start`` is START). Ratios then compare throughput
(images per second) at each model's own batch, and memory per image. Every sweep gives
``memory_vs_peer`` per image, which at equal batches is the plain ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from seqvision.bench.measure import (
    agg_pyplot,
    cpu_busy_fraction,
    cpu_name,
    markdown_table,
    median_time,
    memory_kib,
    reset_peak_memory,
    run_in_fresh_process,
    timed_call,
)
from seqvision.utils.io import save_figure_atomic, write_csv_atomic

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_PEER",
    "MODEL_TARGETS",
    "MODES",
    "SMOKE",
    "ModelSpec",
    "ModelsReport",
    "OpCount",
    "bench_models",
    "count_ops",
    "default_limits",
    "format_report",
    "measure_cell",
    "model_targets",
    "parse_spec",
    "plot_models",
    "resolve_device",
    "resolve_specs",
    "run_sweep",
    "scaling_exponents",
    "unknown_models",
]

_LOG = logging.getLogger(__name__)

DEFAULT_PEER = "vit_small_patch16_224"
DEFAULT_MODELS = ("vir_small_patch16_224", "lightnet_small_patch16_224", "vim_small_patch16_224")
MODES = ("eval", "train")
BUSY_WARNING = 0.1  # CPU use by other processes above which the report warns that times are noisy
# The columns of every result row, in CSV order; cells that did not run keep NaN in the numbers.
ROW_KEYS = (
    "model", "timm_name", "call", "created_with", "device", "mode", "batch", "batch_start", "fill",
    "img_size", "tokens",
    "threads", "status", "reason", "weights_mib", "time_s", "images_per_s", "peak_mib",
    "gflops_per_image", "elementwise_gops_per_image", "peer", "throughput_vs_peer", "memory_vs_peer",
    "flops_vs_peer",
)  # fmt: skip
NAN = float("nan")


# ------------------------------------------------------------------------------------------------
# what to measure
# ------------------------------------------------------------------------------------------------


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _forward_streaming(model: torch.nn.Module, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    return model.forward_streaming(x, chunk_tokens=chunk_tokens)


def _set_chunk_form(model: torch.nn.Module, chunk_size: int) -> None:
    model.set_retention_form("chunk", chunk_size=chunk_size)


@dataclass(frozen=True)
class ModelSpec:
    """A timm model and how to call it: the rows of one model in the results.

    ``prepare`` and ``call`` travel to the child process by pickling, so they must be top-level
    functions (or ``functools.partial`` of them).
    """

    label: str  # names the rows in the table, the CSV and the plot
    model_name: str  # timm name
    call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = _forward
    prepare: Callable[[torch.nn.Module], None] | None = None  # applied before the model is moved
    required: str | None = None  # model method the call needs, checked for a clear error
    description: str = "m(x)"
    trainable: bool = True  # False for inference-only calls (forward_streaming runs under no_grad)


def parse_spec(text: str, chunk_size: int = 64, chunk_tokens: int = 256) -> ModelSpec:
    """Turn ``NAME``, ``NAME:chunk`` or ``NAME:streaming`` into a ModelSpec.

    ``NAME:chunk`` calls ``m.set_retention_form("chunk", chunk_size=chunk_size)`` first (ViR's
    chunkwise retention); ``NAME:streaming`` calls ``m.forward_streaming(x, chunk_tokens=...)``
    (ViR's chunkwise streaming inference, eval only).
    """
    name, _, how = text.partition(":")
    if not name:
        raise ValueError(f"{text!r}: empty model name")
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
            trainable=False,
        )
    raise ValueError(f"{text!r}: the call after ':' must be 'chunk' or 'streaming'")


def import_seqvision() -> str | None:
    """Import seqvision, which registers its models in timm; return why it failed, or None."""
    try:
        import seqvision  # noqa: F401
    except Exception as e:  # a broken seqvision must not stop measuring timm's own models
        return f"{type(e).__name__}: {e}"
    return None


def unknown_models(names: Iterable[str]) -> str | None:
    """A message naming the timm models among ``names`` that do not exist, or None when all do."""
    import timm

    import_error = import_seqvision()
    missing = sorted({name for name in names if not timm.is_model(name)})
    if not missing:
        return None
    why = f"`import seqvision` failed: {import_error}" if import_error else "not registered in timm"
    return f"unknown model(s) {', '.join(missing)} ({why})"


def resolve_specs(
    models: Sequence[str], peer: str, chunk_size: int = 64, chunk_tokens: int = 256
) -> list[ModelSpec]:
    """The specs of the peer (first) and of ``models``, each label once; ValueError for a bad entry or a
    model timm does not know (checked before any measurement rather than in the middle of a sweep)."""
    specs = [parse_spec(text, chunk_size, chunk_tokens) for text in [peer, *models]]
    message = unknown_models(s.model_name for s in specs)
    if message:
        raise ValueError(message)
    return list({s.label: s for s in specs}.values())


def resolve_device(device: str) -> str:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available) to the device to measure on.

    ValueError where CUDA is asked for and missing, or where the CPU cannot report peak memory."""
    from seqvision.bench.measure import CLEAR_REFS, peak_memory_supported

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if device == "cpu" and not peak_memory_supported():
        raise ValueError(f"peak memory is reset through {CLEAR_REFS}, which this system lacks (Linux only)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return device


def default_limits(device: str) -> tuple[float, float]:
    """The default (max_memory_gib, max_call_s) of a sweep on ``device``.

    CPU: 8 GiB (or half the available memory when less), and 120 s per call, which keeps the
    default sweep within minutes on a 2-core machine. CUDA: 90 % of the card's memory, no time limit.
    """
    if device == "cuda":
        return 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30, math.inf
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return min(8.0, available / 2), 120.0


# What ``--smoke`` measures: two tiny models at two sizes, both batch sizes and modes, in seconds.
SMOKE = {
    "models": ["vir_tiny_patch16_224"],
    "peer": "vit_tiny_patch16_224",
    "sizes": [32, 64],
    "batch_sizes": [1, 2],
    "modes": list(MODES),
    "repeats": 1,
}


# ------------------------------------------------------------------------------------------------
# counting operations
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCount:
    """Operations of one call: ``flops`` as FlopCounterMode counts them, ``elementwise`` the rest."""

    flops: float
    elementwise: float


def _sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode's table has the CUDA attention kernels but not the CPU one that
    # F.scaled_dot_product_attention dispatches to, so timm's ViT would be counted without its
    # attention on the CPU. The two matrix products are the same as for the CUDA kernels.
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _extra_flop_formulas() -> dict:
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}
    return {}


# Pointwise-tagged aten ops that only move or fill memory: no arithmetic to count.
_COPIES = frozenset({"clone", "copy", "copy_", "_to_copy", "fill", "fill_", "zero_", "lift_fresh_copy"})
# Reductions, scans and normalisations: one operation per input element.
_REDUCTIONS = frozenset(
    {"sum", "mean", "prod", "amax", "amin", "max", "min", "cumsum", "cumprod", "logcumsumexp",
     "_softmax", "_log_softmax", "logsumexp", "var", "var_mean", "std", "norm", "linalg_vector_norm",
     "native_layer_norm", "native_group_norm", "_fused_rms_norm"}
)  # fmt: skip


class ElementwiseCounter(TorchDispatchMode):
    """Counts the elementwise work FlopCounterMode leaves out, by aten op: one operation per output
    element of an arithmetic pointwise op (copies and fills excluded) and one per input element of a
    reduction, cumulative scan or normalisation. A rough, form-dependent measure (an ``addcmul``
    counts once, an ``exp`` as much as an ``add``), but it sees the recurrent scans: their gates,
    decays and state updates are exactly such ops in seqvision's PyTorch forms."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _REDUCTIONS:
            tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
            self.ops += tensors[0].numel() if tensors else 0
        elif torch.Tag.pointwise in getattr(func, "tags", ()) and name not in _COPIES:
            tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.ops += tensors[0].numel() if tensors else 0
        return out


def count_ops(
    model: torch.nn.Module,
    x: torch.Tensor,
    call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = _forward,
) -> OpCount:
    """Operations of ``call(model, x)`` in eval mode under ``torch.no_grad`` (for the whole batch x).

    ``flops``: ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 per multiply-add of
    matrix products (mm, addmm, bmm, baddbmm), convolutions and scaled-dot-product attention (its
    CUDA kernels, plus the CPU kernel added here) and nothing else: not activations, norms, softmax,
    or the elementwise recurrences of seqvision's scans. ``elementwise``: see ``ElementwiseCounter``.
    seqvision's operators run their PyTorch forms while counting (``SEQVISION_BACKEND=torch``): a
    Triton kernel is one opaque call that neither counter can see into.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from seqvision.kernels import BACKEND_ENV

    was_training, previous = model.training, os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "torch"
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
        with torch.no_grad(), counter, ElementwiseCounter() as elementwise:
            call(model, x)
    finally:
        model.train(was_training)
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous
    return OpCount(float(counter.get_total_flops()), float(elementwise.ops))


# ------------------------------------------------------------------------------------------------
# one cell, in a child process
# ------------------------------------------------------------------------------------------------


def create_model(name: str, img_size: int) -> tuple[torch.nn.Module, str]:
    """``timm.create_model(name, pretrained=False, dynamic_img_size=True)``, else with ``img_size``,
    else with no size argument (convolutional models take any size); returns the model and how."""
    import timm

    attempts = (
        ("dynamic_img_size=True", {"dynamic_img_size": True}),
        (f"img_size={img_size}", {"img_size": img_size}),
        ("no size argument", {}),
    )
    for how, kwargs in attempts:
        try:
            return timm.create_model(name, pretrained=False, **kwargs), how
        except TypeError as e:  # the model's constructor does not take this argument: try the next
            if "unexpected keyword" not in str(e) or how == attempts[-1][0]:
                raise
    raise AssertionError("unreachable")


def _patch_tokens(model: torch.nn.Module, img_size: int) -> int | None:
    patch_size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch_size, int):
        patch_size = (patch_size, patch_size)
    if not patch_size:
        return None
    return math.ceil(img_size / patch_size[0]) * math.ceil(img_size / patch_size[1])


def measure_cell(
    spec: ModelSpec,
    img_size: int,
    batch: int,
    mode: str,
    device: str,
    repeats: int,
    threads: int,
    with_ops: bool,
    fill: bool = False,
) -> dict:
    """Run in a child process: time and peak memory of one cell, and (``with_ops``) its operations.

    With ``fill``, a batch that runs out of memory is halved (down to 1) and tried again in the same
    process; the batch that ran is returned as ``batch``. Returns the measured fields of a result row
    (see ``ROW_KEYS``).
    """
    torch.set_num_threads(threads)
    import_seqvision()  # in every child alike, so all models run in the same kind of process
    torch.manual_seed(0)
    dev = torch.device(device)
    model, created_with = create_model(spec.model_name, img_size)
    if spec.required and not hasattr(model, spec.required):
        raise TypeError(f"{spec.label}: {type(model).__name__} has no {spec.required}()")
    if spec.prepare is not None:
        spec.prepare(model)
    model.to(dev).train(mode == "train")
    weights = itertools.chain(model.parameters(), model.buffers())
    weights_mib = sum(t.numel() * t.element_size() for t in weights) / 2**20
    first_batch, note = batch, ""
    while True:
        try:
            time_s, peak = _measure_batch(spec, model, img_size, batch, mode, dev, repeats)
            break
        except (torch.cuda.OutOfMemoryError, MemoryError):
            if not fill or batch == 1:
                raise
        # Outside the except block, so the failed attempt's frames (and tensors) are gone.
        model.zero_grad(set_to_none=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        batch //= 2
        note = f"batch {first_batch} ran out of memory, halved to {batch}"
    ops = None
    if with_ops:
        image = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(dev)
        ops = count_ops(model, image, spec.call)
    return {
        "created_with": created_with,
        "tokens": _patch_tokens(model, img_size),
        "batch": batch,
        "reason": note,
        "weights_mib": weights_mib,
        "time_s": time_s,
        "images_per_s": batch / time_s,
        "peak_mib": peak / 2**20,
        "gflops_per_image": ops.flops / 1e9 if ops else NAN,
        "elementwise_gops_per_image": ops.elementwise / 1e9 if ops else NAN,
    }


def _measure_batch(
    spec: ModelSpec, model: torch.nn.Module, img_size: int, batch: int, mode: str, dev: torch.device,
    repeats: int,
) -> tuple[float, float]:  # fmt: skip
    """(median seconds per call, peak bytes above the baseline) of ``batch`` images through ``model``."""
    cuda = dev.type == "cuda"
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(dev)
    labels = torch.arange(batch, device=dev)  # reduced modulo the classes at the first call

    if mode == "eval":

        def step() -> torch.Tensor:
            with torch.no_grad():
                return spec.call(model, x)

    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            logits = spec.call(model, x)
            F.cross_entropy(logits.float(), labels % logits.shape[-1]).backward()
            optimizer.step()
            return logits.detach()

    def synced_step() -> torch.Tensor:
        out = step()
        if cuda:
            torch.cuda.synchronize(dev)
        return out

    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        baseline = torch.cuda.memory_allocated(dev)
    else:
        baseline = reset_peak_memory() * 1024  # weights, images and optimiser exist: only the call counts
    out, first = timed_call(synced_step)
    if out.ndim != 2 or out.shape[0] != batch:  # a call returning features would not be comparable
        raise RuntimeError(
            f"{spec.label}: expected logits of shape ({batch}, classes), got {tuple(out.shape)}"
        )
    del out
    if cuda:  # the first calls compile and autotune Triton kernels: never a measurement
        synced_step()
        time_s = median_time(synced_step, repeats, first_s=0.0, slow_s=math.inf)
        peak = torch.cuda.max_memory_allocated(dev) - baseline
    else:
        time_s = median_time(synced_step, repeats, first)
        peak = memory_kib()[0] * 1024 - baseline  # the peak over the warm-up and the timed calls
    return time_s, peak


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------


def _blank_row(
    spec: ModelSpec, size: int, batch: int, mode: str, device: str, threads: int, fill: bool = False
) -> dict:
    row = dict.fromkeys(ROW_KEYS, NAN)
    row.update(
        model=spec.label, timm_name=spec.model_name, call=spec.description, created_with="", device=device,
        mode=mode, batch=batch, batch_start=batch, fill=fill, img_size=size, tokens=None, threads=threads,
        status="", reason="", peer="",
    )  # fmt: skip
    return row


def _fill_start(row: dict, done: list[dict], max_memory_gib: float, max_call_s: float) -> int:
    """The batch a ``fill`` cell starts from: the largest power of two up to ``row["batch_start"]``
    whose memory and call time, estimated from the measured cells (``_skip_reason``), fit the limits;
    1 when none does (``_skip_reason`` then says why the cell is skipped)."""
    batch = 1 << (row["batch_start"].bit_length() - 1)
    while batch > 1 and _skip_reason(dict(row, batch=batch), done, max_memory_gib, max_call_s):
        batch //= 2
    return batch


def _work(row: dict) -> int:
    return row["batch"] * row["img_size"] ** 2


def _skip_reason(row: dict, done: list[dict], max_memory_gib: float, max_call_s: float) -> str | None:
    """Why ``row``'s cell should not run, from the cells of its model and mode measured so far."""
    same = [r for r in done if r["model"] == row["model"] and r["mode"] == row["mode"]]
    for r in same:
        if r["status"] == "oom" and _work(r) <= _work(row):
            return f"a smaller or equal cell ({r['img_size']} px, batch {r['batch']}) ran out of memory"
    measured = [r for r in same if r["status"] == "ok"]
    if not measured:
        return None
    # The nearest measured cell in log(batch x pixels), the smaller one on a tie.
    near = min(measured, key=lambda r: (abs(math.log(_work(row) / _work(r))), _work(r)))
    scale = _work(row) / _work(near)
    source = f"{near['img_size']} px batch {near['batch']} scaled x{scale:g}"
    memory_gib = (near["weights_mib"] + near["peak_mib"] * scale) / 1024
    if memory_gib > max_memory_gib:
        return f"estimated {memory_gib:.1f} GiB ({source}) > --max-memory-gib {max_memory_gib:.1f}"
    call_s = near["time_s"] * scale
    if call_s > max_call_s:
        return f"estimated {call_s:.0f} s per call ({source}) > --max-call-seconds {max_call_s:.0f}"
    return None


def _failure(e: BaseException) -> tuple[str, str]:
    if isinstance(e, BrokenProcessPool):
        return "failed", "the measuring process died (killed by the system: out of memory?)"
    text = f"{type(e).__name__}: {e}".strip()
    lowered = text.lower()
    oom = isinstance(e, MemoryError) or "out of memory" in lowered or "can't allocate memory" in lowered
    return ("oom" if oom else "failed"), text.splitlines()[0][:300]


def run_sweep(
    specs: Sequence[ModelSpec],
    sizes: Sequence[int],
    batch_sizes: Sequence[int],
    modes: Sequence[str],
    *,
    peer: str,
    device: str = "cpu",
    repeats: int = 3,
    threads: int | None = None,
    max_memory_gib: float = math.inf,
    max_call_s: float = math.inf,
    count_operations: bool = True,
    report: Callable[[str], None] | None = None,
    progress: bool = True,
    fill: bool = False,
    on_cell: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Measure every (spec, size, batch, mode) cell, each in a fresh process; return one row per cell.

    ``peer`` is the label of the spec the ratio columns divide by (it must be among ``specs``).
    ``report`` receives one line per skipped or failed cell as it happens (default: the log).
    Operations are counted once per (spec, size), in its first cell that runs. With ``fill`` each
    batch size is a start that every cell fits to the card (module docstring). ``on_cell`` gets the
    rows so far (ratios included) after every cell.
    """
    from tqdm import tqdm

    if peer not in {s.label for s in specs}:
        raise ValueError(f"the peer {peer!r} must be one of the measured models")
    if any(mode not in MODES for mode in modes):
        raise ValueError(f"modes must be among {MODES}, got {list(modes)}")
    threads = threads or torch.get_num_threads()
    report = report or _LOG.info
    order = {s.label: i for i, s in enumerate(sorted(specs, key=lambda s: s.label != peer))}
    cells = sorted(
        itertools.product(specs, sorted(set(sizes)), sorted(set(batch_sizes)), modes),
        key=lambda c: (c[1], c[2], MODES.index(c[3]), order[c[0].label]),
    )  # smallest cells first: the estimates of the larger ones come from them
    rows: list[dict] = []
    counted: set[tuple[str, int]] = set()
    with tqdm(cells, desc="bench models", unit="cell", disable=not progress) as bar:
        for spec, size, batch, mode in bar:
            bar.set_postfix_str(f"{spec.label} {size}px b{batch} {mode}")
            row = _blank_row(spec, size, batch, mode, device, threads, fill)
            rows.append(row)
            _measure_row(row, spec, rows[:-1], counted, device, repeats, threads, max_memory_gib, max_call_s,
                         count_operations, fill, report)  # fmt: skip
            if on_cell is not None:
                _share_ops(rows)
                _add_ratios(rows, peer)
                on_cell(rows)
    _share_ops(rows)
    _add_ratios(rows, peer)
    return rows


def _measure_row(row, spec, done, counted, device, repeats, threads, max_memory_gib, max_call_s,
                 count_operations, fill, report) -> None:  # fmt: skip
    """Run (or skip) one cell and fill its row in place."""
    size, mode = row["img_size"], row["mode"]
    if fill:
        row["batch"] = _fill_start(row, done, max_memory_gib, max_call_s)
    reason = None if spec.trainable or mode == "eval" else f"{spec.description} is inference-only"
    reason = reason or _skip_reason(row, done, max_memory_gib, max_call_s)
    if reason:
        row.update(status="skipped", reason=reason)
        report(f"skipped {spec.label} {size} px batch {row['batch']} {mode}: {reason}")
        return
    with_ops = count_operations and (spec.label, size) not in counted
    try:
        measured = run_in_fresh_process(
            measure_cell, spec, size, row["batch"], mode, device, repeats, threads, with_ops, fill
        )
    except Exception as e:  # one failed cell must not end the sweep
        status, reason = _failure(e)
        row.update(status=status, reason=reason)
        report(f"{status} {spec.label} {size} px batch {row['batch']} {mode}: {reason}")
        return
    row.update(measured, status="ok")
    if measured["reason"]:
        report(f"{spec.label} {size} px {mode}: {measured['reason']}")
    if with_ops:
        counted.add((spec.label, size))


def _share_ops(rows: list[dict]) -> None:
    """Copy the operation counts of each (model, size) to all its rows: they do not depend on the cell."""
    counts = {
        (r["model"], r["img_size"]): (r["gflops_per_image"], r["elementwise_gops_per_image"])
        for r in rows
        if not math.isnan(r["gflops_per_image"])
    }
    for r in rows:
        if (r["model"], r["img_size"]) in counts:
            r["gflops_per_image"], r["elementwise_gops_per_image"] = counts[(r["model"], r["img_size"])]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else NAN


def _add_ratios(rows: list[dict], peer: str) -> None:
    # Cells are paired by their requested batch (with fill, each model ran its own batch).
    by_key = {(r["model"], r["img_size"], r["batch_start"], r["mode"]): r for r in rows}
    for r in rows:
        r["peer"] = peer
        ref = by_key.get((peer, r["img_size"], r["batch_start"], r["mode"]))
        ok = ref is not None and ref["status"] == "ok" and r["status"] == "ok"
        r["throughput_vs_peer"] = _ratio(r["images_per_s"], ref["images_per_s"]) if ok else NAN
        if ok:  # per image: the plain ratio at equal batches
            r["memory_vs_peer"] = _ratio(r["peak_mib"] / r["batch"], ref["peak_mib"] / ref["batch"])
        else:
            r["memory_vs_peer"] = NAN
        has_ops = ref is not None
        r["flops_vs_peer"] = _ratio(r["gflops_per_image"], ref["gflops_per_image"]) if has_ops else NAN


def _slope(x0: float, y0: float, x1: float, y1: float) -> float:
    if min(x0, y0, x1, y1) <= 0 or any(math.isnan(v) for v in (y0, y1)) or x0 == x1:
        return NAN
    return math.log(y1 / y0) / math.log(x1 / x0)


def scaling_exponents(rows: Sequence[dict]) -> list[dict]:
    """Per model: log-log slopes against the number of tokens (which is proportional to the pixels)
    between the smallest and the largest image size, of FLOPs, elementwise operations and the time
    per image of every (mode, batch) measured at both sizes. 1 is linear in tokens, 2 quadratic."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        sizes = sorted({r["img_size"] for r in mine})
        if len(sizes) < 2:
            continue
        s0, s1 = sizes[0], sizes[-1]
        entry = {"model": model, "from_px": s0, "to_px": s1}
        first = next(r for r in mine if r["img_size"] == s0)
        last = next(r for r in mine if r["img_size"] == s1)
        for key, name in (("gflops_per_image", "flops"), ("elementwise_gops_per_image", "elementwise")):
            entry[f"{name}_exponent"] = _slope(s0**2, first[key], s1**2, last[key])
        for mode, batch, fill in dict.fromkeys((r["mode"], r["batch_start"], r["fill"]) for r in mine):
            at = {r["img_size"]: r for r in mine if (r["mode"], r["batch_start"]) == (mode, batch)}
            a, b = at.get(s0), at.get(s1)
            ok = a and b and a["status"] == "ok" and b["status"] == "ok"
            seconds = _slope(s0**2, 1 / a["images_per_s"], s1**2, 1 / b["images_per_s"]) if ok else NAN
            entry[f"time_exponent_{mode}_{'fill' if fill else 'b'}{batch}"] = seconds
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------
# report: table, CSV, plot
# ------------------------------------------------------------------------------------------------


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def _table_order(rows: Sequence[dict], peer: str) -> list[dict]:
    labels = list(dict.fromkeys([peer, *(r["model"] for r in rows)]))
    return sorted(
        rows,
        key=lambda r: (MODES.index(r["mode"]), r["batch_start"], r["img_size"], labels.index(r["model"])),
    )


def format_ratio_table(rows: Sequence[dict], peer: str) -> str:
    """The markdown table of every cell with its ratios to ``peer`` (the peer's own rows read 1.00)."""
    header = ("model", "px", "batch", "mode", "ms/call", "img/s", f"vs {peer}", "peak MiB", "mem vs peer",
              "GFLOP/img", "FLOPs vs peer", "elem. GOP/img", "status")  # fmt: skip
    table = [
        (r["model"], str(r["img_size"]), str(r["batch"]), r["mode"], _fmt(r["time_s"] * 1e3, ".1f"),
         _fmt(r["images_per_s"], ".2f"), _fmt(r["throughput_vs_peer"], ".2f", "x"),
         _fmt(r["peak_mib"], ".1f"), _fmt(r["memory_vs_peer"], ".2f", "x"),
         _fmt(r["gflops_per_image"], ".2f"), _fmt(r["flops_vs_peer"], ".2f", "x"),
         _fmt(r["elementwise_gops_per_image"], ".3f"), r["status"])
        for r in _table_order(rows, peer)
    ]  # fmt: skip
    return markdown_table(header, table)


def format_exponents(exponents: Sequence[dict]) -> str:
    """The scaling exponents (log-log slopes against tokens) as a markdown table."""
    if not exponents:
        return "(scaling exponents need two or more image sizes)"
    timings = list(dict.fromkeys(k for e in exponents for k in e if k.startswith("time_exponent_")))
    header = (
        "model",
        "px",
        "FLOPs",
        "elementwise ops",
        *(f"time {k[14:].replace('_b', ' b').replace('_fill', ' batch filled from ')}" for k in timings),
    )
    table = [
        (e["model"], f"{e['from_px']}->{e['to_px']}", _fmt(e["flops_exponent"], ".2f"),
         _fmt(e["elementwise_exponent"], ".2f"), *(_fmt(e.get(k, NAN), ".2f") for k in timings))
        for e in exponents
    ]  # fmt: skip
    return markdown_table(header, table)


def plot_models(rows: Sequence[dict], path: Path, title: str) -> None:
    """Throughput and peak memory against image size (log-log), one panel pair per (mode, batch) and
    one line per model; then operations per image against image size, with each model's exponent."""
    plt = agg_pyplot()
    from matplotlib.ticker import NullLocator

    ok = [r for r in rows if r["status"] == "ok"]
    combos = list(
        dict.fromkeys(
            (r["mode"], r["batch_start"]) for r in sorted(ok, key=lambda r: (r["mode"], r["batch_start"]))
        )
    )
    filled = any(r["fill"] for r in rows)
    with_ops = [r for r in rows if not math.isnan(r["gflops_per_image"])]
    panel_rows = len(combos) + (1 if with_ops else 0)
    fig, axes = plt.subplots(max(panel_rows, 1), 2, figsize=(12, 4 * max(panel_rows, 1)), squeeze=False)
    labels = list(dict.fromkeys(r["model"] for r in rows))
    sizes = sorted({r["img_size"] for r in rows})
    for i, (mode, batch) in enumerate(combos):
        for label in labels:
            rs = sorted((r for r in ok if (r["model"], r["mode"], r["batch_start"]) == (label, mode, batch)),
                        key=lambda r: r["img_size"])  # fmt: skip
            if rs:
                xs = [r["img_size"] for r in rs]
                axes[i, 0].loglog(xs, [r["images_per_s"] for r in rs], "o-", label=label)
                # log axes cannot show 0 or below; a peak that small is noise anyway
                axes[i, 1].loglog(xs, [max(r["peak_mib"], 1e-2) for r in rs], "o-", label=label)
        which = f"batch filled from {batch}" if filled else f"batch {batch}"
        axes[i, 0].set_title(f"throughput (images/s), {mode}, {which}")
        axes[i, 1].set_title(f"peak memory above the weights (MiB), {mode}, {which}")
    if with_ops:
        exponents = {e["model"]: e for e in scaling_exponents(rows)}
        for label in labels:
            per_size = {r["img_size"]: r for r in with_ops if r["model"] == label}
            xs = sorted(per_size)
            if not xs:
                continue
            e = exponents.get(label, {})
            for col, key, name in (
                (0, "gflops_per_image", "flops"),
                (1, "elementwise_gops_per_image", "elementwise"),
            ):
                slope = e.get(f"{name}_exponent", NAN)
                tag = f" (tokens^{slope:.2f})" if not math.isnan(slope) else ""
                axes[-1, col].loglog(xs, [max(per_size[s][key], 1e-6) for s in xs], "o-", label=label + tag)
        axes[-1, 0].set_title("GFLOP per image (FlopCounterMode: matmul, conv, attention)")
        axes[-1, 1].set_title("elementwise Gop per image (not in FlopCounterMode)")
    for ax in axes.flat:
        ax.set_xlabel("image size (px)")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured sizes as x ticks
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


@dataclass
class ModelsReport:
    """What ``bench_models`` measured and wrote."""

    rows: list[dict]
    exponents: list[dict]
    peer: str
    specs: list[ModelSpec]
    files: dict[str, Path]
    device: str
    device_name: str
    threads: int
    seconds: float
    busy_before: float
    busy_after: float
    settings: dict = dataclasses.field(default_factory=dict)


def bench_models(
    specs: Sequence[ModelSpec],
    sizes: Sequence[int],
    batch_sizes: Sequence[int],
    modes: Sequence[str],
    out: Path,
    *,
    peer: str = DEFAULT_PEER,
    device: str = "cpu",
    repeats: int = 3,
    threads: int | None = None,
    max_memory_gib: float = math.inf,
    max_call_s: float = math.inf,
    count_operations: bool = True,
    report: Callable[[str], None] | None = None,
    progress: bool = True,
    stem: str = "bench_models",
    fill: bool = False,
) -> ModelsReport:
    """Run the sweep (``run_sweep``) and write ``<stem>.csv``, ``<stem>_scaling.csv`` and ``<stem>.png``
    under ``out`` (atomically; the CSV also after every cell, so a sweep cut short keeps what it
    measured). The CPUs' busy fraction is sampled before and after the sweep. ``fill``: the batch
    sizes are starts that each cell fits to the card (module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or torch.get_num_threads()
    files = {"csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    busy_before = cpu_busy_fraction(1.0)
    start = time.perf_counter()
    rows = run_sweep(
        specs, sizes, batch_sizes, modes, peer=peer, device=device, repeats=repeats, threads=threads,
        max_memory_gib=max_memory_gib, max_call_s=max_call_s, count_operations=count_operations,
        report=report, progress=progress, fill=fill,
        on_cell=lambda rows: write_csv_atomic(rows, files["csv"]),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    busy_after = cpu_busy_fraction(1.0)
    exponents = scaling_exponents(rows)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    write_csv_atomic(rows, files["csv"])
    if exponents:
        files["scaling_csv"] = out / f"{stem}_scaling.csv"
        keys = list(dict.fromkeys(k for e in exponents for k in e))
        write_csv_atomic([{k: e.get(k, NAN) for k in keys} for e in exponents], files["scaling_csv"])
    what = "CUDA" if device.startswith("cuda") else f"CPU, {threads} threads"
    plot_models(rows, files["png"], f"{stem}: {name} ({what}), float32, peer {peer}")
    settings = {"sizes": list(sizes), "batch_sizes": list(batch_sizes), "modes": list(modes),
                "repeats": repeats, "max_memory_gib": max_memory_gib, "max_call_s": max_call_s,
                "fill": fill}  # fmt: skip
    return ModelsReport(rows, exponents, peer, list(specs), files, device, name, threads, seconds,
                        busy_before, busy_after, settings)  # fmt: skip


FLOPS_NOTE = (
    "GFLOP/img: torch.utils.flop_counter.FlopCounterMode over one eval forward (batch 1, PyTorch forms of\n"
    "seqvision's operators): matrix products, convolutions and attention only (CPU flash attention added\n"
    "by seqvision.bench). It does not count elementwise work, which is most of what the recurrent scans\n"
    "do (selective_scan's gates and state updates, decays, cumulative sums), nor norms and activations:\n"
    "elem. GOP/img counts those as one op per output element of pointwise ops and one per input element\n"
    "of reductions and scans (rough, and specific to the PyTorch forms; Triton kernels are not seen)."
)


# Issue 19's targets for the backbones: (model, peer, image size, mode, least throughput ratio).
MODEL_TARGETS = (
    ("vir_small_patch16_224", "vit_small_patch16_224", 224, "eval", 0.9),
    ("lightnet_small_patch16_224", "vit_small_patch16_224", 224, "eval", 0.9),
    ("vir_small_patch16_224", "vit_small_patch16_224", 896, "eval", 2.0),
    ("lightnet_small_patch16_224", "vit_small_patch16_224", 896, "eval", 2.0),
    ("vim_tiny_patch16_224", "deit_tiny_patch16_224", 1248, "eval", 2.8),
)


def model_targets(rows: Sequence[dict], peer: str) -> list[str]:
    """MET / MISSED / NOT MEASURED for each of ``MODEL_TARGETS`` this sweep (its peer) has a row for."""
    lines = []
    for model, target_peer, size, mode, least in MODEL_TARGETS:
        if target_peer != peer:
            continue
        for r in rows:
            if (r["model"], r["img_size"], r["mode"]) != (model, size, mode):
                continue
            name = f"{model} {mode} vs {peer} at {size} px >= {least}x"
            ratio = r["throughput_vs_peer"]
            if math.isnan(ratio):
                lines.append(f"NOT MEASURED: {name} ({r['status'] or 'not run'}: {r['reason']})")
            else:
                verdict = "MET" if ratio >= least else "MISSED"
                lines.append(f"{verdict}: {name}: {ratio:.2f}x (batch {r['batch']})")
    return lines


def format_report(result: ModelsReport) -> str:
    """Everything ``seqvision bench models`` prints after the sweep."""
    import timm

    lines = [
        f"torch {torch.__version__}, timm {timm.__version__}, {result.device_name} ({result.device}), "
        f"{result.threads} threads, {os.cpu_count()} CPUs, float32; CPUs busy {result.busy_before:.0%} "
        f"before and {result.busy_after:.0%} after the sweep (other processes)",
        "eval: forward under no_grad; train: forward + cross-entropy + backward + SGD step; "
        f"time: median of {result.settings.get('repeats', '?')} calls after a warm-up",
    ]
    if result.device == "cpu" and result.threads > 1 and result.busy_before > BUSY_WARNING:
        lines.append(
            f"warning: other processes kept the CPUs {result.busy_before:.0%} busy; with {result.threads} "
            "threads every parallel region waits for the slowest core, so times are slow and noisy "
            "(--threads 1 is steadier on a shared machine)"
        )
    if result.settings.get("fill"):
        lines.append(
            "batch: per cell, the largest power of two up to the start that fits the memory and call-time "
            "limits (estimated from smaller cells), halved on out-of-memory; ratios compare images/s "
            "at each model's own batch and memory per image"
        )
    lines += [f"  {s.label}: {s.description}" for s in result.specs]
    lines += ["", format_ratio_table(result.rows, result.peer), ""]
    targets = model_targets(result.rows, result.peer)
    if targets:
        lines += ["targets (issue 19):", *targets, ""]
    notes = [r for r in _table_order(result.rows, result.peer) if r["status"] != "ok"]
    for r in notes:
        lines.append(
            f"- {r['model']} {r['img_size']} px batch {r['batch']} {r['mode']}: {r['status']}: {r['reason']}"
        )
    if notes:
        lines.append("")
    lines += ["scaling exponents (log-log slope against the number of tokens; 1 = linear, 2 = quadratic):",
              format_exponents(result.exponents), "", FLOPS_NOTE, ""]  # fmt: skip
    lines += [f"wrote {path}" for path in result.files.values()]
    lines.append(f"wall time {result.seconds:.0f} s")
    return "\n".join(lines)
