"""The caption vocabulary: tokenisation, building, encode/decode, saving, and errors."""

import json
import random

import pytest
import torch

from seqvision.engine.model_file import read_model_file, save_model_file
from seqvision.eval.captioning.vocab import VOCAB_FORMAT, VOCAB_VERSION, Vocabulary, tokenize

CAPTIONS = [
    "A red circle, above.",
    "a red square below the circle",
    "A blue circle!",
    "the red circle is above",
]


# ----------------------------------------------------------------------------------------------
# tokenize
# ----------------------------------------------------------------------------------------------


def test_tokenize_lowercases_and_splits_off_punctuation():
    assert tokenize("A red circle, above.") == ["a", "red", "circle", ",", "above", "."]
    assert tokenize("Stop!Now?") == ["stop", "!", "now", "?"]
    assert tokenize("wait...") == ["wait", ".", ".", "."]
    assert tokenize("(left)") == ["(", "left", ")"]


def test_tokenize_normalises_whitespace():
    assert tokenize("  A\tred \n\n circle  ") == ["a", "red", "circle"]
    assert tokenize("") == [] and tokenize(" \t\n") == []


def test_tokenize_keeps_inner_apostrophes_and_hyphens():
    assert tokenize("The man's T-shirt") == ["the", "man's", "t-shirt"]
    assert tokenize("The man\u2019s hat") == ["the", "man's", "hat"]  # typographic apostrophe
    assert tokenize("'quoted' - dash") == ["'", "quoted", "'", "-", "dash"]
    assert tokenize("3.5 km") == ["3", ".", "5", "km"]
    assert tokenize("Ünïcode Straße") == ["ünïcode", "straße"]


def test_tokenize_refuses_non_strings():
    with pytest.raises(TypeError, match="text must be a str, got list"):
        tokenize(["a", "b"])


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------


