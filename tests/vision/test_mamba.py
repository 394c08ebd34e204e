"""Mamba mixer and Vim: the mixer against step-by-step loops (Mamba-1 and Mamba-2, every scan
direction), the scan forms agree, parameter counts, the timm contract, mixed precision, bad input."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from mamba_counts import count, mixer_params, on_meta
from timm.models import create_feature_extractor, group_parameters

import seqvision  # noqa: F401  (registers the models)
import seqvision.vision.mamba as mamba_module
from seqvision.kernels.check import relative_error
from seqvision.vision.mamba import MambaMixer, VisionMamba

VIM = [
    "vim_tiny_patch16_224",
    "vim_small_patch16_224",
    "vim_base_patch16_224",
    "vim_tiny_patch16_stride8_224",
    "vim_small_patch16_stride8_224",
    "vim_base_patch16_stride8_224",
]


def small_vim(name="vim_tiny_patch16_224", **kwargs):
    """A real Vim width on a 64-pixel image (16 patches) with few blocks, so every form runs quickly."""
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 2, **kwargs}
    return timm.create_model(name, **kwargs).eval()


# ------------------------------------------------------------------------------------------------
# the mixer against loops written from the Mamba formulas
# ------------------------------------------------------------------------------------------------


def route_orders(directions, length, grid):
    """Index tensors: position l of route k reads raster token orders[k][l] (built independently of
    seqvision.kernels.scan_orders)."""
    if directions == "forward":
        return [torch.arange(length)]
    if directions == "bidirectional":
        return [torch.arange(length), torch.arange(length).flip(0)]
    cells = torch.arange(length).reshape(grid)
    if directions == "cross":  # rows, columns, both reversed
        rows, cols = cells.flatten(), cells.t().flatten()
        return [rows, cols, rows.flip(0), cols.flip(0)]
    raster = cells.flatten()  # tri: raster, reversed, the z slices of each (y, x) column in turn
    return [raster, raster.flip(0), cells.permute(1, 2, 0).flatten()]


def causal_conv_loop(u, weight, bias):
    """Depthwise causal conv by taps: out[:, c, t] = bias[c] + sum_j weight[c, j] u[:, c, t - (k-1) + j]."""
    k = weight.shape[-1]
    out = bias[None, :, None].expand_as(u).clone()
    for t in range(u.shape[-1]):
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                out[:, :, t] += weight[:, j] * u[:, :, s]
    return out


def scan_loop(mixer, k, x):
    """Route k's state-space scan, step by step: x (B, E, L) after conv and silu -> y (B, E, L)."""
    batch, E, L = x.shape
    R, N = mixer.dt_rank, mixer.d_state
    W_x, W_dt, b_dt = mixer.x_proj_weight[k], mixer.dt_proj_weight[k], mixer.dt_proj_bias[k]
    A, D = -mixer.A_log[k].exp(), mixer.D[k]
    H = mixer.num_heads
    P = E // H
    state = x.new_zeros(batch, E, N) if mixer.version == 1 else x.new_zeros(batch, H, P, N)
    ys = []
    for t in range(L):
        xt = x[:, :, t]
        dt_low, Bt, Ct = (xt @ W_x.t()).split((R, N, N), dim=-1)
        delta = F.softplus(dt_low @ W_dt.t() + b_dt)  # (B, E) for Mamba-1, (B, H) for Mamba-2
        if mixer.version == 1:  # h = exp(delta A) h + delta B u, y = C h + D u, per channel
            state = (delta[..., None] * A).exp() * state + delta[..., None] * Bt[:, None, :] * xt[..., None]
            ys.append((state * Ct[:, None, :]).sum(-1) + D * xt)
        else:  # S = exp(delta A) S + delta x B^T, y = S C + D x, per head of P channels
            xh = xt.reshape(batch, H, P)
            decay = (delta * A).exp()[..., None, None]
            state = decay * state + delta[..., None, None] * xh[..., None] * Bt[:, None, None, :]
            ys.append(((state * Ct[:, None, None, :]).sum(-1) + D[:, None] * xh).reshape(batch, E))
    return torch.stack(ys, dim=-1)


