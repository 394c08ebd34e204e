"""ViR in timm: registration, the three retention forms and streaming agree, the timm contract, bad input."""

import pytest
import timm
import torch
from timm.models import create_feature_extractor, group_parameters

import seqvision  # noqa: F401  (registers the models)
from seqvision.kernels.check import relative_error
from seqvision.vision.vir import VisionRetentionNet, init_from_vit, retention_log_decay

VARIANTS = {
    "vir_tiny_patch16_224": (192, 12, 3, 16),
    "vir_small_patch16_224": (384, 12, 6, 16),
    "vir_base_patch16_224": (768, 12, 12, 16),
    "vir_large_patch16_224": (1024, 24, 16, 16),
    "vir_large_patch14_224": (1024, 24, 16, 14),
    "vir_tiny_patch16_224_bidir": (192, 12, 3, 16),
    "vir_small_patch16_224_bidir": (384, 12, 6, 16),
    "vir_base_patch16_224_bidir": (768, 12, 12, 16),
}
CAUSAL = [name for name in VARIANTS if not name.endswith("_bidir")]


def small(name="vir_tiny_patch16_224", **kwargs):
    """A real variant on a small image (few tokens) so every form runs quickly."""
    torch.manual_seed(0)
    patch = VARIANTS[name][3]
    return timm.create_model(name, img_size=kwargs.pop("img_size", 4 * patch), **kwargs).eval()


def test_every_variant_is_registered():
    assert set(timm.list_models("vir_*")) == set(VARIANTS)


def test_default_model_gives_imagenet_logits():
    model = timm.create_model("vir_small_patch16_224")
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


@pytest.mark.parametrize("name", ["vir_tiny_patch16_224", "vir_small_patch16_224", "vir_base_patch16_224"])
def test_parameter_count_matches_timm_vit(name):
    dim, depth, _, _ = VARIANTS[name]
    ours = sum(p.numel() for p in timm.create_model(name).parameters())
    vit = sum(p.numel() for p in timm.create_model(name.replace("vir_", "vit_")).parameters())
    # ViT's position embedding also covers the class token (dim); ViR adds LayerScale (2 dim per block).
    assert ours == vit - dim + 2 * dim * depth


