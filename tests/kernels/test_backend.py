"""Backend selection: 'auto' picks Triton only for CUDA tensors of a dtype its kernel takes; 'triton'
asked for by name never falls back."""

import pytest
import torch

from seqvision.kernels import resolve_backend


def test_auto_and_torch_select_the_reference():
    x = torch.zeros(2)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x, None) == "torch"


def test_triton_is_refused_where_no_kernel_exists():
    with pytest.raises(ValueError, match="backend='triton' is not available for some_op yet"):
        resolve_backend("triton", torch.zeros(2), op="some_op")


def test_float64_keeps_the_reference_unless_the_kernel_takes_it(monkeypatch):
    x = torch.zeros(2, dtype=torch.float64)
    monkeypatch.setenv("SEQVISION_BACKEND", "triton")
    assert resolve_backend("auto", x, op="linear_attention", has_triton=True) == "torch"
    assert resolve_backend("auto", x, op="cross_scan", has_triton=True, takes_float64=True) == "triton"
    with pytest.raises(ValueError, match=r"computes linear_attention in float32 .* got float64"):
        resolve_backend("triton", x, op="linear_attention", has_triton=True)


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"runs on CUDA tensors .* got tensors on \['cpu'\]"):
        resolve_backend("triton", torch.zeros(2), op="cross_scan", has_triton=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.zeros(2), op="cross_scan", has_triton=True) == "triton"


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'gpu'"):
        resolve_backend("gpu")


def test_seqvision_works_without_triton():
    import subprocess
    import sys

    # A None entry in sys.modules makes `import triton` raise ImportError, as on a machine without it.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, timm, seqvision\n"
        "import seqvision.kernels as K\n"
        "q = torch.randn(1, 2, 5, 3)\n"
        "print(K.linear_attention(q, q, q, backend='auto').shape)\n"
        "print(timm.create_model('vir_tiny_patch16_224', img_size=32)(torch.randn(1, 3, 32, 32)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["torch.Size([1, 2, 5, 3])", "torch.Size([1, 1000])"]


def test_an_interpreter_that_cannot_run_the_kernels_is_refused_by_name(monkeypatch):
    # Triton <= 3.6's interpreter turns one-element arrays into ints in a way numpy 2.4 refuses, so it
    # fails deep inside any kernel that loops over an argument (triton-lang/triton#9171); torch 2.11
    # pins Triton 3.6. The operators say so before launching anything.
    import numpy
    import triton

    from seqvision.kernels import _common

    def versions(triton_version: str, numpy_version: str) -> None:
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        _common.interpreter_problem.cache_clear()

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        versions("3.6.0", "2.4.6")
        message = r"Triton 3.6.0's interpreter .* numpy 2.4.6: .* Install numpy<2.4 or triton>=3.7"
        with pytest.raises(RuntimeError, match=message):
            resolve_backend("triton", torch.zeros(2), op="cross_scan", has_triton=True)
        monkeypatch.setenv("SEQVISION_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="triton-lang/triton#9171"):
            resolve_backend("auto", torch.zeros(2), op="cross_scan", has_triton=True)
        for fine in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.10.1", "2.5.0")):
            versions(*fine)
            assert resolve_backend("triton", torch.zeros(2), op="cross_scan", has_triton=True) == "triton"
    finally:
        monkeypatch.undo()
        _common.interpreter_problem.cache_clear()
