"""Published weights: reading the authors' files and converting them to seqvision's layout.

The authors of Vim, VMamba, TokenUnify and LRCN published weights in their own layouts (other
names, per-route twins instead of stacked tensors, other channel orders, Caffe's binary format).
Each family's ``checkpoint_filter_fn`` recognises its authors' layout and converts it, so the files
load through timm's own path (``pretrained=True`` or ``pretrained_cfg_overlay=dict(file=...)``).
This module holds what the families share:

* :func:`read_checkpoint` - a ``.safetensors`` or ``torch.save`` file as a dict, read without
  running code from it: objects of classes that are not tensors or containers (a yacs config, an
  optimizer's scheduler) come back as inert :class:`OpaqueObject` placeholders.
* :func:`unwrap_state_dict` - the state dict inside a training checkpoint ('model', 'state_dict',
  'module', or the EMA copy), with a DDP 'module.' prefix dropped.
* :func:`register_converter` / :func:`convert_checkpoint` - which filter (and which file reader,
  and how to size the model from the file) serves which model names; ``seqvision convert`` writes
  the result as a safetensors file in seqvision's layout.
* :func:`first_mismatch` - the first key where a converted state dict does not fit a model.
* :func:`load_pretrained_file` - what a model's ``load_pretrained`` (timm's ``custom_load`` hook)
  does: read, convert with the family's filter, then adapt and load as timm's own loader would.
"""

from __future__ import annotations

import fnmatch
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import adapt_input_conv

from seqvision.utils.checks import state_mismatch

__all__ = [
    "Converter",
    "OpaqueObject",
    "convert_checkpoint",
    "converter_for",
    "first_mismatch",
    "load_pretrained_file",
    "read_checkpoint",
    "read_local_files_with_load_pretrained",
    "register_converter",
    "registered_converters",
    "unwrap_state_dict",
]


class OpaqueObject(dict):
    """Stands in for an object of a class a checkpoint names but that is not loaded (a yacs
    ``CfgNode``, argparse-like configs, schedulers). It accepts whatever the pickle hands it and
    keeps it for inspection; nothing of the original class runs."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualified_name}>"


def _opaque_class(qualified_name: str) -> type[OpaqueObject]:
    module, _, name = qualified_name.rpartition(".")
    return type(
        name or qualified_name, (OpaqueObject,), {"qualified_name": qualified_name, "__module__": module}
    )


class _InertUnpickler(pickle.Unpickler):
    """torch's weights-only allow-list (tensors, storages, containers, dtypes); every other global
    the file names becomes an ``OpaqueObject`` subclass of that name, so no foreign code runs."""

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import _get_allowed_globals

        qualified_name = f"{module}.{name}"
        allowed = _get_allowed_globals()
        if qualified_name in allowed:
            return allowed[qualified_name]
        return _opaque_class(qualified_name)


def _inert_load(file: Any, **kwargs: Any) -> Any:
    return _InertUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle module: its Unpickler (subclassed by torch) and load.
_INERT_PICKLE = SimpleNamespace(Unpickler=_InertUnpickler, load=_inert_load, __name__="inert_pickle")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.safetensors`` or ``torch.save`` file into a dict, on the CPU, running no code from it.

    A ``torch.save`` file is unpickled with torch's weights-only allow-list; globals outside it (a
    yacs ``CfgNode`` in VMamba's releases, an ``argparse.Namespace`` of training arguments) come
    back as inert :class:`OpaqueObject` stand-ins that keep the pickled values, so the tensors load
    while nothing of those classes is imported or run.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint must be an existing file, got {str(file)!r}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(file)))
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False, pickle_module=_INERT_PICKLE)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise ValueError(f"{str(file)!r} could not be read as a torch checkpoint: {e}") from e
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{str(file)!r} must hold a dict (a state dict or a checkpoint), got {type(checkpoint).__name__}"
        )
    return dict(checkpoint)


def unwrap_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> dict[str, Any]:
    """The state dict inside a training checkpoint.

    Looks for 'state_dict_ema' / 'model_ema' first when ``use_ema``, then 'state_dict', 'model',
    'module' (nested wrappers are unwrapped in turn); a 'module.' prefix on every key (DDP) is
    dropped. A plain state dict is returned as it is (as a new dict).
    """
    state: Mapping[str, Any] = checkpoint
    keys = (("state_dict_ema", "model_ema") if use_ema else ()) + ("state_dict", "model", "module")
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for key in keys:
            if isinstance(state.get(key), Mapping):
                state, unwrapped = state[key], True
                break
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def first_mismatch(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> str:
    """'' when ``state`` fits ``expected`` (same keys and shapes), else a sentence that names the
    first key, in sorted order, that does not fit, followed by ``state_mismatch``'s summary."""
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    shapes = {
        k
        for k in set(state) & set(expected)
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape)
    }
    bad = sorted(missing | unexpected | shapes)
    if not bad:
        return ""
    key = bad[0]
    if key in missing:
        why = "the model has it, the file does not"
    elif key in unexpected:
        why = "the file has it, the model does not"
    else:
        got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
        why = f"file {got} vs model {tuple(expected[key].shape)}"
    return f"first key that does not fit: {key!r} ({why}); {state_mismatch(state, expected)}"


def _cfg_names(value: object) -> tuple[str, ...]:
    """A cfg's ``first_conv`` / ``classifier``: one module name, several, or none."""
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)  # type: ignore[arg-type]


