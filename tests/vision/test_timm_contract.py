"""timm's contract, checked the way timm's own model tests check it, on every registered seqvision model.

The list of models is read from timm's registry at collection time, so a new model is checked
without being named here. Following timm's ``tests/test_models.py``: a model whose cfg declares
``fixed_input_size`` runs at the cfg's size, any other at a reduced size (``reduced_size``); the cfg
must name real layers (``first_conv``, ``classifier``) and resolve to a data config and transform;
forward and backward reach every parameter; ``forward_head(pre_logits=True)``,
``reset_classifier`` and ``num_classes=0`` agree; ``features_only`` and ``forward_intermediates``
give the levels ``feature_info`` promises; gradient checkpointing changes no output.

What a family's own test file keeps is what is specific to it (its math, its forms, its counts).
The runs build each model with few blocks (``shallow``): the contract is the same at any depth and
the full depths are exercised by the families' parameter counts; everything else (widths, stems,
heads, the cfg) is the registered model's. Forward and backward run at timm's size (the cfg's for a
fixed-size model) with one block per stack; the head and feature checks need three blocks (timm's
default ``out_indices=3``) and run fixed-size models with ``dynamic_img_size=True`` at a reduced
size, which keeps the whole file near a minute on two CPU cores.
"""

from __future__ import annotations

import inspect
import math

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from timm.models._registry import _model_entrypoints

import seqvision  # noqa: F401  (registers the models)
from seqvision.vision.em import EMMambaEncoder
from seqvision.vision.lrcn import LRCN

MODELS = sorted(name for name, fn in _model_entrypoints.items() if fn.__module__.startswith("seqvision."))
TAGGED = sorted(
    name for name in timm.list_pretrained() if name.split(".")[0] in MODELS and "." in name
)  # every pretrained tag of a seqvision model

# A model without a fixed size runs reduced, as in timm's tests (which use 96-128 px; smaller here,
# to keep the suite's time: the contract does not depend on the size).
REDUCED_SIZE = 64
EM_VOLUME = (16, 32, 32)  # the smallest crop the EM encoders take (every axis / 16, > 16 on one axis)
CLIP_FRAMES = 2  # frames of an LRCN clip (any T >= 1 runs)


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def shallow(name: str, depth: int = 3) -> dict:
    """Arguments that keep the registered model but with few blocks: ``depth`` for a plain stack
    (timm's default ``out_indices=3`` takes the last three), 1 per stage for a staged model."""
    model_cls = type(on_meta(name))
    parameters = inspect.signature(model_cls.__init__).parameters
    if "depth" in parameters:
        return {"depth": depth}
    if "depths" in parameters:
        default = parameters["depths"].default
        return {"depths": (1,) * len(default)}
    return {}


def reduced_size(cfg: dict, target: int, dynamic: bool = False) -> tuple[int, int]:
    """timm's rule: the cfg's (H, W) when it is fixed (and the model not made dynamic), else each side
    capped at ``target`` but not below the cfg's ``min_input_size``."""
    height, width = cfg["input_size"][1:]
    if cfg.get("fixed_input_size") and not dynamic:
        return height, width
    low = (cfg.get("min_input_size") or (0, 0, 0))[1:]
    return max(min(height, target), low[0]), max(min(width, target), low[1])


def example_input(model: torch.nn.Module, size: tuple[int, int], batch: int = 1) -> torch.Tensor:
    """What the model takes: an image batch, a clip batch (LightNet video: channels first; LRCN:
    time first), or an EM volume batch."""
    torch.manual_seed(0)
    model = getattr(model, "model", model)  # a features_only wrapper holds the model
    channels = model.pretrained_cfg["input_size"][0]
    if isinstance(model, EMMambaEncoder):
        return torch.rand(batch, channels, *EM_VOLUME)
    if isinstance(model, LRCN):
        return torch.randn(batch, CLIP_FRAMES, channels, *size)
    if getattr(model, "video", False):
        frames = model.input_size[0]
        return torch.randn(batch, channels, frames, *size)
    return torch.randn(batch, channels, *size)


def test_every_family_is_checked():
    families = {name.split("_")[0] for name in MODELS}
    assert {"vir", "lightnet", "vim", "vmamba", "emmamba", "lrcn"} <= families


# ------------------------------------------------------------------------------------------------
# the cfg
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_cfg_names_real_layers_and_resolves_to_a_transform(name):
    model = on_meta(name)
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert len(cfg["input_size"]) == 3
    channels = cfg["input_size"][0]
    assert len(cfg["mean"]) == len(cfg["std"]) == channels
    assert 0 < cfg["crop_pct"] <= 1
    assert cfg["interpolation"] in ("bilinear", "bicubic", "nearest")
    assert cfg.get("license")
    assert model.num_classes == cfg["num_classes"] >= 0
    assert model.num_features > 0 and model.head_hidden_size > 0
    first_conv = cfg["first_conv"]
    for conv in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert f"{conv}.weight" in state, f"first_conv {conv!r} is not a layer"
    if cfg["num_classes"]:
        classifier = cfg["classifier"]
        for head in (classifier,) if isinstance(classifier, str) else classifier:
            assert f"{head}.weight" in state, f"classifier {head!r} is not a layer"
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == tuple(cfg["input_size"])
    assert create_transform(**data) is not None


