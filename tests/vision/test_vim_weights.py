"""Vim's published weights: the authors' files load through timm and give their model's logits.

The fixtures (tools/upstream/vim.py) hold a tiny hustvl/Vim model's state dict under the authors'
keys, an input and the logits their own code computed, for 16-pixel patches and for the
overlapping stride-8 patches of their fine-tuned files. Each test packs that state dict the way the
authors' main.py saves checkpoints and loads it as a user would.
"""

import argparse
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from upstream_fixtures import assert_close_relative, load_fixture

import seqvision  # noqa: F401  (registers the models)
from seqvision.vision.layers import StridedPatchEmbed
from seqvision.vision.weights import convert_checkpoint

FIXTURES = {"vim_patch16": "vim_tiny_patch16_224", "vim_stride8": "vim_tiny_patch16_stride8_224"}

TAGS = {  # tag -> (hub repository, file), from the authors' README
    "vim_tiny_patch16_224.in1k": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_small_patch16_224.in1k": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim_base_patch16_224.in1k": ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
    "vim_tiny_patch16_stride8_224.in1k": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_stride8_224.in1k": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth"),
}


def tiny_arch(config, **overrides):
    """The fixture's architecture as timm.create_model arguments."""
    arch = {k: config[k] for k in ("img_size", "embed_dim", "depth", "d_state")}
    return {**arch, **overrides}


def save_authors_checkpoint(path, state_dict, with_ema=False):
    """Pack a state dict as the authors' main.py saves it: the network under "model" and the training
    arguments; ``with_ema`` adds the "model_ema" copy their training script also saves, here shifted
    so that reading it instead of "model" shows in the logits."""
    checkpoint = {"model": state_dict, "args": argparse.Namespace(model="vim_tiny_midclstok", input_size=224)}
    if with_ema:
        checkpoint["model_ema"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in state_dict.items()}
        checkpoint.update(epoch=299, scaler="none")
    torch.save(checkpoint, path)
    return path


def load_through_timm(name, path, config, overlay=None, **kwargs):
    overlay = dict(file=str(path), num_classes=config["num_classes"], **(overlay or {}))
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=overlay, **tiny_arch(config, **kwargs)
    )
    return model.eval()


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_authors_checkpoint_gives_their_logits(tmp_path, fixture):
    upstream = load_fixture(fixture)
    path = save_authors_checkpoint(tmp_path / "vim.pth", upstream.state_dict)
    model = load_through_timm(FIXTURES[fixture], path, upstream.config)
    with torch.no_grad():
        logits = model(upstream.inputs["x"])
    assert_close_relative(logits, upstream.outputs["logits"], rtol=1e-5)
    # Every authors' tensor went somewhere (their 2 x 10 mixer tensors per layer became 2 x 5 stacks;
    # the class token's position row was folded into the token).
    assert sum(p.numel() for p in model.parameters()) + upstream.config["embed_dim"] == sum(
        v.numel() for v in upstream.state_dict.values()
    )


@pytest.mark.parametrize("source", ["hub tag", "local file"])
def test_the_model_entry_is_read_not_the_ema_copy(tmp_path, monkeypatch, source):
    # The README's accuracy is the "model" network's (main.py keeps the best checkpoint by it). The
    # tags read it through VisionMamba.load_pretrained (custom_load), and so does a local file given
    # as the user did, pretrained_cfg_overlay=dict(file=...): timm's own reader would
    # prefer "model_ema".
    upstream = load_fixture("vim_patch16")
    path = save_authors_checkpoint(tmp_path / "vim.pth", upstream.state_dict, with_ema=True)
    arch = tiny_arch(upstream.config)
    if source == "hub tag":
        requested = []

        def download(repo_id, filename, **kwargs):  # the hub, offline: the tag's file is ours
            requested.append((repo_id, filename))
            return str(path)

        monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
        overlay = dict(num_classes=10)  # no new source: the tag's hub file and custom_load stay
        model = timm.create_model(
            "vim_tiny_patch16_224.in1k", pretrained=True, pretrained_cfg_overlay=overlay, **arch
        )
        assert requested == [TAGS["vim_tiny_patch16_224.in1k"]]
    else:
        model = load_through_timm("vim_tiny_patch16_224", path, upstream.config)
    with torch.no_grad():
        assert_close_relative(model.eval()(upstream.inputs["x"]), upstream.outputs["logits"], rtol=1e-5)


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_convert_checkpoint_gives_the_state_timm_loads(tmp_path, fixture):
    upstream = load_fixture(fixture)
    path = save_authors_checkpoint(tmp_path / "vim.pth", upstream.state_dict, with_ema=True)
    name = FIXTURES[fixture]
    expected = load_through_timm(name, path, upstream.config, overlay=dict(custom_load=True)).state_dict()
    model, state = convert_checkpoint(path, name, num_classes=10, **tiny_arch(upstream.config))
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    with torch.no_grad():
        assert_close_relative(model(upstream.inputs["x"]), upstream.outputs["logits"], rtol=1e-5)


