"""Argument checking and backend selection shared by every operator in ``seqvision.kernels``.

Every public operator validates its inputs here so that a wrong call fails with a message that names
the argument, what was expected and what came, instead of a shape error deep inside an einsum.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence

import torch

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "SEQVISION_BACKEND"
# Set to 1 to check log-decays on CUDA tensors too (a host sync per call; see check_nonpositive).
DECAY_CHECK_ENV = "SEQVISION_CHECK_DECAYS"


@functools.cache
def triton_importable() -> bool:
    """Whether the triton package imports here; seqvision itself never needs it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """Whether Triton kernels run through the interpreter (on the CPU): TRITON_INTERPRET=1, which must
    be set before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(
    backend: str,
    *tensors: torch.Tensor | None,
    op: str = "this operator",
    has_triton: bool = False,
    takes_float64: bool = False,
) -> str:
    """Return the backend that runs ``op``: ``"torch"`` (the PyTorch forms) or ``"triton"``.

    ``"auto"`` picks Triton when ``op`` has a Triton kernel, its tensors are on CUDA and triton imports,
    and the PyTorch forms otherwise; the environment variable SEQVISION_BACKEND=torch|triton replaces
    ``"auto"`` (with ``triton``, operators without a kernel keep the PyTorch forms). The scan kernels
    compute in float32, so float64 tensors take the PyTorch forms under ``"auto"`` unless the kernel
    ``takes_float64`` (the copies of scan_orders do). Asking for
    ``"triton"`` explicitly never falls back: it is an error where the kernel cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    present = [t for t in tensors if t is not None]
    float64 = not takes_float64 and any(t.dtype == torch.float64 for t in present)
    if backend == "auto":
        chosen = os.environ.get(BACKEND_ENV, "").strip()
        if chosen and chosen not in ("torch", "triton"):
            raise ValueError(f"{BACKEND_ENV} must be 'torch' or 'triton', got {chosen!r}")
        if chosen:
            if chosen == "triton" and has_triton and not float64:
                _check_interpreter(present)
                return "triton"
            return "torch"
        on_cuda = bool(present) and all(t.is_cuda for t in present)
        return "triton" if has_triton and on_cuda and not float64 and triton_importable() else "torch"
    if backend == "triton":
        if not has_triton:
            raise ValueError(
                f"backend='triton' is not available for {op} yet: use backend='torch' or 'auto' "
                "(which runs the exact PyTorch forms)"
            )
        if not triton_importable():
            raise ValueError("backend='triton' needs the triton package, which does not import here")
        if float64:
            raise ValueError(
                f"backend='triton' computes {op} in float32 and takes float32, float16 or bfloat16 "
                "tensors, got float64: use backend='torch' (or 'auto') for float64"
            )
        devices = {t.device.type for t in present}
        if devices != {"cuda"} and not triton_interpreted():
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before "
                f"triton is imported), got tensors on {sorted(devices)}"
            )
        _check_interpreter(present)
    return backend


def _check_interpreter(tensors: Sequence[torch.Tensor]) -> None:
    """Raise if the Triton kernels would run through an interpreter that cannot run them here."""
    if any(not t.is_cuda for t in tensors) and triton_interpreted():
        problem = interpreter_problem()
        if problem is not None:
            raise RuntimeError(problem)


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = [*re.findall(r"\d+", version), "0", "0"][:2]
    return int(major), int(minor)


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run seqvision's kernels with the installed packages, or None.

    Triton up to 3.6 turns one-element arrays into Python ints (loop bounds, indices) in a way numpy
    2.4 refuses, so its interpreter fails inside any kernel that loops over a kernel argument
    (triton-lang/triton#9171, fixed in Triton 3.7). torch 2.11 requires Triton 3.6."""
    import numpy
    import triton

    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run seqvision's "
            f"kernels with numpy {numpy.__version__}: it converts one-element arrays to Python ints, "
            "which numpy 2.4 refuses (triton-lang/triton#9171, fixed in Triton 3.7). Install "
            "numpy<2.4 or triton>=3.7, or use backend='torch'"
        )
    return None


def check_form(form: str, allowed: Sequence[str]) -> None:
    if form not in allowed:
        raise ValueError(f"form must be one of {tuple(allowed)}, got {form!r}")


def check_tensor(name: str, x: object, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Check that ``x`` is a floating-point tensor with one of the allowed numbers of dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    dtypes = [t.dtype for t in tensors]
    if len(set(dtypes)) > 1:
        got = ", ".join(f"{n}={d}" for n, d in zip(names, dtypes, strict=True))
        raise TypeError(f"{', '.join(names)} must share one dtype, got {got}")


def check_aux_dtype(name: str, x: torch.Tensor, main_dtype: torch.dtype) -> None:
    """Decays and states may be kept in float32 beside 16-bit inputs; any other mix is an error."""
    allowed = {main_dtype, torch.float32} if main_dtype in (torch.float16, torch.bfloat16) else {main_dtype}
    if x.dtype not in allowed:
        names = " or ".join(sorted(str(d) for d in allowed))
        raise TypeError(f"{name} must have dtype {names} to match the inputs, got {x.dtype}")


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        got = ", ".join(f"{n}={t.device}" for n, t in zip(names, tensors, strict=True))
        raise ValueError(f"{', '.join(names)} must be on one device, got {got}")


def check_nonpositive(name: str, x: torch.Tensor) -> None:
    """Log-decays must be <= 0 (a gate in (0, 1]); NaN fails too.

    Checked on CPU tensors, where reading the answer costs nothing. On any other device (CUDA) the
    check would read a boolean back from the device: a host synchronisation on every call, which in
    a model is one per layer and keeps the CPU from queueing kernels ahead of the GPU (and breaks
    CUDA-graph capture). There it runs only when ``SEQVISION_CHECK_DECAYS=1`` is set (read at each
    call; ``0`` or unset skips it), and the operators' docstrings say what a positive log-decay does
    unchecked.
    """
    if x.device.type != "cpu" and not device_decay_checks():
        return
    if not bool((x <= 0).all()):
        raise ValueError(
            f"{name} must be <= 0 everywhere (a log of a gate in (0, 1]), got max {x.max().item():.4g}"
        )


def device_decay_checks() -> bool:
    """Whether ``check_nonpositive`` also checks tensors off the CPU (``SEQVISION_CHECK_DECAYS=1``)."""
    value = os.environ.get(DECAY_CHECK_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{DECAY_CHECK_ENV} must be '0' or '1', got {value!r}")
    return value == "1"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The PyTorch forms run in float64 for float64 inputs and in float32 for everything else.

    Layers use it for what must not be rounded to 16 bits: decays, normalisers, statistics, angles."""
    return torch.float64 if dtype == torch.float64 else torch.float32