def test_decays_follow_the_paper():
    gamma = retention_log_decay(12).exp()
    assert gamma[0].item() == pytest.approx(1 - 1 / 32)
    assert gamma[-1].item() == pytest.approx(1 - 1 / 512)
    assert torch.all(gamma[1:] > gamma[:-1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forms_and_streaming_give_the_same_logits(name):
    model = small(name)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        model.set_retention_form("parallel")
        expected = model(x)
        for form, chunk in (("chunk", 5), ("chunk", 64), ("recurrent", None)):
            model.set_retention_form(form, chunk)
            assert relative_error(model(x), expected) < 1e-4, form
        if name in CAUSAL:
            for chunk_tokens in (1, 6, 100):
                assert relative_error(model.forward_streaming(x, chunk_tokens=chunk_tokens), expected) < 1e-4


@pytest.mark.parametrize("size", [(100, 150), (37, 61), (224, 96)])
@pytest.mark.parametrize("global_pool", ["token_last", "avg"])
def test_odd_image_sizes_with_dynamic_img_size(size, global_pool):
    model = small(dynamic_img_size=True, global_pool=global_pool)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        model.set_retention_form("parallel")
        expected = model(x)
        model.set_retention_form("chunk", 16)
        assert relative_error(model(x), expected) < 1e-4
        assert relative_error(model.forward_streaming(x, chunk_tokens=7), expected) < 1e-4


def test_bidirectional_sees_the_future_and_causal_does_not():
    # LayerScale at 1 so that the retention branch is not scaled down to 1e-5 at initialisation.
    causal, bidir = small(init_values=1.0), small("vir_tiny_patch16_224_bidir", init_values=1.0)
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., 48:, 48:] += 1.0  # change the last patch only
    with torch.no_grad():
        assert torch.equal(causal.forward_features(x)[:, :15], causal.forward_features(y)[:, :15])
        assert (bidir.forward_features(x)[:, 0] - bidir.forward_features(y)[:, 0]).abs().max() > 1e-3


def test_save_and_load_through_pretrained_cfg(tmp_path):
    from safetensors.torch import save_file

    model = small()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    save_file(model.state_dict(), tmp_path / "vir.safetensors")
    torch.save({"model": model.state_dict()}, tmp_path / "vir.pth")
    for file in ("vir.safetensors", "vir.pth"):
        loaded = timm.create_model(
            "vir_tiny_patch16_224",
            pretrained=True,
            img_size=64,
            pretrained_cfg_overlay=dict(file=str(tmp_path / file)),
        ).eval()
        assert torch.equal(loaded(x), expected)


def test_loading_resizes_the_position_embedding_and_adapts_in_chans(tmp_path):
    from safetensors.torch import save_file

    model = small()
    save_file(model.state_dict(), tmp_path / "vir.safetensors")
    overlay = dict(file=str(tmp_path / "vir.safetensors"))
    bigger = timm.create_model(
        "vir_tiny_patch16_224",
        pretrained=True,
        img_size=96,
        in_chans=1,
        num_classes=10,
        pretrained_cfg_overlay=overlay,
    )
    assert bigger.pos_embed.shape == (1, 36, 192)
    assert bigger.patch_embed.proj.weight.shape == (192, 1, 16, 16)
    # a grey image through the adapted stem sees the sum of the RGB filters
    rgb_sum = model.patch_embed.proj.weight.sum(1, keepdim=True)
    assert torch.allclose(bigger.patch_embed.proj.weight, rgb_sum, atol=1e-6)
    assert bigger(torch.randn(1, 1, 96, 96)).shape == (1, 10)


def test_forward_intermediates_and_pruning():
    model = small()
    x = torch.randn(2, 3, 64, 64)
    final, intermediates = model.forward_intermediates(x, indices=[0, -1])
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert [tuple(t.shape) for t in intermediates] == [(2, 192, 4, 4)] * 2
    tokens = model.forward_intermediates(
        x, indices=1, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
    )
    patches, cls = tokens[0]
    assert patches.shape == (2, 16, 192) and cls.shape == (2, 1, 192)
    kept = model.prune_intermediate_layers([1, 3])
    assert kept == [1, 3] and len(model.blocks) == 4
    assert isinstance(model.head, torch.nn.Identity)


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    model = small().train()
    x = torch.randn(2, 3, 64, 64)
    plain = model(x)
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    checkpointed.sum().backward()
    assert torch.allclose(checkpointed, plain, atol=1e-6)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-5)


@pytest.mark.parametrize("form", ["parallel", "chunk", "recurrent"])
def test_backward_reaches_every_parameter(form):
    # The class token is read by the head only through 'token_last' (under 'avg' it feeds nothing).
    model = small("vir_tiny_patch16_224").train()
    model.set_retention_form(form, 8)
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_weight_decay_groups_and_layer_groups():
    model = small()
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 14  # stem, 12 blocks, final norm + head
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))


def test_fx_feature_extraction_treats_retention_as_a_leaf():
    model = small()
    extractor = create_feature_extractor(model, return_nodes={"blocks.3": "b3", "norm": "out"})
    out = extractor(torch.randn(1, 3, 64, 64))
    assert out["b3"].shape == (1, 17, 192) and out["out"].shape == (1, 17, 192)


def test_float16_and_bfloat16_models_run():
    model = small()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    for dtype, tol in ((torch.bfloat16, 0.1), (torch.float16, 0.02)):
        out = model.to(dtype)(x.to(dtype))
        assert out.dtype == dtype
        assert relative_error(out.float(), expected) < tol
        model.float()


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(2, 1, 64, 64), "x must have 3 channels"),
        (torch.randn(2, 3, 64, 60), r"x must be \(64, 64\) for this model"),
        (torch.randn(2, 3, 2, 64, 64), r"x must be an image batch \(B, C, H, W\)"),
    ],
)
def test_bad_input_is_named(x, match):
    with pytest.raises(ValueError, match=match):
        small()(x)


