"""LRCN in timm: registration, shapes, chunked encoding, temporal pooling, causality, a frozen
encoder, module encoders, local encoder weights, the timm contract and bad input.

Frames are 32 x 32 and the LSTM narrow, so the whole file runs in seconds on a CPU.
"""

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import group_modules, group_parameters
from timm.optim import create_optimizer_v2

import seqvision  # noqa: F401  (registers the models)
from seqvision.vision.lrcn import LRCN

VARIANTS = {
    "lrcn_resnet18": "encoder.conv1",
    "lrcn_resnet50": "encoder.conv1",
    "lrcn_vir_small": "encoder.patch_embed.proj",
    "lrcn_lightnet_small": "encoder.patch_embed.proj",
}


def small(name="lrcn_resnet18", **kwargs):
    """A registered variant with 5 classes and a 16-wide LSTM, in eval mode."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 5, "lstm_hidden": 16, **kwargs}
    return timm.create_model(name, **kwargs).eval()


def clip(B=2, T=4, C=3, size=32, seed=1, dtype=torch.float32):
    return torch.randn(B, T, C, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# registration and shapes
# ----------------------------------------------------------------------------------------------


# The authors' Caffe architecture (test_lrcn_caffe.py): the LRCN and its single-frame baseline.
CAFFE_VARIANTS = {"lrcn_caffenet", "lrcn_caffenet_singleframe"}


def test_every_variant_is_registered():
    assert set(timm.list_models("lrcn_*")) == set(VARIANTS) | CAFFE_VARIANTS


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_builds_with_its_cfg(name):
    model = timm.create_model(name, num_classes=3)
    assert isinstance(model, LRCN)
    assert model.num_classes == 3 and model.num_features == model.head_hidden_size == 256
    assert model.get_classifier().out_features == 3
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["num_frames"] == 16 and cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 101
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["classifier"] == "head" and cfg["first_conv"] == VARIANTS[name]
    assert not any(cfg.get(key) for key in ("url", "hf_hub_id", "file"))
    model.get_submodule(cfg["first_conv"])  # names a real module
    assert timm.models.get_pretrained_cfg(name).num_frames == 16
    if "resnet" in name:
        assert model.eval()(torch.randn(1, 2, 3, 32, 32)).shape == (1, 3)


def test_default_head_is_ucf101():
    model = timm.create_model("lrcn_resnet18")
    assert model.num_classes == 101 and model.encoder_dim == 512 and model.lstm.hidden_size == 256


def test_seqvision_encoders_run_on_small_frames():
    # encoder_kwargs, and unknown keyword arguments, both reach the encoder's create_model.
    vir = small("lrcn_vir_small", encoder_kwargs=dict(img_size=32, depth=2))
    assert len(vir.encoder.blocks) == 2 and vir.encoder_dim == 384
    assert vir(clip(T=3)).shape == (2, 5)
    lightnet = small("lrcn_lightnet_small", img_size=32, depth=2)
    assert len(lightnet.encoder.blocks) == 2
    assert lightnet(clip(T=3)).shape == (2, 5)


@pytest.mark.parametrize("T", [1, 16])
def test_output_shapes(T):
    model = small()
    x = clip(T=T)
    assert model(x).shape == (2, 5)
    assert model.forward_features(x).shape == (2, T, 16)
    assert model.forward_step_logits(x).shape == (2, T, 5)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 16)


def test_an_image_is_a_clip_of_one_frame():
    model = small()
    x = clip(T=1)
    assert torch.equal(model(x[:, 0]), model(x))
    assert torch.equal(model.forward_features(x[:, 0]), model.forward_features(x))


@pytest.mark.parametrize("chunk", [1, 3, 8, 100])
def test_encoder_chunk_gives_the_same_output(chunk):
    model = small()
    x = clip(B=2, T=4)
    with torch.no_grad():
        expected = model.forward_features(x)
        model.encoder_chunk = chunk
        assert torch.allclose(model.forward_features(x), expected, rtol=1e-5, atol=1e-6)


def test_model_is_deterministic_in_eval_float64():
    model = small(dropout=0.5, feature_dropout=0.3).double()
    x = clip(dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# ----------------------------------------------------------------------------------------------
# temporal pooling and causality
# ----------------------------------------------------------------------------------------------


def test_mean_pool_is_the_mean_of_the_step_logits():
    model = small(temporal_pool="mean").double()
    x = clip(T=5, dtype=torch.float64)
    steps = model.forward_step_logits(x)
    assert torch.allclose(model(x), steps.mean(dim=1), rtol=0, atol=1e-12)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(pooled, model.forward_features(x).mean(dim=1), rtol=0, atol=1e-12)


def test_last_pool_is_the_last_step():
    model = small(temporal_pool="last")
    x = clip(T=5)
    assert torch.allclose(model(x), model.forward_step_logits(x)[:, -1], rtol=0, atol=1e-6)
    model.reset_classifier(5, temporal_pool="mean")
    assert torch.allclose(model(x), model.forward_step_logits(x).mean(dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0, 3, 5])
def test_a_step_depends_only_on_earlier_frames(t):
    model = small().double()
    x = clip(B=2, T=6, dtype=torch.float64)
    y = x.clone()
    y[:, t] = torch.randn_like(y[:, t])
    with torch.no_grad():
        a, b = model.forward_step_logits(x), model.forward_step_logits(y)
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).gt(1e-9).all()


# ----------------------------------------------------------------------------------------------
# frozen and trainable encoders
# ----------------------------------------------------------------------------------------------


def test_frozen_encoder_gets_no_gradient_and_keeps_its_statistics():
    model = small(freeze_encoder=True).train()
    assert model.training and not model.encoder.training
    assert not model.encoder.bn1.training
    stats = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k or "batches" in k}
    model(clip()).sum().backward()
    after = model.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert all(p.grad is not None for p in [*model.lstm.parameters(), *model.head.parameters()])

    model.set_encoder_frozen(False)
    assert model.encoder.training and all(p.requires_grad for p in model.encoder.parameters())


def test_trainable_encoder_gets_gradients_and_updates_its_statistics():
    model = small().train()
    before = model.encoder.bn1.running_mean.clone()
    model(clip()).sum().backward()
    assert not torch.equal(model.encoder.bn1.running_mean, before)
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------------------
# encoders given as modules, local encoder weights
# ----------------------------------------------------------------------------------------------


def test_encoder_given_as_a_timm_module():
    torch.manual_seed(0)
    encoder = timm.create_model("resnet18", num_classes=0)
    model = LRCN(encoder, num_classes=4, lstm_hidden=8).eval()
    assert model.encoder is encoder and model.encoder_dim == 512
    assert model(clip()).shape == (2, 4)
    assert model.pretrained_cfg["first_conv"] == "encoder.conv1"


def test_encoder_module_without_a_declared_width_is_probed():
    encoder = nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = LRCN(encoder, num_classes=2, lstm_hidden=8).eval()
    assert model.encoder_dim == 7
    assert model(clip()).shape == (2, 2)
    # The probe ran in eval mode: BatchNorm statistics untouched, the mode restored.
    assert torch.equal(encoder[1].running_mean, torch.zeros(7))
    model.train()
    assert encoder.training


def test_bad_encoder_modules_are_refused():
    with pytest.raises(ValueError, match="num_classes=0"):
        LRCN(timm.create_model("resnet18", num_classes=10))
    with pytest.raises(ValueError, match=r"pooled features \(N, D\)"):
        LRCN(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="img_size"):
        LRCN(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), encoder_kwargs=dict(img_size=32))
    with pytest.raises(ValueError, match="pretrained_encoder=True"):
        LRCN(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), pretrained_encoder=True)
    with pytest.raises(TypeError, match="encoder must be"):
        LRCN(encoder=3)
    with pytest.raises(ValueError, match="resnet_18"):
        LRCN(encoder="resnet_18")

    class Unpooled(nn.Module):  # declares a width, but returns maps
        num_features = 4

        def forward(self, x):
            return x[:, :1].expand(-1, 4, -1, -1)

    with pytest.raises(ValueError, match=r"pooled features \(N, D\) = \(8, 4\)"):
        LRCN(Unpooled(), lstm_hidden=8)(clip())


def _saved_resnet18(path, **changes):
    """A full ImageNet-layout resnet18 state (1000-class fc included), saved to ``path``."""
    torch.manual_seed(123)
    state = timm.create_model("resnet18").state_dict()
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_encoder_from_a_local_file(tmp_path, suffix):
    path = tmp_path / f"resnet18{suffix}"
    state = _saved_resnet18(path)
    model = timm.create_model("lrcn_resnet18", num_classes=3, pretrained_encoder=path)
    loaded = model.encoder.state_dict()
    assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_pretrained_encoder_file_is_adapted_to_other_input_channels(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    state = _saved_resnet18(path)
    model = LRCN("resnet18", in_chans=1, pretrained_encoder=path)
    assert torch.allclose(model.encoder.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert model(torch.randn(1, 2, 1, 32, 32)).shape == (1, 101)


def test_mismatched_encoder_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.safetensors"
    _saved_resnet18(path, **{"layer1.0.conv1.weight": None, "extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"bad\.safetensors") as info:
        LRCN("resnet18", pretrained_encoder=path)
    message = str(info.value)
    assert "missing keys: layer1.0.conv1.weight" in message and "unexpected keys: extra.weight" in message

    path = tmp_path / "wide.safetensors"
    _saved_resnet18(path, **{"bn1.weight": torch.ones(65)})
    with pytest.raises(ValueError, match=r"wide\.safetensors.*shapes: bn1\.weight \(65,\) vs \(64,\)"):
        LRCN("resnet18", pretrained_encoder=path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        LRCN("resnet18", pretrained_encoder=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        LRCN("resnet18", pretrained_encoder=tmp_path / "junk.pth")


def test_lrcn_checkpoint_loads_through_timm(tmp_path):
    source = small()
    path = tmp_path / "lrcn.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    overlay = dict(file=str(path), num_classes=5)
    model = timm.create_model(
        "lrcn_resnet18", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5, lstm_hidden=16
    ).eval()
    x = clip()
    assert torch.equal(model(x), source(x))


# ----------------------------------------------------------------------------------------------
# timm's contract
# ----------------------------------------------------------------------------------------------


def test_create_model_passes_arguments_through():
    model = timm.create_model("lrcn_resnet18", num_classes=2, pretrained_encoder=False)
    assert model.num_classes == 2
    model = timm.create_model("lrcn_resnet18", encoder_kwargs=dict(global_pool="max"), drop_rate=0.25)
    assert model.encoder.global_pool.pool_type == "max"
    assert model.head_drop.p == 0.25
    model = timm.create_model("lrcn_resnet18", num_frames=8, lstm_layers=2, lstm_dropout=0.1)
    assert model.pretrained_cfg["num_frames"] == model.num_frames == 8
    assert model.lstm.num_layers == 2 and model.lstm.dropout == 0.1


def test_pretrained_lrcn_and_features_only_are_refused():
    with pytest.raises(ValueError, match="pretrained_encoder=True"):
        timm.create_model("lrcn_resnet18", pretrained=True)
    with pytest.raises(ValueError, match="features_only"):
        timm.create_model("lrcn_resnet18", features_only=True)


def test_reset_classifier():
    model = small()
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(clip()).shape == (2, 7)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model(clip()).shape == (2, 16)
    assert model.forward_step_logits(clip()).shape == (2, 4, 16)
    with pytest.raises(ValueError, match="temporal_pool"):
        model.reset_classifier(3, "avg")


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("name", ["lrcn_resnet18", "lrcn_vir_small"])
def test_group_matcher_covers_every_parameter_once(name, coarse):
    model = small(name, **({"encoder_kwargs": dict(img_size=32, depth=2)} if "vir" in name else {}))
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    names = [n for ids in groups.values() for n in ids]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    last = max(groups)
    assert set(groups[last]) == {"head.weight", "head.bias"}
    assert all(n.startswith("lstm.") for n in groups[last - 1])
    assert all(n.startswith("encoder.") for i in range(last - 1) for n in groups[i])
    assert last - 1 > 1  # the encoder has groups of its own (stem, blocks)
    first = "encoder.conv1.weight" if "resnet" in name else "encoder.patch_embed.proj.weight"
    assert first in groups[0]
    modules = group_modules(model, model.group_matcher(coarse=coarse))
    assert modules[max(modules)] == ["head"] and modules[max(modules) - 1] == ["lstm"]


def test_group_matcher_of_a_plain_encoder_and_layer_decay():
    model = LRCN(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), lstm_hidden=8)
    groups = group_parameters(model, model.group_matcher())
    assert [sorted({n.split(".")[0] for n in groups[i]}) for i in sorted(groups)] == [
        ["encoder"],
        ["lstm"],
        ["head"],
    ]
    optimizer = create_optimizer_v2(small(), "adamw", lr=1e-3, layer_decay=0.5)
    scales = {g["lr_scale"] for g in optimizer.param_groups}
    assert max(scales) == 1.0 and min(scales) < 0.01


def test_no_weight_decay_and_grad_checkpointing_reach_the_encoder():
    model = small("lrcn_vir_small", encoder_kwargs=dict(img_size=32, depth=2))
    names = model.no_weight_decay()
    assert names == {"encoder.pos_embed", "encoder.cls_token"}
    assert names <= {n for n, _ in model.named_parameters()}
    assert small().no_weight_decay() == set()
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing and model.grad_checkpointing
    plain = LRCN(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), lstm_hidden=8)
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        plain.set_grad_checkpointing(True)
    plain.set_grad_checkpointing(False)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors():
    model = small()
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        model([1, 2])
    with pytest.raises(ValueError, match=r"x must be a clip batch \(B, T, C, H, W\).*\(2, 3, 32\)"):
        model(torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match=r"3 channels \(in_chans\).*got 1 in \(2, 4, 1, 32, 32\)"):
        model(torch.randn(2, 4, 1, 32, 32))
    with pytest.raises(ValueError, match=r"transpose\(1, 2\)"):
        model(torch.randn(2, 3, 4, 32, 32))  # (B, C, T, H, W)
    with pytest.raises(ValueError, match="T >= 1"):
        model(torch.randn(2, 0, 3, 32, 32))
    with pytest.raises(ValueError, match="B >= 1"):
        model(torch.randn(0, 2, 3, 32, 32))
    model.encoder_chunk = 0
    with pytest.raises(ValueError, match="encoder_chunk must be a positive int"):
        model(clip())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temporal_pool="max"), ValueError, "temporal_pool must be one of"),
        (dict(lstm_hidden=0), ValueError, "lstm_hidden must be a positive int"),
        (dict(num_classes=-1), ValueError, "num_classes"),
        (dict(encoder_chunk=0), ValueError, "encoder_chunk"),
        (dict(lstm_dropout=0.2), ValueError, "lstm_layers > 1"),
        (dict(encoder_kwargs=dict(num_classes=10)), ValueError, "encoder_kwargs must not set"),
        (dict(encoder_kwargs=dict(img_size=32), img_size=64), ValueError, "img_size"),
        (dict(pretrained_encoder=1.0), TypeError, "pretrained_encoder"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        LRCN(**kwargs)


def test_feature_norm_standardises_each_channel_over_batch_and_time():
    torch.manual_seed(0)
    model = timm.create_model("lrcn_resnet18", num_classes=2, feature_norm=True, freeze_encoder=True)
    seen = {}
    model.lstm.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    model.train()(torch.randn(3, 4, 3, 32, 32))
    features = seen["x"].flatten(0, 1)  # (B * T, D)
    torch.testing.assert_close(features.mean(0), torch.zeros(features.shape[1]), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in model.feature_norm.parameters())  # no affine
