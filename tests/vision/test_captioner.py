"""The LRCN captioner: shapes, the three LSTM stacks, causality, tied weights, the shared frame
encoder, the generic searches (on hand-built toy decoders and on the model), and bad input.

Most models use a one-conv encoder and a 12-wide LSTM on 16 x 16 frames; ResNet-18 at 32 x 32 only
where BatchNorm statistics or timm's contract matter. The whole file runs in seconds on a CPU.
"""

import itertools
import math

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import group_parameters

from seqvision.vision.captioner import (
    DECODE_METHODS,
    VARIANTS,
    VIDEO_FEATURES,
    LRCNCaptioner,
    beam_search,
    caption_loss,
    create_captioner,
    greedy_search,
    sample_search,
    shift_tokens,
)
from seqvision.vision.layers.frame_encoder import FrameEncoderMixin
from seqvision.vision.lrcn import LRCN

PAD, BOS, EOS = 0, 1, 2
V = 13


def tiny_encoder() -> nn.Module:
    """A pooled one-conv encoder (8 features, width probed)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make(seed=0, lively=False, **kwargs) -> LRCNCaptioner:
    """A small captioner in eval mode. A fresh model is nearly uniform and nearly blind (its next-word
    distributions hardly depend on the words or the picture); ``lively`` scales the decoder's
    weights up so that captions differ between inputs and between words, and end (EOS) now and then.
    """
    torch.manual_seed(seed)
    kwargs = {"vocab_size": V, "hidden": 12, **kwargs}
    model = LRCNCaptioner(kwargs.pop("encoder", None) or tiny_encoder(), **kwargs).eval()
    if lively:
        with torch.no_grad():
            model.word_embed.weight.mul_(10)
            model.visual_proj.weight.mul_(10)
            for lstm in (model.lstm1, model.lstm2):
                for name, p in lstm.named_parameters() if lstm is not None else ():
                    if "weight" in name:
                        p.mul_(2)
            model.head.weight.mul_(10)
            model.head.bias[EOS] = 0.05
    return model


def images(B=2, size=16, seed=1, dtype=torch.float32):
    """Noise plus a brightness per image and channel (pooled noise alone looks the same to the model)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, size, size, generator=g) + 2 * torch.randn(B, 3, 1, 1, generator=g)
    return x.to(dtype)


def clips(B=2, T=3, size=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, size, size, generator=g) + 2 * torch.randn(B, T, 3, 1, 1, generator=g)
    return x.to(dtype)


def words(B=2, L=6, seed=2):
    tokens = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = BOS
    return tokens


