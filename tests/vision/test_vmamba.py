"""VMamba: the authors' own outputs (fixtures), their checkpoint layout, parameter counts, the published
tags, the scan forms agree, features, the timm contract, bad input."""

import itertools
import math
import sys
import types
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from mamba_counts import count, on_meta
from timm.models import group_parameters
from upstream_fixtures import assert_close_relative, load_fixture

import seqvision  # noqa: F401  (registers the models)
from seqvision.kernels.check import relative_error
from seqvision.vision.mamba import MambaMixer
from seqvision.vision.vmamba import PatchMerging2d, VMamba, convert_authors_state
from seqvision.vision.weights import convert_checkpoint

V2 = dict(d_state=1, gate=False, conv_bias=False, mlp_ratio=4.0, stem_type="conv", downsample_type="conv")
GENERATIONS = {"v0": {}, "v2": V2}

# name: (dims, depths, expand, generation, the authors' count in millions, assets/performance.md)
VARIANTS = {
    "vmamba_tiny_224": ((96, 192, 384, 768), (2, 2, 9, 2), 2, "v0", 23),
    "vmamba_small_224": ((96, 192, 384, 768), (2, 2, 27, 2), 2, "v0", 44),
    "vmamba_base_224": ((128, 256, 512, 1024), (2, 2, 27, 2), 2, "v0", 76),
    "vmamba_tiny_s2l5_224": ((96, 192, 384, 768), (2, 2, 5, 2), 2, "v2", 31),
    "vmamba_small_s2l15_224": ((96, 192, 384, 768), (2, 2, 15, 2), 2, "v2", 50),
    "vmamba_base_s2l15_224": ((128, 256, 512, 1024), (2, 2, 15, 2), 2, "v2", 89),
    "vmamba_tiny_s1l8_224": ((96, 192, 384, 768), (2, 2, 8, 2), 1, "v2", 30),
    "vmamba_small_s1l20_224": ((96, 192, 384, 768), (2, 2, 20, 2), 1, "v2", 49),
    "vmamba_base_s1l20_224": ((128, 256, 512, 1024), (2, 2, 20, 2), 1, "v2", 87),
}
# The released files (assets/performance.md), by tag.
RELEASES = {
    "vmamba_tiny_224.in1k": "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth",
    "vmamba_small_224.in1k": "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth",
    "vmamba_base_224.in1k": "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth",
    "vmamba_tiny_s2l5_224.in1k": "%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth",
    "vmamba_small_s2l15_224.in1k": "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth",
    "vmamba_base_s2l15_224.in1k": "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth",
    "vmamba_tiny_s1l8_224.in1k": "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth",
    "vmamba_small_s1l20_224.in1k": "%23v2cls/vssm1_small_0229s_ckpt_epoch_240.pth",
    "vmamba_base_s1l20_224.in1k": "%23v2cls/vssm1_base_0229s_ckpt_epoch_225.pth",
}


def small_vmamba(generation="v0", **kwargs):
    torch.manual_seed(0)
    kwargs = {"dims": (16, 32, 48, 64), "depths": (1, 1, 2, 1), **GENERATIONS[generation], **kwargs}
    return timm.create_model("vmamba_tiny_224", **kwargs).eval()


# ------------------------------------------------------------------------------------------------
# parameter counts and registration
# ------------------------------------------------------------------------------------------------


