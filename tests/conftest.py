"""Test-session set-up.

Triton kernels run on the CPU only through Triton's interpreter, which reads TRITON_INTERPRET when
triton is first imported; pytest imports this file before any test module (and so before torch,
timm or seqvision can import triton). ``backend="auto"`` still picks the PyTorch forms for CPU
tensors, so only tests that ask for ``backend="triton"`` run the interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # after TRITON_INTERPRET is set: torch may import triton
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after).

    On a shared 2-core machine the small models of the training tests run several times faster on
    one thread than on two that wait for each other at every parallel region, and a test that
    compares a run with its resumed child process gets the same numerics in both.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
