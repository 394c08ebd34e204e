"""LRCN captioning (Donahue et al., CVPR 2015, section 5): a frame encoder and an LSTM language model.

The visual input is an image (B, C, H, W) or a clip (B, T, C, H, W) (time before channels, as for
the LRCN classifier). Every frame is encoded on its own by the shared frame encoder
(``layers/frame_encoder.py``: a pooled timm backbone or any module), projected to the LSTM width,
and given to the language model at every decoding step:

    visual -> frames (B*T, C, H, W) -> encoder -> (B, T, D) -> Linear D -> hidden -> (B, T, hidden)
      -> 'mean': mean over T -> (B, 1, hidden), the same feature at every step
         'per_step': step t reads frame min(t, T-1)
    words (B, L) -> embedding (B, L, embed_dim) -> dropout -> LSTM stack (below) -> dropout
      -> [Linear hidden -> embed_dim, only for tied weights of another width] -> Linear -> (B, L, vocab)

The three LSTM stacks of the paper (1000 units each there; ``hidden`` here):

* ``single`` (LRCN1u): one layer; its input at every step is [word embedding ; visual feature].
* ``unfactored`` (LRCN2u): two layers; layer 1 reads [word embedding ; visual feature], layer 2
  reads layer 1's output.
* ``factored`` (LRCN2f, the paper's best): two layers; layer 1 reads ONLY the words (a pure language
  model), layer 2 reads [layer 1's output ; visual feature]. Dropout is applied to layer 1's
  output before the concatenation, and between the layers of ``unfactored``.

The paper's visual feature is one CNN feature per image; for video the paper's own video
description model is different (CRF over SVO tuples). ``video_features='mean'`` averages the
projected frame features (an image is a one-frame clip, so images and clips share the path);
``'per_step'`` gives decoding step t (the step that reads the t-th input word, BOS being t = 0)
the feature of frame ``min(t, T - 1)``: the first words see the first frames and the caption's
tail keeps seeing the last frame. The rule is the same in teacher forcing and in generation, so a
generated caption's score equals the teacher-forced log-likelihood of its words.

Training: ``forward(visual, tokens)`` with tokens[:, :-1] of ``[BOS, w..., EOS, PAD...]`` as input
and tokens[:, 1:] as targets (:func:`shift_tokens`), loss :func:`caption_loss` (cross-entropy over
the non-PAD targets). The paper found sampling beat beam search on CIDEr-D for its models; all
three decoders are here (``generate(method=...)``): greedy, beam search and sampling, each
decoding incrementally (the LSTM state is carried, the prefix never re-run).

Beam search (:func:`beam_search`) works on any step function; the rules, in short: a beam of
``beam_size`` hypotheses ranked by their summed log-probabilities; a hypothesis that emits EOS
leaves the beam and the beam shrinks by one (so ``beam_size=1`` is exactly greedy decoding); the
search stops when no hypothesis of any item is live (or at ``max_len``); each item returns its
finished hypothesis with the best length-normalised score ``logp / len ** length_penalty`` (``len``
counting EOS), or, when none finished within ``max_len``, its best live one (``len = max_len``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Literal, TypeAlias, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqvision.utils.checks import check_positive_int

from .base import init_linear
from .layers.frame_encoder import FrameEncoderMixin

__all__ = [
    "DECODE_METHODS",
    "VARIANTS",
    "VIDEO_FEATURES",
    "LRCNCaptioner",
    "beam_search",
    "caption_loss",
    "create_captioner",
    "greedy_search",
    "sample_search",
    "shift_tokens",
]

VARIANTS = ("factored", "unfactored", "single")
VIDEO_FEATURES = ("mean", "per_step")
DECODE_METHODS = ("greedy", "beam", "sample")
# Four specials (pad, bos, eos, unk) and at least one word.
_MIN_VOCAB = 5

# A decoder state: a tensor, or a (nested) tuple/list of tensors, every tensor with the batch of
# hypotheses N on dim 0, so that searches can repeat and reorder it with index_select(0, ...).
DecodeState: TypeAlias = Union[torch.Tensor, tuple["DecodeState", ...], list["DecodeState"]]  # noqa: UP007
StepFn: TypeAlias = Callable[[torch.Tensor, DecodeState], tuple[torch.Tensor, DecodeState]]


# ----------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------


def shift_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption ids (B, L + 1) ``[BOS, w..., EOS, PAD...]`` -> (inputs (B, L), targets (B, L)).

    inputs = tokens[:, :-1] (starting with BOS), targets = tokens[:, 1:] (ending with EOS or PAD).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a (B, L + 1) tensor with L + 1 >= 2, got {got}")
    return tokens[:, :-1], tokens[:, 1:]


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, L, V) against ``targets`` (B, L), mean over the non-PAD targets.

    Every real token weighs the same whatever its caption's length (the paper's per-word loss). A
    batch without any non-PAD target gives 0 (not NaN), without a host sync.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be (B, L, V), got {got}")
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:2]:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be (B, L) = {tuple(logits.shape[:2])} like logits, got {got}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer ids, got dtype {targets.dtype}")
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=pad_id, reduction="sum"
    )
    count = (targets != pad_id).sum().clamp(min=1)
    return total / count


# ----------------------------------------------------------------------------------------------
# decoding, generic over a step function
# ----------------------------------------------------------------------------------------------


def _map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: DecodeState) -> DecodeState:
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return type(state)(_map_state(fn, s) for s in state)
    raise TypeError(f"a decoder state must be a tensor or a tuple/list of them, got {type(state).__name__}")


def _state_device(state: DecodeState) -> torch.device:
    """The device of the state's first tensor (the CPU for a state without tensors)."""
    stack = [state]
    while stack:
        part = stack.pop(0)
        if isinstance(part, torch.Tensor):
            return part.device
        if isinstance(part, (tuple, list)):
            stack[:0] = list(part)
    return torch.device("cpu")


