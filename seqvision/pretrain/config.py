"""YAML experiment configs shared by the training entry points (``pretrain``, ``finetune_segmenter``).

A config is a mapping of named sections (``model``, ``data``, ``train``, ...), each a mapping.
``load_sections`` reads one from a YAML file (or copies a mapping), applies command-line overrides
``"section.key=value"`` and refuses unknown sections and, where the caller lists them, unknown keys:
a typo is an error, never a silently ignored setting. ``write_config`` records the config as run.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seqvision.utils.io import write_text_atomic

from .synthetic import synthetic_em_volume

__all__ = ["CONFIG_FILE", "apply_overrides", "load_sections", "synthetic_volume", "write_config"]

CONFIG_FILE = "config.yaml"
"""The name under which a run records its config (overrides applied) in its output folder."""

_SYNTHETIC_DEFAULTS = {"shape": (32, 256, 256), "seed": 0}


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``"a.b.c=value"`` strings to the nested mapping ``values`` in place; returns it.

    Values are parsed as YAML (``train.steps=20``, ``model.crop_size=[16,32,32]``,
    ``train.keep_last=null``); a dotted key creates the nested mappings it names.
    """
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} must look like section.key=value")
        *parents, leaf = key.split(".")
        node = values
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {name!r} is not a section")
        node[leaf] = yaml.safe_load(text)
    return values


def load_sections(
    config: str | os.PathLike | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    sections: Sequence[str],
    known_keys: Mapping[str, Collection[str]] | None = None,
) -> dict[str, Any]:
    """Read a YAML file (or deep-copy a mapping), apply overrides and check its sections.

    Args:
        config: a YAML file or a mapping of sections.
        overrides: ``"section.key=value"`` strings (see ``apply_overrides``).
        sections: the allowed sections; missing ones become empty mappings.
        known_keys: per section, the keys allowed in it (sections not named here are not checked,
            e.g. ``train``, which ``LoopConfig.from_dict`` checks itself).

    Returns:
        a new dict with every section present. Raises FileNotFoundError for a missing file and
        ValueError for an unknown section or key, a section that is not a mapping, a bad override.
    """
    if isinstance(config, Mapping):
        values = copy.deepcopy(dict(config))
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config: {path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config: {path} must hold a mapping with sections {tuple(sections)}")
    apply_overrides(values, overrides)
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ValueError(f"config: unknown section(s) {unknown}; expected {list(sections)}")
    for section in sections:
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ValueError(f"config: section {section!r} must be a mapping, got {values[section]!r}")
    for section, keys in (known_keys or {}).items():
        unknown = sorted(set(values[section]) - set(keys))
        if unknown:
            raise ValueError(f"config: unknown {section} option(s) {unknown}; known: {sorted(keys)}")
    return values


def write_config(path: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """Write a config as YAML, atomically (a temporary sibling renamed into place).

    The values go through JSON first, so that tuples become lists and paths strings, which
    ``yaml.safe_dump`` can write and ``load_sections`` reads back.
    """
    plain = json.loads(json.dumps(dict(values), default=str))
    return write_text_atomic(path, yaml.safe_dump(plain, sort_keys=False))


def synthetic_volume(spec: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The synthetic volume a config's ``data.synthetic`` mapping describes.

    ``spec`` holds ``synthetic_em_volume`` arguments; ``shape`` defaults to (32, 256, 256) and
    ``seed`` to 0.

    Returns:
        ``(raw, labels, spec)``: raw uint8 (Z, Y, X), labels uint64 (Z, Y, X) and the arguments as
        used (defaults filled in), whose ``voxel_size``, when given, the dataset should use too.
    """
    spec = {**_SYNTHETIC_DEFAULTS, **(spec or {})}
    spec["shape"] = tuple(spec["shape"])
    raw, labels = synthetic_em_volume(**spec)
    return raw, labels, spec
