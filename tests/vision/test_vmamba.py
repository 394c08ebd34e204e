"""VMamba: the scan forms agree, parameter count, features, the timm contract, bad input."""

import itertools

import pytest
import timm
import torch
from mamba_counts import count, mixer_params, on_meta
from timm.models import group_parameters

import seqvision  # noqa: F401  (registers the models)
from seqvision.kernels.check import relative_error
from seqvision.vision.vmamba import VMamba


def small_vmamba(**kwargs):
    torch.manual_seed(0)
    kwargs = {"dims": (16, 32, 48, 64), "depths": (1, 1, 2, 1), **kwargs}
    return timm.create_model("vmamba_tiny_224", **kwargs).eval()


def expected_vmamba(dims=(96, 192, 384, 768), depths=(2, 2, 9, 2), classes=1000):
    stem = 3 * 16 * dims[0] + dims[0] + 2 * dims[0]
    blocks = sum(
        d * (mixer_params(c, K=4, d_conv=3, grid_conv=2, out_norm=True) + 2 * c)
        for c, d in zip(dims, depths, strict=True)
    )
    merges = sum(8 * a + 4 * a * b for a, b in itertools.pairwise(dims))  # LayerNorm(4C), 1x1 conv 4C -> C'
    return stem + blocks + merges + 2 * dims[-1] + dims[-1] * classes + classes


def test_parameter_count():
    ours = count(on_meta("vmamba_tiny_224"))
    assert ours == expected_vmamba()
    assert 22.0e6 <= ours < 23.0e6  # VMamba-T "22M" (arXiv 2401.10166v1)


def test_every_variant_is_registered():
    assert timm.list_models("vmamba_*") == ["vmamba_tiny_224"]


def test_vmamba_forms_give_the_same_logits():
    model = small_vmamba()
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


def test_vmamba_create_model_arguments_any_size_and_intermediates():
    model = small_vmamba(num_classes=10, in_chans=1)
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
    model = small_vmamba().train()
    x = torch.randn(2, 3, 64, 64)
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

    model = small_vmamba()
    save_file(model.state_dict(), tmp_path / "vmamba.safetensors")
    loaded = timm.create_model(
        "vmamba_tiny_224",
        pretrained=True,
        dims=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
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