def mixer_loop(mixer, x, grid):
    """The whole mixer from the formulas: every route conv'd, scanned and gated in its own order, put
    back and summed (gating before the merge, as mamba-ssm does per direction)."""
    batch, L, _ = x.shape
    E = mixer.inner
    proj = (x @ mixer.in_proj.weight.t()).transpose(1, 2)
    u, z = proj.split(E, dim=1) if mixer.gate else (proj, None)  # gate=False: VMamba v2's SS2D
    if mixer.grid_conv:
        conv = F.conv2d if len(grid) == 2 else F.conv3d
        weight, bias = mixer.conv.weight, mixer.conv.bias
        u = F.silu(conv(u.reshape(batch, E, *grid), weight, bias, padding=weight.shape[-1] // 2, groups=E))
        u = u.flatten(2)
    gate_late = not isinstance(mixer.out_norm, torch.nn.Identity)
    y = torch.zeros_like(u)
    for k, order in enumerate(route_orders(mixer.scan_directions, L, grid)):
        seq = u[:, :, order]
        if not mixer.grid_conv:
            w = mixer.conv.weight[k * E : (k + 1) * E, 0]
            seq = F.silu(causal_conv_loop(seq, w, mixer.conv.bias[k * E : (k + 1) * E]))
        out = scan_loop(mixer, k, seq)
        if not gate_late and z is not None:
            out = out * F.silu(z[:, :, order])
        y[:, :, order] += out
    if mixer.average_routes:
        y = y / mixer.num_routes
    y = mixer.out_norm(y.transpose(1, 2))
    if gate_late and z is not None:
        y = y * F.silu(z.transpose(1, 2))
    return mixer.out_proj(y)


MIXER_CASES = {
    "v1-forward": (dict(version=1), (7,)),
    "v1-bidirectional-mean": (dict(version=1, scan_directions="bidirectional", average_routes=True), (9,)),
    "v1-cross": (dict(version=1, scan_directions="cross"), (3, 4)),
    "v1-cross-vmamba": (
        dict(version=1, scan_directions="cross", grid_conv=True, out_norm=True, d_conv=3),
        (3, 4),
    ),
    "v1-cross-vmamba-v2": (  # VMamba v2/v3's SS2D: no z gate
        dict(version=1, scan_directions="cross", grid_conv=True, out_norm=True, d_conv=3, gate=False),
        (3, 4),
    ),
    "v1-tri": (dict(version=1, scan_directions="tri"), (3, 2, 4)),
    "v1-tri-grid-conv": (dict(version=1, scan_directions="tri", grid_conv=True, d_conv=3), (2, 2, 3)),
    "v2-forward": (dict(version=2, head_dim=4), (7,)),
    "v2-bidirectional": (dict(version=2, head_dim=8, scan_directions="bidirectional"), (6,)),
    "v2-tri": (dict(version=2, head_dim=4, scan_directions="tri"), (2, 3, 2)),
}


@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_mixer_matches_the_step_by_step_formula(case):
    kwargs, shape = MIXER_CASES[case]
    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=4, **kwargs).double()
    with torch.no_grad():  # move every parameter off its structured initial value
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    grid = shape if len(shape) > 1 else None
    x = torch.randn(2, math.prod(shape), 8, dtype=torch.float64)
    with torch.no_grad():
        expected = mixer_loop(mixer, x, grid)
        for form, chunk in [("chunk", 3), ("chunk", 64), ("recurrent", None), ("parallel", 4)]:
            if form not in mixer.FORMS:
                continue
            mixer.set_form(form, chunk)
            assert relative_error(mixer(x, grid), expected) < 1e-10, (form, chunk)


def test_mixer_scan_runs_in_float32_under_bfloat16_autocast(monkeypatch):
    seen = []

    def spy(u, delta, A, B, C, *args, **kwargs):
        seen.append((u.dtype, delta.dtype, A.dtype, B.dtype))
        return selective_scan(u, delta, A, B, C, *args, **kwargs)

    selective_scan = mamba_module.selective_scan
    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    mixer = MambaMixer(16, scan_directions="bidirectional")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(torch.randn(2, 10, 16))
    assert out.dtype == torch.bfloat16
    assert seen == [(torch.float32,) * 4]


@pytest.mark.parametrize(
    ("kwargs", "grid"),
    [
        (dict(scan_directions="tri"), (2, 2, 3)),
        (dict(version=2, head_dim=4, scan_directions="cross"), (3, 4)),
    ],
    ids=["mamba1-tri", "mamba2-cross"],
)
def test_mixer_under_seqvision_backend_triton_matches_torch(monkeypatch, kwargs, grid):
    # The calls a GPU run makes (grouped B / C, heads expanded from one B / C, the route copies) go
    # through the Triton kernels, here in the interpreter on CPU tensors: outputs and gradients agree.
    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=4, **kwargs)
    x = torch.randn(2, math.prod(grid), 8, requires_grad=True)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SEQVISION_BACKEND", backend)
        mixer.zero_grad()
        x.grad = None
        out = mixer(x, grid)
        out.square().sum().backward()
        results[backend] = [out.detach(), x.grad, *(p.grad for p in mixer.parameters())]
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("version", [1, 2])
def test_step_decoding_equals_the_whole_sequence(version):
    # Decoding one token at a time with the carried conv window and scan state gives forward()'s
    # outputs for every prefix: the recurrent inference path of a causal Mamba.
    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=5, d_conv=3, expand=2, version=version, head_dim=4).double()
    with torch.no_grad():
        mixer.conv.bias.normal_()  # a zero bias would hide a missing one
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = mixer(x)
        state = mixer.allocate_inference_state(2, dtype=torch.float64)
        steps = []
        for t in range(x.shape[1]):
            y, state = mixer.step(x[:, t], state)
            steps.append(y)
    assert relative_error(torch.stack(steps, dim=1), expected) < 1e-12


