"""Shared vision layers: GroupRmsNorm, MD-TPE, MD-LRPE against slow references; run-time grids; bad input."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from seqvision.vision.layers import GroupRmsNorm, MdLrpe, MdTpe
from seqvision.vision.layers.md_tpe import init_decay_logit

# --------------------------------------------------------------------------------------------------
# GroupRmsNorm


def group_rms_reference(x, num_groups, weight, eps=1e-6):
    """Each group of C / G channels divided by its own root mean square, then the per-channel weight."""
    size = x.shape[-1] // num_groups
    parts = []
    for g in range(num_groups):
        part = x[..., g * size : (g + 1) * size]
        parts.append(part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + eps))
    return torch.cat(parts, -1) * weight


def test_group_rms_norm_matches_formula():
    torch.manual_seed(0)
    norm = GroupRmsNorm(12, 3).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(norm(x), group_rms_reference(x, 3, norm.weight))


def test_group_rms_norm_starts_as_identity_weight_and_affine_false_has_none():
    assert torch.equal(GroupRmsNorm(8, 2).weight, torch.ones(8))
    plain = GroupRmsNorm(8, 2, affine=False)
    assert plain.weight is None and not list(plain.parameters())
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(plain(x), group_rms_reference(x, 2, 1.0))


def test_group_rms_norm_groups_are_independent():
    torch.manual_seed(0)
    norm = GroupRmsNorm(12, 3)
    x = torch.randn(4, 12)
    changed = x.clone()
    changed[:, 4:8] = 10 * torch.randn(4, 4)
    y, y_changed = norm(x), norm(changed)
    torch.testing.assert_close(y[:, :4], y_changed[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(y[:, 8:], y_changed[:, 8:], rtol=0, atol=0)
    assert not torch.allclose(y[:, 4:8], y_changed[:, 4:8])
    # Each group has unit RMS on its own.
    rms2 = y.unflatten(-1, (3, 4)).pow(2).mean(-1)
    torch.testing.assert_close(rms2, torch.ones(4, 3), rtol=1e-4, atol=1e-4)


def test_group_rms_norm_keeps_bfloat16():
    torch.manual_seed(0)
    norm = GroupRmsNorm(16, 4)
    x = torch.randn(2, 3, 16)
    y = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), group_rms_reference(x, 4, 1.0), rtol=2e-2, atol=2e-2)


def test_group_rms_norm_bad_arguments():
    with pytest.raises(ValueError, match="num_channels must be divisible by num_groups"):
        GroupRmsNorm(10, 3)
    with pytest.raises(ValueError, match="num_groups"):
        GroupRmsNorm(10, 0)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., C=8\)"):
        GroupRmsNorm(8, 2)(torch.randn(2, 6))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        GroupRmsNorm(8, 2)(torch.ones(2, 8, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# MdTpe


def toeplitz_sum_reference(module, x):
    """sum_a (q.k) sum_s lambda^|t - s| x[s] along each axis a, by explicit loops over t and s."""
    H, hd = module.num_heads, module.head_dim
    lam = module.decay_logit.detach().sigmoid().repeat_interleave(hd, -1)  # (num_axes, D)
    c = (module.q * module.k).detach().sum(-1).repeat_interleave(hd, -1)  # (num_axes, D)
    assert lam.shape[-1] == H * hd
    y = torch.zeros_like(x)
    for a in range(module.num_axes):
        dim = a + 1
        n = x.shape[dim]
        rows = []
        for t in range(n):
            acc = torch.zeros_like(x.select(dim, 0))
            for s in range(n):
                if s <= t:
                    acc = acc + lam[a] ** (t - s) * x.select(dim, s)
                elif module.bidirectional:
                    acc = acc + lam[a] ** (s - t) * x.select(dim, s)
            rows.append(acc)
        y = y + c[a] * torch.stack(rows, dim)
    return y


def md_tpe_reference(module, x):
    y = toeplitz_sum_reference(module, x)
    y = group_rms_reference(y, module.num_heads, module.norm.weight.detach(), module.norm.eps)
    return F.linear(y, module.proj.weight.detach(), module.proj.bias.detach())


def random_md_tpe(dim=8, num_heads=2, num_axes=2, bidirectional=True):
    """Float64 MdTpe with every parameter randomised, so no term of the formula hides behind its init."""
    torch.manual_seed(0)
    module = MdTpe(dim, num_heads, num_axes, bidirectional=bidirectional).double()
    with torch.no_grad():
        module.q.normal_()
        module.k.normal_()
        module.decay_logit.uniform_(-1.0, 3.0)
        module.norm.weight.normal_()
    return module


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "causal"])
@pytest.mark.parametrize("grid", [(3, 5), (2, 3, 4), (1, 7), (9,)], ids=str)
def test_md_tpe_matches_loop_reference(grid, bidirectional):
    module = random_md_tpe(num_axes=len(grid), bidirectional=bidirectional)
    x = torch.randn(2, *grid, 8, dtype=torch.float64)
    torch.testing.assert_close(module.toeplitz_sum(x), toeplitz_sum_reference(module, x))
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, md_tpe_reference(module, x))


def test_md_tpe_grid_size_is_read_at_run_time():
    module = random_md_tpe()
    for grid in [(4, 4), (6, 2), (3, 5)]:
        x = torch.randn(1, *grid, 8, dtype=torch.float64)
        torch.testing.assert_close(module(x), md_tpe_reference(module, x))


def test_md_tpe_gradients_reach_every_parameter():
    module = random_md_tpe(num_axes=3)
    module(torch.randn(2, 2, 3, 4, 8, dtype=torch.float64)).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_md_tpe_init():
    module = MdTpe(32, 4, 3)
    torch.testing.assert_close((module.q * module.k).sum(-1), torch.ones(3, 4))
    decay = module.decay_logit.detach().sigmoid()
    torch.testing.assert_close(decay[:, 0], torch.full((3,), 0.5))
    torch.testing.assert_close(decay[:, -1], torch.full((3,), 0.99))
    assert torch.all(decay[:, 1:] > decay[:, :-1])
    assert torch.equal(decay[0], decay[2])
    # Evenly spaced in log(1 - lambda); a single head takes the geometric middle.
    gaps = torch.log1p(-decay[0].double()).diff()
    torch.testing.assert_close(gaps, gaps[:1].expand_as(gaps), rtol=1e-4, atol=1e-4)
    middle = init_decay_logit(1).sigmoid().item()
    assert middle == pytest.approx(1 - math.sqrt(0.5 * 0.01), rel=1e-5)


def test_md_tpe_bfloat16_keeps_dtype_and_agrees_with_float32():
    torch.manual_seed(0)
    module = MdTpe(16, 4, 2)
    x = torch.randn(2, 5, 6, 16)
    expected = module(x)
    out = module.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_md_tpe_bad_input():
    module = MdTpe(8, 2, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, h, w, D\)"):
        module(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        module(torch.randn(2, 4, 4, 6))
    with pytest.raises(ValueError, match=r"x must have shape \(B, t, h, w, D\)"):
        MdTpe(8, 2, 3)(torch.randn(2, 4, 4, 8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        module(torch.ones(1, 2, 2, 8, dtype=torch.long))


def test_md_tpe_bad_arguments():
    with pytest.raises(ValueError, match="dim must be divisible by num_heads"):
        MdTpe(10, 4, 2)
    with pytest.raises(ValueError, match="num_axes must be a positive int"):
        MdTpe(8, 2, 0)
    with pytest.raises(ValueError, match="decay_init"):
        MdTpe(8, 2, 2, decay_init=(0.9, 1.0))
    with pytest.raises(TypeError, match="bidirectional must be a bool"):
        MdTpe(8, 2, 2, bidirectional="yes")


# --------------------------------------------------------------------------------------------------
# MdLrpe


def grid_coords(grid):
    """(prod(grid), m) grid indices in raster order (last axis fastest)."""
    return torch.tensor(list(itertools.product(*(range(s) for s in grid))), dtype=torch.float64)


def channel_frequencies(head_dim, num_axes, base=10000.0):
    """For channel i: its axis i // n and its frequency base^(-(i mod n) / n), n = ceil(d / m)."""
    n = math.ceil(head_dim / num_axes)
    axis = [i // n for i in range(head_dim)]
    freq = torch.tensor([base ** (-(i % n) / n) for i in range(head_dim)], dtype=torch.float64)
    return axis, freq


def angles_reference(grid, head_dim, num_prefix_tokens=0, base=10000.0):
    axis, freq = channel_frequencies(head_dim, len(grid), base)
    coords = grid_coords(grid)
    rows = [torch.zeros(head_dim, dtype=torch.float64)] * num_prefix_tokens
    for s in coords:
        rows.append(torch.stack([s[axis[i]] * freq[i] for i in range(head_dim)]))
    return torch.stack(rows)


@pytest.mark.parametrize(("grid", "head_dim"), [((3, 5), 8), ((2, 3, 4), 10), ((4, 1, 3), 7)], ids=str)
@pytest.mark.parametrize("num_prefix_tokens", [0, 2])
def test_md_lrpe_matches_formula(grid, head_dim, num_prefix_tokens):
    torch.manual_seed(0)
    L = num_prefix_tokens + math.prod(grid)
    x = torch.randn(2, 3, L, head_dim, dtype=torch.float64)
    theta = angles_reference(grid, head_dim, num_prefix_tokens)
    expected = torch.cat((x * theta.cos(), x * theta.sin()), -1)
    out = MdLrpe(head_dim, len(grid))(x, grid, num_prefix_tokens)
    assert out.shape == (2, 3, L, 2 * head_dim) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected)