def _check_search_args(batch_size: int, bos_id: int, eos_id: int, pad_id: int, max_len: int) -> None:
    check_positive_int("batch_size", batch_size)
    check_positive_int("max_len", max_len)
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _step(step_fn: StepFn, tokens: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
    log_probs, state = step_fn(tokens, state)
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 2 or log_probs.shape[0] != len(tokens):
        got = tuple(log_probs.shape) if isinstance(log_probs, torch.Tensor) else type(log_probs).__name__
        raise ValueError(f"step_fn must return log-probs (N, V) with N = {len(tokens)}, got {got}")
    return log_probs, state


def _sequential_search(
    step_fn: StepFn,
    state: DecodeState,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hypothesis per item, the next word chosen by ``pick(log_probs (B, V)) -> (B,)``."""
    tokens = torch.full((batch_size,), bos_id, dtype=torch.long, device=_state_device(state))
    done = torch.zeros(batch_size, dtype=torch.bool, device=tokens.device)
    scores: torch.Tensor | None = None
    out = []
    for _ in range(max_len):
        log_probs, state = _step(step_fn, tokens, state)
        token = pick(log_probs)
        token_logp = log_probs.gather(1, token[:, None]).squeeze(1)
        # Finished sequences keep their score and get PAD (their step results are thrown away).
        token_logp = torch.where(done, torch.zeros_like(token_logp), token_logp)
        scores = token_logp if scores is None else scores + token_logp
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out.append(token)
        done = done | (token == eos_id)
        tokens = token
        if bool(done.all()):
            break
    assert scores is not None  # max_len >= 1
    return torch.stack(out, dim=1), scores


def greedy_search(
    step_fn: StepFn,
    initial_state: DecodeState,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    max_len: int = 20,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable word at every step, until EOS or ``max_len`` words (EOS counted).

    Args:
        step_fn: ``step_fn(tokens (N,), state) -> (log_probs (N, V), new_state)``: one decoding
            step from the previous words (BOS first); ``state`` as :func:`beam_search` describes.
        initial_state: the state before the first step, batch ``batch_size`` on dim 0.
    Returns:
        ids (B, W) int64, W <= max_len, without BOS, PAD after EOS (and after the last word of a
        sequence shorter than W); scores (B,) the summed log-probs of the words, EOS included.
    The search stops as soon as every sequence has emitted EOS.
    """
    _check_search_args(batch_size, bos_id, eos_id, pad_id, max_len)
    return _sequential_search(
        step_fn, initial_state, batch_size, bos_id, eos_id, pad_id, max_len, lambda lp: lp.argmax(dim=-1)
    )


def sample_search(
    step_fn: StepFn,
    initial_state: DecodeState,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    max_len: int = 20,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sampling from softmax(log_probs / temperature), optionally among the ``top_k`` words.

    Same step function, stopping rule and output as :func:`greedy_search`. ``generator`` (on the
    log-probs' device) makes the draws reproducible. The scores are the log-probs of the drawn words
    under the model (temperature 1, no top-k), so samples can be re-ranked by likelihood.
    Temperature -> 0 approaches greedy decoding.
    """
    _check_search_args(batch_size, bos_id, eos_id, pad_id, max_len)
    _check_temperature(temperature)
    if top_k is not None:
        check_positive_int("top_k", top_k)

    def pick(log_probs: torch.Tensor) -> torch.Tensor:
        # Softmax of log-probs / T equals softmax of logits / T: log-probs are logits shifted per row.
        # float32 at least, so that a tiny temperature does not overflow a 16-bit division.
        scaled = log_probs.float() / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _sequential_search(step_fn, initial_state, batch_size, bos_id, eos_id, pad_id, max_len, pick)


def beam_search(
    step_fn: StepFn,
    initial_state: DecodeState,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    beam_size: int = 5,
    max_len: int = 20,
    length_penalty: float = 1.0,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over a step function, batched over (batch x beam) hypotheses.

    Args:
        step_fn: ``step_fn(tokens (N,), state) -> (log_probs (N, V), new_state)``: one decoding step
            for N hypotheses from their previous word (BOS at the first step). ``log_probs`` are
            normalised log-probabilities (``-inf`` allowed for words that must not be emitted).
        initial_state: the decoder state for the ``batch_size`` items: a tensor or a (nested)
            tuple/list of tensors, each with the items on DIM 0 (an LSTM's (layers, N, H) state
            must be stored transposed, e.g. as (N, H) per layer). It is repeated ``beam_size``
            times per item (``repeat_interleave`` on dim 0: hypothesis ``n = b * beam_size + k``)
            and reordered with ``index_select(0, ...)`` when hypotheses are re-ranked.
        batch_size: B, the number of items.
        bos_id, eos_id: the first input word; the word that finishes a hypothesis.
        beam_size: hypotheses per item.
        max_len: the most words a hypothesis emits, EOS included.
        length_penalty: a finished hypothesis scores ``logp / len ** length_penalty``, ``len`` its
            word count with EOS; 0 ranks by the summed log-probability (favouring short captions),
            1 by the mean per word.
        pad_id: fills the ids after EOS.

    Returns:
        ids (B, W) int64 with W <= max_len: each item's best hypothesis without BOS, PAD after EOS;
        scores (B,): its length-normalised score.

    The search: the live hypotheses of an item are ranked by their summed log-probabilities; at a
    step every live one is extended by every word and the best ``capacity`` extensions (finite
    ones) are kept, where ``capacity = beam_size - (hypotheses this item has finished)``. An
    extension ending in EOS is finished: it leaves the beam (the beam shrinks) and competes, by its
    normalised score, for the item's best finished hypothesis. The search stops when no item has a
    live hypothesis left, or after ``max_len`` steps. Each item returns its best finished
    hypothesis; an item that finished none returns its best live one (truncated at ``max_len``,
    ``len = max_len``). With ``beam_size=1`` this is exactly greedy decoding (same ids, and the
    greedy sum of log-probs normalised the same way); a beam that never has to drop an extension
    (``beam_size`` at least the finished plus the live hypotheses at every step) is the exhaustive
    search over sequences of at most ``max_len`` words. There is no bound-based early stop ("no live
    hypothesis can beat the best finished one"): with ``length_penalty > 0`` a live hypothesis's
    normalised score can still rise as it grows, so an item stops only when its beam is empty.
    """
    _check_search_args(batch_size, bos_id, eos_id, pad_id, max_len)
    check_positive_int("beam_size", beam_size)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty must be a number, got {type(length_penalty).__name__}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    B, K = batch_size, beam_size
    state = _map_state(lambda t: t.repeat_interleave(K, dim=0), initial_state)
    device = _state_device(state)
    tokens = torch.full((B * K,), bos_id, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    ranks = torch.arange(K, device=device)
    capacity = torch.full((B,), K, dtype=torch.long, device=device)
    history = torch.zeros(B, K, 0, dtype=torch.long, device=device)  # words of the live hypotheses
    best_ids = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)
    best_len = torch.zeros(B, dtype=torch.long, device=device)
    live: torch.Tensor | None = None  # (B, K) summed log-probs; -inf marks an empty slot
    best_score: torch.Tensor | None = None  # (B,) best finished normalised score, -inf: none yet
    for step in range(max_len):
        log_probs, state = _step(step_fn, tokens, state)
        V = log_probs.shape[1]
        if live is None:
            # One live hypothesis (BOS) per item at first: the other slots would be duplicates.
            live = torch.full((B, K), float("-inf"), dtype=log_probs.dtype, device=device)
            live[:, 0] = 0
            best_score = torch.full((B,), float("-inf"), dtype=log_probs.dtype, device=device)
        assert best_score is not None
        candidates = (live.unsqueeze(-1) + log_probs.view(B, K, V)).view(B, K * V)
        top, index = candidates.topk(K, dim=1)  # (B, K), best first
        parent, word = index // V, index % V
        kept = (ranks < capacity[:, None]) & torch.isfinite(top)
        ended = kept & (word == eos_id)
        going = kept & ~ended
        history = torch.cat(
            [history.gather(1, parent.unsqueeze(-1).expand(-1, -1, step)), word.unsqueeze(-1)], dim=-1
        )
        length = step + 1
        # The item's best finished hypothesis: strictly better replaces (earlier wins a tie).
        normed = top / float(length) ** length_penalty
        normed = torch.where(ended, normed, torch.full_like(normed, float("-inf")))
        step_best, which = normed.max(dim=1)
        better = step_best > best_score
        best_score = torch.where(better, step_best, best_score)
        # Earlier finished hypotheses are shorter, so the columns after `length` are still PAD.
        best_ids[:, :length] = torch.where(better[:, None], history[rows, which], best_ids[:, :length])
        best_len = torch.where(better, torch.full_like(best_len, length), best_len)
        capacity = capacity - ended.sum(dim=1)
        live = torch.where(going, top, torch.full_like(top, float("-inf")))
        # Empty slots are still computed (the batch stays rectangular); their results stay -inf.
        order = (rows[:, None] * K + parent).flatten()
        state = _map_state(lambda t, order=order: t.index_select(0, order), state)
        tokens = word.flatten()
        if not bool(going.any()):
            break
    assert live is not None and best_score is not None
    # Items that finished nothing within max_len: their best live (truncated) hypothesis.
    none = torch.isinf(best_score) & (best_score < 0)
    if bool(none.any()):
        top_live, which = live.max(dim=1)
        none = none & torch.isfinite(top_live)  # nothing finite at all (a step_fn of -inf): PAD, -inf
        length = history.shape[-1]
        live_ids = history[rows, which]
        best_ids[:, :length] = torch.where(none[:, None], live_ids, best_ids[:, :length])
        best_len = torch.where(none, torch.full_like(best_len, length), best_len)
        best_score = torch.where(none, top_live / float(length) ** length_penalty, best_score)
    width = int(best_len.max())
    return best_ids[:, : max(width, 1)], best_score


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


class LRCNCaptioner(FrameEncoderMixin, nn.Module):
    """LRCN captioner: a frame encoder, a projected visual feature and a 1- or 2-layer LSTM decoder.

    ``forward(visual, tokens)`` -> logits (B, L, vocab_size) by teacher forcing;
    ``generate(visual, ...)`` -> (ids, scores) by greedy, beam or sampled decoding.

    Args:
        encoder: a timm model name (created with ``num_classes=0`` and ``in_chans``) or an
            ``nn.Module`` mapping frames (N, C, H, W) to pooled features (N, D).
        vocab_size: words, the specials included (``len(Vocabulary)``); at least 5.
        hidden: width of every LSTM layer and of the projected visual feature (the paper: 1000).
        variant: 'factored' (LRCN2f), 'unfactored' (LRCN2u) or 'single' (LRCN1u); see the module
            docstring.
        embed_dim: word-embedding width (None: ``hidden``).
        dropout: on the word embeddings, between the LSTM layers and on the last LSTM output.
        pretrained_encoder: False, True (timm's weights for the named encoder) or the path of a local
            weight file of the encoder.
        encoder_kwargs: more arguments for ``timm.create_model`` of a named encoder. Keyword
            arguments the captioner does not know are added to them.
        encoder_chunk: encode at most this many frames per encoder call (None: all at once).
        freeze_encoder: no gradients for the encoder, and the encoder always in eval mode.
        video_features: 'mean' (one visual feature, the mean over frames) or 'per_step' (decoding
            step t sees frame min(t, T - 1)).
        tie_weights: the output layer shares the word-embedding matrix (vocab_size, embed_dim). When
            ``embed_dim != hidden`` a bias-free Linear hidden -> embed_dim (``pre_logits``) is put
            before it, so any widths can be tied.
        in_chans: input channels per frame.
        pad_id, bos_id, eos_id: the special word ids (the vocabulary's); distinct, < vocab_size.
    """

    def __init__(
        self,
        encoder: str | nn.Module = "resnet18",
        vocab_size: int = 10000,
        hidden: int = 1000,
        variant: Literal["factored", "unfactored", "single"] = "factored",
        embed_dim: int | None = None,
        dropout: float = 0.5,
        pretrained_encoder: bool | str | os.PathLike = False,
        encoder_kwargs: dict | None = None,
        encoder_chunk: int | None = None,
        freeze_encoder: bool = False,
        video_features: Literal["mean", "per_step"] = "mean",
        tie_weights: bool = False,
        in_chans: int = 3,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        **kwargs,
    ) -> None:
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
            raise ValueError(
                f"vocab_size must be an int >= {_MIN_VOCAB} (4 special tokens and a word), got {vocab_size!r}"
            )
        check_positive_int("hidden", hidden)
        embed_dim = hidden if embed_dim is None else embed_dim
        check_positive_int("embed_dim", embed_dim)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if video_features not in VIDEO_FEATURES:
            raise ValueError(f"video_features must be one of {VIDEO_FEATURES}, got {video_features!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        specials = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id}
        for name, value in specials.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(f"{name} must be an int in [0, vocab_size={vocab_size}), got {value!r}")
        if len(set(specials.values())) != 3:
            raise ValueError(f"pad_id, bos_id and eos_id must be distinct, got {specials}")

        self._init_frame_encoder(
            encoder,
            pretrained_encoder=pretrained_encoder,
            encoder_kwargs=encoder_kwargs,
            extra_kwargs=kwargs,
            in_chans=in_chans,
            encoder_chunk=encoder_chunk,
        )
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.embed_dim = embed_dim
        self.variant = variant
        self.video_features = video_features
        self.tie_weights = bool(tie_weights)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

        self.visual_proj = nn.Linear(self.encoder_dim, hidden)
        self.word_embed = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        if variant == "factored":
            self.lstm1 = nn.LSTM(embed_dim, hidden, batch_first=True)
            self.lstm2: nn.LSTM | None = nn.LSTM(2 * hidden, hidden, batch_first=True)
        else:
            self.lstm1 = nn.LSTM(embed_dim + hidden, hidden, batch_first=True)
            self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True) if variant == "unfactored" else None
        # Tying needs the output layer's input to be embed_dim wide: project when hidden differs.
        tied_width = self.tie_weights and embed_dim != hidden
        self.pre_logits = nn.Linear(hidden, embed_dim, bias=False) if tied_width else nn.Identity()
        self.head = nn.Linear(embed_dim if self.tie_weights else hidden, vocab_size)

        # Embeddings uniform +-0.1 (the classic LSTM language-model initialisation, and the tied
        # output layer's); Linear layers timm's ViT initialisation; the LSTMs PyTorch's.
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)
        for module in (self.visual_proj, self.pre_logits, self.head):
            module.apply(init_linear)
        if self.tie_weights:
            self.head.weight = self.word_embed.weight
        self.set_encoder_frozen(freeze_encoder)

    # ------------------------------------------------------------------------------------------
    # timm-like contract (set_grad_checkpointing, no_weight_decay, set_encoder_frozen: the mixin)
    # ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """Layer groups: the encoder's own groups in order, then the whole decoder as one group.

        A callable (name -> group ordinal) for timm's ``group_parameters`` / ``group_modules``.
        """
        return self._group_matcher_after_encoder(coarse)

    # ------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------

    def _check_tokens(self, tokens: object, batch: int) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor of word ids, got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be (B, L) word ids with L >= 1, got shape {tuple(tokens.shape)}")
        if tokens.shape[0] != batch:
            raise ValueError(f"tokens must have the visual input's batch B={batch}, got {tokens.shape[0]}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"tokens must be word ids in [0, vocab_size={self.vocab_size}), got values in [{low}, {high}]"
            )
        return tokens.long()

    def encode_visual(self, visual: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) or clip (B, T, C, H, W) -> projected visual features (B, T', hidden).

        T' = 1 for ``video_features='mean'`` (the mean over frames), T' = T for 'per_step'.
        """
        x = self._as_clip(visual, "visual")
        feats = self.visual_proj(self.encode_clip(x))
        return feats.mean(dim=1, keepdim=True) if self.video_features == "mean" else feats

    @staticmethod
    def _visual_at(visual: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Projected features (B, T', H) at decoding steps (L,) -> (B, L, H): frame min(t, T' - 1)."""
        return visual[:, steps.clamp(max=visual.shape[1] - 1)]

    # ------------------------------------------------------------------------------------------
    # the decoder
    # ------------------------------------------------------------------------------------------

    def _decode(
        self,
        words: torch.Tensor,
        visual: torch.Tensor,
        states: list[tuple[torch.Tensor, torch.Tensor] | None],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Embedded words (B, L, E) and visual features (B, L, H) -> last-layer outputs (B, L, H).

        ``states``: per LSTM layer None (zeros) or nn.LSTM's (h, c), each (1, B, H); the new ones
        are returned, so decoding can go on one step at a time from where it stopped.
        """
        words = self.drop(words)
        if self.variant == "factored":
            # Layer 1 is a language model over the words only; the image enters at layer 2.
            h1, s1 = self.lstm1(words, states[0])
            out, s2 = self.lstm2(torch.cat([self.drop(h1), visual], dim=-1), states[1])
            new = [s1, s2]
        else:
            out, s1 = self.lstm1(torch.cat([words, visual], dim=-1), states[0])
            new = [s1]
            if self.lstm2 is not None:
                out, s2 = self.lstm2(self.drop(out), states[1])
                new.append(s2)
        return self.drop(out), new

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(out))

    def forward(self, visual: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: visual (B, C, H, W) or (B, T, C, H, W), input words (B, L) starting with
        BOS -> next-word logits (B, L, vocab_size). Step t depends on the words 0..t only."""
        # Both inputs are checked before the encoder runs.
        tokens = self._check_tokens(tokens, self._as_clip(visual, "visual").shape[0])
        visual = self.encode_visual(visual)
        L = tokens.shape[1]
        steps = self._visual_at(visual, torch.arange(L, device=tokens.device))
        out, _ = self._decode(self.word_embed(tokens), steps, [None, None])
        return self._logits(out)

    # ------------------------------------------------------------------------------------------
    # incremental decoding
    # ------------------------------------------------------------------------------------------

    def init_decode_state(self, visual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The decoder state before the first word, for :meth:`decode_step` and the searches.

        A flat tuple, every tensor with the batch on dim 0 (what :func:`beam_search` reorders):
        ``(visual (B, T', hidden), step (B,) int64, h1, c1[, h2, c2])``, h/c (B, hidden) per LSTM
        layer (nn.LSTM's (1, B, H) transposed), zeros as in the paper.
        """
        visual = self.encode_visual(visual)
        B = visual.shape[0]
        zeros = visual.new_zeros(B, self.hidden)
        layers = 1 if self.lstm2 is None else 2
        step = torch.zeros(B, dtype=torch.long, device=visual.device)
        return (visual, step, *([zeros, zeros] * layers))

    def decode_step(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One word per hypothesis: tokens (N,), state -> (log-probs (N, vocab_size), next state).

        The log-probs are ``log_softmax`` of the logits with PAD and BOS set to -inf: a generated
        caption never contains them (PAD marks the end, BOS the start). Training never targets BOS
        and ignores PAD, so the other words' probabilities are the trained model's, renormalised.
        """
        visual, step, *hc = state
        N = tokens.shape[0]
        v = visual[torch.arange(N, device=visual.device), step.clamp(max=visual.shape[1] - 1)]
        # nn.LSTM's (1, N, H) per layer, from the (N, H) that the searches reorder.
        pairs = zip(hc[::2], hc[1::2], strict=True)
        states = [(h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()) for h, c in pairs]
        out, new = self._decode(self.word_embed(tokens).unsqueeze(1), v.unsqueeze(1), states)
        log_probs = self.generation_log_probs(self._logits(out[:, 0]))
        flat = [t.squeeze(0) for s in new for t in s]
        return log_probs, (visual, step + 1, *flat)

    def generation_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) -> log-probs over the words a caption may contain (PAD and BOS -inf)."""
        # float32 at least: 16-bit log-probs summed over a caption would lose the ranking.
        logits = logits if logits.dtype == torch.float64 else logits.float()
        banned = torch.tensor([self.pad_id, self.bos_id], device=logits.device)
        return logits.index_fill(-1, banned, float("-inf")).log_softmax(dim=-1)

    @torch.no_grad()
    def generate(
        self,
        visual: torch.Tensor,
        max_len: int = 20,
        method: Literal["greedy", "beam", "sample"] = "greedy",
        beam_size: int = 5,
        length_penalty: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions for images (B, C, H, W) or clips (B, T, C, H, W), without gradients.

        Call ``eval()`` first: in train mode dropout is active during generation too.

        Args:
            max_len: the most words per caption, EOS included.
            method: 'greedy' (argmax), 'beam' (:func:`beam_search`) or 'sample' (:func:`sample_search`).
            beam_size, length_penalty: for 'beam'.
            temperature, top_k, generator: for 'sample'.
        Returns:
            ids (B, W) int64, W <= max_len, without BOS, PAD after EOS; scores (B,) float32 (float64
            for a float64 model): the summed log-probs of the words, EOS included, under
            :meth:`decode_step`'s distribution for 'greedy' and 'sample'; the length-normalised
            score ``logp / len ** length_penalty`` for 'beam'.
        """
        if method not in DECODE_METHODS:
            raise ValueError(f"method must be one of {DECODE_METHODS}, got {method!r}")
        check_positive_int("max_len", max_len)
        check_positive_int("beam_size", beam_size)
        _check_temperature(temperature)
        if top_k is not None:
            check_positive_int("top_k", top_k)
        state = self.init_decode_state(visual)
        B = state[0].shape[0]
        ids = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
        if method == "beam":
            return beam_search(
                self.decode_step,
                state,
                B,
                beam_size=beam_size,
                max_len=max_len,
                length_penalty=length_penalty,
                **ids,
            )
        if method == "sample":
            return sample_search(
                self.decode_step,
                state,
                B,
                max_len=max_len,
                temperature=temperature,
                top_k=top_k,
                generator=generator,
                **ids,
            )
        return greedy_search(self.decode_step, state, B, max_len=max_len, **ids)


def create_captioner(encoder: str | nn.Module, vocab_size: int, **kwargs) -> LRCNCaptioner:
    """``LRCNCaptioner(encoder, vocab_size, **kwargs)``, e.g. ``create_captioner("resnet18",
    len(vocab), variant="factored", pretrained_encoder=True)``."""
    return LRCNCaptioner(encoder, vocab_size, **kwargs)