def teacher_forced_logp(model, visual, ids):
    """Summed log-probs (generation's distribution) of generated ``ids`` by ONE teacher-forced pass."""
    inputs = torch.cat([torch.full_like(ids[:, :1], BOS), ids[:, :-1]], dim=1)
    inputs = inputs.masked_fill(inputs == PAD, EOS)  # after EOS: anything, those steps are ignored
    logp = model.generation_log_probs(model(visual, inputs)).gather(2, ids.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(ids == PAD, 0).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# shapes and the three stacks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("video_features", VIDEO_FEATURES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes(variant, video_features):
    model = make(variant=variant, video_features=video_features)
    tokens = words(B=2, L=6)
    for visual in (images(), clips(T=1), clips(T=4)):
        assert model(visual, tokens).shape == (2, 6, V)
        for method in DECODE_METHODS:
            ids, scores = model.generate(visual, max_len=5, method=method, beam_size=3)
            assert ids.dtype == torch.int64 and ids.shape[0] == 2 and 1 <= ids.shape[1] <= 5
            assert scores.shape == (2,) and scores.dtype == torch.float32
    assert (model.lstm2 is None) == (variant == "single")
    assert model.lstm1.input_size == (model.embed_dim if variant == "factored" else model.embed_dim + 12)


def test_an_image_is_a_clip_of_one_frame():
    for video_features in VIDEO_FEATURES:
        model = make(video_features=video_features)
        x, tokens = clips(T=1), words()
        assert torch.equal(model(x[:, 0], tokens), model(x, tokens))


def test_mean_features_average_the_frames():
    model = make(video_features="mean")
    per_step = make(video_features="per_step")
    x = clips(T=4)
    assert torch.allclose(model.encode_visual(x), per_step.encode_visual(x).mean(1, keepdim=True), atol=1e-6)
    assert per_step.encode_visual(x).shape == (2, 4, 12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_step_features_reach_step_t_from_frame_min_t_last(variant):
    """Step t reads frame min(t, T-1): changing frame j changes steps >= j only (the last frame:
    steps >= T-1); under 'mean' every frame changes every step."""
    model = make(variant=variant, video_features="per_step").double()
    x, tokens = clips(T=3, dtype=torch.float64), words(L=6)
    base = model(x, tokens)
    for j in range(3):
        y = x.clone()
        y[:, j] = torch.randn_like(y[:, j])
        diff = (model(y, tokens) - base).abs().amax(dim=(0, 2))  # per step
        assert torch.all(diff[:j] == 0) and torch.all(diff[j:] > 1e-9)
    mean = make(variant=variant, video_features="mean").double()
    y = x.clone()
    y[:, 2] = torch.randn_like(y[:, 2])
    assert torch.all((mean(y, tokens) - mean(x, tokens)).abs().amax(dim=(0, 2)) > 1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_t_depends_only_on_words_up_to_t(variant):
    model = make(variant=variant).double()
    x, tokens = images(dtype=torch.float64), words(L=7)
    base = model(x, tokens)
    for t in (1, 3, 6):
        changed = tokens.clone()
        changed[:, t] = 3 + (changed[:, t] - 3 + 1) % (V - 3)
        out = model(x, changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert (out[:, t:] - base[:, t:]).abs().amax(dim=-1).gt(1e-9).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_factored_first_layer_is_blind_to_the_image(variant):
    model = make(variant=variant).double()
    seen = []
    model.lstm1.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    tokens = words()
    a = model(images(seed=1, dtype=torch.float64), tokens)
    b = model(images(seed=2, dtype=torch.float64), tokens)
    assert not torch.allclose(a, b)
    if variant == "factored":
        assert torch.equal(seen[0], seen[1])
    else:
        assert (seen[0] - seen[1]).abs().max() > 1e-9


def test_tied_weights_share_the_embedding():
    model = make(tie_weights=True)
    assert model.head.weight is model.word_embed.weight
    assert isinstance(model.pre_logits, nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if n != "head.weight"
    )
    # Another embedding width: a bias-free projection hidden -> embed_dim before the tied layer.
    narrow = make(tie_weights=True, embed_dim=5)
    assert narrow.head.weight is narrow.word_embed.weight and narrow.head.weight.shape == (V, 5)
    assert isinstance(narrow.pre_logits, nn.Linear) and narrow.pre_logits.weight.shape == (5, 12)
    logits = narrow.train()(images(), words())
    assert logits.shape == (2, 6, V)
    logits.sum().backward()
    assert narrow.word_embed.weight.grad is not None and narrow.pre_logits.weight.grad is not None
    untied = make(embed_dim=5)
    assert untied.head.weight is not untied.word_embed.weight and untied.head.weight.shape == (V, 12)


def test_eval_is_deterministic_and_train_uses_dropout():
    model = make(dropout=0.5)
    x, tokens = clips(), words()
    with torch.no_grad():
        assert torch.equal(model(x, tokens), model(x, tokens))
        assert all(torch.equal(a, b) for a, b in zip(model.generate(x), model.generate(x), strict=True))
        model.train()
        assert not torch.equal(model(x, tokens), model(x, tokens))


# ----------------------------------------------------------------------------------------------
# the shared frame encoder
# ----------------------------------------------------------------------------------------------


def test_frame_encoder_code_is_shared_with_lrcn():
    for name in ("encode_frames", "_as_clip", "set_encoder_frozen", "train", "no_weight_decay"):
        assert getattr(LRCNCaptioner, name) is getattr(FrameEncoderMixin, name) is getattr(LRCN, name)


def test_frozen_encoder_gets_no_gradient_and_keeps_its_statistics():
    model = make(encoder="resnet18", freeze_encoder=True).train()
    assert model.training and not model.encoder.training
    stats = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    inputs, targets = shift_tokens(torch.cat([words(L=5), torch.full((2, 1), EOS)], dim=1))
    caption_loss(model(images(size=32), inputs), targets).backward()
    after = model.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    decoder = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    assert all(p.grad is not None for p in decoder)
    model.set_encoder_frozen(False)
    assert model.encoder.training and all(p.requires_grad for p in model.encoder.parameters())


def test_named_encoder_local_weights_and_chunks(tmp_path):
    torch.manual_seed(5)
    state = timm.create_model("resnet18").state_dict()
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = make(encoder="resnet18", pretrained_encoder=path, encoder_chunk=2)
    assert model.encoder_dim == 512
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"])
    x, tokens = clips(T=3, size=32), words()
    with torch.no_grad():
        chunked = model(x, tokens)
        model.encoder_chunk = None
        assert torch.allclose(model(x, tokens), chunked, atol=1e-5)
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"bad\.pth"):
        make(encoder="resnet18", pretrained_encoder=tmp_path / "bad.pth")


def test_timm_like_contract():
    model = make(encoder="resnet18")
    groups = group_parameters(model, model.group_matcher())
    names = [n for ids in groups.values() for n in ids]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    last = max(groups)
    assert all(not n.startswith("encoder.") for n in groups[last])
    assert all(n.startswith("encoder.") for i in groups if i != last for n in groups[i])
    assert "encoder.conv1.weight" in groups[min(groups)] and last > 2
    assert model.no_weight_decay() == set()
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing and model.grad_checkpointing
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        make().set_grad_checkpointing(True)
    built = create_captioner(tiny_encoder(), 9, hidden=8, variant="single")
    assert isinstance(built, LRCNCaptioner) and built.vocab_size == 9 and built.variant == "single"


def test_caption_loss_ignores_pad():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, V, dtype=torch.float64)
    targets = torch.tensor([[5, 6, EOS, PAD], [7, EOS, PAD, PAD]])
    keep = targets != PAD
    expected = -logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1)[keep].mean()
    assert torch.allclose(caption_loss(logits, targets), expected.float())
    assert caption_loss(logits, torch.full((2, 4), PAD)).item() == 0.0
    inputs, shifted = shift_tokens(torch.tensor([[BOS, 5, 6, EOS, PAD]]))
    assert inputs.tolist() == [[BOS, 5, 6, EOS]] and shifted.tolist() == [[5, 6, EOS, PAD]]
    with pytest.raises(ValueError, match=r"targets must be \(B, L\)"):
        caption_loss(logits, targets[:, :3])
    with pytest.raises(TypeError, match="integer ids"):
        caption_loss(logits, targets.float())


def test_the_model_learns_to_caption_two_pictures():
    """End to end: a dark picture is 'a b', a bright one 'c d d' (ids), learned in a few steps."""
    torch.manual_seed(0)
    model = make(dropout=0.0, hidden=16)
    dark, bright = torch.full((1, 3, 16, 16), -1.0), torch.full((1, 3, 16, 16), 1.0)
    x = torch.cat([dark, bright, dark, bright])
    captions = torch.tensor([[BOS, 4, 5, EOS, PAD], [BOS, 6, 7, 7, EOS]] * 2)
    inputs, targets = shift_tokens(captions)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        caption_loss(model(x, inputs), targets).backward()
        optimizer.step()
    model.eval()
    for method in ("greedy", "beam"):
        ids, _ = model.generate(torch.cat([dark, bright]), max_len=8, method=method)
        assert ids.tolist() == [[4, 5, EOS, PAD], [6, 7, 7, EOS]]


# ----------------------------------------------------------------------------------------------
# searches on hand-built toy decoders
# ----------------------------------------------------------------------------------------------

# Toy ids: PAD 0 and BOS 1 are never emitted; EOS 2; the words a = 3, b = 4 (and c = 5).
A, B_, C = 3, 4, 5


def table_decoder(table: torch.Tensor):
    """A step function from a transition table ``table[item, prev, cur] -> log-probs (V,)``: the
    next word depends on the item and the last TWO words, so a search that reorders the state
    wrongly (the previous word is kept in it) reads the wrong row. State: (item (N,), prev (N,))."""

    def step(tokens, state):
        item, prev = state
        return table[item, prev, tokens], (item, tokens)

    def initial(batch):
        return (torch.arange(batch), torch.full((batch,), BOS))

    return step, initial


def hand_table():
    """First word: a 0.6, b 0.4. After a: EOS 0.3, a 0.4, b 0.3. After b: EOS 0.9, a 0.05, b 0.05.
    Greedy takes a, then a forever; the best caption is 'b EOS'."""
    probs = torch.zeros(1, 6, 6, 6, dtype=torch.float64)
    probs[0, :, BOS, [A, B_]] = torch.tensor([0.6, 0.4], dtype=torch.float64)
    probs[0, :, A, [EOS, A, B_]] = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    probs[0, :, B_, [EOS, A, B_]] = torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64)
    # Rows after EOS or PAD are read only for finished hypotheses, whose results are discarded.
    return probs.log()


