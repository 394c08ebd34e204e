"""Atomic output files: written under a temporary name in the target's folder, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    The temporary file lives in the same folder (the same file system), so ``os.replace`` is one
    atomic rename: a reader sees the old file or the complete new one, and a crash or an exception
    mid-write leaves no partial file under ``path``. The temporary name keeps the suffix, from which
    some writers (matplotlib) pick the format.
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


def write_json_atomic(path: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """Write ``values`` as indented JSON at ``path``, atomically; return the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(values, indent=2) + "\n")
    return Path(path)
