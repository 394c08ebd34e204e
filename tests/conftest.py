"""Test-session set-up.

Triton kernels run on the CPU only through Triton's interpreter, which reads TRITON_INTERPRET when
triton is first imported; pytest imports this file before any test module (and so before torch,
timm or seqvision can import triton). ``backend="auto"`` still picks the PyTorch forms for CPU
tensors, so only tests that ask for ``backend="triton"`` run the interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