def expected_vmamba(dims, depths, expand, generation, classes=1000):
    """Parameters counted from the architecture's definition (v0 or v2/v3)."""
    v2 = generation == "v2"

    def block(c):
        E, R, N = int(expand * c), math.ceil(c / 16), 1 if v2 else 16
        in_proj = c * E * (1 if v2 else 2)  # v2: no gate half
        conv = 9 * E + (0 if v2 else E)  # v2: bias-free depthwise 3x3
        per_route = (R + 2 * N) * E + E * R + E + E * N + E  # x_proj, dt_proj (+ bias), A_log, D
        mixer = in_proj + conv + 4 * per_route + 2 * E + E * c  # out_norm, out_proj
        mlp = 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) if v2 else 0  # norm2, fc1, fc2
        return 2 * c + mixer + mlp

    d = dims[0]
    if v2:  # conv 3x3 to d/2, LN, conv 3x3 to d, LN
        stem = 27 * (d // 2) + d // 2 + d + 9 * (d // 2) * d + d + 2 * d
        merges = sum(9 * a * b + b + 2 * b for a, b in itertools.pairwise(dims))
    else:  # 4x4 conv, LN; LayerNorm(4C) and a 1x1 conv 4C -> C'
        stem = 48 * d + d + 2 * d
        merges = sum(8 * a + 4 * a * b for a, b in itertools.pairwise(dims))
    blocks = sum(n * block(c) for c, n in zip(dims, depths, strict=True))
    return stem + blocks + merges + 2 * dims[-1] + dims[-1] * classes + classes


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_and_norm_eps(name):
    dims, depths, expand, generation, authors_millions = VARIANTS[name]
    model = on_meta(name)
    ours = count(model)
    assert ours == expected_vmamba(dims, depths, expand, generation)
    assert round(ours / 1e6) == authors_millions
    # The authors' LayerNorm eps (1e-5) in the stem, every block, every downsample and the final norm.
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and {m.eps for m in norms} == {1e-5}


def test_every_variant_and_tag_is_registered():
    assert timm.list_models("vmamba_*") == sorted(VARIANTS)
    assert timm.list_pretrained("vmamba_*") == sorted(RELEASES)
    for tag, file in RELEASES.items():
        cfg = timm.get_pretrained_cfg(tag).to_dict()
        assert cfg["url"] == "https://github.com/MzeroMiko/VMamba/releases/download/" + file
        assert cfg["custom_load"] is True and cfg["license"] == "mit" and cfg["num_classes"] == 1000
        assert (cfg["crop_pct"], cfg["interpolation"], cfg["input_size"]) == (0.875, "bicubic", (3, 224, 224))
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["fixed_input_size"] is False and cfg["classifier"] == "head.fc"
        model = on_meta(tag.split(".")[0])
        assert cfg["first_conv"] == model.first_conv
        assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)


# ------------------------------------------------------------------------------------------------
# the authors' model (fixtures made by tools/upstream/vmamba.py) and their checkpoint layout
# ------------------------------------------------------------------------------------------------


def fixture_arch(fixture, generation):
    c = fixture.config
    return dict(
        dims=c["dims"], depths=c["depths"], d_state=c["ssm_d_state"], expand=c["ssm_ratio"],
        num_classes=c["num_classes"], **{k: v for k, v in GENERATIONS[generation].items() if k != "d_state"},
    )  # fmt: skip


def save_like_the_authors(path, state, monkeypatch, ema=None):
    """torch.save as their main.py does: 'model' (+ 'model_ema'), optimizer state and a yacs config.
    The config's class lives in a throwaway module that is gone when the file is read, as yacs is."""
    module = types.ModuleType("throwaway_yacs")

    class CfgNode(dict):
        pass

    CfgNode.__module__ = module.__name__
    CfgNode.__qualname__ = "CfgNode"
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, module.__name__, module)
    checkpoint = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 262,
        "max_accuracy": 82.6,
        "config": CfgNode(MODEL=CfgNode(TYPE="vssm")),
    }
    if ema is not None:
        checkpoint["model_ema"] = ema
    torch.save(checkpoint, path)
    monkeypatch.delitem(sys.modules, module.__name__)
    return path


@pytest.mark.parametrize("generation", ["v0", "v2"])
def test_authors_file_loads_through_timm_and_gives_their_logits(generation, tmp_path, monkeypatch):
    fixture = load_fixture(f"vmamba_{generation}")
    ema = {k: v + 1 for k, v in fixture.state_dict.items()}  # must not be what the tag loads
    path = save_like_the_authors(tmp_path / "ckpt_epoch_5.pth", fixture.state_dict, monkeypatch, ema=ema)
    with pytest.raises(Exception, match="CfgNode"):  # why the cfgs need custom_load
        timm.models.load_state_dict(str(path))
    arch = fixture_arch(fixture, generation)
    # timm's plain local-file path: the file goes to VMamba.load_pretrained, not timm's reader.
    overlay = dict(file=str(path), num_classes=arch["num_classes"])
    model = timm.create_model("vmamba_tiny_224", pretrained=True, pretrained_cfg_overlay=overlay, **arch)
    model.eval()
    x = fixture.inputs["x"]
    with torch.no_grad():
        assert_close_relative(model(x), fixture.outputs["logits"])
        model.set_scan_form("recurrent")
        assert_close_relative(model(x), fixture.outputs["logits"])

    # convert_checkpoint (behind `seqvision convert`) gives the same state; use_ema reads 'model_ema'.
    _, state = convert_checkpoint(path, "vmamba_tiny_224", **arch)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    ema_model = timm.create_model("vmamba_tiny_224", **arch)
    ema_model.load_pretrained(path, use_ema=True)
    assert torch.equal(ema_model.head.fc.bias, model.head.fc.bias + 1)
    with pytest.raises(Exception, match="CfgNode"):  # custom_load=False asks for timm's own reader
        overlay = dict(file=str(path), custom_load=False)
        timm.create_model("vmamba_tiny_224", pretrained=True, pretrained_cfg_overlay=overlay, **arch)


