"""Sequence-mixing operators. Nothing here knows about images.

Each operator has a PyTorch reference for every form (``recurrent`` is the ground truth; ``chunk`` the
fast exact form used by default) and takes ``backend="auto" | "torch" | "triton"``.

* :func:`linear_attention` - decayed linear attention: retention, Mamba-2/SSD, GLA/LightNet.
* :func:`selective_scan` - Mamba-1's selective scan with mamba-ssm's signature.
* :func:`linear_recurrence` - ``h_t = a_t h_{t-1} + x_t`` along one axis of an N-D tensor.
* :mod:`scan_orders` - flatten a 2-D/3-D grid into sequences and back; ``cross_scan``/``cross_merge``.
* :func:`compute_dtype` - the dtype the operators compute in: float64 for float64, float32 otherwise.
* :func:`resolve_backend`, :func:`triton_interpreted`, ``BACKEND_ENV`` - which implementation
  ``backend="auto"`` picks (``SEQVISION_BACKEND`` overrides it), for benchmarks and tests;
  :func:`interpreter_problem` - why Triton's interpreter cannot run the kernels here, if it cannot.
"""

from . import scan_orders
from ._common import BACKEND_ENV, compute_dtype, interpreter_problem, resolve_backend, triton_interpreted
from .linear_attention import linear_attention
from .linear_recurrence import linear_recurrence
from .scan_orders import cross_merge, cross_scan
from .selective_scan import selective_scan

__all__ = [
    "BACKEND_ENV",
    "compute_dtype",
    "cross_merge",
    "cross_scan",
    "interpreter_problem",
    "linear_attention",
    "linear_recurrence",
    "resolve_backend",
    "scan_orders",
    "selective_scan",
    "triton_interpreted",
]
