"""The one atomic file writer: every output is written under a temporary name in the target's
folder, then renamed over the target.

A reader therefore sees the old file or the complete new one, and a crash or an exception mid-write
leaves no partial file under the target's name. ``atomic_path`` is the primitive; the rest are the
formats seqvision writes (JSON, text, CSV, matplotlib figures). HDF5 volumes, safetensors files and
checkpoints use ``atomic_path`` directly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "save_figure_atomic", "write_csv_atomic", "write_json_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    The temporary file lives in the same folder (the same file system), so ``os.replace`` is one
    atomic rename. The temporary name keeps the suffix, from which some writers (matplotlib) pick the
    format, and starts with a dot, so folder listings and globs for the outputs skip it.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder to write {path.name} into")
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` at ``path``, atomically; return the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """Write ``values`` as indented JSON at ``path``, atomically; return the path."""
    return write_text_atomic(path, json.dumps(values, indent=2) + "\n")


def write_csv_atomic(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` (mappings sharing the keys of the first one) as a CSV file at ``path``, atomically."""
    with atomic_path(path) as temporary, temporary.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def save_figure_atomic(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure at ``path``, atomically; ``savefig_kwargs`` go to ``fig.savefig``."""
    with atomic_path(path) as temporary:
        fig.savefig(temporary, **savefig_kwargs)
    return Path(path)
