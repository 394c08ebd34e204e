"""Backend selection: 'auto' and 'torch' run the PyTorch forms; 'triton' is refused until it lands."""

import pytest
import torch

from seqvision.kernels._common import resolve_backend


def test_auto_and_torch_select_the_reference():
    x = torch.zeros(2)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x, None) == "torch"


def test_triton_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="backend='triton' is not available in this release"):
        resolve_backend("triton", torch.zeros(2))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'gpu'"):
        resolve_backend("gpu")


def test_importing_seqvision_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, seqvision, seqvision.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