def random_tables(items, seed):
    """Random (items, prev, cur, V) tables over EOS, a, b, c (PAD and BOS impossible)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(items, 6, 6, 6, generator=g, dtype=torch.float64) * 2
    logits[..., [PAD, BOS]] = float("-inf")
    return logits.log_softmax(-1)


def brute_force(table, item, max_len, length_penalty):
    """Every caption (words then EOS) of at most max_len words: the best normalised score."""
    best, best_seq = -math.inf, None
    for n in range(max_len):
        for body in itertools.product((A, B_, C), repeat=n):
            seq = (*body, EOS)
            prev, cur, logp = BOS, BOS, 0.0
            for w in seq:
                logp += float(table[item, prev, cur, w])
                prev, cur = cur, w
            score = logp / len(seq) ** length_penalty
            if score > best:
                best, best_seq = score, seq
    return best, best_seq


def strip(ids):
    return tuple(int(i) for i in ids if i != PAD)


def test_beam_finds_the_best_caption_that_greedy_misses():
    step, initial = table_decoder(hand_table())
    ids, score = greedy_search(step, initial(1), 1, BOS, EOS, max_len=5)
    assert ids.tolist() == [[A, A, A, A, A]]  # no EOS within max_len
    assert math.isclose(float(score), math.log(0.6) + 4 * math.log(0.4), rel_tol=1e-12)
    for beam_size in (2, 5, 40):
        ids, score = beam_search(step, initial(1), 1, BOS, EOS, beam_size=beam_size, max_len=5)
        assert ids.tolist() == [[B_, EOS]]
        assert math.isclose(float(score), (math.log(0.4) + math.log(0.9)) / 2, rel_tol=1e-12)
    best, seq = brute_force(hand_table(), 0, 5, 1.0)
    assert seq == (B_, EOS) and math.isclose(best, float(score))


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_is_the_exhaustive_search(seed, length_penalty):
    max_len, items = 4, 3
    table = random_tables(items, seed)
    step, initial = table_decoder(table)
    # A beam of 64 holds every prefix: 1 + 3 + 9 + 27 = 40 hypotheses at most.
    ids, scores = beam_search(
        step, initial(items), items, BOS, EOS, beam_size=64, max_len=max_len, length_penalty=length_penalty
    )
    for item in range(items):
        best, seq = brute_force(table, item, max_len, length_penalty)
        assert strip(ids[item]) == seq
        assert math.isclose(float(scores[item]), best, rel_tol=1e-12)


def reference_beam(table, item, beam_size, max_len, length_penalty):
    """The documented rule, one item, in plain Python: keep the best ``capacity`` extensions
    (capacity = beam_size - finished so far); EOS extensions finish and leave the beam."""
    live, finished, capacity = [((), 0.0)], [], beam_size
    for _ in range(max_len):
        candidates = []
        for seq, logp in live:
            prev, cur = (BOS, BOS, *seq)[-2:]
            for w in range(table.shape[-1]):
                if math.isfinite(float(table[item, prev, cur, w])):
                    candidates.append((logp + float(table[item, prev, cur, w]), (*seq, w)))
        candidates.sort(key=lambda c: -c[0])
        live, kept = [], candidates[:capacity]
        for logp, seq in kept:
            if seq[-1] == EOS:
                finished.append((logp / len(seq) ** length_penalty, seq))
                capacity -= 1
            else:
                live.append((seq, logp))
        if not live:
            break
    if finished:
        return max(finished, key=lambda f: f[0])
    logp, seq = max((logp, seq) for seq, logp in live)
    return logp / max_len**length_penalty, seq


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_beam_search_follows_the_documented_rule(beam_size, length_penalty):
    items, max_len = 6, 5
    table = random_tables(items, seed=10 + beam_size)
    step, initial = table_decoder(table)
    ids, scores = beam_search(
        step,
        initial(items),
        items,
        BOS,
        EOS,
        beam_size=beam_size,
        max_len=max_len,
        length_penalty=length_penalty,
    )
    for item in range(items):
        score, seq = reference_beam(table, item, beam_size, max_len, length_penalty)
        assert strip(ids[item]) == seq
        assert math.isclose(float(scores[item]), score, rel_tol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_beam_equals_beam_per_item(seed):
    items, max_len = 4, 6
    table = random_tables(items, seed)
    step, _ = table_decoder(table)
    state = (torch.arange(items), torch.full((items,), BOS))
    ids, scores = beam_search(step, state, items, BOS, EOS, beam_size=3, max_len=max_len)
    for i in range(items):
        one = (torch.tensor([i]), torch.tensor([BOS]))
        ids_i, score_i = beam_search(step, one, 1, BOS, EOS, beam_size=3, max_len=max_len)
        assert strip(ids[i]) == strip(ids_i[0]) and torch.equal(scores[i], score_i[0])
        assert torch.all(ids[i, ids_i.shape[1] :] == PAD)


def test_searches_stop_as_soon_as_every_caption_ended():
    """After the first word only EOS is possible: two steps, whatever max_len or beam."""
    calls = []
    logp = torch.full((6,), float("-inf"))
    logp[A], logp[B_], logp[C] = math.log(0.5), math.log(0.3), math.log(0.2)
    only_eos = torch.full((6,), float("-inf"))
    only_eos[EOS] = 0.0

    def step(tokens, state):
        calls.append(len(tokens))
        rows = torch.where((tokens == BOS)[:, None], logp, only_eos)
        return rows, state + 1

    start = torch.zeros(3)
    for search, kwargs in (
        (greedy_search, {}),
        (sample_search, {"generator": torch.Generator().manual_seed(0)}),
        (beam_search, {"beam_size": 4}),
    ):
        calls.clear()
        ids, _ = search(step, start, 3, BOS, EOS, max_len=10, **kwargs)
        assert len(calls) == 2 and ids.shape == (3, 2) and torch.all(ids[:, 1] == EOS)


def test_padding_after_eos_in_greedy():
    probs = torch.zeros(2, 6, 6, 6)
    probs[:, :, :, A] = 1.0
    probs[0, :, A, :] = 0
    probs[0, :, A, EOS] = 1.0  # item 0: a EOS; item 1: a a a ...
    step, initial = table_decoder(probs.log())
    ids, scores = greedy_search(step, initial(2), 2, BOS, EOS, max_len=4)
    assert ids.tolist() == [[A, EOS, PAD, PAD], [A, A, A, A]]
    assert scores.tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# generation with the model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("video_features", VIDEO_FEATURES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decoding_matches_teacher_forcing(variant, video_features):
    """A generated caption's score is the teacher-forced log-likelihood of its words: the carried
    LSTM state and the per-step frame rule agree with one full pass."""
    model = make(variant=variant, video_features=video_features, lively=True).double()
    x = clips(B=4, T=3, dtype=torch.float64)
    for method in ("greedy", "sample"):
        ids, scores = model.generate(x, max_len=8, method=method, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.allclose(teacher_forced_logp(model, x, ids), scores, rtol=1e-10, atol=1e-10)
    ids, scores = model.generate(x, max_len=8, method="beam", beam_size=3, length_penalty=0.0)
    with torch.no_grad():
        assert torch.allclose(teacher_forced_logp(model, x, ids), scores, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("video_features", VIDEO_FEATURES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_of_one_is_greedy(variant, video_features):
    model = make(variant=variant, video_features=video_features, lively=True, seed=7)
    x = clips(B=8, T=2)
    ids, scores = model.generate(x, max_len=10)
    beam_ids, beam_scores = model.generate(x, max_len=10, method="beam", beam_size=1, length_penalty=0.0)
    assert torch.equal(beam_ids, ids) and torch.equal(beam_scores, scores)
    beam_ids, beam_scores = model.generate(x, max_len=10, method="beam", beam_size=1, length_penalty=1.0)
    lengths = (ids != PAD).sum(dim=1).float()
    assert torch.equal(beam_ids, ids) and torch.equal(beam_scores, scores / lengths)


def test_batched_model_beam_equals_beam_per_item():
    model = make(lively=True, seed=3)
    x = images(B=4)
    ids, scores = model.generate(x, max_len=8, method="beam", beam_size=4)
    for i in range(4):
        ids_i, score_i = model.generate(x[i : i + 1], max_len=8, method="beam", beam_size=4)
        assert strip(ids[i]) == strip(ids_i[0])
        assert torch.allclose(scores[i], score_i[0], atol=1e-6)


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_max_len_is_respected(method):
    model = make(lively=True)
    with torch.no_grad():
        model.head.bias[EOS] = -1e4  # never ends
    for max_len in (1, 3, 7):
        ids, _ = model.generate(clips(), max_len=max_len, method=method)
        assert ids.shape == (2, max_len) and not (ids == EOS).any()
    with torch.no_grad():
        model.head.bias[EOS] = 1e4  # ends at once
    ids, scores = model.generate(clips(), max_len=7, method=method)
    assert ids.tolist() == [[EOS], [EOS]] and torch.allclose(scores, torch.zeros(2), atol=1e-5)


def test_generated_captions_never_hold_pad_or_bos():
    model = make(lively=True)
    with torch.no_grad():
        model.head.bias[[PAD, BOS]] = 1e4  # would be chosen if they were allowed
    for method in DECODE_METHODS:
        ids, _ = model.generate(images(B=3), max_len=6, method=method)
        for row in ids.tolist():
            body = row[: row.index(EOS)] if EOS in row else row
            assert PAD not in body and BOS not in body


def test_sampling_is_reproducible_and_cold_sampling_is_greedy():
    model = make(lively=True)
    x = images(B=6)

    def sample(seed, **kwargs):
        return model.generate(
            x, max_len=8, method="sample", generator=torch.Generator().manual_seed(seed), **kwargs
        )

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    greedy = model.generate(x, max_len=8)
    assert torch.equal(sample(2, temperature=1e-4)[0], greedy[0])
    assert torch.equal(sample(3, top_k=1)[0], greedy[0])
    assert torch.allclose(sample(4, top_k=1)[1], greedy[1])  # scores: the model's log-probs


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors():
    model = make()
    tokens = words()
    with pytest.raises(TypeError, match=r"visual must be a torch\.Tensor"):
        model([1], tokens)
    with pytest.raises(ValueError, match=r"visual must be a clip batch \(B, T, C, H, W\).*\(2, 3, 16\)"):
        model(torch.randn(2, 3, 16), tokens)
    with pytest.raises(ValueError, match=r"visual must have 3 channels.*got 1"):
        model(torch.randn(2, 1, 16, 16), tokens)
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor.*float32"):
        model(images(), tokens.float())
    with pytest.raises(ValueError, match=r"tokens must be \(B, L\).*\(2,\)"):
        model(images(), tokens[:, 0])
    with pytest.raises(ValueError, match="batch B=2, got 3"):
        model(images(), words(B=3))
    with pytest.raises(ValueError, match=r"word ids in \[0, vocab_size=13\), got values in \[1, 13\]"):
        model(images(), torch.cat([tokens, torch.full((2, 1), V)], dim=1))
    with pytest.raises(ValueError, match="method must be one of"):
        model.generate(images(), method="nucleus")
    with pytest.raises(ValueError, match="beam_size must be a positive int, got 0"):
        model.generate(images(), method="beam", beam_size=0)
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        model.generate(images(), max_len=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        model.generate(images(), method="sample", temperature=0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        model.generate(images(), method="sample", top_k=0)
    with pytest.raises(ValueError, match=r"step_fn must return log-probs \(N, V\) with N = 2"):
        greedy_search(lambda t, s: (torch.zeros(3, 5), s), torch.zeros(2), 2, BOS, EOS)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(vocab_size=4), ValueError, r"vocab_size must be an int >= 5 .*got 4"),
        (dict(variant="lrcn3f"), ValueError, "variant must be one of"),
        (dict(video_features="max"), ValueError, "video_features must be one of"),
        (dict(hidden=0), ValueError, "hidden must be a positive int"),
        (dict(embed_dim=0), ValueError, "embed_dim must be a positive int"),
        (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
        (dict(eos_id=1), ValueError, "distinct"),
        (dict(pad_id=V), ValueError, r"pad_id must be an int in \[0, vocab_size=13\)"),
        (dict(encoder_chunk=0), ValueError, "encoder_chunk must be a positive int"),
        (dict(pretrained_encoder=1.0), TypeError, "pretrained_encoder must be a bool or a path"),
        (dict(img_size=32), TypeError, "nothing to pass"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        LRCNCaptioner(tiny_encoder(), **{"vocab_size": V, "hidden": 8, **kwargs})
