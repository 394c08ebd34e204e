"""LRCN: Long-term Recurrent Convolutional Networks (Donahue et al., CVPR 2015), activity recognition.

A 2-D image network encodes every frame of a clip on its own; an LSTM runs over the per-frame
features in time order; a linear classifier reads the LSTM output at every time step; the clip's
prediction is the average over the steps:

    x (B, T, C, H, W) -> frames (B*T, C, H, W) -> encoder -> pooled features (B*T, D) -> (B, T, D)
      -> feature dropout -> LSTM -> (B, T, hidden) -> dropout -> Linear at every step (B, T, classes)
      -> mean over T ('mean') or the last step ('last') -> logits (B, classes)

The paper uses an ImageNet-pretrained CaffeNet variant's fc6 as the frame feature (after its
ReLU, with dropout 0.9), one LSTM layer of 256 units, dropout 0.5 before the classifier, and
16-frame training clips: ``lrcn_caffenet`` (encoder ``caffenet.CaffeNet``). The modern form keeps
the recipe and swaps the encoder for a pooled ResNet (or any timm backbone). Reported accuracies,
UCF101, average over the three splits: single frame RGB 67.37, LRCN-fc6 RGB 68.20, LRCN-fc6 flow
77.28 (Donahue et al., CVPR 2015; the released models are split-1 models); a PyTorch
reimplementation with ResNet-18 + LSTM reports 82.2 on split 1 (not reproduced by this project).

Layout: clips are (B, T, C, H, W), time BEFORE channels (frames stacked like a batch of images);
LightNet's video model takes (B, C, T, H, W) instead. An image (B, C, H, W) is a clip of one frame.

Temporal pooling of the predictions: the paper averages the per-step softmax probabilities. Here
``temporal_pool='mean'`` averages the per-step LOGITS: ``forward`` returns logits as every timm
classifier does, and the mean of logits is itself a logit vector (softmax of it is the normalised
geometric mean of the per-step probabilities), so cross-entropy on it is numerically stable and
every step gets the same gradient. Because the classifier is affine, it also equals the classifier
applied to the mean LSTM output, which is what ``forward_head(pre_logits=True)`` returns. The
paper's evaluation rule is ``model.forward_step_logits(x).softmax(-1).mean(1)``, and its training
loss (cross-entropy at every step) is ``cross_entropy(step_logits.flatten(0, 1), y.repeat_interleave(T))``.

The encoder: a timm model name (``timm.create_model(name, num_classes=0, in_chans=...)``: any timm or
seqvision backbone that pools to (N, D)), or an ``nn.Module`` that returns pooled features (N, D).
It stays the attribute ``encoder``, so a training loop can give it its own learning rate by the
``encoder.`` name prefix. ``freeze_encoder=True`` turns its gradients off and keeps it in eval mode
whatever ``train()`` says, so BatchNorm statistics are not updated either (a frozen encoder is a
fixed feature extractor). ``encoder_chunk`` encodes at most that many frames at once (memory);
the result is identical to one call in eval mode, while in train mode BatchNorm's batch statistics
are then per chunk. All of this is ``layers/frame_encoder.py``'s ``FrameEncoderMixin``, which the
LRCN captioner (``captioner.py``) shares.

Weights: the authors published their Caffe models for UCF101 split 1 (RGB and flow, the LRCN and
the single-frame baseline; https://people.eecs.berkeley.edu/~lisa_anne/LRCN_video). They are the
pretrained tags of ``lrcn_caffenet`` (``ucf101_split1_rgb``, ``ucf101_split1_flow``) and of
``lrcn_caffenet_singleframe`` (``caffenet.py``): ``pretrained=True`` downloads the ``.caffemodel``
and ``LRCN.load_pretrained`` reads it with ``caffe.read_caffemodel`` (the protobuf wire format, no
Caffe install) and converts it (:func:`checkpoint_filter_fn`): conv1..conv5 and fc6 into the
encoder (conv1's input channels reversed, BGR -> RGB), the LSTM ``lstm1`` with Caffe's gate order
[i, f, o, g] reordered to PyTorch's [i, f, g, o] (``W_xc`` -> ``weight_ih``, ``W_hc`` ->
``weight_hh``, ``b_c`` -> ``bias_ih``, ``bias_hh`` = 0), ``fc8-final`` into the head. A local
caffemodel: ``pretrained_cfg_overlay=dict(file=path)`` (the file goes to ``LRCN.load_pretrained``,
see ``weights.read_local_files_with_load_pretrained``), or
``seqvision.vision.weights.convert_checkpoint(path, "lrcn_caffenet")``. Caffe's LSTM starts every
clip from a zero state (the clip marker ``cont`` is 0 at the first frame), as ``nn.LSTM`` does.
The other LRCN variants have no published weights: ``pretrained=True`` on them is an error unless
a source is given (``pretrained_cfg_overlay=dict(file=...)`` for your own LRCN checkpoint).
``pretrained_encoder=True`` loads timm's ImageNet weights for the encoder; a path loads a local
``.safetensors`` / ``torch.save`` file of the encoder's own state dict (see ``load_encoder_file``).
``features_only`` is not supported: there is no feature pyramid over time (the encoder's own
``features_only`` gives one per frame).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn as nn
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._pretrained import PretrainedCfg

from seqvision.utils.checks import check_positive_int

from .base import check_chunk_size, init_linear
from .caffe import CaffeModel, read_weights
from .caffenet import (
    MEAN_FLOW,
    WEIGHTS_URL,
    CaffeNet,
    caffe_blob,
    caffe_cfg,
    caffenet_state_from_caffe,
    unmapped_layers,
)
from .caffenet import checkpoint_filter_fn as caffenet_filter_fn
from .layers.frame_encoder import FrameEncoderMixin, load_encoder_file
from .weights import (
    load_pretrained_file,
    read_local_files_with_load_pretrained,
    register_converter,
    unwrap_state_dict,
)

__all__ = ["LRCN", "TEMPORAL_POOLS", "ClipPretrainedCfg", "checkpoint_filter_fn", "load_encoder_file"]

TEMPORAL_POOLS = ("mean", "last")
# Where an LRCN's weights could come from (timm's PretrainedCfg fields); only lrcn_caffenet's tags
# set one (the authors' caffemodels).
_WEIGHT_SOURCES = ("file", "url", "hf_hub_id", "state_dict")


@dataclasses.dataclass
class ClipPretrainedCfg(PretrainedCfg):
    """timm's pretrained cfg plus the clip length (frames) the model is meant to be trained on."""

    num_frames: int = 16