def test_undivisible_size_without_padding():
    model = small(dynamic_img_size=True, dynamic_img_pad=False)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 3, 60, 64))


@pytest.mark.parametrize(("form", "chunk"), [("fast", None), ("chunk", 0), ("chunk", 2.0)])
def test_bad_form_or_chunk_size(form, chunk):
    with pytest.raises(ValueError, match=r"form must be|chunk_size must be"):
        small().set_retention_form(form, chunk)


def test_streaming_arguments():
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        small().forward_streaming(torch.randn(1, 3, 64, 64), chunk_tokens=0)
    with pytest.raises(ValueError, match="needs the causal scan"):
        small("vir_tiny_patch16_224_bidir").forward_streaming(torch.randn(1, 3, 64, 64))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="global_pool must be one of"):
        VisionRetentionNet(global_pool="max")
    with pytest.raises(ValueError, match="dim must be divisible by num_heads"):
        VisionRetentionNet(embed_dim=100, num_heads=3)


def test_class_token_reaches_the_head_at_init():
    """The head must read a normalised class token, not LayerNorm's eps: with the authors' 1e-6 init
    (and no position embedding on the class token) its features were ~0 and training stalled at chance."""
    torch.manual_seed(0)
    model = timm.create_model("vir_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4).eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(torch.randn(4, 3, 32, 32)), pre_logits=True)
    assert features.shape == (4, 192)
    assert features.std(dim=-1).min() > 0.5  # LayerNorm's output scale (1), not ~sqrt(var / eps)


# ------------------------------------------------------------------------------------------------
# initialisation from timm's ViT
# ------------------------------------------------------------------------------------------------


def test_init_from_vit_fills_every_tensor_from_the_vit_of_the_same_size():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64).eval()
    vir = timm.create_model("vir_tiny_patch16_224", depth=2, img_size=64).eval()
    assert init_from_vit(vir, vit) is vir
    ours, theirs = vir.state_dict(), vit.state_dict()
    for name, value in ours.items():
        if name.endswith(("ls1.gamma", "ls2.gamma")):
            assert torch.equal(value, torch.ones_like(value))  # a ViT's residual branches are unscaled
        elif name == "cls_token":
            assert torch.equal(value, theirs["cls_token"] + theirs["pos_embed"][:, :1])
        elif name == "pos_embed":
            assert torch.equal(value, theirs["pos_embed"][:, 1:])
        else:
            assert torch.equal(value, theirs[name]), name
    # The embedded tokens are the ViT's, the class token (with its position) last.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, grid = vir._embed(x)
        vit_tokens = vit._pos_embed(vit.patch_embed(x))
    assert grid == (4, 4)
    assert torch.allclose(tokens[:, :-1], vit_tokens[:, 1:], atol=1e-6)
    assert torch.allclose(tokens[:, -1], vit_tokens[:, 0], atol=1e-6)
    assert torch.isfinite(vir(x)).all()


def test_init_from_vit_resamples_positions_keeps_other_heads_and_names_misfits():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64)
    vir = timm.create_model("vir_tiny_patch16_224", depth=2, img_size=96, num_classes=10)
    head = vir.head.weight.clone()
    init_from_vit(vir, vit.state_dict(), layer_scale=None)
    assert vir.pos_embed.shape == (1, 36, 192)
    assert torch.equal(vir.head.weight, head)  # 1000 ViT classes vs 10: the ViR keeps its own head
    assert torch.allclose(vir.blocks[0].ls1.gamma, torch.full((192,), 1e-5))
    with pytest.raises(ValueError, match=r"first key that does not fit: 'blocks\.0\.attn\.proj\.bias'"):
        init_from_vit(
            timm.create_model("vir_tiny_patch16_224", depth=2, img_size=64),
            timm.create_model("vit_small_patch16_224", depth=2, img_size=64),
        )
    with pytest.raises(TypeError, match="vit must be a ViT module"):
        init_from_vit(vir, 3)