def test_step_needs_a_causal_single_route_mixer():
    with pytest.raises(ValueError, match="step\\(\\) decodes a causal sequence"):
        MambaMixer(8, scan_directions="bidirectional").allocate_inference_state(1)
    mixer = MambaMixer(8)
    state = mixer.allocate_inference_state(2)
    with pytest.raises(ValueError, match=r"x must be one token per sequence \(B, dim=8\)"):
        mixer.step(torch.randn(2, 3, 8), state)
    with pytest.raises(ValueError, match="state is for batch 2, got x with batch 3"):
        mixer.step(torch.randn(3, 8), state)


def test_version_one_has_no_parallel_form():
    mixer = MambaMixer(8)
    with pytest.raises(ValueError, match=r"form must be one of \('chunk', 'recurrent'\)"):
        mixer.set_form("parallel")
    assert "parallel" in MambaMixer(8, version=2, head_dim=4).FORMS


def test_dt_initialisation_and_state_matrix():
    torch.manual_seed(0)
    mixer = MambaMixer(32, scan_directions="cross")
    dt = F.softplus(mixer.dt_proj_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert torch.allclose(mixer.A_log.exp(), torch.arange(1.0, 17.0).expand(4, 64, 16))  # S4D-real: A = -n
    assert torch.equal(mixer.D, torch.ones(4, 64))
    assert mixer.dt_proj_weight.abs().max() <= mixer.dt_rank**-0.5
    v2 = MambaMixer(32, version=2, head_dim=16)
    assert v2.A_log.shape == (1, 4) and (v2.A_log.exp() >= 1).all() and (v2.A_log.exp() <= 16).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(version=3), "version must be 1"),
        (dict(scan_directions="zigzag"), "scan_directions must be one of"),
        (dict(grid_conv=True), "grid_conv needs scan_directions 'cross' or 'tri'"),
        (dict(scan_directions="cross", grid_conv=True, d_conv=4), "an odd d_conv"),
        (dict(version=2, head_dim=5), "head_dim must divide the inner width"),
        (dict(d_state=0), "d_state must be a positive int"),
        (dict(dt_rank=1.5), "dt_rank must be a positive int"),
    ],
)
def test_bad_mixer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MambaMixer(8, **kwargs)


def test_bad_mixer_input():
    mixer = MambaMixer(8, scan_directions="cross")
    with pytest.raises(ValueError, match=r"x must be tokens \(B, L, dim=8\), got \(2, 12, 6\)"):
        mixer(torch.randn(2, 12, 6), (3, 4))
    with pytest.raises(ValueError, match=r"grid must be \(H, W\) with prod\(grid\) = L = 12"):
        mixer(torch.randn(2, 12, 8), (3, 5))
    with pytest.raises(ValueError, match=r"grid must be \(Z, Y, X\)"):
        MambaMixer(8, scan_directions="tri")(torch.randn(1, 12, 8), (3, 4))


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------