def test_specials_have_fixed_ids():
    vocab = Vocabulary.build(CAPTIONS)
    assert (Vocabulary.PAD, Vocabulary.BOS, Vocabulary.EOS, Vocabulary.UNK) == (0, 1, 2, 3)
    assert [vocab.word(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert vocab.id("<eos>") == 2 and "<pad>" in vocab


def test_build_orders_by_count_then_alphabetically():
    vocab = Vocabulary.build(["b a c", "b a", "b d", "z"])
    # b: 3, a: 2, then the count-1 words alphabetically.
    assert vocab.words[4:] == ["b", "a", "c", "d", "z"]
    assert len(vocab) == 9 and vocab.id("b") == 4 and vocab.word(5) == "a"


def test_build_is_deterministic_whatever_the_caption_order():
    shuffled = CAPTIONS[:]
    random.Random(0).shuffle(shuffled)
    assert Vocabulary.build(shuffled) == Vocabulary.build(CAPTIONS)
    assert Vocabulary.build(c for c in CAPTIONS) == Vocabulary.build(CAPTIONS)  # any iterable


def test_min_count_and_max_size():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    # circle 4, then a and red 3 (alphabetically), then above and the 2
    assert vocab.words[4:] == ["circle", "a", "red", "above", "the"]
    assert vocab.min_count == 2 and "blue" not in vocab
    capped = Vocabulary.build(CAPTIONS, min_count=2, max_size=6)  # max_size counts the specials
    assert len(capped) == 6 and capped.words[4:] == ["circle", "a"]


def test_empty_vocabulary_names_min_count_and_captions_seen():
    with pytest.raises(ValueError, match=r"min_count=10 times in the 4 captions seen"):
        Vocabulary.build(CAPTIONS, min_count=10)
    with pytest.raises(ValueError, match=r"min_count=1 times in the 0 captions seen"):
        Vocabulary.build([])
    with pytest.raises(ValueError, match=r"in the 2 captions seen"):
        Vocabulary.build(["", "  ."], min_count=2)


def test_bad_build_arguments():
    with pytest.raises(TypeError, match="captions must be an iterable of str, got str"):
        Vocabulary.build("a red circle")
    with pytest.raises(TypeError, match="captions must hold str, got int at index 1"):
        Vocabulary.build(["a", 3])
    with pytest.raises(ValueError, match="min_count must be an int >= 1, got 0"):
        Vocabulary.build(CAPTIONS, min_count=0)
    with pytest.raises(ValueError, match="max_size must be an int >= 5, got 4"):
        Vocabulary.build(CAPTIONS, max_size=4)


def test_bad_word_lists():
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(["a", "<unk>"])
    with pytest.raises(ValueError, match=r"distinct.*'a'"):
        Vocabulary(["a", "b", "a"])
    with pytest.raises(ValueError, match="without whitespace"):
        Vocabulary(["a b"])
    with pytest.raises(ValueError, match="without whitespace"):
        Vocabulary([""])
    with pytest.raises(TypeError, match="words must be a sequence of str"):
        Vocabulary("abc")


# ----------------------------------------------------------------------------------------------
# lookups, encode, decode
# ----------------------------------------------------------------------------------------------


def test_lookups():
    vocab = Vocabulary.build(CAPTIONS)
    assert len(vocab) == 4 + len(set(tokenize(" ".join(CAPTIONS))))
    assert "circle" in vocab and "zebra" not in vocab and 3 not in vocab
    assert vocab.word(vocab.id("circle")) == "circle"
    assert vocab.id("zebra") == Vocabulary.UNK
    with pytest.raises(ValueError, match=r"id must be an int in \[0, "):
        vocab.word(len(vocab))
    with pytest.raises(ValueError, match="id must be an int"):
        vocab.word(-1)


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(CAPTIONS)
    ids, truncated = vocab.encode("A red circle, above.")
    assert not truncated
    assert ids[0] == Vocabulary.BOS and ids[-1] == Vocabulary.EOS and len(ids) == 8
    assert [vocab.word(i) for i in ids[1:-1]] == ["a", "red", "circle", ",", "above", "."]
    assert vocab.decode(ids) == "a red circle, above."
    for caption in CAPTIONS:
        assert vocab.decode(vocab.encode(caption)[0]) == " ".join(tokenize(caption)).replace(
            " ,", ","
        ).replace(" .", ".").replace(" !", "!")


def test_encode_truncates_to_max_len_words_and_keeps_eos():
    vocab = Vocabulary.build(CAPTIONS)
    ids, truncated = vocab.encode("a red circle, above.", max_len=3)
    assert truncated and len(ids) == 5 and ids[-1] == Vocabulary.EOS
    assert vocab.decode(ids) == "a red circle"
    ids, truncated = vocab.encode("a red circle", max_len=3)  # exactly max_len: not truncated
    assert not truncated and len(ids) == 5
    with pytest.raises(ValueError, match="max_len must be an int >= 1, got 0"):
        vocab.encode("a", max_len=0)


def test_unknown_words_become_unk():
    vocab = Vocabulary.build(CAPTIONS)
    ids, _ = vocab.encode("a purple circle")
    assert ids[2] == Vocabulary.UNK
    assert vocab.decode(ids) == "a <unk> circle"


def test_decode_stops_at_eos_and_skips_pad_and_bos():
    vocab = Vocabulary.build(CAPTIONS)
    a, red, comma = vocab.id("a"), vocab.id("red"), vocab.id(",")
    assert vocab.decode([1, a, 0, red, comma, 2, red, red]) == "a red,"
    assert vocab.decode(torch.tensor([a, red, 2, 0, 0])) == "a red"  # a tensor, no BOS
    assert vocab.decode([2, a]) == "" and vocab.decode([]) == ""
    brackets = Vocabulary.build(["a (b) c"])
    ids, _ = brackets.encode("a (b) c")
    assert brackets.decode(ids) == "a ( b) c"  # only closing marks attach to the word before
    with pytest.raises(ValueError, match=r"ids must be ints in \[0, "):
        vocab.decode([a, len(vocab)])
    with pytest.raises(TypeError, match="ids must be an iterable of int"):
        vocab.decode("abc")


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip_through_json():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    data = vocab.to_dict()
    assert data == {
        "format": VOCAB_FORMAT,
        "version": VOCAB_VERSION,
        "words": ["circle", "a", "red", "above", "the"],
        "min_count": 2,
    }
    again = Vocabulary.from_dict(json.loads(json.dumps(data)))
    assert again == vocab and again.words == vocab.words and again.min_count == 2
    assert again.encode("the red circle") == vocab.encode("the red circle")


def test_from_dict_refuses_other_formats_and_versions():
    data = Vocabulary.build(CAPTIONS).to_dict()
    with pytest.raises(ValueError, match="format must be 'seqvision-vocab', got 'other'"):
        Vocabulary.from_dict({**data, "format": "other"})
    with pytest.raises(ValueError, match=r"version 2 is not supported.*reads version 1"):
        Vocabulary.from_dict({**data, "version": 2})
    with pytest.raises(ValueError, match="format must be"):
        Vocabulary.from_dict({"words": data["words"]})
    with pytest.raises(ValueError, match=r"missing \['min_count'\]"):
        Vocabulary.from_dict({k: v for k, v in data.items() if k != "min_count"})
    with pytest.raises(ValueError, match="words must be a list of str"):
        Vocabulary.from_dict({**data, "words": "abc"})
    with pytest.raises(TypeError, match="data must be a mapping"):
        Vocabulary.from_dict([data])


def test_vocabulary_travels_in_a_model_file(tmp_path):
    vocab = Vocabulary.build(CAPTIONS)
    path = save_model_file(
        {"w": torch.zeros(2)},
        tmp_path / "model.safetensors",
        task="caption",
        config={},
        extra={"vocab": vocab.to_dict()},
    )
    assert Vocabulary.from_dict(read_model_file(path, "caption").extra["vocab"]) == vocab
