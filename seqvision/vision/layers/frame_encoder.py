"""A per-frame image encoder for the recurrent video models (LRCN and the LRCN captioner).

Both models encode every frame of a clip on its own with a 2-D network that pools to one feature
vector per frame, then run an LSTM over the features. What they share lives here, once:

* :func:`build_frame_encoder` - the encoder from a timm model name (``timm.create_model(name,
  num_classes=0, in_chans=...)``) or an ``nn.Module`` mapping frames (N, C, H, W) to pooled
  features (N, D); optionally timm's pretrained weights or a local weight file.
* :func:`load_encoder_file` - a local ``.safetensors`` / ``torch.save`` file of the encoder's own
  state dict, with a strict key and shape check.
* :func:`frame_encoder_dim` - the feature width D (declared by timm models, else probed).
* :class:`FrameEncoderMixin` - for an ``nn.Module`` holding the encoder as the attribute
  ``encoder``: clip/image input checks, chunked frame encoding (``encoder_chunk``), freezing (no
  gradients AND eval mode whatever ``train()`` says), and the encoder's part of timm's contract
  (``set_grad_checkpointing``, ``no_weight_decay``, layer groups).

The attribute name ``encoder`` is part of the contract: parameters are ``encoder.*`` so a training
loop can give the encoder its own learning rate by name prefix, and checkpoints keep their keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import timm
import torch
import torch.nn as nn
from timm.models import adapt_input_conv, group_modules, group_parameters, load_state_dict

from seqvision.utils.checks import check_positive_int, state_mismatch

__all__ = ["FrameEncoderMixin", "build_frame_encoder", "frame_encoder_dim", "load_encoder_file"]

_Model = TypeVar("_Model", bound="FrameEncoderMixin")


def _check_chunk(name: str, value: int | None) -> None:
    # The same rule as vision.base.check_chunk_size, restated so that layers/ stays below the model
    # files (it imports nothing from vision/ outside layers/).
    if value is not None:
        check_positive_int(name, value)


def _classifier_names(encoder: nn.Module) -> tuple[str, ...]:
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_encoder_file(encoder: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weight file into ``encoder`` with a strict key and shape check.

    ``path``: ``.safetensors`` or a ``torch.save`` file (read with timm's ``load_state_dict``:
    weights only; a {'state_dict': ...} / {'model': ...} wrapper is unwrapped, EMA weights are taken
    when the file has them, a 'module.' prefix is dropped). The keys must be the encoder's own
    (as ``timm.create_model(name).state_dict()`` writes them); no family-specific conversion is
    applied. Weights of the encoder's classifier (its cfg's ``classifier``, e.g. ResNet's ``fc``)
    are dropped when the encoder has none (``num_classes=0``), and a first-conv weight for another
    number of input channels is adapted as timm does (``adapt_input_conv``). Any other missing or
    unexpected key, or a shape that differs, is a ValueError naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"pretrained_encoder must be an existing weight file, got {str(file)!r}")
    try:
        state = load_state_dict(str(file))
    except Exception as e:  # a file that is not a checkpoint; say which one
        raise ValueError(f"pretrained_encoder {str(file)!r} could not be read as a state dict: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained_encoder {str(file)!r} does not hold a state dict of tensors")
    expected = encoder.state_dict()
    for name in _classifier_names(encoder):
        if not any(k.startswith(name + ".") for k in expected):
            state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    first_conv = cfg.get("first_conv")
    for conv in (first_conv,) if isinstance(first_conv, str) else (first_conv or ()):
        key = f"{conv}.weight"
        if key in state and key in expected:
            got, want = state[key], expected[key]
            same_but_channels = got.shape[:1] + got.shape[2:] == want.shape[:1] + want.shape[2:]
            if got.dim() == 4 and same_but_channels and got.shape[1] != want.shape[1]:
                state[key] = adapt_input_conv(want.shape[1], got)
    problem = state_mismatch(state, expected)
    if problem:
        raise ValueError(
            f"pretrained_encoder {str(file)!r} does not match the encoder "
            f"({type(encoder).__name__}): {problem}"
        )
    encoder.load_state_dict(state, strict=True)


def build_frame_encoder(
    encoder: str | nn.Module,
    *,
    pretrained: bool | str | os.PathLike = False,
    encoder_kwargs: dict | None = None,
    extra_kwargs: dict | None = None,
    in_chans: int = 3,
) -> nn.Module:
    """The frame encoder: a timm model built with ``num_classes=0``, or the given module.

    Args:
        encoder: a registered timm model name, or an ``nn.Module`` mapping frames (N, C, H, W) to
            pooled features (N, D), used as is.
        pretrained: False, True (timm's weights for the named encoder), or the path of a local
            weight file of the encoder (:func:`load_encoder_file`).
        encoder_kwargs: more arguments for ``timm.create_model`` (``img_size``, ``drop_path_rate``...).
        extra_kwargs: keyword arguments the calling model did not know; they join ``encoder_kwargs``
            (timm's ``create_model`` passes unknown arguments to the model, so they belong to the
            encoder). Given both ways is an error.
        in_chans: input channels per frame.
    """
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained_encoder must be a bool or a path, got {type(pretrained).__name__}")
    encoder_kwargs = dict(encoder_kwargs or {})
    extra = dict(extra_kwargs or {})
    if isinstance(encoder, nn.Module):
        if extra or encoder_kwargs:
            names = sorted({*extra, *encoder_kwargs})
            raise TypeError(
                f"encoder is a module, so there is nothing to pass {names} to; they are arguments "
                "for timm.create_model of a named encoder"
            )
        if pretrained is True:
            raise ValueError(
                "pretrained_encoder=True needs an encoder name (timm's weights); for a module, "
                "load its weights yourself or pass pretrained_encoder='weights.safetensors'"
            )
        chans = getattr(encoder, "in_chans", None)
        if isinstance(chans, int) and chans != in_chans:
            raise ValueError(f"encoder takes {chans} input channels but in_chans is {in_chans}")
        module = encoder
    else:
        if not isinstance(encoder, str):
            raise TypeError(
                f"encoder must be a timm model name or an nn.Module, got {type(encoder).__name__}"
            )
        if ":" not in encoder and not timm.is_model(encoder):
            raise ValueError(f"encoder must be a registered timm model name, got {encoder!r}")
        clash = sorted(set(extra) & set(encoder_kwargs))
        if clash:
            raise ValueError(f"{clash} given both as keyword arguments and in encoder_kwargs")
        encoder_kwargs.update(extra)
        reserved = sorted({"num_classes", "in_chans", "pretrained"} & set(encoder_kwargs))
        if reserved:
            raise ValueError(
                f"encoder_kwargs must not set {reserved}: the encoder is built with num_classes=0, the "
                "model's in_chans and pretrained_encoder"
            )
        module = timm.create_model(
            encoder, pretrained=pretrained is True, num_classes=0, in_chans=in_chans, **encoder_kwargs
        )
    if isinstance(pretrained, (str, os.PathLike)):
        load_encoder_file(module, pretrained)
    return module


def _probe_feature_dim(encoder: nn.Module, in_chans: int) -> int:
    """Feature width D of an encoder that declares none: one forward of a single frame.

    The frame size is the encoder's cfg ``input_size`` when it has one, else 224 x 224; the call runs
    in eval mode without autograd (no BatchNorm update) and the mode is restored after.
    """
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (in_chans, 224, 224))[-2:]
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(torch.zeros(1, in_chans, *size, device=device, dtype=dtype))
    finally:
        encoder.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"encoder must return pooled features (N, D) for frames (N, C, H, W); for a frame of "
            f"{(1, in_chans, *size)} it returned {got}"
        )
    return out.shape[1]


def frame_encoder_dim(encoder: nn.Module, in_chans: int) -> int:
    """The width D of the pooled features (N, D) that ``encoder`` returns for frames (N, C, H, W).

    A timm model declares it (``head_hidden_size``, else ``num_features``); any other module is
    probed with one frame (:func:`_probe_feature_dim`). An encoder with a classifier is an error.
    """
    classes = getattr(encoder, "num_classes", 0)
    if isinstance(classes, int) and classes > 0:
        raise ValueError(
            f"encoder must return pooled features, but it has a {classes}-class classifier: build it "
            "with num_classes=0 or call encoder.reset_classifier(0)"
        )
    # timm: with num_classes=0 forward() returns forward_head(pre_logits=True), head_hidden_size wide.
    for name in ("head_hidden_size", "num_features"):
        dim = getattr(encoder, name, None)
        if isinstance(dim, int) and dim > 0:
            return dim
    return _probe_feature_dim(encoder, in_chans)


class FrameEncoderMixin:
    """A frame encoder held as ``self.encoder``, for an ``nn.Module`` subclass (list it first:
    ``class Model(FrameEncoderMixin, nn.Module)``, so its ``train`` wraps ``nn.Module.train``).

    The model calls :meth:`_init_frame_encoder` in its ``__init__`` (after ``nn.Module.__init__``)
    and :meth:`set_encoder_frozen` once every submodule exists. Attributes it sets: ``encoder``,
    ``encoder_dim`` (D), ``encoder_chunk``, ``encoder_frozen``, ``in_chans``, ``grad_checkpointing``.
    """

    encoder: nn.Module
    encoder_dim: int
    encoder_chunk: int | None
    encoder_frozen: bool
    in_chans: int
    grad_checkpointing: bool
    training: bool

    def _init_frame_encoder(
        self,
        encoder: str | nn.Module,
        *,
        pretrained_encoder: bool | str | os.PathLike,
        encoder_kwargs: dict | None,
        extra_kwargs: dict | None,
        in_chans: int,
        encoder_chunk: int | None,
    ) -> None:
        check_positive_int("in_chans", in_chans)
        _check_chunk("encoder_chunk", encoder_chunk)
        self.encoder = build_frame_encoder(
            encoder,
            pretrained=pretrained_encoder,
            encoder_kwargs=encoder_kwargs,
            extra_kwargs=extra_kwargs,
            in_chans=in_chans,
        )
        self.encoder_dim = frame_encoder_dim(self.encoder, in_chans)
        self.in_chans = in_chans
        self.encoder_chunk = encoder_chunk
        self.encoder_frozen = False
        self.grad_checkpointing = False

    # ------------------------------------------------------------------------------------------
    # freezing
    # ------------------------------------------------------------------------------------------

    def set_encoder_frozen(self, frozen: bool = True) -> None:
        """Freeze (no gradients, always eval mode) or unfreeze (all gradients, follows ``train()``)."""
        self.encoder_frozen = bool(frozen)
        self.encoder.requires_grad_(not self.encoder_frozen)
        self.train(self.training)

    def train(self: _Model, mode: bool = True) -> _Model:
        super().train(mode)  # type: ignore[misc]  (nn.Module.train, next in the MRO)
        if self.encoder_frozen:
            # A frozen encoder is a fixed feature extractor: no BatchNorm updates, no dropout.
            self.encoder.eval()
        return self

    # ------------------------------------------------------------------------------------------
    # input and encoding
    # ------------------------------------------------------------------------------------------

    def _as_clip(self, x: object, name: str = "x") -> torch.Tensor:
        """(B, T, C, H, W) as is, (B, C, H, W) as (B, 1, C, H, W); errors naming ``name`` otherwise."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4:
            x = x.unsqueeze(1)
        elif x.dim() != 5:
            raise ValueError(
                f"{name} must be a clip batch (B, T, C, H, W) or an image batch (B, C, H, W), got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[2] != self.in_chans:
            hint = (
                "; a (B, C, T, H, W) clip needs x.transpose(1, 2)"
                if x.dim() == 5 and x.shape[1] == self.in_chans
                else ""
            )
            raise ValueError(
                f"{name} must have {self.in_chans} channels (in_chans) at dim -3 of (B, T, C, H, W), got "
                f"{x.shape[2]} in {tuple(x.shape)}{hint}"
            )
        if x.shape[1] == 0:
            raise ValueError(f"{name} must have at least one frame (T >= 1), got T=0 in {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} must have at least one clip (B >= 1), got B=0 in {tuple(x.shape)}")
        return x

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (N, C, H, W) -> pooled encoder features (N, D), ``encoder_chunk`` frames at a time.

        The result equals one call in eval mode; in train mode BatchNorm's batch statistics are
        then per chunk.
        """
        _check_chunk("encoder_chunk", self.encoder_chunk)
        parts = frames.split(self.encoder_chunk or frames.shape[0])
        # One part is the whole batch: call the encoder on it directly (torch.cat would copy).
        feats = self.encoder(frames) if len(parts) == 1 else torch.cat([self.encoder(p) for p in parts])
        if feats.dim() != 2 or feats.shape != (frames.shape[0], self.encoder_dim):
            raise ValueError(
                f"encoder must return pooled features (N, D) = ({frames.shape[0]}, {self.encoder_dim}) for "
                f"frames {tuple(frames.shape)}, got {tuple(feats.shape)}"
            )
        return feats

    def encode_clip(self, x: torch.Tensor) -> torch.Tensor:
        """A checked clip (B, T, C, H, W) -> per-frame features (B, T, D)."""
        B, T = x.shape[:2]
        return self.encode_frames(x.flatten(0, 1)).unflatten(0, (B, T))

    # ------------------------------------------------------------------------------------------
    # the encoder's part of timm's contract
    # ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing inside the encoder (the LSTMs are cheap to keep)."""
        setter = getattr(self.encoder, "set_grad_checkpointing", None)
        if setter is None:
            if enable:
                raise ValueError(f"the encoder ({type(self.encoder).__name__}) has no set_grad_checkpointing")
        else:
            setter(enable)
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The encoder's own ``no_weight_decay`` names, 'encoder.' prefixed."""
        names = self.encoder.no_weight_decay() if hasattr(self.encoder, "no_weight_decay") else set()
        return {f"encoder.{name}" for name in names}

    def _group_matcher_after_encoder(
        self, coarse: bool, prefixes: Sequence[str] = ()
    ) -> Callable[[str], tuple[int]]:
        """Layer groups: the encoder's own groups in order, then one group per name prefix in
        ``prefixes``, then one group for every other name.

        Returned as a callable (name -> group ordinal), which timm's ``group_parameters`` /
        ``group_modules`` accept: an encoder's regexes are anchored at the start of its names
        (e.g. ResNet's '^conv1|bn1|maxpool') and cannot be prefixed with 'encoder.' reliably, so the
        encoder's names are grouped by its own matcher and the group ids are looked up here.
        """
        matcher = getattr(self.encoder, "group_matcher", None)
        ids: dict[str, int] = {}
        if matcher is not None:
            spec = matcher(coarse=coarse)
            for group in (group_parameters, group_modules):
                ids.update(group(self.encoder, spec, reverse=True))
        last = max(ids.values(), default=0)
        prefixes = tuple(prefixes)

        def group_of(name: str) -> tuple[int]:
            if name == "encoder" or name.startswith("encoder."):
                return (ids.get(name.removeprefix("encoder."), last),)
            for i, prefix in enumerate(prefixes):
                if name.startswith(prefix):
                    return (last + 1 + i,)
            return (last + 1 + len(prefixes),)

        return group_of
