"""Helpers shared by the Triton kernels of ``seqvision.kernels``.

Importing this module never fails: without triton, ``triton`` and ``tl`` are None and the operators
keep their PyTorch forms. The kernels accumulate in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from ._common import triton_interpreted

try:  # optional: the Triton paths exist only where triton imports
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# How tl.dot multiplies float32 tiles, by input dtype: exact float32 products for float32 inputs (the
# default, tf32, keeps 10 mantissa bits), and tensor-core products in the inputs' own 16-bit type
# otherwise, accumulated in float32 either way; DOT_TF32 for float32 tiles whose range float16 lacks.
DOT_IEEE, DOT_FP16, DOT_BF16, DOT_TF32 = 0, 1, 2, 3
_DOT_MODES = {torch.float32: DOT_IEEE, torch.float16: DOT_FP16, torch.bfloat16: DOT_BF16}


def dot_mode(dtype: torch.dtype) -> int:
    """The ``DOT`` constant the kernels take for inputs of ``dtype`` (float32, float16 or bfloat16).

    Triton's interpreter multiplies bfloat16 tiles wrongly (it holds them as raw 16-bit integers), so
    there bfloat16 inputs get float32 products; loads and stores of bfloat16 work there."""
    mode = _DOT_MODES[dtype]
    return DOT_TF32 if mode == DOT_BF16 and triton_interpreted() else mode


if triton is not None:

    @triton.jit
    def dot(a, b, DOT: tl.constexpr):
        """a @ b for float32 tiles a (M, K), b (K, N) with M, N, K >= 16, accumulated in float32."""
        if DOT == 0:
            out = tl.dot(a, b, input_precision="ieee")
        elif DOT == 1:
            out = tl.dot(a.to(tl.float16), b.to(tl.float16))
        elif DOT == 2:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            out = tl.dot(a, b, input_precision="tf32")
        return out
