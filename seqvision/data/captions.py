"""Captioning data: image and video caption files, and a dataset of (picture, caption) pairs.

1. **Records** (``CaptionRecord(path, captions, key)``): one image or video with all its reference
   captions; ``key`` names it in predictions and metrics (the COCO image id as a string, or the
   video id).
2. **Readers**: ``load_coco_captions`` (COCO captions annotations, or a Karpathy split JSON) and
   ``load_video_captions`` (a ``video,caption`` CSV/TSV, an MSR-VTT-style JSON, or a JSON list of
   ``{"video", "captions"}``). Files listed but absent are skipped, counted and reported in one
   warning; a file that yields no usable pair is an error.
3. **Dataset** (``CaptionDataset``): training items are one (picture, caption) pair each, the caption
   as a fixed-length token row; evaluation items are one picture per record. Images are read with
   PIL, videos decoded with ``video_data.decode_frames`` (its decord guards included); both go
   through ``video_data``'s transforms, an image as a one-frame clip, so images and videos share
   one crop / resize / normalise code path.
4. ``references(records)``: key -> reference captions, the form ``caption_metrics`` takes.

Every item is a dict of fixed-size tensors, so PyTorch's default ``collate`` batches them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from seqvision.data.video import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAMPLING_MODES,
    VIDEO_EXTENSIONS,
    UnreadableDatasetError,
    UnreadableVideoError,
    decode_frames,
    eval_clip_views,
    sample_frame_indices,
    train_clip_transform,
)

if TYPE_CHECKING:
    from seqvision.eval.captioning.vocab import Vocabulary

__all__ = [
    "CaptionDataset",
    "CaptionRecord",
    "UnreadableImageError",
    "load_coco_captions",
    "load_video_captions",
    "read_image",
    "references",
]

_logger = logging.getLogger(__name__)

# Column names recognised in the header row of a video caption CSV/TSV.
_VIDEO_COLUMNS = ("video", "video_id", "path", "file", "filename", "file_name", "clip", "name")
_CAPTION_COLUMNS = ("caption", "sentence", "text", "description")
# The token id of padding in ``caption_vocab.Vocabulary`` (PAD=0, BOS=1, EOS=2, UNK=3).
_PAD = 0


# ----------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CaptionRecord:
    """One image or video and its reference captions.

    ``key`` identifies it in predictions, references and result files: the COCO image id as a
    string (``"391895"``), an MSR-VTT video id (``"video0"``) or a listed video path without its
    suffix.
    """

    path: Path
    captions: tuple[str, ...]
    key: str


def references(records: Iterable[CaptionRecord]) -> dict[str, list[str]]:
    """Key -> the record's raw captions, for ``caption_metrics.caption_scores``.

    Raises:
        ValueError: two records share a key (their references would be ambiguous).
    """
    out: dict[str, list[str]] = {}
    for record in records:
        if record.key in out:
            raise ValueError(f"records: the key {record.key!r} occurs twice ({record.path})")
        out[record.key] = list(record.captions)
    return out


def _clean(caption: Any) -> str:
    """A caption as one line: collapse whitespace (newlines would break line-based scorers)."""
    return " ".join(str(caption).split())


def _finish(
    records: list[CaptionRecord],
    missing: list[Path],
    *,
    what: Path,
    unit: str,
    listed: int,
    read: str,
    uncaptioned: int,
) -> tuple[list[CaptionRecord], int]:
    """Warn once about missing files, note uncaptioned ones, and refuse a result without pairs."""
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        _logger.warning(
            "%s: %d of %d %s with captions do not exist and were skipped: %s%s",
            what, len(missing), len(missing) + len(records), unit, shown, more,
        )  # fmt: skip
    if uncaptioned:
        _logger.info("%s: %d listed %s have no caption and were skipped", what, uncaptioned, unit)
    if not records:
        raise ValueError(
            f"{what}: no usable ({unit[:-1]}, caption) pairs: read {read}, {listed} {unit} listed, "
            f"{len(missing)} of those with captions missing on disk, {uncaptioned} without captions"
        )
    return records, len(missing)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _splits(split: str | Sequence[str] | None) -> set[str] | None:
    if split is None:
        return None
    names = {split} if isinstance(split, str) else set(split)
    if not names or not all(isinstance(s, str) and s for s in names):
        raise ValueError(f"split must be a name or a sequence of names, got {split!r}")
    return names


# ------------------------------------------------------------------------------------------ images


def load_coco_captions(
    annotations_json: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    split: str | Sequence[str] | None = None,
) -> tuple[list[CaptionRecord], int]:
    """Read image captions; return the records (in the file's image order) and the missing count.

    Formats, recognised by their keys:

    - **COCO captions** (``captions_train2014.json``): ``{"images": [{"id", "file_name", ...}],
      "annotations": [{"image_id", "caption", ...}]}``; the file of an image is
      ``image_root / file_name``, its key ``str(id)``.
    - **Karpathy split** (``dataset_coco.json``, also Flickr8k/30k): ``{"images": [{"filepath"?,
      "filename", "cocoid" or "imgid", "split", "sentences": [{"raw", ...}]}]}``; the file is
      ``image_root / filepath / filename``, the key ``str(cocoid)`` (else ``imgid``). ``split``
      keeps the images of the named splits: ``"test"``, or ``("train", "restval")`` for the usual
      113k-image training set.

    Captions are grouped per image, whitespace collapsed. Images without captions are skipped
    (logged); images that do not exist under ``image_root`` are skipped and counted, with one
    warning that gives the count and a few paths.

    Returns:
        ``(records, missing_count)``.

    Raises:
        FileNotFoundError: the annotations file or ``image_root`` does not exist.
        ValueError: not one of the formats, a malformed entry, ``split`` on a COCO file, or no usable
            (image, caption) pair (the message gives what was read and what was missing).
    """
    path, root = Path(annotations_json), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotations file")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    data = _read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and isinstance(data.get("annotations"), list):
        if split is not None:
            raise ValueError(
                f"split applies to Karpathy split files; {path} is a COCO captions file (one split)"
            )
        return _read_coco(path, root, images, data["annotations"])
    if isinstance(images, list) and all(isinstance(i, dict) and "sentences" in i for i in images):
        return _read_karpathy(path, root, images, _splits(split))
    found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
    raise ValueError(
        f"{path}: expected COCO captions JSON (keys 'images' and 'annotations') or a Karpathy split "
        f"JSON ('images' with 'sentences'), got {found}"
    )


def _read_coco(
    path: Path, root: Path, images: list[Any], annotations: list[Any]
) -> tuple[list[CaptionRecord], int]:
    captions: dict[str, list[str]] = {}
    for n, annotation in enumerate(annotations):
        if not (isinstance(annotation, dict) and "image_id" in annotation and "caption" in annotation):
            raise ValueError(f"{path}: annotations[{n}] needs 'image_id' and 'caption', got {annotation!r}")
        text = _clean(annotation["caption"])
        if text:
            captions.setdefault(str(annotation["image_id"]), []).append(text)
    records, missing, uncaptioned = [], [], 0
    for n, image in enumerate(images):
        if not (isinstance(image, dict) and "id" in image and "file_name" in image):
            raise ValueError(f"{path}: images[{n}] needs 'id' and 'file_name', got {image!r}")
        key = str(image["id"])
        if key not in captions:
            uncaptioned += 1
            continue
        file = root / str(image["file_name"])
        if file.is_file():
            records.append(CaptionRecord(file, tuple(captions[key]), key))
        else:
            missing.append(file)
    return _finish(
        records, missing, what=path, unit="images", listed=len(images),
        read=f"{len(annotations)} annotations", uncaptioned=uncaptioned,
    )  # fmt: skip


def _read_karpathy(
    path: Path, root: Path, images: list[dict], splits: set[str] | None
) -> tuple[list[CaptionRecord], int]:
    records, missing, uncaptioned, listed, sentences = [], [], 0, 0, 0
    for n, image in enumerate(images):
        if "filename" not in image:
            raise ValueError(f"{path}: images[{n}] needs 'filename'")
        if splits is not None and image.get("split") not in splits:
            continue
        listed += 1
        texts = []
        for sentence in image["sentences"]:
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and "tokens" in sentence:
                raw = " ".join(sentence["tokens"])
            if _clean(raw or ""):
                texts.append(_clean(raw))
        sentences += len(texts)
        if not texts:
            uncaptioned += 1
            continue
        key = image.get("cocoid", image.get("imgid", Path(image["filename"]).stem))
        file = root / str(image.get("filepath", "")) / str(image["filename"])
        if file.is_file():
            records.append(CaptionRecord(file, tuple(texts), str(key)))
        else:
            missing.append(file)
    where = f" in split {sorted(splits)}" if splits is not None else ""
    return _finish(
        records, missing, what=path, unit="images", listed=listed,
        read=f"{len(images)} images, {sentences} sentences{where}", uncaptioned=uncaptioned,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ videos


def _resolve_video(base: Path, name: str) -> tuple[Path, bool]:
    """The file of a listed video: ``base / name``, or ``base / name<ext>`` for a name without a
    video suffix (MSR-VTT ids). Returns (path, exists); a missing one is reported as listed."""
    listed = Path(name) if Path(name).is_absolute() else base / name
    if listed.is_file():
        return listed, True
    if listed.suffix.lower() not in VIDEO_EXTENSIONS:
        for ext in VIDEO_EXTENSIONS:
            candidate = listed.with_name(listed.name + ext)
            if candidate.is_file():
                return candidate, True
        return listed.with_name(listed.name + ".mp4"), False
    return listed, False


def _video_key(name: str) -> str:
    """A listed video's key: its path as written, '/'-separated, without a video suffix."""
    name = name.replace("\\", "/")
    stem, dot, ext = name.rpartition(".")
    return stem if dot and f".{ext.lower()}" in VIDEO_EXTENSIONS else name


def load_video_captions(
    path: str | os.PathLike,
    video_root: str | os.PathLike | None = None,
    *,
    split: str | Sequence[str] | None = None,
) -> tuple[list[CaptionRecord], int]:
    """Read video captions; return the records (in first-listed order) and the missing count.

    Formats:

    - **CSV / TSV** (any suffix but ``.json``; tab-separated for ``.tsv`` or a tab in the first
      line): ``video,caption`` rows, several per video. An optional header row names the columns
      (video: ``video``, ``video_id``, ``path``, ``file``, ...; caption: ``caption``, ``sentence``,
      ``text``, ``description``) and may have others, which are ignored. Without a header the first
      field is the video and the rest of the row the caption, so unquoted commas in a caption are
      kept. Blank lines are skipped.
    - **MSR-VTT JSON**: ``{"videos": [{"video_id": "video0", "split"?, ...}], "sentences":
      [{"video_id": "video0", "caption": "..."}]}``; ``"videos"`` may be absent (then every video
      with a sentence counts); ``split`` keeps the videos whose ``"split"`` is named (MSR-VTT's
      ``"train"``, ``"validate"``, ``"test"``).
    - **a JSON list** ``[{"video": "a.mp4", "captions": ["...", ...]}]`` (``"caption"``: one string;
      ``"id"`` / ``"video_id"``: the key, by default the path without its suffix).

    A video is ``video_root / <listed path>`` (``video_root`` defaults to the file's folder); a name
    without a video suffix (MSR-VTT's ``video0``) is looked up as ``<name>.mp4``, ``<name>.avi``, ...
    Keys: the MSR-VTT id, else the listed path without its suffix. Missing videos are skipped and
    counted, with one warning.

    Returns:
        ``(records, missing_count)``.

    Raises:
        FileNotFoundError: the file or ``video_root`` does not exist.
        ValueError: a malformed row or entry (file and line / index named), ``split`` on a format
            without splits, or no usable (video, caption) pair.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such caption file")
    base = Path(video_root) if video_root is not None else path.parent
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such video folder (video_root of {path})")
    splits = _splits(split)
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and isinstance(data.get("sentences"), list):
            entries, read, listed_only = _msrvtt_entries(path, data, splits)
        elif isinstance(data, list):
            if splits is not None:
                raise ValueError(f"split applies to MSR-VTT JSON files; {path} is a JSON list")
            entries, read, listed_only = _list_entries(path, data)
        else:
            found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{path}: expected an MSR-VTT JSON (keys 'videos', 'sentences') or a list of "
                f"{{'video', 'captions'}}, got {found}"
            )
    else:
        if splits is not None:
            raise ValueError(f"split applies to MSR-VTT JSON files; {path} is a caption list")
        entries, read, listed_only = _row_entries(path)
    # Group per video in first-listed order: (key, listed name) -> captions.
    grouped: dict[str, tuple[str, list[str]]] = {}
    for key, name, caption in entries:
        grouped.setdefault(key, (name, []))[1].append(caption)
    records, missing = [], []
    for key, (name, captions) in grouped.items():
        file, exists = _resolve_video(base, name)
        if exists:
            records.append(CaptionRecord(file, tuple(captions), key))
        else:
            missing.append(file)
    uncaptioned = len(set(listed_only) - set(grouped))
    return _finish(
        records, missing, what=path, unit="videos", listed=len(grouped) + uncaptioned,
        read=read, uncaptioned=uncaptioned,
    )  # fmt: skip


def _row_entries(path: Path) -> tuple[list[tuple[str, str, str]], str, list[str]]:
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        return [], "0 rows", []
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in lines[0][1] else ","
    reader = csv.reader([line for _, line in lines], delimiter=delimiter)
    rows = [(n, fields) for (n, _), fields in zip(lines, reader, strict=True)]
    header = [field.strip().lower() for field in rows[0][1]]
    video_column, caption_column = 0, None  # None: the rest of the row after the video
    video_names = [c for c in _VIDEO_COLUMNS if c in header]
    caption_names = [c for c in _CAPTION_COLUMNS if c in header]
    if video_names and caption_names:
        video_column, caption_column = header.index(video_names[0]), header.index(caption_names[0])
        rows = rows[1:]
    entries = []
    for line, fields in rows:
        if caption_column is None:
            name, caption = fields[0] if fields else "", delimiter.join(fields[1:])
        else:
            if len(fields) <= max(video_column, caption_column):
                raise ValueError(f"{path}:{line}: expected {len(header)} fields ({','.join(header)})")
            name, caption = fields[video_column], fields[caption_column]
        name, caption = name.strip(), _clean(caption)
        if not name or not caption:
            raise ValueError(f"{path}:{line}: expected 'video{delimiter}caption', got {fields!r}")
        entries.append((_video_key(name), name, caption))
    return entries, f"{len(rows)} rows", []


def _msrvtt_entries(
    path: Path, data: dict, splits: set[str] | None
) -> tuple[list[tuple[str, str, str]], str, list[str]]:
    videos = data.get("videos")
    listed: list[str] | None = None
    if videos is not None:
        if not isinstance(videos, list):
            raise ValueError(f"{path}: 'videos' must be a list, got {type(videos).__name__}")
        listed = []
        for n, video in enumerate(videos):
            if not (isinstance(video, dict) and "video_id" in video):
                raise ValueError(f"{path}: videos[{n}] needs 'video_id', got {video!r}")
            if splits is None or video.get("split") in splits:
                listed.append(str(video["video_id"]))
    elif splits is not None:
        raise ValueError(f"split needs the 'videos' list with their 'split's; {path} has none")
    keep = None if listed is None else set(listed)
    entries = []
    for n, sentence in enumerate(data["sentences"]):
        if not (isinstance(sentence, dict) and "video_id" in sentence and "caption" in sentence):
            raise ValueError(f"{path}: sentences[{n}] needs 'video_id' and 'caption', got {sentence!r}")
        key, caption = str(sentence["video_id"]), _clean(sentence["caption"])
        if caption and (keep is None or key in keep):
            entries.append((key, key, caption))
    where = f" (keeping the videos of split {sorted(splits)})" if splits is not None else ""
    return entries, f"{len(data['sentences'])} sentences{where}", listed or []


def _list_entries(path: Path, data: list) -> tuple[list[tuple[str, str, str]], str, list[str]]:
    entries, listed = [], []
    for n, item in enumerate(data):
        if not (isinstance(item, dict) and "video" in item and ("captions" in item or "caption" in item)):
            raise ValueError(f"{path}: [{n}] needs 'video' and 'captions', got {item!r}")
        captions = item.get("captions", item.get("caption"))
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list):
            raise ValueError(f"{path}: [{n}]['captions'] must be a list of strings, got {captions!r}")
        name = str(item["video"])
        key = str(item.get("id", item.get("video_id", _video_key(name))))
        listed.append(key)
        entries += [(key, name, _clean(c)) for c in captions if _clean(c)]
    return entries, f"{len(data)} entries", listed


# ----------------------------------------------------------------------------------------- dataset


class UnreadableImageError(Exception):
    """An image that cannot be read: ``path`` and a short ``reason`` (as ``UnreadableVideoError``)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file with PIL as RGB: uint8 (3, H, W).

    Raises:
        UnreadableImageError: missing, empty, truncated or not an image.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(path, "no such file")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))  # convert() decodes the whole file
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        message = " ".join(str(err).split())[:200]
        raise UnreadableImageError(path, f"{type(err).__name__}: {message}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _int_at_least(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in pair):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


class CaptionDataset(Dataset):
    """Images or videos with captions, for training a captioner and for generating captions.

    Training item ``i`` (``train=True``), one per (record, caption) pair, record-major::

        image       float32 (C, size_h, size_w)      the picture, augmented, normalised (images)
        video       float32 (T, C, size_h, size_w)   or the clip (videos)
        tokens      int64 (max_len + 2,)             [BOS, w_1 .. w_n, EOS, PAD ...], n <= max_len
        length      int64 ()                         n + 2: the tokens before the padding
        index       int64 ()                         the record the picture came from
        unreadable  int64 ()                         unreadable records skipped to produce this item

    Evaluation item ``i`` (``train=False``), one per record::

        image / video  as above, resized (short side ``resize``) and centre-cropped
        index          int64 ()  i
        valid          int64 ()  1, or 0 for an unreadable file (the picture is all zeros)

    Captions are encoded once at construction with ``vocab``; a caption of more than ``max_len``
    words keeps its first ``max_len`` and its EOS, and is counted (``truncated_count``, one log line).

    Transforms are ``video_data``'s: training ``RandomResizedCrop(size, crop_scale, crop_ratio)``
    and, with ``hflip``, a horizontal flip (off by default: captions say "left" and "right");
    evaluation a resize of the short side to ``resize`` and a centre crop; then ``[0, 1]`` scaling
    and ``Normalize(mean, std)``. An image is a one-frame clip to them. Videos: ``num_frames``
    frames by ``sampling`` (``sample_frame_indices``; 'random' is evaluated as 'dense'), one clip,
    one centre crop in evaluation, decoded by ``decode_frames``.

    Training randomness (frames, crop, flip) depends only on ``(seed, epoch, i)`` and the record
    used, so DataLoader workers and resumed runs agree; ``set_epoch`` selects the epoch.

    Unreadable files are warned about once per file and process and remembered
    (``unreadable_files()``). Training then uses the pair of the next readable record (the caption
    goes with its picture) and counts the records skipped in ``unreadable``; beyond
    ``max_unreadable_fraction`` of the records known unreadable it raises ``UnreadableDatasetError``.
    Evaluation returns zeros with ``valid = 0``, so every record is accounted for.

    Args:
        records: the images or videos (``load_coco_captions`` / ``load_video_captions``).
        vocab: a ``caption_vocab.Vocabulary`` (needed for training; unused in evaluation).
        train: training pairs or evaluation records.
        max_len: the most words of a caption; token rows are ``max_len + 2`` long.
        video: videos or images; ``None`` decides by the records' suffixes (``VIDEO_EXTENSIONS``).
        size: output crop, int or (height, width).
        resize: evaluation: the short side before the centre crop.
        crop_scale, crop_ratio: training crop area fraction and aspect ratio. The default keeps at
            least half the picture: a tighter crop drops the objects the caption mentions.
        hflip: training horizontal flips.
        num_frames, sampling, stride: the clip of a video (ignored for images).
        mean, std: per-channel normalisation of [0, 1] pixels (ImageNet's by default).
        seed: with the epoch and the index, determines every training item.
        max_unreadable_fraction: training fails beyond this fraction of unreadable records.
        check_frame_count: ``decode_frames``'s guard against over-reported frame counts.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        vocab: Vocabulary | None = None,
        *,
        train: bool,
        max_len: int = 20,
        video: bool | None = None,
        size: int | Sequence[int] = 224,
        resize: int = 256,
        crop_scale: Sequence[float] = (0.5, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = False,
        num_frames: int = 8,
        sampling: Literal["uniform", "dense", "random"] = "uniform",
        stride: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        max_unreadable_fraction: float = 0.1,
        check_frame_count: bool = True,
    ):
        super().__init__()
        if not all(isinstance(r, CaptionRecord) for r in records):
            raise TypeError("records must be CaptionRecords (see load_coco_captions / load_video_captions)")
        self.records = [CaptionRecord(Path(r.path), tuple(r.captions), str(r.key)) for r in records]
        if not self.records:
            raise ValueError("records: need at least one image or video")
        self.train = bool(train)
        self.max_len = _int_at_least(max_len, "max_len", 1)
        self.video = self._detect_video(video)
        self.size = _size(size)
        self.resize = _int_at_least(resize, "resize", 1)
        if not self.train and self.resize < min(self.size):
            raise ValueError(f"resize (the short side, {resize}) must be >= the crop size {size}")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {crop_scale!r}")
        self.num_frames = _int_at_least(num_frames, "num_frames", 1)
        if sampling not in SAMPLING_MODES:
            raise ValueError(
                f"sampling must be one of {', '.join(map(repr, SAMPLING_MODES))}, got {sampling!r}"
            )
        # 'random' is dense sampling at random starts: evaluating it means a dense clip at a fixed start.
        self.sampling = "dense" if sampling == "random" and not self.train else sampling
        self.stride = _int_at_least(stride, "stride", 1)
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"mean and std must be 3 values (RGB), std > 0; got {mean!r}, {std!r}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self.epoch = 0
        if not 0.0 <= float(max_unreadable_fraction) <= 1.0:
            raise ValueError(f"max_unreadable_fraction must be in [0, 1], got {max_unreadable_fraction!r}")
        self.max_unreadable_fraction = float(max_unreadable_fraction)
        self.check_frame_count = bool(check_frame_count)
        self._transform = None
        if self.train:
            self._transform = train_clip_transform(
                self.size, scale=crop_scale, ratio=crop_ratio, hflip=hflip, mean=mean, std=std
            )
        self._unreadable: dict[Path, str] = {}
        self._clamped: set[Path] = set()
        self.truncated_count = 0
        if self.train:
            if vocab is None:
                raise ValueError("vocab: training (train=True) needs a caption_vocab.Vocabulary, got None")
            self._encode_pairs(vocab)

    def _detect_video(self, video: bool | None) -> bool:
        is_video = [r.path.suffix.lower() in VIDEO_EXTENSIONS for r in self.records]
        if video is None:
            if any(is_video) and not all(is_video):
                example = self.records[is_video.index(False)].path
                raise ValueError(f"records mix videos and images (e.g. {example}); pass video=True or False")
            return bool(is_video[0])
        if not isinstance(video, bool):
            raise TypeError(f"video must be True, False or None (by suffix), got {type(video).__name__}")
        return video

    def _encode_pairs(self, vocab: Vocabulary) -> None:
        """Every (record, caption) pair as a fixed-length token row, in numpy arrays (not lists of
        Python ints, which DataLoader workers would copy page by page as reference counts change)."""
        rows, lengths, owners, truncated = [], [], [], 0
        width = self.max_len + 2
        for r, record in enumerate(self.records):
            for caption in record.captions:
                ids, cut = vocab.encode(caption, max_len=self.max_len)
                if len(ids) > width:
                    raise ValueError(
                        f"vocab.encode(max_len={self.max_len}) returned {len(ids)} ids, "
                        f"expected at most {width}"
                    )
                row = np.full(width, _PAD, dtype=np.int32)
                row[: len(ids)] = ids
                rows.append(row)
                lengths.append(len(ids))
                owners.append(r)
                truncated += bool(cut)
        if not rows:
            raise ValueError(f"records: none of the {len(self.records)} records has a caption to train on")
        self._tokens = np.stack(rows)
        self._lengths = np.asarray(lengths, dtype=np.int32)
        self._pair_record = np.asarray(owners, dtype=np.int64)
        # Pairs are record-major: record r's pairs are [first[r], first[r] + count[r]).
        counts = np.bincount(self._pair_record, minlength=len(self.records))
        self._first_pair = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._pair_counts = counts.astype(np.int64)
        self.truncated_count = truncated
        _logger.info(
            "%d of %d training captions longer than max_len=%d were truncated",
            truncated, len(rows), self.max_len,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose training items ``__getitem__`` returns (0 at construction)."""
        if not (isinstance(epoch, int) and epoch >= 0):
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._tokens) if self.train else len(self.records)

    @property
    def input_key(self) -> str:
        """``'video'`` or ``'image'``: the name of the picture in items."""
        return "video" if self.video else "image"

    def unreadable_files(self) -> dict[Path, str]:
        """The files this process found unreadable: path -> reason (a copy)."""
        return dict(self._unreadable)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        return self._train_item(index) if self.train else self._eval_item(index)

    # -- training

    def _train_item(self, index: int) -> dict[str, torch.Tensor]:
        pair, skipped = index, 0
        for _ in range(len(self.records)):
            r = int(self._pair_record[pair])
            record = self.records[r]
            # One generator per (seed, epoch, item, record tried): the item does not depend on which
            # files this process happened to find unreadable before (other workers know others).
            rng = np.random.default_rng((self.seed, self.epoch, index, r))
            try:
                if record.path in self._unreadable:
                    raise UnreadableImageError(record.path, self._unreadable[record.path])
                pixels = self._load(record.path, rng)
            except (UnreadableImageError, UnreadableVideoError) as err:
                self._mark_unreadable(err)
                skipped += 1
                self._check_unreadable_fraction()
                # The next record's first pair: the caption must describe the picture it comes with.
                pair = int(self._first_pair[r] + self._pair_counts[r]) % len(self._tokens)
                continue
            # fork_rng: the v2 transforms draw from torch's global generator; seed a private copy so
            # the crop and flip follow (seed, epoch, index) and callers' streams are untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**63 - 1)))
                out = self._transform(pixels)  # (T, C, h, w); T = 1 for an image
            return {
                self.input_key: (out if self.video else out[0]).contiguous(),
                "tokens": torch.from_numpy(self._tokens[pair].astype(np.int64)),
                "length": torch.tensor(int(self._lengths[pair]), dtype=torch.int64),
                "index": torch.tensor(r, dtype=torch.int64),
                "unreadable": torch.tensor(skipped, dtype=torch.int64),
            }
        raise UnreadableDatasetError(
            f"all {len(self.records)} files are unreadable (see the warnings for the reasons)"
        )

    # -- evaluation

    def _eval_item(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        item = {"index": torch.tensor(index, dtype=torch.int64)}
        try:
            if record.path in self._unreadable:
                raise UnreadableImageError(record.path, self._unreadable[record.path])
            pixels = self._load(record.path, None)
        except (UnreadableImageError, UnreadableVideoError) as err:
            self._mark_unreadable(err)
            shape = (self.num_frames, 3, *self.size) if self.video else (3, *self.size)
            item[self.input_key] = torch.zeros(shape)
            item["valid"] = torch.tensor(0, dtype=torch.int64)
            return item
        views = eval_clip_views(
            pixels, size=self.size, resize=self.resize, num_crops=1, mean=self.mean, std=self.std
        )  # (1, T, C, h, w)
        item[self.input_key] = (views[0] if self.video else views[0, 0]).contiguous()
        item["valid"] = torch.tensor(1, dtype=torch.int64)
        return item

    # -- shared

    def _load(self, path: Path, rng: np.random.Generator | None) -> torch.Tensor:
        """uint8 (T, C, H, W): the sampled frames of a video, or the image as one frame."""
        if not self.video:
            return read_image(path)[None]

        def choose(count: int) -> np.ndarray:
            return sample_frame_indices(count, self.num_frames, self.sampling, stride=self.stride, rng=rng)

        frames, _, count, reported = decode_frames(path, choose, check_frame_count=self.check_frame_count)
        if count < reported and path not in self._clamped:
            self._clamped.add(path)
            _logger.warning(
                "%s: the container reports %d frames but only %d decode; sampling from the first %d",
                path, reported, count, count,
            )  # fmt: skip
        return frames

    def _mark_unreadable(self, err: UnreadableImageError | UnreadableVideoError) -> None:
        if err.path not in self._unreadable:
            self._unreadable[err.path] = err.reason
            what = "video" if self.video else "image"
            _logger.warning("%s: unreadable %s, skipped (%s)", err.path, what, err.reason)

    def _check_unreadable_fraction(self) -> None:
        fraction = len(self._unreadable) / len(self.records)
        if fraction > self.max_unreadable_fraction:
            shown = "; ".join(f"{p}: {why}" for p, why in sorted(self._unreadable.items(), key=str)[:3])
            raise UnreadableDatasetError(
                f"{len(self._unreadable)} of {len(self.records)} files ({fraction:.1%}) are unreadable, "
                f"more than max_unreadable_fraction={self.max_unreadable_fraction:g}; {shown}"
            )