@pytest.mark.parametrize("name", TAGGED or ["(no tags)"])
def test_pretrained_tags_name_their_weights_and_eval_transform(name):
    if not TAGGED:
        pytest.fail("no seqvision model has a pretrained tag")
    cfg = get_pretrained_cfg(name).to_dict()
    assert cfg.get("hf_hub_id") or cfg.get("url"), f"{name} names no weights"
    assert cfg.get("license") and cfg.get("num_classes") is not None
    assert 0 < cfg["crop_pct"] <= 1 and cfg.get("mean") and cfg.get("std") and cfg.get("interpolation")
    assert name in timm.list_pretrained(name.split(".")[0] + "*")


# ------------------------------------------------------------------------------------------------
# forward, head, features, backward: one model per check, built with few blocks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_backward_at_timm_size_reach_every_parameter(name):
    """timm's test_model_forward / test_model_backward: batch 2, a new 42-class head, gradient
    checkpointing on (it must change no output), every parameter reached. Both runs start from the
    same random state, so the models' default dropouts draw the same masks. A model whose cfg says
    ``fixed_input_size`` must refuse other sizes (and the next test runs it with
    ``dynamic_img_size=True`` at a reduced size); the others take the reduced size here."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, **shallow(name, depth=1)).train()
    cfg = model.pretrained_cfg
    if cfg.get("fixed_input_size"):
        height, width = cfg["input_size"][1:]
        with pytest.raises(ValueError, match="dynamic_img_size=True"):
            model(example_input(model, (height // 2, width // 2)))
    x = example_input(model, reduced_size(cfg, REDUCED_SIZE), batch=2)
    torch.manual_seed(1)
    with torch.no_grad():
        plain = model(x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out = model(x)
    assert out.shape == (2, 42)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, plain, rtol=1e-4, atol=1e-5)
    loss = out.mean()
    if isinstance(model, EMMambaEncoder):  # its first skip heads serve the segmenter's decoder only
        loss = loss + sum(level.mean() for level in model.forward_intermediates(x, intermediates_only=True))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_head_reset_classifier_features_and_intermediates_agree(name):
    """timm's test_model_default_cfgs, test_model_forward_features and test_model_forward_intermediates."""
    torch.manual_seed(0)
    fixed = get_pretrained_cfg(name).fixed_input_size
    kwargs = {**shallow(name), **({"dynamic_img_size": True} if fixed else {})}
    model = timm.create_model(name, **kwargs).eval()
    x = example_input(model, reduced_size(model.pretrained_cfg, REDUCED_SIZE, dynamic=True))
    is_lrcn = isinstance(model, LRCN)

    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        pre_logits = model.forward_head(features, pre_logits=True)
    assert logits.shape == (1, model.num_classes or model.head_hidden_size)
    assert pre_logits.shape == (1, model.head_hidden_size)

    # The classifier goes (num_classes=0: pooled features), then the pooling ('': unpooled).
    assert isinstance(model.get_classifier(), torch.nn.Module)
    model.reset_classifier(0)
    assert model.num_classes == 0
    with torch.no_grad():
        assert torch.allclose(model(x), pre_logits, atol=1e-6)
        if not is_lrcn:  # LRCN pools over time, not space: its second argument is the temporal pool
            model.reset_classifier(0, "")
            assert torch.allclose(model(x), features, atol=1e-6)
    headless = on_meta(name, num_classes=0)
    assert headless.num_classes == 0 and headless.num_features == model.num_features

    if is_lrcn:
        with pytest.raises(ValueError, match="features_only"):
            timm.create_model(name, features_only=True)
        return
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
    assert torch.allclose(final, features, atol=1e-6)
    check_levels(x, intermediates, model.feature_info)
    levels = timm.create_model(name, features_only=True, **kwargs).eval()
    with torch.no_grad():
        outputs = levels(x)
    assert len(outputs) >= 3
    check_levels(x, outputs, levels.feature_info)


def check_levels(x: torch.Tensor, outputs: list, feature_info) -> None:
    """timm's check of feature levels: channels as promised, height and width <= ceil(size / reduction)
    + 1 (a clip's or volume's leading grid axis is not covered by the 2-D reductions)."""
    info = (
        feature_info
        if hasattr(feature_info, "channels")
        else timm.models.FeatureInfo(feature_info, len(feature_info))
    )
    channels, reductions = info.channels(), info.reduction()
    assert len(outputs) == len(channels)
    height, width = x.shape[-2:]
    for c, r, o in zip(channels, reductions, outputs, strict=True):
        assert o.shape[:2] == (1, c)
        assert o.shape[-2] <= math.ceil(height / r) + 1 and o.shape[-1] <= math.ceil(width / r) + 1
        assert torch.isfinite(o).all()
