"""Caption vocabulary: a tokeniser and a word <-> id map with the four special tokens.

Token ids are what ``seqvision.vision.captioner.LRCNCaptioner`` reads and writes: ``<pad>`` = 0,
``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then the words, most frequent first. A model must decode
with the vocabulary it was trained with, so a fine-tuning run stores ``vocab.to_dict()`` in its model
file's metadata (``model_file.save_model_file(..., extra={"vocab": vocab.to_dict()})``) and the
evaluation rebuilds it with ``Vocabulary.from_dict``, which refuses any other format or version.

Tokenisation (:func:`tokenize`) is deliberately simple and deterministic, with no language model of
English: lower-case, then words and single punctuation characters. It is not the PTB tokeniser the
COCO caption metrics use ("man's" stays one token here); captions scored with those metrics should
be detokenised with :meth:`Vocabulary.decode` first, which is what it is for.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from seqvision.utils.checks import check_int

__all__ = ["VOCAB_FORMAT", "VOCAB_VERSION", "Vocabulary", "tokenize"]

VOCAB_FORMAT = "seqvision-vocab"
VOCAB_VERSION = 1

# A word: letters/digits/underscores, optionally joined by single inner apostrophes or hyphens
# ("man's", "t-shirt", "x-ray"), so these survive a round trip through decode. Any other
# non-space character is a token of its own ("..." is three "." tokens).
_TOKEN = re.compile(r"\w+(?:['-]\w+)*|[^\w\s]")
# Punctuation that closes or ends a phrase: decode attaches it to the word before, without a space.
# Opening brackets, quotes and other symbols stay space-separated (which side a '"' belongs to is
# not knowable from the token alone).
_ATTACHED = frozenset(".,;:!?)]}%")


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and punctuation tokens.

    * every whitespace run separates tokens (and never appears in one);
    * a word is a run of letters, digits and underscores, with single inner apostrophes or hyphens
      kept inside it ("man's", "t-shirt"); a typographic apostrophe becomes "'";
    * every other non-space character is a token of its own: "A red circle, above." ->
      ["a", "red", "circle", ",", "above", "."]; "3.5" -> ["3", ".", "5"].

    Letters are Unicode-aware (``str.lower`` and ``\\w``).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    # The typographic apostrophe (U+2019) is read as "'", so "man\u2019s" and "man's" are one word.
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


class Vocabulary:
    """Words with ids: the specials ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then ``words``.

    Build one from training captions with :meth:`build`; ``len(vocab)`` (specials included) is the
    captioner's ``vocab_size``.

    Args:
        words: the vocabulary words in id order (ids 4, 5, ...), without the specials: distinct,
            non-empty strings without whitespace.
        min_count: the count threshold the words were selected with (kept for the record).
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        if isinstance(words, str) or not isinstance(words, Sequence):
            raise TypeError(f"words must be a sequence of str, got {type(words).__name__}")
        check_int("min_count", min_count, 1)
        for word in words:
            if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
                raise ValueError(f"words must be non-empty strings without whitespace, got {word!r}")
        special = sorted(set(words) & set(self.SPECIALS))
        if special:
            raise ValueError(f"words must not contain the special tokens {self.SPECIALS}, got {special}")
        if len(set(words)) != len(words):
            repeated = sorted(w for w, n in Counter(words).items() if n > 1)
            raise ValueError(f"words must be distinct, got repeats of {repeated[:10]}")
        self._words: list[str] = [*self.SPECIALS, *words]
        self._ids: dict[str, int] = {word: i for i, word in enumerate(self._words)}
        self.min_count = min_count

    # ------------------------------------------------------------------------------------------
    # building
    # ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: int | None = None) -> Vocabulary:
        """The words of ``captions`` (:func:`tokenize`) that occur at least ``min_count`` times.

        Ids follow the count, most frequent first, ties in alphabetical order, so the same captions
        give the same vocabulary whatever their order. ``max_size`` caps ``len(vocab)``, the four
        specials included (so it is the model's largest ``vocab_size``): only the most frequent
        ``max_size - 4`` words are kept. No word reaching ``min_count`` is a ValueError.
        """
        if isinstance(captions, str) or not isinstance(captions, Iterable):
            # A single string would be iterated character by character.
            raise TypeError(f"captions must be an iterable of str, got {type(captions).__name__}")
        check_int("min_count", min_count, 1)
        if max_size is not None:
            check_int("max_size", max_size, len(cls.SPECIALS) + 1)
        counts: Counter[str] = Counter()
        seen = 0
        for caption in captions:
            if not isinstance(caption, str):
                raise TypeError(f"captions must hold str, got {type(caption).__name__} at index {seen}")
            counts.update(tokenize(caption))
            seen += 1
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max_size - len(cls.SPECIALS)]
        if not kept:
            raise ValueError(
                f"empty vocabulary: no word occurs at least min_count={min_count} times in the {seen} "
                f"captions seen ({len(counts)} distinct words)"
            )
        return cls(kept, min_count=min_count)

    # ------------------------------------------------------------------------------------------
    # lookups
    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        return word in self._ids

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._words == other._words and self.min_count == other.min_count

    __hash__ = None  # type: ignore[assignment]  (mutable-looking container; equality by content)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, min_count={self.min_count})"

    @property
    def words(self) -> list[str]:
        """Every token in id order, the specials first (a copy)."""
        return list(self._words)

    def id(self, word: str) -> int:
        """The id of ``word``; ``UNK`` for a word not in the vocabulary."""
        return self._ids.get(word, self.UNK)

    def word(self, id: int) -> str:
        """The token with id ``id`` (a special's name for 0..3)."""
        if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id < len(self._words):
            raise ValueError(f"id must be an int in [0, {len(self._words)}), got {id!r}")
        return self._words[id]

    # ------------------------------------------------------------------------------------------
    # captions <-> ids
    # ------------------------------------------------------------------------------------------

    def encode(self, text: str, max_len: int | None = None) -> tuple[list[int], bool]:
        """``[BOS, w_1, ..., w_n, EOS]`` for the tokens of ``text``, and whether it was truncated.

        ``max_len`` caps n, the number of tokens (words and punctuation), BOS and EOS not counted;
        a longer caption keeps its first ``max_len`` tokens and still ends in EOS. Words not in the
        vocabulary become ``UNK``.
        """
        if max_len is not None:
            check_int("max_len", max_len, 1)
        ids = [self.id(token) for token in tokenize(text)]
        truncated = max_len is not None and len(ids) > max_len
        if truncated:
            ids = ids[:max_len]
        return [self.BOS, *ids, self.EOS], truncated

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (a list, or anything with ``tolist()`` such as a 1-D tensor) -> a caption string.

        Reads up to the first EOS (excluded), skips PAD and BOS, joins the tokens with spaces and
        attaches closing punctuation (``.,;:!?)]}%``) to the token before it: [a, red, circle, ",",
        above, "."] -> "a red circle, above.". UNK reads "<unk>".
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be an iterable of int, got {type(ids).__name__}")
        text = ""
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._words):
                raise ValueError(f"ids must be ints in [0, {len(self._words)}), got {i!r}")
            if i == self.EOS:
                break
            if i in (self.PAD, self.BOS):
                continue
            token = self._words[i]
            text += token if not text or token in _ATTACHED else " " + token
        return text

    # ------------------------------------------------------------------------------------------
    # saving
    # ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description: ``{"format": "seqvision-vocab", "version": 1,
        "words": [...], "min_count": ...}``, ``words`` without the specials, in id order."""
        return {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "words": self._words[len(self.SPECIALS) :],
            "min_count": self.min_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        """The vocabulary :meth:`to_dict` described; any other format or version is a ValueError."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping (Vocabulary.to_dict()), got {type(data).__name__}")
        fmt, version = data.get("format"), data.get("version")
        if fmt != VOCAB_FORMAT:
            raise ValueError(f"data is not a vocabulary: format must be {VOCAB_FORMAT!r}, got {fmt!r}")
        if version != VOCAB_VERSION:
            raise ValueError(
                f"vocabulary version {version!r} is not supported: this seqvision reads version "
                f"{VOCAB_VERSION} (written by Vocabulary.to_dict)"
            )
        missing = sorted({"words", "min_count"} - set(data))
        if missing:
            raise ValueError(f"vocabulary data is missing {missing}")
        words = data["words"]
        if isinstance(words, str) or not isinstance(words, Sequence):
            raise ValueError(f"vocabulary data: words must be a list of str, got {type(words).__name__}")
        return cls(list(words), min_count=data["min_count"])
