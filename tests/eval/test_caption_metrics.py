"""Caption metrics on hand-made references, the COCO results file and the caption grid figure.

METEOR and the PTB tokenizer start java (a few seconds each); the tests that need it run only
where java is on PATH, and the auto-METEOR scores are computed once per module.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from seqvision.eval.captioning import metrics as caption_metrics
from seqvision.eval.captioning.metrics import (
    CaptionScores,
    caption_scores,
    metric_tokenize,
    save_caption_grid,
    write_coco_results,
)

pytest.importorskip("pycocoevalcap")
HAVE_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="java not found on PATH")

REFERENCES = {
    "1": ["a man is riding a brown horse on the beach", "a person rides a horse along the sea"],
    "2": ["two dogs are playing in the fresh snow", "a pair of dogs runs through deep snow"],
    "3": ["a plate of pasta with tomato sauce and basil", "a bowl of spaghetti with red sauce"],
    "4": ["a red bus drives down a busy city street", "a double decker bus in traffic"],
    "5": ["a little girl flies a kite in the park", "a child holding a kite string on the grass"],
    "6": ["an old clock tower under a cloudy sky", "a tall tower with a clock at the top"],
}
PERFECT = {key: refs[0] for key, refs in REFERENCES.items()}


@pytest.fixture(scope="module")
def perfect_auto():
    """The perfect predictions scored with METEOR on auto (java is started once for the module)."""
    return caption_scores(PERFECT, REFERENCES)


def test_identical_captions_score_one(perfect_auto):
    scores = perfect_auto
    for value in (scores.bleu_1, scores.bleu_2, scores.bleu_3, scores.bleu_4, scores.rouge_l):
        assert value == pytest.approx(1.0, abs=1e-6)
    assert scores.num_items == 6 and scores.tokenizer == "simple"
    if HAVE_JAVA:
        assert scores.meteor is not None and scores.meteor > 0.9 and scores.skipped == {}
    assert scores.cider > 1.0  # CIDEr-D is scaled by 10: perfect captions score well above 1


def test_cider_ranks_perfect_above_constant_and_shuffled(perfect_auto):
    constant_caption = "a man is riding a brown horse on the beach"
    constant = caption_scores({k: constant_caption for k in REFERENCES}, REFERENCES, meteor=False)
    keys = list(REFERENCES)
    shuffled = caption_scores(
        {key: PERFECT[keys[(i + 1) % len(keys)]] for i, key in enumerate(keys)}, REFERENCES, meteor=False
    )
    assert perfect_auto.cider > constant.cider > 0.0
    assert perfect_auto.cider > shuffled.cider
    assert shuffled.cider < 0.2 and shuffled.bleu_4 < 0.1 and shuffled.rouge_l < 0.5
    assert 0.0 <= constant.bleu_4 < 1.0


def test_punctuation_and_case_do_not_change_scores():
    noisy = {key: caption.capitalize() + "." for key, caption in PERFECT.items()}
    scores = caption_scores(noisy, REFERENCES, meteor=False)
    assert scores.bleu_4 == pytest.approx(1.0, abs=1e-6)
    assert metric_tokenize("A man's T-shirt, red!") == "a man's t-shirt red"


@needs_java
def test_meteor_present_with_java(perfect_auto):
    assert perfect_auto.meteor == pytest.approx(1.0, abs=0.05)
    assert "METEOR" in perfect_auto.table() and "skipped" not in perfect_auto.table()


def test_meteor_skipped_with_reason_when_disabled_or_without_java(monkeypatch):
    disabled = caption_scores(PERFECT, REFERENCES, meteor=False)
    assert disabled.meteor is None and disabled.skipped == {"METEOR": "disabled with meteor=False"}
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name))
    hidden = caption_scores(PERFECT, REFERENCES)
    assert hidden.meteor is None and hidden.skipped == {"METEOR": "java not found on PATH"}
    assert hidden.bleu_4 == pytest.approx(disabled.bleu_4) and hidden.cider == pytest.approx(disabled.cider)
    assert "METEOR    skipped (java not found on PATH)" in hidden.table()
    assert hidden.to_dict()["meteor"] is None and hidden.to_dict()["skipped"] == hidden.skipped
    json.dumps(hidden.to_dict())
    with pytest.raises(RuntimeError, match="meteor=True needs java"):
        caption_scores(PERFECT, REFERENCES, meteor=True)
    with pytest.raises(RuntimeError, match="tokenizer='ptb' needs java"):
        caption_scores(PERFECT, REFERENCES, tokenizer="ptb")


def test_meteor_hidden_through_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    scores = caption_scores(PERFECT, REFERENCES)
    assert scores.meteor is None and scores.skipped["METEOR"] == "java not found on PATH"


@needs_java
def test_ptb_tokenizer_option():
    scores = caption_scores(PERFECT, REFERENCES, meteor=False, tokenizer="ptb")
    assert scores.tokenizer == "ptb" and scores.bleu_4 == pytest.approx(1.0, abs=1e-6)


def test_input_errors():
    with pytest.raises(ValueError, match=r"1 predictions have no references \(e.g. \['7'\]\)"):
        caption_scores({**PERFECT, "7": "extra"}, REFERENCES, meteor=False)
    partial = {k: v for k, v in PERFECT.items() if k != "3"}
    with pytest.raises(ValueError, match=r"1 references have no prediction \(e.g. \['3'\]\)"):
        caption_scores(partial, REFERENCES, meteor=False)
    with pytest.raises(TypeError, match=r"references\['1'\] must be a sequence of captions"):
        caption_scores(PERFECT, {**REFERENCES, "1": "a man"}, meteor=False)
    with pytest.raises(TypeError, match=r"predictions\['1'\] must be one caption"):
        caption_scores({**PERFECT, "1": ["a man"]}, REFERENCES, meteor=False)
    with pytest.raises(ValueError, match="at least one caption"):
        caption_scores({}, {}, meteor=False)
    with pytest.raises(ValueError, match="tokenizer must be"):
        caption_scores(PERFECT, REFERENCES, tokenizer="nltk")
    # Integer keys match their string form (COCO ids).
    scores = caption_scores({int(k): v for k, v in PERFECT.items()}, REFERENCES, meteor=False)
    assert scores.num_items == 6 and isinstance(scores, CaptionScores)


def test_write_coco_results(tmp_path):
    path = write_coco_results(tmp_path / "results.json", {"391895": "a man", "video0": "a cat", "007": "x"})
    assert path == tmp_path / "results.json"
    assert json.loads(path.read_text()) == [
        {"image_id": 391895, "caption": "a man"},
        {"image_id": "video0", "caption": "a cat"},
        {"image_id": "007", "caption": "x"},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(TypeError, match=r"predictions\['1'\] must be a caption"):
        write_coco_results(tmp_path / "bad.json", {"1": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_caption_grid_png(tmp_path):
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),  # uint8 (H, W, 3)
        rng.random((3, 32, 32), dtype=np.float32),  # float (C, H, W)
        torch.randn(4, 3, 24, 24),  # a normalised clip: its middle frame
        torch.rand(36, 36, 3),
        rng.integers(0, 256, (20, 60, 3), dtype=np.uint8),
    ]
    generated = ["a generated caption that is long enough to wrap onto a second line in its cell", "", "x",
                 "y", "z"]  # fmt: skip
    references = [["first reference", "second reference", "third, not shown"], ["r"], ["r"], ["r"], []]
    path = save_caption_grid(tmp_path / "grid.png", images, generated, references, columns=3, title="val")
    assert path == tmp_path / "grid.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        width, height = image.size
    assert width == 900 and height > 400  # 3 cells of 3 inches at 100 dpi, two rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    with pytest.raises(ValueError, match="one entry per item"):
        save_caption_grid(tmp_path / "bad.png", images, generated[:2], references)
    with pytest.raises(ValueError, match=r"images\[0\] must be"):
        save_caption_grid(tmp_path / "bad.png", [np.zeros((5, 5, 5))], ["a"], [["b"]])
    with pytest.raises(TypeError, match=r"references\[0\] must be a sequence"):
        save_caption_grid(tmp_path / "bad.png", images[:1], ["a"], ["b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_module_exports():
    assert set(caption_metrics.__all__) >= {"caption_scores", "write_coco_results", "save_caption_grid"}
