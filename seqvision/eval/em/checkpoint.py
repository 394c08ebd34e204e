"""EM segmenter checkpoints: one safetensors file that names its own architecture.

Format (``CHECKPOINT_FORMAT``, version 1): a ``.safetensors`` file holding an ``EMSegMamba``'s state
dict (``encoder.*``, ``skip_blocks.*``, ``up_blocks.*``, ``final_block.*``, ``head.*``) and, in the
safetensors header metadata, ``format`` = 'seqvision.em_segmenter', ``format_version`` = '1' and
``config`` = the JSON of a ``SegmenterConfig`` (encoder name, decoder width, output channels, decoder
kernel, encoder keyword arguments). ``save_segmenter`` writes it; ``load_segmenter`` rebuilds the
model from the config and loads the weights with a strict check that names every missing,
unexpected or mis-shaped key. Weights saved without that metadata (e.g. the ``model.safetensors`` of
a training checkpoint, whose keys carry an ``AffinityModel``'s ``segmenter.`` prefix, which is
removed) load with the config given explicitly or from a sidecar ``<name>.json`` / ``<name>.yaml``
/ ``<name>.yml`` next to the file.

A fine-tuning config can hold a ``SegmenterConfig`` as a mapping (``SegmenterConfig.from_dict``),
build the model with ``.build(pretrained_encoder=...)`` and save the result with ``save_segmenter``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import yaml

from seqvision.engine.config import TypedSection
from seqvision.utils.checks import state_mismatch
from seqvision.utils.io import atomic_path
from seqvision.vision.em import EMSegMamba, create_em_segmenter

__all__ = [
    "CHECKPOINT_FORMAT",
    "SegmenterConfig",
    "load_segmenter",
    "read_segmenter_config",
    "save_segmenter",
]

CHECKPOINT_FORMAT = "seqvision.em_segmenter"
_CHECKPOINT_VERSION = "1"


@dataclass
class SegmenterConfig(TypedSection):
    """The architecture of an ``EMSegMamba``: ``create_em_segmenter``'s arguments.

    ``encoder_kwargs`` go to the encoder (``dims``, ``depths``, ``d_state``, ``mamba_residual``,
    ...); ``hidden_size`` None means the encoder's default decoder width.
    """

    section_name: ClassVar[str] = "segmenter"

    encoder_name: str = "emmamba_base"
    hidden_size: int | None = None
    out_chans: int = 3
    kernel_size: tuple[int, int, int] = (1, 5, 5)
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kernel_size = tuple(int(k) for k in self.kernel_size)
        self.encoder_kwargs = {
            k: tuple(v) if isinstance(v, list) else v for k, v in self.encoder_kwargs.items()
        }

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["kernel_size"] = list(self.kernel_size)
        values["encoder_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.encoder_kwargs.items()
        }
        return values

    def build(self, pretrained_encoder: Any = None) -> EMSegMamba:
        """A new segmenter of this architecture (randomly initialised, or with pretrained encoder weights)."""
        return create_em_segmenter(
            self.encoder_name,
            pretrained_encoder,
            out_chans=self.out_chans,
            hidden_size=self.hidden_size,
            kernel_size=self.kernel_size,
            **self.encoder_kwargs,
        )


def _as_config(config: SegmenterConfig | Mapping[str, Any] | str | os.PathLike) -> SegmenterConfig:
    if isinstance(config, SegmenterConfig):
        return config
    if isinstance(config, Mapping):
        return SegmenterConfig.from_dict(config)
    if isinstance(config, str | os.PathLike):
        path = Path(config)
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(values, Mapping):
            raise ValueError(f"{path}: expected a mapping of segmenter options, got {type(values).__name__}")
        return SegmenterConfig.from_dict(values)
    raise TypeError(f"config must be a SegmenterConfig, a mapping or a path, got {type(config).__name__}")


def _expected_state(config: SegmenterConfig) -> dict[str, torch.Tensor]:
    # Built on the meta device: the names and shapes without allocating or initialising weights.
    with torch.device("meta"):
        return config.build().state_dict()


def save_segmenter(
    segmenter: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    config: SegmenterConfig | Mapping[str, Any],
) -> Path:
    """Write ``segmenter``'s weights and architecture as one safetensors file, atomically.

    Args:
        segmenter: an ``EMSegMamba`` (an ``AffinityModel``'s ``.segmenter``) or its state dict
            (e.g. gathered from FSDP shards).
        path: the ``.safetensors`` file to write.
        config: the ``SegmenterConfig`` it was built from; checked against the weights, so that
            every file written here loads back.

    Returns:
        the path. Raises ValueError when the weights do not fit ``config``.
    """
    from safetensors.torch import save_file

    config = _as_config(config)
    weights = segmenter.state_dict() if isinstance(segmenter, nn.Module) else segmenter
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    problem = state_mismatch(state, _expected_state(config))
    if problem:
        raise ValueError(f"segmenter does not match config {config.to_dict()}: {problem}")
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": _CHECKPOINT_VERSION,
        "config": json.dumps(config.to_dict()),
    }
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)
    return Path(path)


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as file:
            return dict(file.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot be read as a safetensors checkpoint ({err})") from err


def read_segmenter_config(path: str | os.PathLike) -> SegmenterConfig:
    """The architecture of a checkpoint: from its metadata, else a sidecar ``.json``/``.yaml``/``.yml``."""
    path = Path(path)
    metadata = _read_metadata(path)
    if "config" in metadata:
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path}: metadata format {metadata.get('format')!r} is not {CHECKPOINT_FORMAT!r}"
            )
        if metadata.get("format_version") != _CHECKPOINT_VERSION:
            raise ValueError(
                f"{path}: checkpoint format version {metadata.get('format_version')!r}; this seqvision "
                f"reads version {_CHECKPOINT_VERSION}"
            )
        return SegmenterConfig.from_dict(json.loads(metadata["config"]))
    for suffix in (".json", ".yaml", ".yml"):
        sidecar = path.with_suffix(suffix)
        if sidecar.is_file():
            return _as_config(sidecar)
    raise ValueError(
        f"{path}: the checkpoint does not name its architecture (no seqvision metadata, no sidecar "
        f"{path.with_suffix('.json').name} or .yaml); write it with save_segmenter or pass config="
    )


def load_segmenter(
    path: str | os.PathLike,
    config: SegmenterConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
) -> EMSegMamba:
    """Build the segmenter a checkpoint describes and load its weights, strictly; in eval mode.

    Args:
        path: a ``.safetensors`` file (see the module docstring for the format).
        config: the architecture, overriding the file's metadata and sidecars: a
            ``SegmenterConfig``, a mapping, or a JSON / YAML file.
        device: where the model goes.

    Raises:
        FileNotFoundError: no such file. ValueError: not safetensors, no architecture, or weights
        that do not fit it (the message lists the missing, unexpected and mis-shaped keys).
    """
    from safetensors.torch import load_file

    path = Path(path)
    config = read_segmenter_config(path) if config is None else _as_config(config)
    _read_metadata(path)  # a clear error for a missing or foreign file, also when config is given
    state = load_file(str(path))
    if state and all(key.startswith("segmenter.") for key in state):
        # The weights of a whole AffinityModel (a training checkpoint's model.safetensors).
        state = {key.removeprefix("segmenter."): value for key, value in state.items()}
    model = config.build()
    problem = state_mismatch(state, model.state_dict())
    if problem:
        raise ValueError(
            f"{path}: the weights do not fit the architecture {config.to_dict()} (a checkpoint of "
            f"another model?): {problem}"
        )
    model.load_state_dict(state)
    return model.to(device).eval()