def relative_scores_reference(q, k, grid, base):
    """S[s, t] = sum_i q_s,i k_t,i cos(theta_i (s - t)[axis of channel i]), by loops over s and t."""
    axis, freq = channel_frequencies(q.shape[-1], len(grid), base)
    coords = grid_coords(grid)
    N = coords.shape[0]
    S = torch.zeros(N, N, dtype=torch.float64)
    for s in range(N):
        for t in range(N):
            offset = torch.stack([coords[s, a] - coords[t, a] for a in axis])
            S[s, t] = (q[s] * k[t] * torch.cos(freq * offset)).sum()
    return S


def lrpe_scores(module, q, k, grid):
    """S = lrpe(q) lrpe(k)^T for q, k (N, d): the score matrix a linear attention sees."""
    lq = module(q[None, None], grid)[0, 0]
    lk = module(k[None, None], grid)[0, 0]
    return lq @ lk.T


@pytest.mark.parametrize(("grid", "head_dim"), [((3, 4), 6), ((2, 3, 2), 10)], ids=str)
def test_md_lrpe_scores_depend_on_relative_offsets(grid, head_dim):
    torch.manual_seed(0)
    module = MdLrpe(head_dim, len(grid), base=100.0)
    N = math.prod(grid)
    q = torch.randn(N, head_dim, dtype=torch.float64)
    k = torch.randn(N, head_dim, dtype=torch.float64)
    torch.testing.assert_close(lrpe_scores(module, q, k, grid), relative_scores_reference(q, k, grid, 100.0))


