"""TokenUnify objectives: token order, what each corrupted input keeps and hides (nothing hidden leaks),
the targets, losses and gradients, schedules, weights, determinism, the encoder export, bad arguments."""

import itertools

import pytest
import timm
import torch

import seqvision  # noqa: F401  (registers the models)
from seqvision.pretrain.tokenunify import (
    DEGRADATIONS,
    OBJECTIVES,
    RandomDegradation,
    TokenUnify,
    mask_count_range,
    random_token_mask,
    take_token,
    token_mask_to_voxels,
)
from seqvision.vision import create_em_segmenter

# The smallest crop the encoder takes (its last stage keeps 1 x 1 x 2 voxels), cut into 4 x 2 x 2 tokens.
CROP = (16, 16, 32)
PATCH = (4, 8, 16)
GRID = (4, 2, 2)
T = 16
TINY = dict(
    encoder_kwargs=dict(dims=(4, 8, 8, 8), depths=(1, 1, 1, 1)),
    crop_size=CROP,
    patch_size=PATCH,
    decoder_hidden_size=8,
)


def tiny(**kwargs) -> TokenUnify:
    torch.manual_seed(0)
    return TokenUnify("emmamba_base", **{**TINY, **kwargs})


def volume(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, *CROP, generator=torch.Generator().manual_seed(seed))


def raster_slices(grid=GRID, patch=PATCH):
    """(z, y, x) slices of every token, numbered independently of the module: z slowest, x fastest."""
    return [
        tuple(slice(i * p, (i + 1) * p) for i, p in zip(position, patch, strict=True))
        for position in itertools.product(*(range(g) for g in grid))
    ]


def token_voxels(x: torch.Tensor, b: int, t: int) -> torch.Tensor:
    return x[(b, slice(None), *raster_slices()[t])]


def call(fn, seed: int, *args):
    torch.manual_seed(seed)
    return fn(*args)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------
# tokens
# ------------------------------------------------------------------------------------------------


def test_tokens_are_in_z_major_raster_order():
    x = torch.randn(3, 2, *CROP)
    for t, where in enumerate(raster_slices()):
        index = torch.full((3,), t)
        torch.testing.assert_close(take_token(x, index, PATCH), x[(slice(None), slice(None), *where)])
        mask = torch.zeros(3, T, dtype=torch.bool)
        mask[:, t] = True
        expected = torch.zeros(3, 1, *CROP, dtype=torch.bool)
        expected[(slice(None), slice(None), *where)] = True
        assert torch.equal(token_mask_to_voxels(mask, GRID, PATCH), expected)


