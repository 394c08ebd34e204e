"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D via pycocoevalcap), result files and a figure.

``caption_scores(predictions, references)`` scores generated captions against reference captions
with the COCO caption evaluation code (``pycocoevalcap``): BLEU-1..4 (corpus-level, 'closest'
reference length), ROUGE-L (mean per item), CIDEr (pycocoevalcap's ``Cider``, which is CIDEr-D:
clipped n-gram counts, a Gaussian length penalty, document frequencies from the evaluated
references, scaled by 10, so it can exceed 1) and, when ``java`` is on PATH, METEOR 1.5. Without
java METEOR is reported as skipped with the reason, never as 0.

**Tokenisation.** Both sides are tokenised before scoring. The default, ``tokenizer='simple'``, is
``caption_vocab.tokenize`` (lower case, punctuation split off) with punctuation tokens dropped,
joined by spaces: pure Python, so the same predictions get the same BLEU / ROUGE-L / CIDEr on every
machine, with or without java (only METEOR needs java, and it is reported as skipped, not changed).
Published COCO / MSR-VTT numbers use the Stanford PTB tokenizer (java), which splits contractions
and possessives ("doesn't" -> "does n't", "man's" -> "man 's") where ``tokenize`` keeps them whole,
and keeps numbers such as "3.5" whole where ``tokenize`` splits them. Both lower-case, drop
punctuation and keep hyphenated words. So scores from the default tokenizer are close to published
ones but not identical (n-gram counts differ wherever such tokens occur): compare runs with each
other freely, and pass ``tokenizer='ptb'`` (needs java) for numbers to put beside papers.