def test_the_first_files_key_spellings_convert_alike(tmp_path, monkeypatch):
    fixture = load_fixture("vmamba_v0")
    old = {}
    for key, value in fixture.state_dict.items():  # as in their Jan 2024 code
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace(
            "patch_embed.2.", "patch_embed.norm."
        )
        key = key.replace(".norm.", ".ln_1.") if ".blocks." in key else key
        key = key.replace(".op.", ".self_attention.").replace("classifier.", "")
        old[key] = value
    assert "layers.0.blocks.0.self_attention.A_logs" in old and "head.weight" in old
    arch = fixture_arch(fixture, "v0")
    old_file = save_like_the_authors(tmp_path / "old.pth", old, monkeypatch)
    new_file = save_like_the_authors(tmp_path / "new.pth", fixture.state_dict, monkeypatch)
    _, ours = convert_checkpoint(old_file, "vmamba_tiny_224", **arch)
    _, new = convert_checkpoint(new_file, "vmamba_tiny_224", **arch)
    assert all(torch.equal(ours[k], new[k]) for k in new)


def rename(state, old, new):
    state[new] = state.pop(old)


def truncate(state, key):
    state[key] = state[key][:-4]


@pytest.mark.parametrize(
    ("edit", "named"),
    [  # a renamed key is named as the file spells it; a reshaped or missing one as the model does
        (partial(rename, old="layers.0.blocks.0.op.x_proj_weight", new="layers.0.blocks.0.op.x_proj_wt"),
         "layers.0.blocks.0.op.x_proj_wt"),
        (partial(truncate, key="layers.1.blocks.0.op.A_logs"), "stages.1.blocks.0.mixer.A_log"),
        (lambda state: state.pop("layers.2.downsample.1.weight"), "stages.3.downsample.conv.weight"),
    ],
)  # fmt: skip
def test_a_broken_authors_file_names_the_key(edit, named, tmp_path, monkeypatch):
    fixture = load_fixture("vmamba_v2")
    state = dict(fixture.state_dict)
    edit(state)
    path = save_like_the_authors(tmp_path / "broken.pth", state, monkeypatch)
    arch = fixture_arch(fixture, "v2")
    with pytest.raises(ValueError, match=f"first key that does not fit: '{named}'"):
        convert_checkpoint(path, "vmamba_tiny_224", **arch)
    with pytest.raises(ValueError, match=named):
        timm.create_model(
            "vmamba_tiny_224",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path), custom_load=True),
            **arch,
        )


def test_load_pretrained_drops_a_classifier_that_does_not_fit_and_adapts_in_chans(tmp_path, monkeypatch):
    fixture = load_fixture("vmamba_v0")
    path = save_like_the_authors(tmp_path / "ckpt.pth", fixture.state_dict, monkeypatch)
    arch = fixture_arch(fixture, "v0")
    reference = timm.create_model("vmamba_tiny_224", **arch).eval()
    reference.load_pretrained(path)
    overlay = dict(file=str(path), custom_load=True)
    arch.update(num_classes=3)
    other = timm.create_model(
        "vmamba_tiny_224", pretrained=True, pretrained_cfg_overlay=overlay, **arch
    ).eval()
    x = fixture.inputs["x"]
    with torch.no_grad():
        assert torch.equal(other.forward_features(x), reference.forward_features(x))
    gray = timm.create_model(
        "vmamba_tiny_224", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, **arch
    )
    assert torch.allclose(gray.stem[0].weight[:, 0], reference.stem[0].weight.sum(1))