def rename(key, new_key):
    return lambda sd: {(new_key if k == key else k): v for k, v in sd.items()}


def replace(key, fn):
    return lambda sd: {k: fn(v) if k == key else v for k, v in sd.items()}


BROKEN = {  # what breaks the file, the key every error must name, the converter's whole message
    "backward twin renamed": (
        rename("layers.1.mixer.x_proj_b.weight", "layers.1.mixer.x_proj_back.weight"),
        "layers.1.mixer.x_proj_b.weight",
        r"'layers\.1\.mixer\.x_proj_b\.weight' is missing",
    ),
    "twins of different shapes": (
        replace("layers.0.mixer.A_b_log", lambda v: v[:, :8]),
        "layers.0.mixer.A_b_log",
        r"'layers\.0\.mixer\.A_log' \(96, 16\) and its backward twin 'layers\.0\.mixer\.A_b_log' \(96, 8\)",
    ),
    "reshaped projection": (
        replace("layers.0.mixer.in_proj.weight", lambda v: v[:, :40]),
        "blocks.0.mixer.in_proj.weight",
        r"'blocks\.0\.mixer\.in_proj\.weight' \(file \(192, 40\) vs model \(192, 48\)\)",
    ),
    "renamed final norm": (
        rename("norm_f.weight", "norm_final.weight"),
        "norm.weight",
        r"first key that does not fit: 'norm\.weight' \(the model has it, the file does not\)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_authors_file_names_the_key(tmp_path, case):
    upstream = load_fixture("vim_patch16")
    breaks, key, message = BROKEN[case]
    path = save_authors_checkpoint(tmp_path / "broken.pth", breaks(upstream.state_dict))
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(path, "vim_tiny_patch16_224", num_classes=10, **tiny_arch(upstream.config))
    # A local file through timm (read by VisionMamba.load_pretrained) checks alike; timm's own strict
    # load, asked for with custom_load=False, names the key in its RuntimeError.
    with pytest.raises(ValueError, match=message):
        load_through_timm("vim_tiny_patch16_224", path, upstream.config)
    with pytest.raises((ValueError, RuntimeError), match=re.escape(key)):
        load_through_timm("vim_tiny_patch16_224", path, upstream.config, overlay=dict(custom_load=False))


@pytest.mark.parametrize(("fixture", "img_size", "grid"), [("vim_patch16", 96, 6), ("vim_stride8", 64, 7)])
def test_authors_file_at_another_image_size_resamples_the_patch_positions(tmp_path, fixture, img_size, grid):
    upstream = load_fixture(fixture)
    sd = upstream.state_dict
    path = save_authors_checkpoint(tmp_path / "vim.pth", sd)
    model = load_through_timm(FIXTURES[fixture], path, upstream.config, img_size=img_size)
    rows = sd["pos_embed"].shape[1]  # N + 1, the class token's row in the middle
    mid, side = (rows - 1) // 2, int((rows - 1) ** 0.5)
    patches = torch.cat((sd["pos_embed"][:, :mid], sd["pos_embed"][:, mid + 1 :]), dim=1)
    assert torch.equal(model.cls_token, sd["cls_token"] + sd["pos_embed"][:, mid : mid + 1])
    assert model.pos_embed.shape == (1, grid * grid, upstream.config["embed_dim"])
    # The patch rows, without the class row, resampled from side x side to grid x grid as timm
    # resamples position embeddings (bicubic, antialiased).
    original = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(original, size=(grid, grid), mode="bicubic", antialias=True)
    assert torch.allclose(
        model.pos_embed, expected.permute(0, 2, 3, 1).reshape(1, grid * grid, -1), atol=1e-6
    )
    with torch.no_grad():
        assert model(torch.randn(1, 3, img_size, img_size)).shape == (1, 10)


def test_stride8_file_with_dynamic_image_size_matches_and_pads(tmp_path):
    upstream = load_fixture("vim_stride8")
    path = save_authors_checkpoint(tmp_path / "vim.pth", upstream.state_dict)
    model = load_through_timm(FIXTURES["vim_stride8"], path, upstream.config, dynamic_img_size=True)
    with torch.no_grad():
        assert_close_relative(model(upstream.inputs["x"]), upstream.outputs["logits"], rtol=1e-5)
        # 53 x 41 pixels: padded to 56 x 48, (56 - 16) / 8 + 1 = 6 by 5 tokens.
        tokens = model.forward_features(torch.randn(1, 3, 53, 41))
    assert tokens.shape == (1, 6 * 5 + 1, 48)


def test_pretrained_features_only_and_other_heads_and_channels(tmp_path):
    upstream = load_fixture("vim_stride8")
    sd = upstream.state_dict
    path = save_authors_checkpoint(tmp_path / "vim.pth", sd)
    arch = tiny_arch(upstream.config)
    overlay = dict(file=str(path), num_classes=10)
    features = timm.create_model(
        "vim_tiny_patch16_stride8_224", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True,
        out_indices=(1,), **arch,
    )  # fmt: skip
    assert features.feature_info.reduction() == [8]
    assert [tuple(f.shape) for f in features(upstream.inputs["x"])] == [(2, 48, 5, 5)]
    # Another classifier size (the cfg's num_classes stays the file's): the head keeps its own weights.
    other = timm.create_model(
        "vim_tiny_patch16_stride8_224", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3,
        in_chans=1, **arch,
    )  # fmt: skip
    assert other.head.weight.shape == (3, 48)
    assert torch.equal(other.norm.weight, sd["norm_f.weight"])
    # One input channel: timm's adaptation sums the patch filters over the RGB channels.
    assert torch.allclose(other.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))


# seqvision's per-route tensor -> the authors' forward and backward names (mamba_simple.py, bimamba v2)
AUTHORS_TWINS = {
    "x_proj_weight": ("x_proj.weight", "x_proj_b.weight"),
    "dt_proj_weight": ("dt_proj.weight", "dt_proj_b.weight"),
    "dt_proj_bias": ("dt_proj.bias", "dt_proj_b.bias"),
    "A_log": ("A_log", "A_b_log"),
    "D": ("D", "D_b"),
    "conv.weight": ("conv1d.weight", "conv1d_b.weight"),  # the two routes' channels, forward first
    "conv.bias": ("conv1d.bias", "conv1d_b.bias"),
}


def to_authors_layout(state):
    """seqvision's Vim state -> hustvl/Vim's keys and packing, written from their model's definition:
    per-direction tensors with twins, and a class row (here random) inserted into pos_embed at N // 2
    whose value the class token no longer carries."""
    out = {}
    for key, value in state.items():
        head, _, name = key.rpartition(".mixer.")
        if name in AUTHORS_TWINS:
            forward, backward = AUTHORS_TWINS[name]
            layer = head.replace("blocks.", "layers.")
            # route-stacked (2, ...) tensors, except the conv: both routes' channels in one axis
            pieces = value.chunk(2) if name.startswith("conv.") else value.unbind(0)
            out[f"{layer}.mixer.{forward}"], out[f"{layer}.mixer.{backward}"] = pieces
        elif key == "norm.weight":
            out["norm_f.weight"] = value
        else:
            out[key.replace("blocks.", "layers.")] = value
    patches = state["pos_embed"]
    mid = patches.shape[1] // 2
    class_row = torch.randn(1, 1, patches.shape[2])
    out["pos_embed"] = torch.cat((patches[:, :mid], class_row, patches[:, mid:]), dim=1)
    out["cls_token"] = state["cls_token"] - class_row
    return out


def test_a_full_size_stride8_authors_file_loads_at_224(tmp_path):
    # The file of the failing call: 27 x 27 patches, pos_embed (1, 730, 192), class row 364.
    torch.manual_seed(0)
    ours = timm.create_model("vim_tiny_patch16_stride8_224", depth=2)
    theirs = to_authors_layout(ours.state_dict())
    assert theirs["pos_embed"].shape == (1, 730, 192) and theirs["layers.0.mixer.x_proj.weight"].shape == (
        44,
        384,
    )
    path = save_authors_checkpoint(tmp_path / "vim_t_midclstok_ft.pth", theirs)
    loaded = timm.create_model(
        "vim_tiny_patch16_stride8_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=2
    )
    for key, value in ours.state_dict().items():
        assert torch.allclose(loaded.state_dict()[key], value, atol=1e-6), key


# ------------------------------------------------------------------------------------------------
# overlapping patches against a loop over the patches
# ------------------------------------------------------------------------------------------------


def patches_by_loop(x, weight, bias, patch, stride):
    """Token (i, j) = bias + <weight, the patch whose top-left pixel is (i * stride, j * stride)>."""
    (ph, pw), (sh, sw) = patch, stride
    rows, cols = (x.shape[2] - ph) // sh + 1, (x.shape[3] - pw) // sw + 1
    out = torch.empty(x.shape[0], rows, cols, weight.shape[0], dtype=x.dtype)
    for i in range(rows):
        for j in range(cols):
            window = x[:, :, i * sh : i * sh + ph, j * sw : j * sw + pw]
            out[:, i, j] = window.flatten(1) @ weight.flatten(1).t() + bias
    return out


@pytest.mark.parametrize(
    ("size", "padded"),
    [((21, 14), (21, 14)), ((22, 15), (24, 16))],
    ids=["fits", "padded"],
)
def test_strided_patch_embed_matches_a_loop_over_patches(size, padded):
    torch.manual_seed(0)
    patch, stride = (6, 4), (3, 2)
    embed = StridedPatchEmbed((21, 14), patch, stride, in_chans=2, embed_dim=5, strict_img_size=False,
                              dynamic_img_pad=True).double()  # fmt: skip
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    zero_padded = torch.zeros(2, 2, *padded, dtype=torch.float64)
    zero_padded[:, :, : size[0], : size[1]] = x
    expected = patches_by_loop(zero_padded, embed.proj.weight, embed.proj.bias, patch, stride)
    got = embed(x)
    assert got.shape == expected.shape == (2, (padded[0] - 6) // 3 + 1, (padded[1] - 4) // 2 + 1, 5)
    assert torch.allclose(got, expected, atol=1e-12)
    assert embed.grid_size == (6, 6) and embed.dynamic_feat_size(size) == tuple(got.shape[1:3])


def test_strided_patch_embed_refuses_sizes_it_cannot_take():
    strict = StridedPatchEmbed(24, 16, 8, embed_dim=4)
    assert strict.grid_size == (2, 2) and strict.feat_ratio() == 8
    with pytest.raises(ValueError, match=r"x must be \(24, 24\) \(img_size\), got \(32, 32\)"):
        strict(torch.randn(1, 3, 32, 32))
    loose = StridedPatchEmbed(24, 16, 8, embed_dim=4, strict_img_size=False)
    assert loose(torch.randn(1, 3, 40, 32)).shape == (1, 4, 3, 4)
    with pytest.raises(
        ValueError, match=r"size - \(16, 16\) is a multiple of the stride \(8, 8\), got \(36, 32\)"
    ):
        loose(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"x must be at least one patch \(16, 16\), got \(8, 32\)"):
        StridedPatchEmbed(24, 16, 8, strict_img_size=False, dynamic_img_pad=True)(torch.randn(1, 3, 8, 32))
    with pytest.raises(ValueError, match="img_size must have sizes where"):
        StridedPatchEmbed(30, 16, 8)
    with pytest.raises(ValueError, match="stride must be a positive int or a pair of them, got 0"):
        StridedPatchEmbed(24, 16, 0)


# ------------------------------------------------------------------------------------------------
# tags
# ------------------------------------------------------------------------------------------------


def test_every_published_file_has_a_tag_with_its_source_and_transform():
    assert sorted(timm.list_pretrained("vim_*")) == sorted(TAGS)
    for tag, (hub_id, filename) in TAGS.items():
        cfg = timm.get_pretrained_cfg(tag).to_dict()
        assert (cfg["hf_hub_id"], cfg["hf_hub_filename"]) == (hub_id, filename), tag
        assert cfg["num_classes"] == 1000 and cfg["license"] == "apache-2.0"
        assert cfg["custom_load"] == "hf"  # the authors' "model" entry, not timm's pick of "model_ema"
        # The authors' evaluation: resize to 256 bicubic, centre crop 224, ImageNet mean / std.
        assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"]
        assert (cfg["crop_pct"], cfg["interpolation"], cfg["crop_mode"]) == (0.875, "bicubic", "center")
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    base8 = timm.get_pretrained_cfg("vim_base_patch16_stride8_224").to_dict()
    assert "hf_hub_id" not in base8 and base8["crop_pct"] == 0.875  # no published stride-8 Vim-B


def test_timm_passes_the_cfg_image_size_to_the_stride8_models():
    with torch.device("meta"):
        model = timm.create_model("vim_small_patch16_stride8_224")
    assert model.patch_embed.grid_size == (27, 27) and model.pos_embed.shape == (1, 729, 384)
    assert timm.data.resolve_data_config({}, model=model)["crop_pct"] == 0.875