def expected_vim(dim, depth=24, patches=196, classes=1000):
    embed = 3 * 16 * 16 * dim + dim + patches * dim + dim  # patch conv, positions, class token
    return embed + depth * (mixer_params(dim, K=2) + dim) + dim + dim * classes + classes


STRIDE8_PATCHES = ((224 - 16) // 8 + 1) ** 2  # 27 x 27 overlapping patches


@pytest.mark.parametrize(
    ("name", "expected", "paper_range"),
    [
        ("vim_tiny_patch16_224", expected_vim(192), (6.5, 7.5)),  # Vim-Ti "7M" (Zhu et al., Table 1)
        ("vim_small_patch16_224", expected_vim(384), (25.5, 26.5)),  # Vim-S "26M"
        ("vim_base_patch16_224", expected_vim(768), (97.5, 98.5)),  # Vim-B "98M" (hustvl/Vim README)
        ("vim_tiny_patch16_stride8_224", expected_vim(192, patches=STRIDE8_PATCHES), (6.5, 7.5)),  # Ti+ "7M"
        ("vim_small_patch16_stride8_224", expected_vim(384, patches=STRIDE8_PATCHES), (25.5, 26.5)),  # S+
        ("vim_base_patch16_stride8_224", expected_vim(768, patches=STRIDE8_PATCHES), None),  # unpublished
    ],
)
def test_parameter_counts(name, expected, paper_range):
    ours = count(on_meta(name))
    print(f"{name}: {ours / 1e6:.2f} M parameters (paper range {paper_range} M)")
    assert ours == expected
    if paper_range is not None:
        assert paper_range[0] * 1e6 <= ours < paper_range[1] * 1e6


def test_every_variant_is_registered():
    assert set(timm.list_models("vim_*")) == set(VIM)


# ------------------------------------------------------------------------------------------------
# Vim
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"scan_directions": "forward", "global_pool": "avg"}, {"version": 2, "head_dim": 32}],
    ids=["bidirectional", "forward-avg", "mamba2"],
)
def test_vim_forms_give_the_same_logits(kwargs):
    model = small_vim(**kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.set_scan_form("recurrent")
        expected = model(x)
        forms = [("chunk", 5), ("chunk", 64)] + ([("parallel", None)] if kwargs.get("version") == 2 else [])
        for form, chunk in forms:
            model.set_scan_form(form, chunk)
            assert relative_error(model(x), expected) < 1e-5, form


def test_vim_class_token_sits_in_the_middle_of_the_scan():
    # A forward-only scan: the class token at position N // 2 sees the first half of the patches only.
    model = small_vim(scan_directions="forward")
    x = torch.randn(1, 3, 64, 64)
    first, last = x.clone(), x.clone()
    first[..., :16, :16] += 1.0  # patch 0
    last[..., 48:, 48:] += 1.0  # patch 15
    with torch.no_grad():
        cls = model.forward_features(x)[:, -1]
        assert torch.equal(model.forward_features(last)[:, -1], cls)
        assert not torch.equal(model.forward_features(first)[:, -1], cls)
        # and the bidirectional model's class token sees both ends
        bidir = small_vim()
        cls = bidir.forward_features(x)[:, -1]
        assert not torch.equal(bidir.forward_features(last)[:, -1], cls)


def test_vim_create_model_arguments_and_dynamic_size():
    model = timm.create_model("vim_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, depth=2)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert model.pos_embed.shape == (1, 4, 192)
    dynamic = small_vim(dynamic_img_size=True)
    assert dynamic(torch.randn(1, 3, 40, 72)).shape == (1, 1000)


def test_vim_intermediates_give_the_class_token_apart_from_the_patches():
    model = small_vim(depth=3)
    x = torch.randn(2, 3, 64, 64)
    patches, cls = model.forward_intermediates(
        x, indices=1, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
    )[0]
    assert patches.shape == (2, 16, 192) and cls.shape == (2, 1, 192)
    final = model.forward_features(x)
    assert torch.allclose(model.norm(torch.cat((patches, cls), dim=1)), final, atol=1e-6)


def test_vim_stride8_overlapping_patches_contract():
    # 16-pixel patches every 8 pixels: (48 - 16) / 8 + 1 = 5 tokens per side, features at reduction 8.
    model = small_vim("vim_tiny_patch16_stride8_224", img_size=48)
    assert model.patch_embed.grid_size == (5, 5) and model.pos_embed.shape == (1, 25, 192)
    x = torch.randn(2, 3, 48, 48)
    final, intermediates = model.forward_intermediates(x, indices=[1])
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert [tuple(t.shape) for t in intermediates] == [(2, 192, 5, 5)]
    features = timm.create_model(
        "vim_tiny_patch16_stride8_224", features_only=True, out_indices=(0, 1), img_size=48, depth=2
    )
    assert features.feature_info.reduction() == [8, 8]
    assert [tuple(f.shape) for f in features(x)] == [(2, 192, 5, 5)] * 2
    with pytest.raises(ValueError, match=r"x must be \(48, 48\) for this model"):
        model(torch.randn(1, 3, 56, 56))
    # dynamic_img_size: any size of at least one patch, padded to the next that fits (40: 4 tokens,
    # 45 -> 48: 5 tokens), positions resampled to the grid.
    dynamic = small_vim("vim_tiny_patch16_stride8_224", img_size=48, dynamic_img_size=True)
    dynamic.load_state_dict(model.state_dict())
    assert torch.allclose(dynamic(x), model(x), atol=1e-6)
    _, (grid,) = dynamic.forward_intermediates(torch.randn(1, 3, 40, 45), indices=[1])
    assert grid.shape == (1, 192, 4, 5)
    exact = small_vim(
        "vim_tiny_patch16_stride8_224", img_size=48, dynamic_img_size=True, dynamic_img_pad=False
    )
    assert exact.forward_features(torch.randn(1, 3, 40, 56)).shape == (1, 4 * 6 + 1, 192)
    with pytest.raises(ValueError, match=r"x must have sizes divisible by the patch size \(8, 8\)"):
        exact(torch.randn(1, 3, 44, 56))
    with pytest.raises(ValueError, match="stride must divide patch_size=16, got stride=6"):
        VisionMamba(stride=6, depth=1)


def test_vim_layer_groups_weight_decay_and_constructor_errors():
    model = small_vim()
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 4  # stem, 2 blocks (the final norm joins the last), head
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))
    decay_free = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.mixer.A_log", "blocks.1.mixer.D"} <= decay_free
    with pytest.raises(ValueError, match="global_pool='token' needs class_token=True"):
        VisionMamba(class_token=False, depth=1)
    with pytest.raises(ValueError, match="scan_directions must be 'forward' or 'bidirectional' for Vim"):
        VisionMamba(scan_directions="cross", depth=1)