def test_patch_merging_converts_the_authors_channel_order():
    # Their merge: the 2x2 offsets (dy, dx) = (0,0), (1,0), (0,1), (1,1) concatenated, LayerNorm(4C),
    # Linear(4C -> C'); ours: pixel_unshuffle (channel c * 4 + 2 dy + dx), LayerNorm2d, 1x1 conv.
    torch.manual_seed(0)
    C, out = 3, 5
    norm, reduction = nn.LayerNorm(4 * C), nn.Linear(4 * C, out, bias=False)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, C, 6, 7)  # odd width: both pad to the right
    padded = F.pad(x, (0, 1))
    theirs = torch.cat([padded[..., dy::2, dx::2] for dy, dx in [(0, 0), (1, 0), (0, 1), (1, 1)]], dim=1)
    expected = reduction(norm(theirs.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    authors = {f"layers.0.downsample.norm.{k}": v for k, v in norm.state_dict().items()}
    authors["layers.0.downsample.reduction.weight"] = reduction.weight
    merge = PatchMerging2d(C, out)
    merge.load_state_dict(
        {k.removeprefix("stages.1.downsample."): v for k, v in convert_authors_state(authors).items()}
    )
    with torch.no_grad():
        assert torch.allclose(merge(x), expected, atol=1e-5)
        unconverted = PatchMerging2d(C, out)
        unconverted.norm.load_state_dict(norm.state_dict())
        unconverted.reduction.weight.copy_(reduction.weight[..., None, None])
        assert not torch.allclose(unconverted(x), expected, atol=1e-2)  # the order does matter


def test_gate_free_mixer_decodes_step_by_step():
    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=1, d_conv=3, expand=1, gate=False).double()
    assert mixer.in_proj.weight.shape == (8, 8)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = mixer(x)
        state = mixer.allocate_inference_state(2, dtype=torch.float64)
        steps = []
        for t in range(x.shape[1]):
            y, state = mixer.step(x[:, t], state)
            steps.append(y)
    assert relative_error(torch.stack(steps, dim=1), expected) < 1e-12


# ------------------------------------------------------------------------------------------------
# forms, features, the timm contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", ["v0", "v2"])
def test_vmamba_forms_give_the_same_logits(generation):
    model = small_vmamba(generation)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.set_scan_form("recurrent")
        expected = model(x)
        model.set_scan_form("chunk", 7)
        assert relative_error(model(x), expected) < 1e-5


def test_vmamba_features_only_gives_four_levels():
    torch.manual_seed(0)
    model = timm.create_model("vmamba_tiny_224", features_only=True, depths=(1, 1, 1, 1))
    assert model.feature_info.channels() == [96, 192, 384, 768]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    features = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [
        (1, 96, 16, 16),
        (1, 192, 8, 8),
        (1, 384, 4, 4),
        (1, 768, 2, 2),
    ]
    two = timm.create_model("vmamba_tiny_224", features_only=True, out_indices=(1, 2), dims=(8, 16, 24, 32))
    assert [tuple(f.shape) for f in two(torch.randn(1, 3, 64, 64))] == [(1, 16, 8, 8), (1, 24, 4, 4)]
    assert len(two.model.stages) == 3  # pruned after the last requested stage


@pytest.mark.parametrize("generation", ["v0", "v2"])
def test_vmamba_create_model_arguments_any_size_and_intermediates(generation):
    model = small_vmamba(generation, num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 36, 52)).shape == (2, 10)  # odd maps are padded when merging
    x = torch.randn(2, 1, 64, 64)
    final, intermediates = model.forward_intermediates(x, indices=[0, 3])
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert [tuple(t.shape) for t in intermediates] == [(2, 16, 16, 16), (2, 64, 2, 2)]
    nhwc = model.forward_intermediates(x, indices=[2], output_fmt="NHWC", intermediates_only=True)
    assert nhwc[0].shape == (2, 4, 4, 48)
    assert model.forward_head(final, pre_logits=True).shape == (2, 64)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 64, 2, 2)
    assert model.prune_intermediate_layers([1]) == [1] and len(model.stages) == 2


def test_vmamba_gradients_checkpointing_and_contract():
    # (test_timm_contract.py runs every registered variant, the v2/v3 ones included, through the same.)
    model = small_vmamba().train()
    x = torch.randn(2, 3, 64, 64)  # the last stage's grid must have 2+ cells for A_log to matter
    plain = model(x)
    plain.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert model.get_classifier() is model.head.fc
    assert "stages.2.blocks.1.mixer.A_log" in model.no_weight_decay()
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))


def test_vmamba_save_and_load_through_pretrained_cfg(tmp_path):
    from safetensors.torch import save_file

    model = small_vmamba("v2")
    save_file(model.state_dict(), tmp_path / "vmamba.safetensors")
    loaded = timm.create_model(
        "vmamba_tiny_224",
        pretrained=True,
        dims=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
        **V2,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "vmamba.safetensors")),
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_vmamba_bad_input_and_arguments():
    model = small_vmamba()
    with pytest.raises(ValueError, match="x must have 3 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"x must be at least 4x4 pixels"):
        model(torch.randn(1, 3, 2, 32))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NHWC'"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")
    with pytest.raises(ValueError, match="dims and depths must have one entry per stage"):
        VMamba(dims=(8, 16), depths=(1,))
    with pytest.raises(ValueError, match="stem_type must be one of"):
        VMamba(stem_type="overlap")
    with pytest.raises(ValueError, match="downsample_type must be one of"):
        VMamba(downsample_type="pool")
    with pytest.raises(ValueError, match="stem_type='conv' reduces by 4"):
        VMamba(stem_type="conv", patch_size=2)
    with pytest.raises(ValueError, match="norm_eps must be a positive float"):
        VMamba(norm_eps=0.0)