@pytest.mark.parametrize("grid", [(3, 4), (2, 3, 2)], ids=str)
def test_md_lrpe_scores_are_translation_invariant(grid):
    torch.manual_seed(0)
    head_dim = 10
    module = MdLrpe(head_dim, len(grid), base=100.0)
    N = math.prod(grid)
    # The same q and k at every token: the score can only depend on where the two tokens are.
    q = torch.randn(head_dim, dtype=torch.float64).expand(N, -1)
    k = torch.randn(head_dim, dtype=torch.float64).expand(N, -1)
    S = lrpe_scores(module, q, k, grid)
    index = {tuple(int(c) for c in coord): i for i, coord in enumerate(grid_coords(grid))}
    checked = 0
    for (s, i), (t, j) in itertools.product(index.items(), index.items()):
        for u in itertools.product(*(range(-size + 1, size) for size in grid)):
            s_u = tuple(a + b for a, b in zip(s, u, strict=True))
            t_u = tuple(a + b for a, b in zip(t, u, strict=True))
            if s_u in index and t_u in index:
                assert S[index[s_u], index[t_u]].item() == pytest.approx(S[i, j].item(), abs=1e-12)
                checked += 1
    assert checked > N * N
    # And the dependence on the offset is real, not a constant.
    assert S.std() > 1e-3


def test_md_lrpe_prefix_tokens():
    torch.manual_seed(0)
    module = MdLrpe(8, 2)
    grid = (3, 4)
    patches = torch.randn(2, 3, 12, 8)
    prefix = torch.randn(2, 3, 2, 8)
    out = module(torch.cat((prefix, patches), 2), grid, num_prefix_tokens=2)
    torch.testing.assert_close(out[:, :, :2], torch.cat((prefix, torch.zeros_like(prefix)), -1))
    torch.testing.assert_close(out[:, :, 2:], module(patches, grid), rtol=0, atol=0)


def test_md_lrpe_has_no_parameters_or_saved_state():
    module = MdLrpe(8, 3)
    assert not list(module.parameters())
    assert module.state_dict() == {}
    assert module.theta.dtype == torch.float32 and module.theta.shape == (3,)


def test_md_lrpe_half_module_keeps_precise_frequencies():
    torch.manual_seed(0)
    grid = (64, 64)
    x = torch.randn(1, 1, math.prod(grid), 8)
    expected = MdLrpe(8, 2)(x.double(), grid)
    out = MdLrpe(8, 2).half()(x.half(), grid)
    assert out.dtype == torch.float16
    # Rounded float16 frequencies would be off by ~0.03 rad at position 63.
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=4e-3)


def test_md_lrpe_bad_input():
    module = MdLrpe(8, 2)
    x = torch.randn(1, 2, 13, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, L, d\)"):
        module(x[0], (3, 4), 1)
    with pytest.raises(ValueError, match="d = 8"):
        module(x[..., :6], (3, 4), 1)
    with pytest.raises(ValueError, match="grid must be 2 positive ints"):
        module(x, (3, 2, 2), 1)
    with pytest.raises(ValueError, match="grid must be 2 positive ints"):
        module(x, (12, 0), 1)
    with pytest.raises(ValueError, match="L = num_prefix_tokens"):
        module(x, (3, 4))
    with pytest.raises(ValueError, match="num_prefix_tokens must be a non-negative int"):
        module(x, (3, 4), -1)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        module(x.long(), (3, 4), 1)
    with pytest.raises(ValueError, match="base"):
        MdLrpe(8, 2, base=0.0)