Also: ``write_coco_results`` (the COCO results JSON) and ``save_caption_grid`` (pictures with their
generated and reference captions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from seqvision.utils.extras import require
from seqvision.utils.io import atomic_path

_PURPOSE = "caption metrics (pycocoevalcap)"

__all__ = [
    "CaptionScores",
    "caption_scores",
    "metric_tokenize",
    "save_caption_grid",
    "write_coco_results",
]

_logger = logging.getLogger(__name__)

_JAVA_MISSING = "java not found on PATH"
_INT_KEY = re.compile(r"-?[1-9]\d*|0")


@dataclass(frozen=True)
class CaptionScores:
    """Corpus scores of a set of generated captions, in pycocoevalcap's scale ([0, 1]; CIDEr can
    exceed 1). ``meteor`` is None when METEOR was skipped; ``skipped`` then says why."""

    bleu_1: float
    bleu_2: float
    bleu_3: float
    bleu_4: float
    meteor: float | None
    rouge_l: float
    cider: float
    num_items: int
    tokenizer: str
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The scores as a JSON-ready dict (field names as keys)."""
        return asdict(self)

    def table(self) -> str:
        """A two-column text table: metric, value (pycocoevalcap's scale; papers often print x100)."""
        rows = [
            ("BLEU-1", self.bleu_1),
            ("BLEU-2", self.bleu_2),
            ("BLEU-3", self.bleu_3),
            ("BLEU-4", self.bleu_4),
            ("METEOR", self.meteor),
            ("ROUGE-L", self.rouge_l),
            ("CIDEr", self.cider),
        ]
        lines = [f"{'metric':<8}  value", f"{'-' * 8}  {'-' * 6}"]
        for name, value in rows:
            reason = self.skipped.get(name, "not computed")
            text = f"{value:.4f}" if value is not None else f"skipped ({reason})"
            lines.append(f"{name:<8}  {text}")
        lines.append(f"({self.num_items} items, {self.tokenizer} tokenizer)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- scoring


def metric_tokenize(text: str) -> str:
    """The default tokenisation for scoring: ``caption_vocab.tokenize`` without punctuation tokens,
    joined by single spaces (pycocoevalcap's scorers split on spaces)."""
    from seqvision.eval.captioning.vocab import tokenize

    return " ".join(t for t in tokenize(text) if any(ch.isalnum() for ch in t))


def _check_inputs(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Validate and normalise: str keys, one str prediction, a non-empty list of str references."""
    for name, value in (("predictions", predictions), ("references", references)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping key -> caption(s), got {type(value).__name__}")
    preds: dict[str, str] = {}
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"predictions[{key!r}] must be one caption (str), got {type(caption).__name__}")
        if str(key) in preds:
            raise ValueError(f"predictions: the key {key!r} occurs twice once keys are strings")
        preds[str(key)] = caption
    refs: dict[str, list[str]] = {}
    for key, captions in references.items():
        # A bare string is a Sequence[str] too (of characters): almost certainly a mistake.
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(
                f"references[{key!r}] must be a sequence of captions, got {type(captions).__name__}"
            )
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"references[{key!r}] must hold at least one caption (str), got {captions!r}")
        if str(key) in refs:
            raise ValueError(f"references: the key {key!r} occurs twice once keys are strings")
        refs[str(key)] = list(captions)
    if not preds:
        raise ValueError("predictions: need at least one caption to score, got none")
    only_pred = [k for k in preds if k not in refs]
    only_ref = [k for k in refs if k not in preds]
    if only_pred or only_ref:
        parts = []
        if only_pred:
            parts.append(f"{len(only_pred)} predictions have no references (e.g. {only_pred[:3]})")
        if only_ref:
            parts.append(f"{len(only_ref)} references have no prediction (e.g. {only_ref[:3]})")
        raise ValueError(f"predictions and references must have the same keys: {'; '.join(parts)}")
    return preds, refs


def _tokenize_all(
    preds: dict[str, str], refs: dict[str, list[str]], tokenizer: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """pycocoevalcap's input form: key -> [tokenised caption] (res) and key -> [tokenised refs]."""
    if tokenizer == "simple":
        res = {k: [metric_tokenize(c)] for k, c in preds.items()}
        gts = {k: [metric_tokenize(c) for c in cs] for k, cs in refs.items()}
        return res, gts
    PTBTokenizer = require("pycocoevalcap.tokenizer.ptbtokenizer", "caption", _PURPOSE).PTBTokenizer

    # PTBTokenizer writes its input to a temporary file in its own package folder: an installation
    # that is not writable fails here with OSError.
    try:
        ptb = PTBTokenizer()
        res = ptb.tokenize({k: [{"caption": c}] for k, c in preds.items()})
        gts = ptb.tokenize({k: [{"caption": c} for c in cs] for k, cs in refs.items()})
    except OSError as err:
        raise RuntimeError(f"the PTB tokenizer (java) failed: {err}") from err
    return res, gts


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    Meteor = require("pycocoevalcap.meteor.meteor", "caption", _PURPOSE).Meteor

    scorer = Meteor()  # starts `java -jar meteor-1.5.jar` (-Xmx2G), loads paraphrases: seconds
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        # Stop the java process now rather than whenever the scorer is garbage-collected.
        process = scorer.meteor_p
        with contextlib.suppress(Exception):
            process.stdin.close()
        process.kill()
        process.wait()
        with contextlib.suppress(Exception):
            process.stdout.close()
            process.stderr.close()
    return float(score)


def caption_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    meteor: bool | None = None,
    tokenizer: Literal["simple", "ptb"] = "simple",
) -> CaptionScores:
    """Score generated captions against references with pycocoevalcap.

    Args:
        predictions: key -> the generated caption (one string).
        references: key -> its reference captions (raw text; ``caption_data.references``).
            Keys are compared as strings; both mappings must have the same keys.
        meteor: compute METEOR: None (default) when ``java`` is on PATH, True always (an error
            without java), False never. Skipped METEOR is ``meteor=None`` with the reason in
            ``skipped['METEOR']``.
        tokenizer: 'simple' (``metric_tokenize``, no java, the same on every machine) or 'ptb'
            (the Stanford PTB tokenizer of the COCO evaluation, needs java; comparable with
            published numbers). See the module docstring.

    Returns:
        ``CaptionScores``: BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D), the item count.

    Raises:
        TypeError: not mappings, a prediction that is not a string, references that are a string.
        ValueError: keys that differ (examples named), no items, empty reference lists, a bad
            ``meteor`` / ``tokenizer``.
        RuntimeError: ``meteor=True`` or ``tokenizer='ptb'`` without java, or METEOR failing when
            it was asked for explicitly.
    """
    Bleu = require("pycocoevalcap.bleu.bleu", "caption", _PURPOSE).Bleu
    Cider = require("pycocoevalcap.cider.cider", "caption", _PURPOSE).Cider
    Rouge = require("pycocoevalcap.rouge.rouge", "caption", _PURPOSE).Rouge

    if meteor not in (None, True, False):
        raise ValueError(f"meteor must be None (auto), True or False, got {meteor!r}")
    if tokenizer not in ("simple", "ptb"):
        raise ValueError(f"tokenizer must be 'simple' or 'ptb', got {tokenizer!r}")
    preds, refs = _check_inputs(predictions, references)
    # Looked up at call time (not imported by name) so that PATH changes and tests see the truth.
    have_java = shutil.which("java") is not None
    if not have_java and (meteor is True or tokenizer == "ptb"):
        needs = "meteor=True" if meteor is True else "tokenizer='ptb'"
        raise RuntimeError(f"{needs} needs java, but {_JAVA_MISSING}; install a JRE or use the defaults")
    res, gts = _tokenize_all(preds, refs, tokenizer)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    skipped: dict[str, str] = {}
    meteor_score = None
    if meteor is False:
        skipped["METEOR"] = "disabled with meteor=False"
    elif not have_java:
        skipped["METEOR"] = _JAVA_MISSING
    else:
        try:
            meteor_score = _meteor(gts, res)
        except Exception as err:  # java too old, too little memory for -Xmx2G, a missing jar ...
            if meteor is True:
                raise RuntimeError(f"METEOR failed: {type(err).__name__}: {err}") from err
            skipped["METEOR"] = f"METEOR failed: {type(err).__name__}: {err}"
            _logger.warning("METEOR skipped: %s", skipped["METEOR"])
    return CaptionScores(
        bleu_1=float(bleu[0]),
        bleu_2=float(bleu[1]),
        bleu_3=float(bleu[2]),
        bleu_4=float(bleu[3]),
        meteor=meteor_score,
        rouge_l=float(rouge),
        cider=float(cider),
        num_items=len(preds),
        tokenizer=tokenizer,
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------------- files


def write_coco_results(path: str | os.PathLike, predictions: Mapping[str, str]) -> Path:
    """Write predictions as a COCO caption results file, atomically; return the path.

    The file is ``[{"image_id": ..., "caption": ...}, ...]`` in the mapping's order; ``image_id`` is
    an int where the key is the decimal form of one (COCO ids, ``"391895"``), the key string
    otherwise (``"video0"``; a key like ``"007"`` stays a string so that it round-trips).
    """
    if not isinstance(predictions, Mapping):
        raise TypeError(f"predictions must be a mapping key -> caption, got {type(predictions).__name__}")
    results = []
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"predictions[{key!r}] must be a caption (str), got {type(caption).__name__}")
        key = str(key)
        results.append({"image_id": int(key) if _INT_KEY.fullmatch(key) else key, "caption": caption})
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return Path(path)


# ------------------------------------------------------------------------------------------ figure


def _display_image(
    image: Any, index: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """One picture as float (H, W, 3) in [0, 1] for imshow.

    Accepts numpy arrays or tensors, channels last (H, W, 3) or first (3, H, W), and videos with a
    leading time axis (T, H, W, 3) / (T, 3, H, W), of which the middle frame is shown. uint8 is
    divided by 255; floats are un-normalised with ``mean`` / ``std`` when given, min-max scaled if
    they still leave [0, 1] (a normalised picture), then clipped.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 4:  # a clip: its middle frame
        array = array[array.shape[0] // 2]
    if array.ndim == 3 and array.shape[-1] not in (1, 3) and array.shape[0] in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(
            f"images[{index}] must be (H, W, 3), (3, H, W) or a clip (T, H, W, 3) / (T, 3, H, W), "
            f"got shape {tuple(np.shape(image))}"
        )
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32)
        if mean is not None or std is not None:
            m = np.asarray(mean if mean is not None else (0.0, 0.0, 0.0), np.float32)
            s = np.asarray(std if std is not None else (1.0, 1.0, 1.0), np.float32)
            array = array * s[: array.shape[-1]] + m[: array.shape[-1]]
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        if lo < -1e-3 or hi > 1 + 1e-3:
            array = (array - lo) / max(hi - lo, 1e-12)
    array = np.clip(np.nan_to_num(array), 0.0, 1.0)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def save_caption_grid(
    path: str | os.PathLike,
    images: Sequence[Any],
    generated: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    columns: int = 4,
    title: str = "",
    max_references: int = 2,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dpi: int = 100,
) -> Path:
    """Save a grid of pictures with their generated caption and references under each, atomically.

    Under each picture: the generated caption in bold blue, then up to ``max_references``
    references in grey, each wrapped to the cell's width.

    Args:
        path: the image file (format from the suffix, e.g. ``.png``).
        images: per item an image (H, W, 3) or (3, H, W), uint8 or float, numpy or torch; or a
            clip (T, H, W, 3) / (T, 3, H, W), shown by its middle frame.
        generated: per item the generated caption.
        references: per item its reference captions.
        columns: pictures per row.
        title: the figure's title ('' for none).
        max_references: references shown per picture.
        mean, std: undo this normalisation of float pictures (a dataset's ``mean`` / ``std``).
        dpi: resolution; a cell is 3 inches wide.

    Returns:
        the path.
    """
    require("matplotlib", "caption", "the caption grid")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = len(images)
    if count == 0:
        raise ValueError("images: need at least one picture, got none")
    if len(generated) != count or len(references) != count:
        raise ValueError(
            f"images, generated and references must have one entry per item, got {count}, "
            f"{len(generated)} and {len(references)}"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i}] must be a sequence of captions (str), got {refs!r}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be an int >= 1, got {columns!r}")
    if isinstance(max_references, bool) or not isinstance(max_references, int) or max_references < 0:
        raise ValueError(f"max_references must be an int >= 0, got {max_references!r}")
    pictures = [_display_image(image, i, mean, std) for i, image in enumerate(images)]

    columns = min(columns, count)
    rows = -(-count // columns)
    cell, picture, line = 3.0, 2.6, 0.16  # inches: cell width, picture box, one text line (8 pt)
    wrap = 44  # characters per line at 8 pt in a 3-inch cell
    texts = []
    for caption, refs in zip(generated, references, strict=True):
        gen = textwrap.wrap(str(caption), wrap) or ["(empty)"]
        ref = [textwrap.wrap(f"- {r}", wrap) for r in list(refs)[:max_references]]
        texts.append((gen, ref))
    # Each row is as tall as its picture box plus its longest text block.
    text_lines = [
        max(len(gen) + sum(len(r) for r in ref) for gen, ref in texts[r * columns : (r + 1) * columns])
        for r in range(rows)
    ]
    heights = [picture + 0.15 + line * n + 0.2 for n in text_lines]
    top_margin = 0.45 if title else 0.1
    width, height = cell * columns, top_margin + sum(heights)

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    y = height - top_margin  # inches from the bottom, at the top of the current row
    for r in range(rows):
        for c in range(columns):
            i = r * columns + c
            if i >= count:
                break
            left = c * cell + (cell - picture) / 2
            ax = figure.add_axes((left / width, (y - picture) / height, picture / width, picture / height))
            ax.imshow(pictures[i], interpolation="nearest")
            ax.set_axis_off()
            gen, ref = texts[i]
            text_y = y - picture - 0.1
            x = (c * cell + 0.1) / width
            figure.text(
                x, text_y / height, "\n".join(gen), fontsize=8, fontweight="bold",
                color="tab:blue", va="top", ha="left",
            )  # fmt: skip
            text_y -= line * len(gen)
            for lines in ref:
                figure.text(x, text_y / height, "\n".join(lines), fontsize=8, color="0.35", va="top")
                text_y -= line * len(lines)
        y -= heights[r]
    if title:
        figure.suptitle(title, y=1 - 0.12 / height, va="top")
    with atomic_path(path) as temporary:
        figure.savefig(temporary)
    return Path(path)