def test_default_crop_has_400_tokens_in_raster_order():
    # Label every voxel with its patch's raster number, computed from its coordinates.
    z, y, x = torch.meshgrid(torch.arange(16), torch.arange(160), torch.arange(160), indexing="ij")
    labels = ((z // 4) * 100 + (y // 16) * 10 + x // 16).float()[None, None]
    for t in range(400):
        patch = take_token(labels, torch.tensor([t]), (4, 16, 16))
        assert patch.shape == (1, 1, 4, 16, 16) and (patch == t).all(), t


def test_take_token_picks_a_different_token_per_sample():
    x = torch.randn(4, 1, *CROP)
    index = torch.tensor([0, 5, 10, 15])
    out = take_token(x, index, PATCH)
    for b, t in enumerate(index.tolist()):
        torch.testing.assert_close(out[b], token_voxels(x, b, t))


# ------------------------------------------------------------------------------------------------
# random-token prediction: the input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_tokens", "ratio"), [(400, (0.2, 0.8)), (16, (0.2, 0.8)), (10, (0.3, 0.35))])
def test_masked_fraction_stays_within_the_ratio_bounds(num_tokens, ratio):
    torch.manual_seed(0)
    hidden = random_token_mask(2000, num_tokens, ratio)
    fraction = hidden.float().mean(dim=1)
    assert (fraction >= ratio[0]).all() and (fraction <= ratio[1]).all()
    # One ratio per sample, spread over the range, not one for the batch.
    fewest, most = mask_count_range(num_tokens, ratio)
    counts = set(hidden.sum(dim=1).tolist())
    assert counts == set(range(fewest, most + 1))


def test_masked_tokens_are_uniform_over_positions():
    torch.manual_seed(0)
    hidden = random_token_mask(4000, T, (0.5, 0.5))
    assert (hidden.sum(dim=1) == 8).all()
    torch.testing.assert_close(hidden.float().mean(dim=0), torch.full((T,), 0.5), atol=0.04, rtol=0)


def test_masked_input_keeps_visible_tokens_and_hides_the_rest():
    model, x = tiny(degrade_prob=0.0), volume(batch=3)
    corrupted, hidden = call(model.masked_input, 0, x)
    assert corrupted.shape == x.shape and hidden.shape == (3, T) and hidden.dtype == torch.bool
    for b, t in itertools.product(range(3), range(T)):
        same = torch.equal(token_voxels(corrupted, b, t), token_voxels(x, b, t))
        assert same != bool(hidden[b, t]), (b, t)
    # The fill is noise with the spread of a standard normal, not a constant.
    voxels = token_mask_to_voxels(hidden, GRID, PATCH).expand_as(x)
    assert 0.8 < corrupted[voxels].std() < 1.2


@pytest.mark.parametrize("kinds", [(), *((kind,) for kind in DEGRADATIONS)])
def test_nothing_of_a_masked_token_reaches_the_input(kinds):
    model = tiny(degrade_prob=1.0 if kinds else 0.0, degradations=kinds or DEGRADATIONS)
    x = volume(batch=3)
    corrupted, hidden = call(model.masked_input, 0, x)
    changed = torch.where(token_mask_to_voxels(hidden, GRID, PATCH), 1.0 - x, x)
    assert not torch.equal(changed, x)
    corrupted_changed, hidden_changed = call(model.masked_input, 0, changed)
    assert torch.equal(hidden_changed, hidden)
    assert torch.equal(corrupted_changed, corrupted)


# ------------------------------------------------------------------------------------------------
# next-token / next-all prediction: the input
# ------------------------------------------------------------------------------------------------


def test_prefix_input_keeps_exactly_the_first_k_tokens():
    model, x = tiny(degrade_prob=0.0), volume(batch=4)
    corrupted, prefix_len = call(model.prefix_input, 0, x)
    assert prefix_len.shape == (4,)
    for b, k in enumerate(prefix_len.tolist()):
        assert 1 <= k <= T - 1
        for t in range(T):
            assert torch.equal(token_voxels(corrupted, b, t), token_voxels(x, b, t)) == (t < k), (b, t, k)


def test_prefix_length_covers_one_to_t_minus_one():
    model = tiny(degrade_prob=0.0)
    _, prefix_len = call(model.prefix_input, 0, torch.rand(400, 1, *CROP))
    assert set(prefix_len.tolist()) == set(range(1, T))


@pytest.mark.parametrize("kinds", [(), *((kind,) for kind in DEGRADATIONS)])
def test_nothing_after_the_prefix_reaches_the_input(kinds):
    model = tiny(degrade_prob=1.0 if kinds else 0.0, degradations=kinds or DEGRADATIONS)
    x = volume(batch=3)
    corrupted, prefix_len = call(model.prefix_input, 0, x)
    after = torch.arange(T) >= prefix_len[:, None]
    changed = torch.where(token_mask_to_voxels(after, GRID, PATCH), 1.0 - x, x)
    corrupted_changed, prefix_changed = call(model.prefix_input, 0, changed)
    assert torch.equal(prefix_changed, prefix_len)
    assert torch.equal(corrupted_changed, corrupted)


# ------------------------------------------------------------------------------------------------
# degradations
# ------------------------------------------------------------------------------------------------


def test_degradations():
    x = volume(batch=2)
    assert call(RandomDegradation(0.0), 0, x) is x
    noisy = call(RandomDegradation(1.0, ("noise",), noise_std=(0.05, 0.05)), 0, x)
    assert 0.045 < (noisy - x).std() < 0.055
    flat = torch.full_like(x, 0.3)  # a normalised blur keeps a constant volume, edges included
    torch.testing.assert_close(call(RandomDegradation(1.0, ("blur",)), 0, flat), flat)
    blurred = call(RandomDegradation(1.0, ("blur",)), 0, x)
    assert blurred.std() < 0.8 * x.std()
    cut = call(RandomDegradation(1.0, ("cutout",), cutout_size=(0.25, 0.25)), 0, x + 1)
    for b in range(2):
        zeroed = (cut[b, 0] == 0).nonzero()
        extent = (zeroed.max(dim=0).values - zeroed.min(dim=0).values + 1).tolist()
        assert extent == [4, 4, 8] and len(zeroed) == 4 * 4 * 8  # one cuboid, a quarter of each side


def test_degradation_applies_with_its_probability_per_sample():
    flat = torch.full((1000, 1, 1, 1, 2), 0.5)
    out = call(RandomDegradation(0.3, ("noise",)), 0, flat)
    changed = (out != flat).flatten(1).any(dim=1).float().mean()
    assert 0.25 < changed < 0.35


# ------------------------------------------------------------------------------------------------
# targets and losses
# ------------------------------------------------------------------------------------------------


def test_next_token_target_is_token_k():
    model = tiny(objectives=("next_token",), degrade_prob=0.0)
    x = volume(batch=2)
    with torch.no_grad():
        base = call(model, 0, x, 0)["next_token"]
        _, prefix_len = call(model.prefix_input, 0, x)
        k = prefix_len.tolist()
        later = torch.zeros(2, T, dtype=torch.bool)
        token_k = torch.zeros(2, T, dtype=torch.bool)
        for b in range(2):
            later[b, k[b] + 1 :] = True
            token_k[b, k[b]] = True
        x_later = torch.where(token_mask_to_voxels(later, GRID, PATCH), 1.0 - x, x)
        x_token = torch.where(token_mask_to_voxels(token_k, GRID, PATCH), 1.0 - x, x)
        # Hidden tokens other than k reach neither the input nor the target; token k is the target.
        assert torch.equal(call(model, 0, x_later, 0)["next_token"], base)
        assert not torch.equal(call(model, 0, x_token, 0)["next_token"], base)


def test_reconstruction_losses_are_mse_on_hidden_voxels_and_on_the_whole_volume():
    model = tiny(degrade_prob=0.0)
    x = volume(batch=2)
    outputs = []
    model.reconstruction_head.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        losses = call(model, 0, x, 0)
        _, hidden = call(model.masked_input, 0, x)
    masked_out, prefix_out = outputs
    voxels = token_mask_to_voxels(hidden, GRID, PATCH).expand_as(x)
    torch.testing.assert_close(losses["masked"], ((masked_out - x)[voxels] ** 2).mean())
    torch.testing.assert_close(losses["next_all"], ((prefix_out - x) ** 2).mean())


def test_joint_losses_are_finite_scalars_with_gradients():
    model = tiny()
    out = call(model, 0, volume(), 0)
    assert set(out) == {"loss", *OBJECTIVES}
    assert out["loss"].dim() == 0 and out["loss"].requires_grad and torch.isfinite(out["loss"])
    for name in OBJECTIVES:
        assert out[name].dim() == 0 and torch.isfinite(out[name]) and not out[name].requires_grad
    torch.testing.assert_close(out["loss"].detach(), sum(out[name] for name in OBJECTIVES))
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_alone_reaches_the_encoder(objective):
    model = tiny(objectives=(objective,))
    call(model, 0, volume(), 0)["loss"].backward()
    encoder = dict(model.encoder.named_parameters())
    for name in (
        "stem.weight",
        "stages.0.blocks.0.mixer.in_proj.weight",
        "stages.3.conv_block.conv1.0.weight",
    ):
        assert encoder[name].grad is not None and encoder[name].grad.abs().sum() > 0, name
    head_used = objective == "next_token"
    assert all((p.grad is not None) == head_used for p in model.next_token_head.parameters())
    assert all((p.grad is not None) != head_used for p in model.reconstruction_head.parameters())


# ------------------------------------------------------------------------------------------------
# schedules and weights
# ------------------------------------------------------------------------------------------------


def test_joint_schedule_runs_every_objective_at_every_step():
    model = tiny()
    assert all(model.active_objectives(step) == OBJECTIVES for step in (0, 1, 99, 10**6))


def test_alternate_schedule_switches_every_n_steps():
    model = tiny(schedule="alternate", switch_every=3)
    seen = [model.active_objectives(step) for step in range(12)]
    expected = [(name,) for name in OBJECTIVES for _ in range(3)]
    assert seen == expected + expected[:3]
    with torch.no_grad():
        assert set(call(model, 0, volume(), 4)) == {"loss", "next_token"}


def test_sequential_schedule_switches_after_masked_steps():
    model = tiny(schedule="sequential", masked_steps=5)
    assert [model.active_objectives(step) for step in range(5)] == [("masked",)] * 5
    assert all(model.active_objectives(step) == ("next_token", "next_all") for step in (5, 6, 1000))
    model = tiny(schedule="sequential", masked_steps=0, objectives=("next_all", "masked"))
    assert model.active_objectives(0) == ("next_all",)


def test_weights_scale_the_total_and_zero_removes_the_gradient():
    model = tiny(weights={"masked": 2.0, "next_token": 0.0})
    assert model.weights == {"masked": 2.0, "next_token": 0.0, "next_all": 1.0}
    out = call(model, 0, volume(), 0)
    torch.testing.assert_close(out["loss"].detach(), 2 * out["masked"] + out["next_all"])
    assert out["next_token"] > 0  # still computed, for monitoring
    out["loss"].backward()
    assert all(p.grad.abs().sum() == 0 for p in model.next_token_head.parameters())
    assert model.encoder.stem.weight.grad.abs().sum() > 0

    # The encoder's gradient is the one without the zero-weighted objective.
    reference = tiny(weights={"masked": 2.0}, objectives=("masked", "next_all"))
    call(reference, 0, volume(), 0)["loss"].backward()
    for name, p in reference.encoder.named_parameters():
        torch.testing.assert_close(model.encoder.get_parameter(name).grad, p.grad)


def test_runs_are_reproducible_under_manual_seed():
    results = []
    for _ in range(2):
        model = tiny()
        out = call(model, 7, volume(), 0)
        out["loss"].backward()
        results.append(({k: v.item() for k, v in out.items()}, grads(model)))
    assert results[0][0] == results[1][0]
    for name, g in results[0][1].items():
        assert torch.equal(g, results[1][1][name]), name
    # Restoring the RNG state replays the same corruption.
    model, x = tiny(), volume()
    state = torch.get_rng_state()
    first = model.masked_input(x)[0]
    torch.set_rng_state(state)
    assert torch.equal(model.masked_input(x)[0], first)
    assert not torch.equal(model.masked_input(x)[0], first)


# ------------------------------------------------------------------------------------------------
# the encoder
# ------------------------------------------------------------------------------------------------


def test_encoder_state_dict_loads_strictly_into_timm_base():
    torch.manual_seed(0)
    model = TokenUnify("emmamba_base")
    state = model.encoder_state_dict()
    target = timm.create_model("emmamba_base")
    target.load_state_dict(state, strict=True)
    assert set(state) == set(target.state_dict())
    for name, value in target.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(not name.startswith("encoder.") for name in state)
    assert model.grid == (4, 10, 10) and model.num_tokens == 400


def test_encoder_instance_is_used_as_given():
    torch.manual_seed(0)
    encoder = timm.create_model("emmamba_base", dims=(4, 8, 8, 8), depths=(1, 1, 1, 1))
    model = TokenUnify(encoder, crop_size=CROP, patch_size=PATCH)
    assert model.encoder is encoder
    assert model.decoder.skip_blocks[-1].conv1.out_channels == 16  # twice the last width
    assert model.encoder_state_dict().keys() == encoder.state_dict().keys()
    assert TokenUnify("emmamba_base").decoder.skip_blocks[-1].conv1.out_channels == 512  # the segmenter's


def test_decoder_is_the_segmenter_decoder():
    model = tiny()
    segmenter = create_em_segmenter(
        "emmamba_base", hidden_size=8, kernel_size=(1, 3, 3), out_chans=1, **TINY["encoder_kwargs"]
    )
    decoder = [p.shape for n, p in segmenter.named_parameters() if not n.startswith("encoder.")]
    ours = [p.shape for p in [*model.decoder.parameters(), *model.reconstruction_head.parameters()]]
    assert ours == decoder


def test_no_weight_decay_names_are_parameters():
    model = tiny()
    names = model.no_weight_decay()
    assert names and names <= set(dict(model.named_parameters()))


# ------------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(crop_size=(16, 32)), "crop_size"),
        (dict(crop_size=(16, 16, 24)), "crop_size"),  # not a multiple of the encoder's 16
        (dict(crop_size=(16, 16, 16)), "crop_size"),  # leaves one voxel for the last InstanceNorm
        (dict(patch_size=(4, 8, 0)), "patch_size"),
        (dict(patch_size=(4, 8, 12)), "patch_size"),
        (dict(patch_size=(16, 16, 32)), "patch_size"),  # a single token
        (dict(objectives=()), "objectives"),
        (dict(objectives=("masked", "masked")), "objectives"),
        (dict(objectives=("contrastive",)), "objectives"),
        (dict(weights={"contrastive": 1.0}), "weights"),
        (dict(weights={"masked": -1.0}), "weights"),
        (dict(weights={"masked": float("nan")}), "weights"),
        (dict(objectives=("masked",), weights={"next_all": 1.0}), "weights"),
        (dict(schedule="cyclic"), "schedule"),
        (dict(schedule="alternate", objectives=("masked",)), "objectives"),
        (dict(schedule="sequential", objectives=("next_token", "next_all")), "objectives"),
        (dict(schedule="sequential", objectives=("masked",)), "objectives"),
        (dict(switch_every=0), "switch_every"),
        (dict(masked_steps=-1), "masked_steps"),
        (dict(mask_ratio=(0.8, 0.2)), "mask_ratio"),
        (dict(mask_ratio=(0.0, 0.5)), "mask_ratio"),
        (dict(mask_ratio=(0.2, 1.0)), "mask_ratio"),
        (dict(mask_ratio=0.5), "mask_ratio"),
        (dict(mask_ratio=(0.51, 0.55)), "mask_ratio"),  # no whole number of the 16 tokens
        (dict(degrade_prob=1.5), "degrade_prob"),
        (dict(degradations=("rain",)), "degradations"),
        (dict(degradations=()), "degradations"),
        (dict(decoder_hidden_size=0), "decoder_hidden_size"),
        (dict(decoder_kernel_size=(1, 2, 2)), "decoder_kernel_size"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tiny(**kwargs)


def test_bad_encoders():
    with pytest.raises(ValueError, match="encoder"):
        TokenUnify("resnet50")
    with pytest.raises(TypeError, match="encoder"):
        TokenUnify(torch.nn.Linear(2, 2))
    encoder = timm.create_model("emmamba_base", dims=(4, 8, 8, 8), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="encoder_kwargs"):
        TokenUnify(encoder, crop_size=CROP, patch_size=PATCH, encoder_kwargs=dict(depths=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="num_classes"):
        TokenUnify("emmamba_base", **{**TINY, "encoder_kwargs": dict(TINY["encoder_kwargs"], num_classes=3)})


def test_bad_forward_inputs():
    model = tiny()
    x = volume()
    with pytest.raises(ValueError, match="volume"):
        model(x[0], 0)  # no batch dimension
    with pytest.raises(ValueError, match="volume"):
        model(torch.rand(2, 2, *CROP), 0)  # two channels for a one-channel encoder
    with pytest.raises(ValueError, match="crop_size"):
        model(torch.rand(2, 1, 16, 32, 32), 0)
    with pytest.raises(TypeError, match="volume"):
        model((x * 255).to(torch.uint8), 0)
    with pytest.raises(TypeError, match="volume"):
        model(x.numpy(), 0)
    with pytest.raises(ValueError, match="step"):
        model(x, -1)
    with pytest.raises(TypeError, match="step"):
        model.active_objectives(1.5)
