"""Measurement helpers shared by the benchmark scripts: a re-export of ``seqvision.bench.measure``.

The helpers live in the package (``seqvision bench`` uses them too); this module keeps the scripts'
``from _measure import ...`` working. The scripts are run as ``python benchmarks/<name>.py``, which
puts ``benchmarks/`` on ``sys.path``. Importing this module also puts the repository root on
``sys.path`` (after ``benchmarks/``) before it imports seqvision: a script then measures the
``seqvision`` of this checkout, not another copy that happens to be installed (an editable install
of a different tree would otherwise win, as the root is not on ``sys.path`` by itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # Right after benchmarks/ (sys.path[0]) and before site-packages; child processes inherit it.
    sys.path.insert(1, str(REPO_ROOT))

from seqvision.bench.measure import *  # noqa: E402, F403
from seqvision.bench.measure import STATUS  # noqa: E402
from seqvision.bench.measure import __all__ as _measure_all  # noqa: E402

__all__ = ["REPO_ROOT", "STATUS", *_measure_all]