class LRCN(FrameEncoderMixin, nn.Module):
    """LRCN with timm's model interface: a frame encoder, an LSTM over time, a per-step classifier.

    Input (B, T, in_chans, H, W) clips or (B, in_chans, H, W) images (one frame). ``forward`` returns
    logits (B, num_classes); ``forward_features`` the LSTM outputs (B, T, lstm_hidden);
    ``forward_step_logits`` the classifier at every step (B, T, num_classes).

    Args:
        encoder: a timm model name, created with ``num_classes=0`` and ``in_chans``, or an
            ``nn.Module`` mapping frames (N, C, H, W) to pooled features (N, D).
        num_classes: classes of the per-step classifier (0: no classifier, features are returned).
        lstm_hidden: LSTM width (the paper: 256 for RGB); also ``num_features``.
        lstm_layers: stacked LSTM layers.
        dropout: dropout on the LSTM outputs before the classifier (the paper: 0.5). timm's
            ``drop_rate`` keyword sets it too.
        feature_dropout: dropout on the frame features before the LSTM.
        feature_norm: standardise each feature channel over the batch and time (``BatchNorm1d``
            without affine, as MAE's linear probe does on frozen features) before the LSTM. For a
            frozen encoder: its features carry per-channel offsets much larger than their
            variation, which the LSTM's gates learn around only slowly (with a frozen random
            ResNet-18 on the moving-square test, an LSTM on raw features stayed at chance for 800
            steps and reached 97.5 % with this). Off by default, as in the paper.
        lstm_dropout: dropout between stacked LSTM layers (needs ``lstm_layers > 1``).
        temporal_pool: 'mean' averages the per-step logits, 'last' takes the last step's.
        pretrained_encoder: False, True (timm's weights for the named encoder), or the path of a
            local weight file of the encoder (``load_encoder_file``).
        encoder_kwargs: more arguments for ``timm.create_model`` of a named encoder (``img_size``,
            ``drop_path_rate``, ...). Keyword arguments the LRCN does not know are added to them.
        encoder_chunk: encode at most this many frames per encoder call (None: all at once).
        freeze_encoder: no gradients for the encoder, and the encoder always in eval mode.
        num_frames: the clip length the model is meant for (16 in the paper); informational, any
            T >= 1 runs.
        in_chans: input channels per frame.
    """

    def __init__(
        self,
        encoder: str | nn.Module = "resnet18",
        num_classes: int = 101,
        lstm_hidden: int = 256,
        lstm_layers: int = 1,
        dropout: float = 0.5,
        feature_dropout: float = 0.0,
        feature_norm: bool = False,
        lstm_dropout: float = 0.0,
        temporal_pool: Literal["mean", "last"] = "mean",
        pretrained_encoder: bool | str | os.PathLike = False,
        encoder_kwargs: dict | None = None,
        encoder_chunk: int | None = None,
        freeze_encoder: bool = False,
        num_frames: int = 16,
        in_chans: int = 3,
        **kwargs,
    ) -> None:
        super().__init__()
        # timm's name for the classifier dropout (timm's train.py always passes it).
        dropout = kwargs.pop("drop_rate", dropout)
        for name, value in (("lstm_hidden", lstm_hidden), ("lstm_layers", lstm_layers)):
            check_positive_int(name, value)
        check_positive_int("num_frames", num_frames)
        check_positive_int("in_chans", in_chans)
        check_chunk_size("encoder_chunk", encoder_chunk)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self._check_temporal_pool(temporal_pool)
        if lstm_dropout and lstm_layers == 1:
            raise ValueError(
                f"lstm_dropout acts between stacked LSTM layers and needs lstm_layers > 1, got "
                f"lstm_dropout={lstm_dropout} with lstm_layers=1"
            )

        self._init_frame_encoder(
            encoder,
            pretrained_encoder=pretrained_encoder,
            encoder_kwargs=encoder_kwargs,
            extra_kwargs=kwargs,
            in_chans=in_chans,
            encoder_chunk=encoder_chunk,
        )
        self.num_classes = num_classes
        self.num_frames = num_frames
        self.temporal_pool = temporal_pool
        self.num_features = self.head_hidden_size = lstm_hidden

        self.feature_norm = nn.BatchNorm1d(self.encoder_dim, affine=False) if feature_norm else nn.Identity()
        self.feature_drop = nn.Dropout(feature_dropout)
        self.lstm = nn.LSTM(
            self.encoder_dim, lstm_hidden, num_layers=lstm_layers, batch_first=True, dropout=lstm_dropout
        )
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(lstm_hidden, num_classes) if num_classes > 0 else nn.Identity()
        # The LSTM keeps PyTorch's initialisation (uniform +-1/sqrt(hidden)); the head timm's ViT one.
        self.head.apply(init_linear)

        # build_model_with_cfg replaces this with the registered variant's cfg.
        self.pretrained_cfg = self.default_cfg = _lrcn_cfg(
            _encoder_first_conv(self.encoder), num_frames=num_frames
        )
        self.set_encoder_frozen(freeze_encoder)

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_temporal_pool(temporal_pool: str) -> None:
        if temporal_pool not in TEMPORAL_POOLS:
            raise ValueError(f"temporal_pool must be one of {TEMPORAL_POOLS}, got {temporal_pool!r}")

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, temporal_pool: str | None = None) -> None:
        """A new per-step classifier with ``num_classes`` outputs (0: none); optionally a new pooling."""
        if temporal_pool is not None:
            self._check_temporal_pool(temporal_pool)
            self.temporal_pool = temporal_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(init_linear)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """Layer groups: the encoder's own groups in order, then the LSTM, then the head.

        A callable (name -> group ordinal), which timm's ``group_parameters`` / ``group_modules``
        accept (see ``FrameEncoderMixin._group_matcher_after_encoder``). ``set_grad_checkpointing``
        and ``no_weight_decay`` come from the mixin and reach the encoder.
        """
        return self._group_matcher_after_encoder(coarse, ("lstm",))

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, T, C, H, W) or image (B, C, H, W) -> LSTM outputs (B, T, lstm_hidden).

        Step t depends on frames 0..t only (a one-way LSTM).
        """
        x = self._as_clip(x)
        B, T = x.shape[:2]
        feats = self.feature_norm(self.encode_frames(x.flatten(0, 1))).unflatten(0, (B, T))
        out, _ = self.lstm(self.feature_drop(feats))
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """LSTM outputs (B, T, hidden) -> logits (B, num_classes), or the pooled (B, hidden) features
        with ``pre_logits``. The head is affine, so 'mean' here equals the mean of per-step logits."""
        x = self.head_drop(x)
        x = x.mean(dim=1) if self.temporal_pool == "mean" else x[:, -1]
        return x if pre_logits else self.head(x)

    def forward_step_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, T, C, H, W) or image (B, C, H, W) -> the classifier at every step (B, T, num_classes)."""
        return self.head(self.head_drop(self.forward_features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """timm's ``custom_load``: read ``path`` (a caffemodel, or a seqvision ``.safetensors`` /
        ``torch.save`` file), convert it (:func:`checkpoint_filter_fn`) and load it; a head of another
        size keeps its initialisation, any other mismatch is a ValueError naming the key."""
        load_pretrained_file(self, path, checkpoint_filter_fn, read=read_weights)


# ----------------------------------------------------------------------------------------------
# the authors' Caffe models
# ----------------------------------------------------------------------------------------------

# deploy_lstm.prototxt's layer names: the LSTM and the per-step classifier after it.
_CAFFE_LSTM, _CAFFE_HEAD = "lstm1", "fc8-final"


def caffe_lstm_to_torch(blobs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Caffe's LSTM blobs [W_xc (4H, D), b_c (4H,), W_hc (4H, H)] -> ``nn.LSTM``'s layer-0 tensors.

    Caffe stacks the gates as [i, f, o, g] (lstm_layer.cpp / lstm_unit_layer.cpp), PyTorch as
    [i, f, g, o]; Caffe has one bias, added to ``W_xc x``, so ``bias_hh`` is zero. H is the file's
    (the key check then compares it with the model's).
    """
    if len(blobs) != 3:
        raise ValueError(f"a Caffe LSTM layer holds 3 blobs (W_xc, b_c, W_hc), this one {len(blobs)}")
    w_xc, b_c, w_hc = (blob.reshape(blob.shape[-2:]) if blob.dim() > 2 else blob for blob in blobs)
    b_c = b_c.flatten()
    rows = w_xc.shape[0]
    if rows % 4 or w_hc.shape[0] != rows or b_c.numel() != rows:
        raise ValueError(
            f"a Caffe LSTM's blobs stack 4 gates of H rows each: W_xc {tuple(w_xc.shape)}, b_c "
            f"{tuple(b_c.shape)}, W_hc {tuple(w_hc.shape)} do not"
        )
    hidden = rows // 4
    i, f, o, g = (torch.arange(hidden) + k * hidden for k in range(4))
    order = torch.cat([i, f, g, o])
    return {
        "weight_ih_l0": w_xc[order],
        "weight_hh_l0": w_hc[order],
        "bias_ih_l0": b_c[order],
        "bias_hh_l0": torch.zeros_like(b_c),
    }


def _lrcn_state_from_caffe(net: CaffeModel, model: LRCN) -> dict[str, torch.Tensor]:
    if not isinstance(model.encoder, CaffeNet):
        raise ValueError(
            f"{net.source}: a caffemodel converts into an LRCN whose encoder is the authors' CaffeNet "
            f"variant (lrcn_caffenet), this one's is {type(model.encoder).__name__}"
        )
    if model.lstm.num_layers != 1:
        raise ValueError(
            f"{net.source}: the authors' LRCN has one LSTM layer, the model {model.lstm.num_layers}"
        )
    expected = model.state_dict()
    encoder_expected = {
        k.removeprefix("encoder."): v for k, v in expected.items() if k.startswith("encoder.")
    }
    state, used = caffenet_state_from_caffe(net, model.encoder, "encoder.", encoder_expected)
    lstm = net.get(_CAFFE_LSTM)
    if lstm is not None and lstm.blobs:
        used.add(_CAFFE_LSTM)
        try:
            converted = caffe_lstm_to_torch(lstm.blobs)
        except ValueError as e:
            raise ValueError(f"{net.source}: layer {_CAFFE_LSTM!r}: {e}") from e
        state.update({f"lstm.{k}": v for k, v in converted.items()})
    head = net.get(_CAFFE_HEAD)
    if head is not None and head.blobs:
        used.add(_CAFFE_HEAD)
        for suffix, blob in zip(("weight", "bias"), head.blobs, strict=False):
            state[f"head.{suffix}"] = caffe_blob(blob, expected.get(f"head.{suffix}"))
    state.update(unmapped_layers(net, used))
    return state


def checkpoint_filter_fn(state: dict, model: LRCN) -> dict[str, torch.Tensor]:
    """An LRCN checkpoint -> ``model``'s state dict: a caffemodel of the authors (read as
    :class:`~seqvision.vision.caffe.CaffeModel`: conv1..conv5, fc6, 'lstm1', 'fc8-final') is
    converted; a seqvision checkpoint is unwrapped ('model' / 'state_dict' / 'module.')."""
    if isinstance(state, CaffeModel):
        return _lrcn_state_from_caffe(state, model)
    return unwrap_state_dict(state)


def _caffe_filter(state: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """The converter of the lrcn_caffenet* names: LRCNs and the single-frame CaffeNet."""
    return checkpoint_filter_fn(state, model) if isinstance(model, LRCN) else caffenet_filter_fn(state, model)


register_converter("lrcn_caffenet*", _caffe_filter, read=read_weights)


# ----------------------------------------------------------------------------------------------
# configs, registration
# ----------------------------------------------------------------------------------------------


def _encoder_first_conv(encoder: nn.Module) -> str | tuple[str, ...] | None:
    """The encoder's input conv(s) from its cfg, as LRCN parameter names ('encoder.' prefixed)."""
    first_conv = (getattr(encoder, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first_conv, Iterable) and not isinstance(first_conv, str):
        return tuple(f"encoder.{name}" for name in first_conv)
    return f"encoder.{first_conv}" if first_conv else None


def _lrcn_cfg(first_conv: str | tuple[str, ...] | None = None, **kwargs) -> dict:
    """timm's cfg of an LRCN: 224-pixel ImageNet-normalised frames, 16-frame clips, UCF101's classes."""
    return {
        "num_classes": 101,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": first_conv,
        "classifier": "head",
        "license": "apache-2.0",
        "num_frames": 16,
        "description": "LRCN: clips (B, T, C, H, W), 16-frame training clips; no weights for this variant",
        **kwargs,
    }


def _create_lrcn(variant: str, pretrained: bool = False, **kwargs) -> LRCN:
    if kwargs.pop("features_only", False):
        raise ValueError(
            f"{variant} has no feature pyramid (features_only): use forward_features for the LSTM "
            "outputs (B, T, hidden), or create the encoder itself with features_only=True"
        )
    encoder_kwargs = kwargs.get("encoder_kwargs") or {}
    if "img_size" in encoder_kwargs and "img_size" not in kwargs:
        # The frame size given for the encoder is the model's img_size: for a fixed-size encoder's cfg
        # timm would otherwise add the cfg's img_size to the keyword arguments, a second value.
        kwargs["img_size"] = encoder_kwargs["img_size"]
        kwargs["encoder_kwargs"] = {k: v for k, v in encoder_kwargs.items() if k != "img_size"}
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
        )
        if not any(getattr(cfg, key, None) for key in _WEIGHT_SOURCES):
            raise ValueError(
                f"no pretrained weights exist for {variant}; pretrained_encoder=True loads timm's "
                "ImageNet weights into the encoder, and pretrained_cfg_overlay=dict(file=...) loads "
                "your own LRCN checkpoint"
            )
    kwargs = read_local_files_with_load_pretrained(kwargs)
    model = build_model_with_cfg(
        LRCN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )
    model.pretrained_cfg["num_frames"] = model.num_frames  # the model's clip length, as built
    return model


def _caffe_lrcn_cfg(file: str, **kwargs) -> ClipPretrainedCfg:
    """An authors' LRCN caffemodel: their frame preprocessing (``caffenet.caffe_cfg``), 16-frame clips."""
    return ClipPretrainedCfg(
        **caffe_cfg(url=WEIGHTS_URL + file, first_conv="encoder.conv1", num_frames=16, **kwargs)
    )


default_cfgs = generate_default_cfgs(
    {
        # A ViR or LightNet frame encoder refuses other frame sizes unless dynamic_img_size=True
        # (which the LRCN passes on to it), so those two declare a fixed input size as their encoders do.
        **{
            name: ClipPretrainedCfg(**_lrcn_cfg(first_conv, fixed_input_size=fixed))
            for name, first_conv, fixed in (
                ("lrcn_resnet18", "encoder.conv1", False),
                ("lrcn_resnet50", "encoder.conv1", False),
                ("lrcn_vir_small", "encoder.patch_embed.proj", True),
                ("lrcn_lightnet_small", "encoder.patch_embed.proj", True),
            )
        },
        "lrcn_caffenet.ucf101_split1_rgb": _caffe_lrcn_cfg(
            "RGB_lstm_model_iter_30000.caffemodel",
            description="LRCN-fc6, RGB frames, UCF101 split 1 (the authors' Caffe model)",
        ),
        "lrcn_caffenet.ucf101_split1_flow": _caffe_lrcn_cfg(
            "flow_lstm_model_iter_50000.caffemodel",
            mean=MEAN_FLOW,
            description=(
                "LRCN-fc6, flow images (x, y, magnitude; 128 + 16 * flow), UCF101 split 1 (the authors' "
                "Caffe model)"
            ),
        ),
    }
)


def _variant(name: str, pretrained: bool, kwargs: dict, **arch) -> LRCN:
    return _create_lrcn(name, pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def lrcn_resnet18(pretrained: bool = False, **kwargs) -> LRCN:
    """LRCN on a pooled ResNet-18 (512 features), one LSTM layer of 256, UCF101's 101 classes."""
    return _variant("lrcn_resnet18", pretrained, kwargs, encoder="resnet18")


@register_model
def lrcn_resnet50(pretrained: bool = False, **kwargs) -> LRCN:
    """LRCN on a pooled ResNet-50 (2048 features), one LSTM layer of 256, UCF101's 101 classes."""
    return _variant("lrcn_resnet50", pretrained, kwargs, encoder="resnet50")


@register_model
def lrcn_vir_small(pretrained: bool = False, **kwargs) -> LRCN:
    """LRCN on ViR-Small/16 (class token, 384 features), one LSTM layer of 256, 101 classes."""
    return _variant("lrcn_vir_small", pretrained, kwargs, encoder="vir_small_patch16_224")


@register_model
def lrcn_lightnet_small(pretrained: bool = False, **kwargs) -> LRCN:
    """LRCN on LightNet-Small/16 (mean of the tokens, 384 features), one LSTM layer of 256, 101 classes."""
    return _variant("lrcn_lightnet_small", pretrained, kwargs, encoder="lightnet_small_patch16_224")


@register_model
def lrcn_caffenet(pretrained: bool = False, **kwargs) -> LRCN:
    """LRCN as the authors built it: the CaffeNet variant's ReLU(fc6) (4096 features; encoder
    ``caffenet_hybrid`` with ``fc_dims=(4096,)``), dropout 0.9, one LSTM layer of 256, dropout 0.5,
    UCF101's 101 classes, 227-pixel frames (deploy_lstm.prototxt / train_test_lstm_RGB.prototxt)."""
    return _variant(
        "lrcn_caffenet",
        pretrained,
        kwargs,
        encoder="caffenet_hybrid",
        fc_dims=(4096,),
        feature_dropout=0.9,
        dropout=0.5,
        lstm_hidden=256,
    )