def load_pretrained_file(
    model: nn.Module,
    path: str | os.PathLike,
    filter_fn: Callable[[dict, nn.Module], dict],
    read: Callable[[Path], dict] = read_checkpoint,
) -> None:
    """Read ``path`` with ``read``, convert it with ``filter_fn(raw, model)`` and load it into
    ``model``, doing what timm's loader does after its filter.

    timm hands a file to the model's ``load_pretrained`` instead of its own reader when the cfg says
    ``custom_load`` (the authors' files hold objects timm's weights-only reader refuses, or are not
    PyTorch files); this is the body every family's ``load_pretrained`` shares. As in timm: where
    the file's classifier (the cfg's ``classifier``) has another size (other ``num_classes``) or the
    model has none, the model keeps its own; a first conv (the cfg's ``first_conv``) for other input
    channels is adapted (``adapt_input_conv``). Every other key must fit exactly: a ValueError names
    the file and the first key that does not.
    """
    state = filter_fn(read(Path(path)), model)
    expected = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    for conv in _cfg_names(cfg.get("first_conv")):
        key = f"{conv}.weight"
        if key in state and key in expected and state[key].dim() == 4:
            got, want = state[key], expected[key]
            if got.shape[1] != want.shape[1] and got.shape[0] == want.shape[0]:
                state[key] = adapt_input_conv(want.shape[1], got)
    kept: set[str] = set()  # the model's own classifier, where the file's does not fit it
    for head in _cfg_names(cfg.get("classifier")):
        in_file = {k for k in state if k.startswith(head + ".")}
        in_model = {k for k in expected if k.startswith(head + ".")}
        other_size = any(state[k].shape != expected[k].shape for k in in_file & in_model)
        if in_file and (not in_model or other_size):  # num_classes=0, or another num_classes
            for key in in_file:
                del state[key]
            kept |= in_model
    problem = first_mismatch(state, {k: v for k, v in expected.items() if k not in kept})
    if problem:
        raise ValueError(f"{str(path)!r} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=not kept)


def read_local_files_with_load_pretrained(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments in which a local file given through
    ``pretrained_cfg_overlay=dict(file=...)`` goes to the model's ``load_pretrained``.

    timm resets ``custom_load`` whenever an overlay names a new weight source and then reads the file
    itself: with a weights-only ``torch.load`` that refuses the authors' VMamba files (a yacs
    config), cannot read a ``.caffemodel``, and takes a training checkpoint's ``model_ema`` copy over
    the ``model`` network the authors evaluated. For a family whose ``load_pretrained`` reads any
    file (``load_pretrained_file``), the overlay's ``custom_load`` defaults to True instead; an
    explicit ``custom_load=False`` keeps timm's reader.
    """
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and overlay.get("file"):
        kwargs = {**kwargs, "pretrained_cfg_overlay": {"custom_load": True, **overlay}}
    return kwargs


@dataclass(frozen=True)
class Converter:
    """How files for the model names matching ``pattern`` become seqvision state dicts.

    ``filter_fn(raw, model)``: the family's checkpoint filter (the same one timm's builder calls);
    ``read(path)``: the file reader (``read_checkpoint`` unless the format is not PyTorch's);
    ``build(name, raw, **kwargs)``: the model for the file, when its size must be read from the file
    (default: ``timm.create_model(name, **kwargs)``).
    """

    pattern: str
    filter_fn: Callable[[dict, nn.Module], dict]
    read: Callable[[Path], dict] = read_checkpoint
    build: Callable[..., nn.Module] | None = None


_CONVERTERS: list[Converter] = []


def register_converter(
    pattern: str,
    filter_fn: Callable[[dict, nn.Module], dict],
    *,
    read: Callable[[Path], dict] | None = None,
    build: Callable[..., nn.Module] | None = None,
) -> Converter:
    """Serve the model names matching the fnmatch ``pattern`` (e.g. 'vim_*') with ``filter_fn``."""
    converter = Converter(pattern, filter_fn, read or read_checkpoint, build)
    _CONVERTERS[:] = [c for c in _CONVERTERS if c.pattern != pattern]
    _CONVERTERS.append(converter)
    return converter


def registered_converters() -> tuple[str, ...]:
    """The model-name patterns ``seqvision convert`` knows."""
    return tuple(c.pattern for c in _CONVERTERS)


def converter_for(model_name: str) -> Converter:
    """The converter whose pattern matches ``model_name`` (ValueError naming the known patterns)."""
    for converter in _CONVERTERS:
        if fnmatch.fnmatchcase(model_name, converter.pattern):
            return converter
    raise ValueError(
        f"model must be a name that a converter serves ({', '.join(registered_converters())}), "
        f"got {model_name!r}"
    )


def convert_checkpoint(
    source: str | os.PathLike, model_name: str, **model_kwargs: Any
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Read an authors' (or seqvision's) file for ``model_name`` and return the model loaded with it
    and its state dict in seqvision's layout.

    Raises ValueError naming the first key that does not fit the model (``first_mismatch``).
    """
    converter = converter_for(model_name)
    raw = converter.read(Path(source))
    if converter.build is not None:
        model = converter.build(model_name, raw, **model_kwargs)
    else:
        model = timm.create_model(model_name, **model_kwargs)
    state = converter.filter_fn(raw, model)
    problem = first_mismatch(state, model.state_dict())
    if problem:
        raise ValueError(f"{str(source)!r} does not fit {model_name}: {problem}")
    model.load_state_dict(state, strict=True)
    return model.eval(), {k: v.detach().contiguous() for k, v in model.state_dict().items()}
