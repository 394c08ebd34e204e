"""The CaffeNet variant of LRCN (Donahue et al., CVPR 2015): the authors' frame network.

The paper's image network is a hybrid of CaffeNet (AlexNet) and Zeiler & Fergus' network; the
layers below are those of ``examples/LRCN_activity_recognition/deploy_singleFrame.prototxt`` /
``deploy_lstm.prototxt`` in LisaAnne/lisa-caffe-public (the fork the models were trained with):

    x (N, 3, 227, 227)
      -> conv1 96 @ 7x7 / 2 -> ReLU -> max pool 3 / 2 -> LRN (5, alpha 1e-4, beta 0.75, k 1)
                                                                             (N, 96, 55, 55)
      -> conv2 384 @ 5x5 / 2, 2 groups -> ReLU -> max pool 3 / 2 -> LRN      (N, 384, 13, 13)
      -> conv3 512 @ 3x3 pad 1 -> ReLU -> conv4 512 @ 3x3 pad 1, 2 groups -> ReLU
      -> conv5 384 @ 3x3 pad 1, 2 groups -> ReLU -> max pool 3 / 2           (N, 384, 6, 6)
                                                                             = forward_features
      -> flatten (C, H, W order) -> fc6 4096 -> ReLU -> dropout -> fc7 4096 -> ReLU
      -> dropout -> head                                                     (N, num_classes)
                                                                             = forward_head

Caffe's pooling rounds its output size UP (``ceil((H - 3) / 2) + 1``; the last window is clipped
at the border): without padding this is ``nn.MaxPool2d(3, 2, ceil_mode=True)``, and it matters
here (conv2's 26 x 26 pools to 13, not 12). Caffe's LRN across channels is ``x / (k + alpha / n *
sum of x^2 over the n channels around c)^beta`` with zero padding at the ends, which is
``nn.LocalResponseNorm``. Grouped convolutions split channels in order, as PyTorch's ``groups``.

``fc_dims`` sets the fully connected layers: (4096, 4096) for the single-frame classifier (fc6,
fc7, fc8), (4096,) for the LRCN frame encoder, which feeds ReLU(fc6) to the LSTM. Dropout
(``drop_rate``) follows every fc layer's ReLU, as Caffe's drop6 / drop7.

Input: RGB frames, timm's layout. Caffe saw BGR images scaled to 0-255 minus a per-channel mean
(``classify_video.py``: ``set_raw_scale(255)``, ``set_channel_swap((2, 1, 0))``, ``set_mean``); the
conversion reverses conv1's input channels instead, so an RGB frame normalised with the cfg's mean
(the authors' mean / 255, RGB order) and std (1 / 255) gives the network exactly what Caffe's
transformer gave it. Flow images (x flow, y flow, magnitude, stored as an RGB JPEG) go through the
same swap in the authors' code, so they are fed in their file order too.

The size is fixed by fc6: the input must give the same pool5 grid as ``img_size`` (227 and 224
both give 6 x 6); the cfgs declare ``fixed_input_size``. A clip (B, T, C, H, W) given to
``forward`` is classified frame by frame and the logits averaged over T (the single-frame
baseline's rule averages probabilities: ``model(x.flatten(0, 1)).softmax(-1)`` then the mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models._pretrained import PretrainedCfg
from torch.utils.checkpoint import checkpoint

from seqvision.utils.checks import check_positive_int

from .base import build_backbone, select_levels
from .caffe import CaffeModel, read_weights
from .weights import (
    load_pretrained_file,
    read_local_files_with_load_pretrained,
    register_converter,
    unwrap_state_dict,
)

__all__ = [
    "UCF101_CLASSES",
    "CaffeNet",
    "caffe_blob",
    "caffe_cfg",
    "caffenet_state_from_caffe",
    "check_caffe_geometry",
    "checkpoint_filter_fn",
    "feature_grid",
    "unmapped_layers",
]

# The label order of the authors' UCF101 models: UCF101's classInd.txt, 0-based (the labels of
# examples/LRCN_activity_recognition/ucf101_split1_trainVideos.txt).
UCF101_CLASSES = (
    "ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching",
    "BaseballPitch", "Basketball", "BasketballDunk", "BenchPress", "Biking", "Billiards",
    "BlowDryHair", "BlowingCandles", "BodyWeightSquats", "Bowling", "BoxingPunchingBag",
    "BoxingSpeedBag", "BreastStroke", "BrushingTeeth", "CleanAndJerk", "CliffDiving",
    "CricketBowling", "CricketShot", "CuttingInKitchen", "Diving", "Drumming", "Fencing",
    "FieldHockeyPenalty", "FloorGymnastics", "FrisbeeCatch", "FrontCrawl", "GolfSwing", "Haircut",
    "Hammering", "HammerThrow", "HandstandPushups", "HandstandWalking", "HeadMassage", "HighJump",
    "HorseRace", "HorseRiding", "HulaHoop", "IceDancing", "JavelinThrow", "JugglingBalls",
    "JumpingJack", "JumpRope", "Kayaking", "Knitting", "LongJump", "Lunges", "MilitaryParade",
    "Mixing", "MoppingFloor", "Nunchucks", "ParallelBars", "PizzaTossing", "PlayingCello",
    "PlayingDaf", "PlayingDhol", "PlayingFlute", "PlayingGuitar", "PlayingPiano", "PlayingSitar",
    "PlayingTabla", "PlayingViolin", "PoleVault", "PommelHorse", "PullUps", "Punch", "PushUps",
    "Rafting", "RockClimbingIndoor", "RopeClimbing", "Rowing", "SalsaSpin", "ShavingBeard",
    "Shotput", "SkateBoarding", "Skiing", "Skijet", "SkyDiving", "SoccerJuggling", "SoccerPenalty",
    "StillRings", "SumoWrestling", "Surfing", "Swing", "TableTennisShot", "TaiChi", "TennisSwing",
    "ThrowDiscus", "TrampolineJumping", "Typing", "UnevenBars", "VolleyballSpiking",
    "WalkingWithDog", "WallPushups", "WritingOnBoard", "YoYo",
)  # fmt: skip

# (kernel, stride, padding) of conv1..conv5 (the prototxts); every pooling is 3 / 2, ceil mode.
_CONV_GEOMETRY = ((7, 2, 0), (5, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1))
_POOL_KERNEL, _POOL_STRIDE = 3, 2
# How the head reads the pool5 map (timm's global_pool): flattened by fc6, or not at all.
GLOBAL_POOLS = ("fc", "")
# The stages of forward_intermediates end at each conv's ReLU; their nominal strides.
_STAGE_REDUCTIONS = (2, 8, 16, 16, 16)


def _pooled(size: int) -> int:
    """Caffe's max-pool output size (3 / 2, no padding): ceil((size - 3) / 2) + 1."""
    return math.ceil((size - _POOL_KERNEL) / _POOL_STRIDE) + 1


