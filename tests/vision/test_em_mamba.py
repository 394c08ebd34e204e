"""TokenUnify's EM encoder and affinity segmenter: sizes against the paper, the stated feature shapes,
the scan forms agree, the inter-slice route (real slices or the authors' fixed chunks, against a loop
reference), the residual choice, encoder weights for the segmenter, the timm contract, mixed
precision, bad input. The authors' checkpoints: test_em_weights.py."""

import itertools
import math

import pytest
import timm
import torch
from timm.models import group_parameters

import seqvision  # noqa: F401  (registers the models)
from seqvision.kernels import scan_orders
from seqvision.kernels.check import relative_error
from seqvision.vision import create_em_segmenter, load_encoder_weights
from seqvision.vision.em import EM_ENCODERS, EMMambaEncoder, EMSegMamba
from seqvision.vision.mamba import MambaMixer

TINY = dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))
VOLUME = (1, 1, 16, 16, 32)  # a smallest crop: its last stage (1 x 1 x 2) has more than one voxel


def tiny_encoder(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("emmamba_base", **{**TINY, **kwargs}).eval()


def tiny_segmenter(**kwargs):
    torch.manual_seed(0)
    return create_em_segmenter("emmamba_base", hidden_size=48, **{**TINY, **kwargs}).eval()


def count(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------


def expected_encoder(dims, depths=(2, 2, 2, 2)):
    """Parameters of the encoder, counted from its definition (InstanceNorms have none)."""

    def mamba_layer(d):  # LayerNorm + tri-scan Mamba-1: shared in/out projections, 3 routes
        E, R, N = 2 * d, math.ceil(d / 16), 16
        route = 5 * E + (R + 2 * N) * E + R * E + E + N * E + E  # conv k4 + bias, x_proj, dt_proj, A, D
        return 2 * d + d * 2 * E + 3 * route + E * d

    conv_block = [56 * d * d + 4 * d for d in dims]  # two 3x3x3 and two 1x1x1 convs with bias
    skip_head = [4 * d * d + 3 * d for d in dims]  # 1x1x1 MLP d -> 2d -> d
    downsample = [4 * a * b + b for a, b in itertools.pairwise(dims)]  # k (1, 2, 2)
    stem = 49 * dims[0] + dims[0]
    layers = sum(n * mamba_layer(d) for d, n in zip(dims, depths, strict=True))
    return stem + sum(downsample) + sum(conv_block) + sum(skip_head) + layers


def expected_decoder(dims, hidden, k=25, out_chans=3):
    """MONAI's UNETR blocks: bias-free convs with (1, 5, 5) kernels, k2 s2 transposed convs, 1x1x1 head."""

    def res(i, o):
        return i * o * k + o * o * k + (i * o if i != o else 0)

    encoders = res(1, dims[0]) + sum(res(a, b) for a, b in zip(dims, [*dims[1:], hidden], strict=True))
    ups = [(hidden, dims[3]), (dims[3], dims[2]), (dims[2], dims[1]), (dims[1], dims[0])]
    decoders = sum(8 * i * o + res(2 * o, o) for i, o in ups)
    return encoders + decoders + res(dims[0], dims[0]) + dims[0] * out_chans + out_chans


@pytest.mark.parametrize(
    ("name", "dims", "paper_millions"),
    [
        ("emmamba_base", (32, 64, 128, 256), 28.3),
        ("emmamba_small", (64, 128, 256, 512), 112.5),
        ("emmamba_mid", (96, 192, 384, 768), 206.6),
        ("emmamba_large", (144, 288, 576, 1104), 506.6),
        # not in the paper's table: the count beside segmamba_huge_model in their src/models_mamba.py
        ("emmamba_huge", (192, 384, 768, 1536), 1008.91),
    ],
)
def test_parameter_counts_match_tokenunify(name, dims, paper_millions):
    with torch.device("meta"):  # counted without allocating (the large model has 507 M parameters)
        segmenter = create_em_segmenter(name)
    encoder, total = count(segmenter.encoder), count(segmenter)
    print(
        f"{name}: encoder {encoder / 1e6:.2f} M, with decoder {total / 1e6:.2f} M (paper {paper_millions} M)"
    )
    assert encoder == expected_encoder(dims)
    assert total == encoder + expected_decoder(dims, EM_ENCODERS[name])
    assert abs(total / 1e6 - paper_millions) < 0.05  # TokenUnify's table, one decimal


def test_every_encoder_is_registered():
    assert set(timm.list_models("emmamba_*")) == set(EM_ENCODERS)


def test_the_reference_crop_gives_the_stated_sizes():
    # 16 x 160 x 160 -> 8x80x80 (32 ch) -> 4x40x40 (64) -> 2x20x20 (128) -> 1x10x10 (256), and the Mamba
    # layers scan 51200 / 6400 / 800 / 100 tokens. On the meta device: shapes without arithmetic.
    lengths = []
    with torch.device("meta"):
        segmenter = create_em_segmenter("emmamba_base", scan_form="chunk", chunk_size=1 << 16)
        for module in segmenter.modules():
            if isinstance(module, MambaMixer):
                module.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
        x = torch.empty(1, 1, 16, 160, 160)
        features = segmenter.encoder.forward_intermediates(x, intermediates_only=True)
        out = segmenter(x)
    assert [tuple(f.shape[1:]) for f in features] == [
        (32, 8, 80, 80),
        (64, 4, 40, 40),
        (128, 2, 20, 20),
        (256, 1, 10, 10),
    ]
    assert lengths[::2] == [51200, 6400, 800, 100] * 2  # two layers per stage; encoder, then segmenter
    assert out.shape == (1, 3, 16, 160, 160)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_scan_forms_give_the_same_output(version):
    segmenter = tiny_segmenter(version=version, head_dim=8)
    x = torch.rand(*VOLUME)
    with torch.no_grad():
        segmenter.set_scan_form("recurrent")
        expected = segmenter.forward_logits(x)
        forms = [("chunk", 7), ("chunk", 64)] + ([("parallel", None)] if version == 2 else [])
        for form, chunk in forms:
            segmenter.set_scan_form(form, chunk)
            assert relative_error(segmenter.forward_logits(x), expected) < 1e-5, form


def test_inter_slice_route_follows_the_real_slice_count():
    # The third route visits the Z slices of one (y, x) column in turn, whatever Z is (the authors'
    # kernel cut the sequence into a fixed 5 pieces).
    mixer = MambaMixer(4, scan_directions="tri")
    for grid in [(2, 3, 4), (5, 2, 3), (1, 4, 4)]:
        cells = torch.arange(math.prod(grid), dtype=torch.float32).expand(1, 1, -1)
        routes = mixer._route(cells, grid)
        column_major = torch.arange(math.prod(grid)).reshape(grid).permute(1, 2, 0).flatten()
        assert torch.equal(routes[0, 2, 0].long(), column_major)
        assert torch.equal(mixer._merge(routes, grid), 3 * cells)  # every route put back in place


def authors_interleave(length, chunks):
    """The authors' inter-slice order, written as a loop: xz.chunk(n, -1), stacked on a new last
    axis and flattened, so position p * n + c holds token c * (L / n) + p."""
    size = length // chunks
    return [c * size + p for p in range(size) for c in range(chunks)]


def single_route(tri, route):
    """A one-route mixer holding route ``route``'s parameters of a 'tri' mixer (and its projections)."""
    single = MambaMixer(tri.dim, tri.d_state, tri.conv.kernel_size[0], tri.inner / tri.dim).double()
    E = tri.inner
    with torch.no_grad():
        single.in_proj.weight.copy_(tri.in_proj.weight)
        single.out_proj.weight.copy_(tri.out_proj.weight)
        single.conv.weight.copy_(tri.conv.weight[route * E : (route + 1) * E])
        single.conv.bias.copy_(tri.conv.bias[route * E : (route + 1) * E])
        for name in ("x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D"):
            getattr(single, name).copy_(getattr(tri, name)[route : route + 1])
    return single


@pytest.mark.parametrize(
    ("grid", "chunks"), [((2, 3, 5), 5), ((4, 2, 5), 5), ((3, 2, 4), 4), ((2, 3, 4), None)]
)
def test_inter_slice_chunks_match_a_loop_reference(grid, chunks):
    # The tri mixer is the sum over its routes of a one-route Mamba run on the tokens in that route's
    # order and put back; the orders are written out as loops (chunks=None: Z chunks, the slices).
    torch.manual_seed(0)
    tri = MambaMixer(6, d_state=4, d_conv=3, scan_directions="tri", inter_slice_chunks=chunks).double()
    with torch.no_grad():
        for p in tri.parameters():
            p.add_(0.2 * torch.randn_like(p))  # no two routes alike
    length = math.prod(grid)
    orders = [
        list(range(length)),
        list(range(length - 1, -1, -1)),
        authors_interleave(length, grid[0] if chunks is None else chunks),
    ]
    x = torch.randn(2, length, 6, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for route, order in enumerate(orders):
        order = torch.tensor(order)
        expected[:, order] += single_route(tri, route)(x[:, order])
    tri.set_form("recurrent")
    assert relative_error(tri(x, grid), expected) < 1e-12


def test_inter_slice_chunks_equal_to_z_is_the_default_route():
    torch.manual_seed(0)
    default = MambaMixer(4, scan_directions="tri")
    chunked = MambaMixer(4, scan_directions="tri", inter_slice_chunks=3)
    chunked.load_state_dict(default.state_dict())
    x, grid = torch.randn(2, 24, 4), (3, 2, 4)
    assert torch.equal(chunked(x, grid), default(x, grid))
    # and the default is the route it always was: slices of one (y, x) column in turn
    cells = torch.randn(1, 4, 24)
    before = scan_orders.flatten(cells.reshape(1, 4, *grid).transpose(-1, -2), "transposed")
    assert torch.equal(default._route(cells, grid)[:, 2], before)


def test_inter_slice_chunks_errors_and_defaults():
    with pytest.raises(ValueError, match=r"inter_slice_chunks=5 must divide the sequence length L = 24"):
        MambaMixer(4, scan_directions="tri", inter_slice_chunks=5)(torch.randn(1, 24, 4), (2, 3, 4))
    with pytest.raises(ValueError, match="inter_slice_chunks needs scan_directions='tri'"):
        MambaMixer(4, scan_directions="bidirectional", inter_slice_chunks=5)
    with pytest.raises(ValueError, match="inter_slice_chunks"):
        MambaMixer(4, scan_directions="tri", inter_slice_chunks=0)
    encoder = tiny_encoder(inter_slice_chunks=5, mamba_residual=False)
    assert {m.inter_slice_chunks for m in encoder.modules() if isinstance(m, MambaMixer)} == {5}
    with pytest.raises(ValueError, match="must divide the sequence length L = 1024"):
        encoder(torch.rand(*VOLUME))  # stage 0 holds 8 x 8 x 16 tokens
    default = tiny_encoder()
    assert default.inter_slice_chunks is None and default.mamba_residual
    assert {m.inter_slice_chunks for m in default.modules() if isinstance(m, MambaMixer)} == {None}
    assert all(block.residual for stage in default.stages for block in stage.blocks)


def test_mamba_residual_choice():
    x = torch.randn(2, 24, 8)
    for residual in (True, False):
        torch.manual_seed(0)
        encoder = timm.create_model("emmamba_base", dims=(8, 8, 8, 8), mamba_residual=residual)
        block = encoder.stages[0].blocks[0]
        mixed = block.mixer(block.norm(x), (2, 3, 4))
        assert torch.equal(block(x, (2, 3, 4)), x + mixed if residual else mixed)
    with pytest.raises(ValueError, match="drop_path needs the residual connection"):
        timm.create_model("emmamba_base", mamba_residual=False, drop_path_rate=0.1, **TINY)


def test_segmenter_gives_affinities_and_gradients_reach_every_parameter():
    segmenter = tiny_segmenter().train()
    x = torch.rand(*VOLUME)
    affinities = segmenter(x)
    assert affinities.shape == (1, 3, 16, 16, 32)
    assert (affinities > 0).all() and (affinities < 1).all()
    (affinities - 0.5).square().mean().backward()
    missing = [n for n, p in segmenter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_segmenter_loads_pretrained_encoder_weights(tmp_path):
    from safetensors.torch import save_file

    pretrained = timm.create_model("emmamba_base", num_classes=5, **TINY)  # the head is not used
    state = pretrained.state_dict()
    save_file(state, tmp_path / "encoder.safetensors")
    torch.save({"model": state}, tmp_path / "encoder.pth")
    x = torch.rand(*VOLUME)
    expected = pretrained.eval().forward_features(x)
    for source in (state, tmp_path / "encoder.safetensors", str(tmp_path / "encoder.pth")):
        segmenter = create_em_segmenter("emmamba_base", source, hidden_size=48, **TINY).eval()
        assert torch.equal(segmenter.encoder.forward_features(x), expected)


def test_encoder_weights_are_checked_strictly():
    encoder = tiny_encoder()
    state = encoder.state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("skip_heads.3")}
    with pytest.raises(ValueError, match=r"missing keys: skip_heads\.3\.fc1\.bias"):
        load_encoder_weights(encoder, missing)
    with pytest.raises(ValueError, match=r"unexpected keys: decoder\.weight"):
        load_encoder_weights(encoder, {**state, "decoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"shapes: stem\.bias \(3,\) vs \(8,\)"):
        load_encoder_weights(encoder, {**state, "stem.bias": torch.zeros(3)})
    with pytest.raises(TypeError, match="pretrained_encoder must be a path or a state dict"):
        load_encoder_weights(encoder, 3)
    with pytest.raises(FileNotFoundError, match="pretrained_encoder must be an existing file"):
        load_encoder_weights(encoder, "/nonexistent/encoder.safetensors")
    with pytest.raises(ValueError, match="encoder_name must be one of"):
        create_em_segmenter("emmamba_tiny")


def test_encoder_skips_groups_and_pruned_features():
    encoder = tiny_encoder()
    x = torch.rand(*VOLUME)
    _, skips = encoder.forward_intermediates(x)
    assert [tuple(s.shape) for s in skips] == [
        (1, 8, 8, 8, 16),
        (1, 16, 4, 4, 8),
        (1, 24, 2, 2, 4),
        (1, 32, 1, 1, 2),
    ]
    assert "stages.1.blocks.0.mixer.A_log" in encoder.no_weight_decay()
    groups = group_parameters(encoder, encoder.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(encoder.named_parameters()))
    features = timm.create_model("emmamba_base", features_only=True, out_indices=(0, 2), **TINY).eval()
    assert features.feature_info.channels() == [8, 24]
    assert features.feature_info.reduction() == [2, 8]
    assert [tuple(f.shape) for f in features(x)] == [(1, 8, 8, 8, 16), (1, 24, 2, 2, 4)]
    assert len(features.model.stages) == 3


def test_encoder_grad_checkpointing_gives_the_same_gradients():
    encoder = tiny_encoder(num_classes=3).train()
    x = torch.rand(*VOLUME)
    encoder(x).square().mean().backward()
    # forward() reads the last skip head only; the other three feed the decoder
    used = [p for p in encoder.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in used]
    encoder.zero_grad()
    encoder.set_grad_checkpointing(True)
    encoder(x).square().mean().backward()
    for p, g in zip(used, grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_pretrained_cfg_loading_adapts_the_stem_to_in_chans(tmp_path):
    from safetensors.torch import save_file

    encoder = tiny_encoder()
    save_file(encoder.state_dict(), tmp_path / "em.safetensors")
    two = timm.create_model(
        "emmamba_base",
        pretrained=True,
        in_chans=2,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "em.safetensors")),
        **TINY,
    ).eval()
    assert two.stem.weight.shape == (8, 2, 1, 7, 7)
    x = torch.rand(*VOLUME)
    # the same slice in both channels sees the one-channel filter
    assert torch.allclose(
        two.forward_features(x.repeat(1, 2, 1, 1, 1)), encoder.forward_features(x), atol=1e-5
    )


def test_emmamba_base_bfloat16_autocast_forward_and_backward_are_finite():
    torch.manual_seed(0)
    segmenter = create_em_segmenter("emmamba_base", hidden_size=64).train()  # real encoder widths
    x = torch.rand(*VOLUME)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = segmenter(x)
    (out.float() - 0.5).square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in segmenter.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(1, 16, 32, 32), r"x must be a volume batch \(B, C, Z, Y, X\)"),
        (torch.rand(1, 2, 16, 32, 32), "x must have 1 channels"),
        (torch.rand(1, 1, 12, 32, 32), r"x must have Z, Y, X divisible by 16 .*got \(12, 32, 32\)"),
        (torch.rand(1, 1, 16, 16, 16), "x must be larger than 16 on some axis"),
    ],
)
def test_bad_input_is_named(x, match):
    with pytest.raises(ValueError, match=match):
        tiny_segmenter()(x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dims and depths must have one entry per stage"):
        EMMambaEncoder(dims=(8, 16), depths=(1,))
    with pytest.raises(ValueError, match="encoder must have 4 stages"):
        EMSegMamba(EMMambaEncoder(dims=(8, 16, 24), depths=(1, 1, 1)))
    with pytest.raises(ValueError, match="kernel_size must be 3 odd positive ints"):
        EMSegMamba(tiny_encoder(), kernel_size=(1, 4, 4))
    with pytest.raises(TypeError, match="encoder must be an EMMambaEncoder"):
        EMSegMamba(torch.nn.Identity())
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        tiny_encoder().forward_intermediates(torch.rand(*VOLUME), output_fmt="NLC")