def test_vim_gradients_reach_every_parameter_and_checkpointing_matches():
    model = small_vim(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    plain = model(x)
    plain.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    checkpointed.square().mean().backward()
    assert torch.allclose(checkpointed, plain, atol=1e-6)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_vim_save_and_load_through_pretrained_cfg(tmp_path):
    from safetensors.torch import save_file

    model = small_vim()
    save_file(model.state_dict(), tmp_path / "vim.safetensors")
    overlay = dict(file=str(tmp_path / "vim.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    loaded = timm.create_model(
        "vim_tiny_patch16_224", pretrained=True, img_size=64, depth=2, pretrained_cfg_overlay=overlay
    ).eval()
    assert torch.equal(loaded(x), model(x))
    bigger = timm.create_model(
        "vim_tiny_patch16_224", pretrained=True, img_size=96, depth=2, pretrained_cfg_overlay=overlay
    )
    assert bigger.pos_embed.shape == (1, 36, 192)


def test_vim_fx_feature_extraction_treats_the_mixer_as_a_leaf():
    model = small_vim()
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "b1", "norm": "out"})
    out = extractor(torch.randn(1, 3, 64, 64))
    assert out["b1"].shape == (1, 17, 192) and out["out"].shape == (1, 17, 192)


def test_vim_tiny_bfloat16_autocast_forward_and_backward_are_finite():
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32).train()  # all 24 blocks, 5 tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_vim_bfloat16_model_stays_close_to_float32():
    model = small_vim()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and relative_error(out.float(), expected) < 0.1


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(2, 1, 64, 64), "x must have 3 channels"),
        (torch.randn(2, 3, 64, 48), r"x must be \(64, 64\) for this model"),
        (torch.randn(2, 3, 2, 64, 64), r"x must be an image batch \(B, C, H, W\)"),
    ],
)
def test_vim_bad_input_is_named(x, match):
    with pytest.raises(ValueError, match=match):
        small_vim()(x)