def feature_grid(size: int) -> int:
    """The pool5 grid side for an input side ``size``; 0 when the input is too small."""
    conv1, conv2 = _CONV_GEOMETRY[:2]
    size = (size - conv1[0]) // conv1[1] + 1
    if size < _POOL_KERNEL:
        return 0
    size = (_pooled(size) - conv2[0]) // conv2[1] + 1
    if size < _POOL_KERNEL:
        return 0
    size = _pooled(size)  # conv3..conv5 keep the size (3 x 3, padding 1)
    return _pooled(size) if size >= _POOL_KERNEL else 0


_MIN_SIZE = next(s for s in range(1, 512) if feature_grid(s) > 0)


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


class CaffeNet(nn.Module):
    """The LRCN authors' CaffeNet variant with timm's model interface.

    Args:
        num_classes: classifier outputs (0: none; ``forward`` returns the last fc's features).
        in_chans: input channels.
        img_size: the input size (int or (height, width)); it fixes fc6's input width. Any input
            giving the same pool5 grid runs (227 and 224 both give 6 x 6).
        widths: output channels of conv1..conv5 (the authors': 96, 384, 512, 512, 384).
        groups: groups of conv1..conv5 (the authors': 1, 2, 1, 2, 2).
        fc_dims: widths of the fully connected layers fc6, fc7, ... (the single-frame classifier:
            (4096, 4096); the LRCN encoder: (4096,)).
        drop_rate: dropout after every fc layer's ReLU (the authors trained with 0.5; the LRCN
            applies its own feature dropout, so its encoder keeps 0).
        lrn_size, lrn_alpha, lrn_beta, lrn_k: Caffe's LRNParameter (local_size, alpha, beta, k).
        global_pool: how the head reads the pool5 map: 'fc' (flattened by fc6, the network) or ''
            (``forward_head`` returns the map itself; timm's "unpooled", only without a classifier).
        dynamic_img_size: accept any input of at least the minimum size: a pool5 map of another
            size is brought to the fc6 grid by adaptive average pooling (torchvision's AlexNet does
            the same); at ``img_size`` nothing changes. Not the authors' network at other sizes.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | Sequence[int] = 227,
        widths: Sequence[int] = (96, 384, 512, 512, 384),
        groups: Sequence[int] = (1, 2, 1, 2, 2),
        fc_dims: Sequence[int] = (4096, 4096),
        drop_rate: float = 0.0,
        lrn_size: int = 5,
        lrn_alpha: float = 1e-4,
        lrn_beta: float = 0.75,
        lrn_k: float = 1.0,
        global_pool: str = "fc",
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("in_chans", in_chans)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.img_size = _pair("img_size", img_size)
        self.grid = tuple(feature_grid(s) for s in self.img_size)
        if min(self.grid) < 1:
            raise ValueError(f"img_size must be at least {_MIN_SIZE} on each side, got {self.img_size}")
        widths, groups, fc_dims = tuple(widths), tuple(groups), tuple(fc_dims)
        if len(widths) != 5 or len(groups) != 5:
            raise ValueError(
                f"widths and groups must have 5 entries (conv1..conv5), got {widths} and {groups}"
            )
        if not fc_dims:
            raise ValueError("fc_dims must name at least fc6's width, got ()")
        for name, values in (("widths", widths), ("groups", groups), ("fc_dims", fc_dims)):
            for value in values:
                check_positive_int(name, value)
        channels = (in_chans, *widths)
        for i, g in enumerate(groups):
            if channels[i] % g or channels[i + 1] % g:
                raise ValueError(
                    f"conv{i + 1} has {g} groups, which must divide its {channels[i]} input and "
                    f"{channels[i + 1]} output channels"
                )
        check_positive_int("lrn_size", lrn_size)
        if lrn_size % 2 == 0:
            raise ValueError(f"lrn_size must be odd (Caffe's LRN is centred), got {lrn_size}")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.widths, self.groups, self.fc_dims = widths, groups, fc_dims
        self.drop_rate = drop_rate
        self.num_features = widths[-1]
        self.head_hidden_size = fc_dims[-1]
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size
        self._check_global_pool(global_pool, num_classes)
        self.global_pool = global_pool

        for i, (kernel, stride, pad) in enumerate(_CONV_GEOMETRY):
            conv = nn.Conv2d(channels[i], channels[i + 1], kernel, stride, pad, groups=groups[i])
            self.add_module(f"conv{i + 1}", conv)
        for name in ("pool1", "pool2", "pool5"):
            self.add_module(name, nn.MaxPool2d(_POOL_KERNEL, _POOL_STRIDE, ceil_mode=True))
        self.norm1 = nn.LocalResponseNorm(lrn_size, alpha=lrn_alpha, beta=lrn_beta, k=lrn_k)
        self.norm2 = nn.LocalResponseNorm(lrn_size, alpha=lrn_alpha, beta=lrn_beta, k=lrn_k)

        self.fc_names = tuple(f"fc{6 + i}" for i in range(len(fc_dims)))
        width = widths[-1] * self.grid[0] * self.grid[1]
        for name, dim in zip(self.fc_names, fc_dims, strict=True):
            self.add_module(name, nn.Linear(width, dim))
            width = dim
        self.fc_drop = nn.Dropout(drop_rate)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=w, reduction=r, module=f"conv{i + 1}")
            for i, (w, r) in enumerate(zip(widths, _STAGE_REDUCTIONS, strict=True))
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        # Caffe's fillers in the prototxts: gaussian std 0.01 weights, biases 0.1 (hidden layers)
        # and 0 (classifier).
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0 if module is self.head else 0.1)

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @staticmethod
    def _check_global_pool(global_pool: str, num_classes: int) -> None:
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(
                f"global_pool must be one of {GLOBAL_POOLS} (fc6 reads the whole pool5 map; '' returns the "
                f"map), got {global_pool!r}"
            )
        if global_pool == "" and num_classes:
            raise ValueError(
                f"global_pool='' returns the unpooled pool5 map and takes no classifier, got num_classes="
                f"{num_classes}"
            )

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier with ``num_classes`` outputs (0: none); optionally another ``global_pool``."""
        if global_pool is not None:
            self._check_global_pool(global_pool, num_classes)
            self.global_pool = global_pool
        elif self.global_pool == "" and num_classes:
            self._check_global_pool("", num_classes)
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """conv1 is the stem; conv2..conv5, fc6, fc7 one group each (the head is last)."""
        return dict(stem=r"^conv1\.", blocks=[(r"^conv(\d+)\.", None), (r"^fc(\d+)\.", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each conv stage in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def load_pretrained(self, path: str) -> None:
        """timm's ``custom_load``: a caffemodel (or a seqvision file) read, converted
        (:func:`checkpoint_filter_fn`) and loaded (``weights.load_pretrained_file``)."""
        load_pretrained_file(self, path, checkpoint_filter_fn, read=read_weights)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def _check(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"x must have {self.in_chans} channels (in_chans), got {x.shape[1]} in {tuple(x.shape)}"
            )
        grid = tuple(feature_grid(s) for s in x.shape[2:])
        if self.dynamic_img_size and min(grid) < 1:
            raise ValueError(f"x must be at least {_MIN_SIZE} x {_MIN_SIZE}, got {tuple(x.shape[2:])}")
        if grid != self.grid and not self.dynamic_img_size:
            raise ValueError(
                f"x must give fc6 a {self.grid[0]} x {self.grid[1]} pool5 map as img_size={self.img_size} "
                f"does, got {tuple(x.shape[2:])} (a {grid[0]} x {grid[1]} map); create the model with "
                "img_size=(H, W), or with dynamic_img_size=True to pool the map to fc6's grid"
            )
        return x

    def _stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` (0..4): up to and including conv{index + 1}'s ReLU."""
        if index == 1:
            x = self.norm1(self.pool1(x))
        elif index == 2:
            x = self.norm2(self.pool2(x))
        return F.relu(getattr(self, f"conv{index + 1}")(x))

    def _run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(self._stage, index, x, use_reentrant=False)
        return self._stage(index, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the pool5 map (B, widths[-1], *grid)."""
        x = self._check(x)
        for index in range(5):
            x = self._run_stage(index, x)
        return self.pool5(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The pool5 map (B, C, h, w) -> logits (B, num_classes), or the last fc's (B, fc_dims[-1])
        features after its ReLU and dropout with ``pre_logits``; with ``global_pool=''`` the map as
        it is."""
        if self.global_pool == "":
            return x
        if self.dynamic_img_size and tuple(x.shape[-2:]) != self.grid:
            x = F.adaptive_avg_pool2d(x, self.grid)
        x = x.flatten(1)
        for i, name in enumerate(self.fc_names):
            x = F.relu(getattr(self, name)(x))
            x = self.fc_drop(x) if i < len(self.fc_names) - 1 else self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes); a clip (B, T, C, H, W) -> the mean over T
        of its frames' logits."""
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            B, T = x.shape[:2]
            return self.forward(x.flatten(0, 1)).unflatten(0, (B, T)).mean(1)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The ReLU outputs of conv1..conv5 (``indices``: which, or the last n), and optionally
        the pool5 map. There is no norm layer (``norm`` is accepted and ignored)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = select_levels(5, indices)
        x = self._check(x)
        intermediates = []
        last = max_index if stop_early or intermediates_only else 4
        for index in range(last + 1):
            x = self._run_stage(index, x)
            if index in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return self.pool5(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one ``indices`` takes (and the fc layers and head)."""
        take, max_index = select_levels(5, indices)
        for index in range(max_index + 1, 5):
            setattr(self, f"conv{index + 1}", nn.Identity())
        if prune_head or max_index < 4:
            for name in self.fc_names:
                setattr(self, name, nn.Identity())
            self.reset_classifier(0)
        return take


# ----------------------------------------------------------------------------------------------
# Caffe's layers -> CaffeNet's state dict
# ----------------------------------------------------------------------------------------------

# Caffe's LRNParameter / PoolingParameter / ConvolutionParameter defaults (caffe.proto).
_CAFFE_DEFAULTS = {
    "convolution_param": {"pad": 0, "stride": 1, "group": 1},
    "pooling_param": {"pool": 0, "pad": 0, "stride": 1},
    "lrn_param": {"local_size": 5, "alpha": 1.0, "beta": 0.75, "k": 1.0, "norm_region": 0},
}


def _model_geometry(model: CaffeNet) -> dict[str, tuple[str, dict[str, float]]]:
    """What each Caffe layer of the prototxt must say for ``model``: name -> (parameter, fields)."""
    geometry: dict[str, tuple[str, dict[str, float]]] = {}
    for i in range(5):
        conv = getattr(model, f"conv{i + 1}")
        if isinstance(conv, nn.Conv2d):
            fields = dict(kernel_size=conv.kernel_size[0], stride=conv.stride[0], pad=conv.padding[0])
            geometry[f"conv{i + 1}"] = ("convolution_param", dict(fields, group=conv.groups))
    for name in ("pool1", "pool2", "pool5"):
        geometry[name] = ("pooling_param", dict(pool=0, kernel_size=_POOL_KERNEL, stride=_POOL_STRIDE, pad=0))
    for name in ("norm1", "norm2"):
        lrn: nn.LocalResponseNorm = getattr(model, name)
        fields = dict(local_size=lrn.size, alpha=lrn.alpha, beta=lrn.beta, k=lrn.k, norm_region=0)
        geometry[name] = ("lrn_param", fields)
    return geometry


def _file_value(params: dict, param: str, name: str) -> float | None:
    """A field of a Caffe parameter message, with the square forms (kernel_h...) read too."""
    values = params.get(param, {})
    for key in (name, f"{name}_h" if name in ("kernel_size", "stride", "pad") else None):
        if key and key in values:
            return values[key]
    return _CAFFE_DEFAULTS.get(param, {}).get(name)


def check_caffe_geometry(net: CaffeModel, model: CaffeNet) -> None:
    """ValueError when a layer of the file was trained with another kernel, stride, padding, group,
    pooling or LRN setting than the model computes (weights alone would not show it)."""
    for name, (param, expected) in _model_geometry(model).items():
        layer = net.get(name)
        if layer is None or param not in layer.params:
            continue  # the file does not say (a layer without weights may be left out)
        for field, want in expected.items():
            got = _file_value(layer.params, param, field)
            if got is not None and not math.isclose(float(got), float(want), rel_tol=1e-6):
                raise ValueError(
                    f"{net.source}: layer {name!r} has {param}.{field} = {got}, but the model's {name} "
                    f"computes with {want}: the file is not this architecture"
                )


def _strip_ones(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def caffe_blob(blob: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """A Caffe blob in the target's shape when it differs only by leading 1-dims (the legacy 4-D
    num/channels/height/width shape of fc weights (1, 1, out, in) and biases (1, 1, 1, out));
    otherwise as it is, for the mismatch check to name."""
    if (
        target is not None
        and blob.shape != target.shape
        and _strip_ones(blob.shape) == _strip_ones(target.shape)
    ):
        return blob.reshape(target.shape)
    return blob


def unmapped_layers(net: CaffeModel, used: set[str]) -> dict[str, torch.Tensor]:
    """The weights of file layers a conversion does not use, under keys that say so (so that the
    key check names them as the file's, not the model's)."""
    return {
        f"<caffe layer {name} blob {i}>": blob
        for name, layer in net.items()
        if name not in used
        for i, blob in enumerate(layer.blobs)
    }


def caffenet_state_from_caffe(
    net: CaffeModel, model: CaffeNet, prefix: str = "", expected: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """conv1..conv5 and fc6.. of a caffemodel as ``model``'s state dict (keys ``prefix`` + name).

    Caffe's layouts are PyTorch's (conv (out, in / group, kh, kw), InnerProduct (out, in)); conv1's
    input channels are reversed (Caffe's BGR -> RGB) when it has 3. The file's layer parameters are
    checked against the model first (:func:`check_caffe_geometry`). Returns the state and the
    names of the Caffe layers used.
    """
    check_caffe_geometry(net, model)
    expected = model.state_dict() if expected is None else expected
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    names = [f"conv{i + 1}" for i in range(5) if isinstance(getattr(model, f"conv{i + 1}"), nn.Conv2d)]
    names += [n for n in model.fc_names if isinstance(getattr(model, n), nn.Linear)]
    for name in names:
        layer = net.get(name)
        if layer is None or not layer.blobs:
            continue  # reported as missing keys by the caller's check
        used.add(name)
        for suffix, blob in zip(("weight", "bias"), layer.blobs, strict=False):
            key = f"{prefix}{name}.{suffix}"
            blob = caffe_blob(blob, expected.get(key))
            if name == "conv1" and suffix == "weight" and blob.dim() == 4 and blob.shape[1] == 3:
                blob = blob.flip(1)
            state[key] = blob
        for i, extra in enumerate(layer.blobs[2:], start=2):
            state[f"<caffe layer {name} blob {i}>"] = extra
    return state, used


# The classifier of the single-frame models (deploy_singleFrame.prototxt) and of an ImageNet net.
_CLASSIFIER_LAYERS = ("fc8-ucf", "fc8")


def checkpoint_filter_fn(state: dict, model: CaffeNet) -> dict[str, torch.Tensor]:
    """A caffemodel (read as :class:`~seqvision.vision.caffe.CaffeModel`) or a seqvision state dict
    -> ``model``'s state dict. The file's classifier is 'fc8-ucf' (the single-frame models) or 'fc8'."""
    if not isinstance(state, CaffeModel):
        return unwrap_state_dict(state)
    expected = model.state_dict()
    converted, used = caffenet_state_from_caffe(state, model, expected=expected)
    head = next((name for name in _CLASSIFIER_LAYERS if state.get(name) and state[name].blobs), None)
    if head is not None:
        used.add(head)
        for suffix, blob in zip(("weight", "bias"), state[head].blobs, strict=False):
            converted[f"head.{suffix}"] = caffe_blob(blob, expected.get(f"head.{suffix}"))
    converted.update(unmapped_layers(state, used))
    return converted


# ----------------------------------------------------------------------------------------------
# configs, registration
# ----------------------------------------------------------------------------------------------

# The authors' preprocessing, classify_video.py: frames 240 x 320 (resized up if smaller), 227 x 227
# crops (4 corners + centre, and their mirrors; timm's eval transform takes the centre one),
# x * 255 - mean in BGR order. RGB: mean (103.939, 116.779, 128.68) BGR, listed here in RGB order.
# The single-frame RGB model was trained with 123.68 for red (train_test_singleFrame_RGB.prototxt);
# the authors' evaluation script uses 128.68 for both RGB models. Flow images: 128 per channel.
MEAN_RGB = (128.68 / 255, 116.779 / 255, 103.939 / 255)
MEAN_FLOW = (128 / 255, 128 / 255, 128 / 255)
STD_CAFFE = (1 / 255, 1 / 255, 1 / 255)
# The source of every published file: the authors' page https://people.eecs.berkeley.edu/~lisa_anne/LRCN_video
WEIGHTS_URL = "https://people.eecs.berkeley.edu/~lisa_anne/"
LICENSE = "bsd-2-clause"  # lisa-caffe-public's LICENSE (Caffe's); the weights page names none


def caffe_cfg(**kwargs) -> dict:
    """timm's cfg of the authors' Caffe models: 227-pixel crops of 240-pixel frames, Caffe's 0-255
    scale minus the mean, UCF101's classes, the caffemodel read by ``load_pretrained``."""
    return {
        "num_classes": 101,
        "input_size": (3, 227, 227),
        "min_input_size": (3, _MIN_SIZE, _MIN_SIZE),  # with dynamic_img_size=True: fc6's grid is >= 1
        "pool_size": None,
        "crop_pct": 227 / 240,
        "interpolation": "bilinear",
        "fixed_input_size": True,
        "mean": MEAN_RGB,
        "std": STD_CAFFE,
        "first_conv": "conv1",
        "classifier": "head",
        "license": LICENSE,
        "label_names": UCF101_CLASSES,
        "custom_load": True,
        "origin_url": "https://github.com/LisaAnne/lisa-caffe-public/tree/lstm_video_deploy/examples/LRCN_activity_recognition",
        "paper_ids": "arXiv:1411.4389",
        "paper_name": "Long-term Recurrent Convolutional Networks for Visual Recognition and Description",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "caffenet_hybrid": PretrainedCfg(
            **caffe_cfg(
                num_classes=1000,
                label_names=None,
                custom_load=False,
                mean=(123.68 / 255, 116.779 / 255, 103.939 / 255),
                description=(
                    "The LRCN authors' CaffeNet / ZF hybrid for ImageNet (fc6, fc7, fc8); no weights are "
                    "hosted here: a caffemodel loads with pretrained_cfg_overlay=dict(file=...)"
                ),
            )
        ),
        "lrcn_caffenet_singleframe.ucf101_split1_rgb": PretrainedCfg(
            **caffe_cfg(
                url=WEIGHTS_URL + "single_frame_all_layers_hyb_RGB_iter_5000.caffemodel",
                description=(
                    "LRCN's single-frame baseline, RGB frames, UCF101 split 1 (the authors' Caffe model)"
                ),
            )
        ),
        "lrcn_caffenet_singleframe.ucf101_split1_flow": PretrainedCfg(
            **caffe_cfg(
                url=WEIGHTS_URL + "single_frame_all_layers_hyb_flow_iter_50000.caffemodel",
                mean=MEAN_FLOW,
                description=(
                    "LRCN's single-frame baseline, flow images (x, y, magnitude; 128 + 16 * flow), UCF101 "
                    "split 1 (the authors' Caffe model)"
                ),
            )
        ),
    }
)


def _create_caffenet(variant: str, pretrained: bool = False, **kwargs) -> CaffeNet:
    kwargs = read_local_files_with_load_pretrained(kwargs)
    return build_backbone(CaffeNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def caffenet_hybrid(pretrained: bool = False, **kwargs) -> CaffeNet:
    """The LRCN authors' CaffeNet variant as an ImageNet classifier (fc6, fc7 of 4096, 1000 classes)."""
    return _create_caffenet("caffenet_hybrid", pretrained, **kwargs)


@register_model
def lrcn_caffenet_singleframe(pretrained: bool = False, **kwargs) -> CaffeNet:
    """LRCN's single-frame baseline: the CaffeNet variant classifying every frame (fc6, fc7, 101
    UCF101 classes, dropout 0.5 as trained); a clip's prediction is the mean over its frames."""
    kwargs.setdefault("drop_rate", 0.5)
    return _create_caffenet("lrcn_caffenet_singleframe", pretrained, **kwargs)


# lrcn_caffenet_singleframe is served by lrcn.py's 'lrcn_caffenet*' converter.
register_converter("caffenet_*", checkpoint_filter_fn, read=read_weights)
