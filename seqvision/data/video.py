"""Video recognition data: video lists, frame sampling, decoding with decord, clip transforms, a dataset.

Everything here works on clips: ``T`` frames of ``C = 3`` (RGB) channels, ``H x W`` pixels, laid out
(T, C, H, W) as torchvision's video transforms expect. Decoded frames are uint8; the dataset returns
float32 normalised clips.

1. **Lists** (``load_video_list``): a folder per class (UCF101 / HMDB51 layout), a ``path,label``
   CSV/TSV list, a Kinetics annotation CSV, or UCF101's official ``trainlist0N.txt`` /
   ``testlist0N.txt`` split files with ``classInd.txt``. Each gives ``VideoRecord(path, label)``s and
   the class names; ``classes=`` reuses a training class list, so evaluation labels mean the same.
2. **Sampling** (``sample_frame_indices``): which frames of a video make a clip. ``'uniform'`` is
   TSN's segment sampling, ``'dense'`` consecutive frames with a stride, ``'random'`` the training
   form of ``'dense'``. A generator means training (random draws), none means evaluation
   (deterministic positions, several clips per video through ``clip_index`` / ``num_clips``).
3. **Decoding** (``decode_frames``): decord, one ``VideoReader`` per call, deleted before returning,
   after checking how many frames the file really decodes (``decodable_frame_count``: decord trusts
   the container, and asking it for a frame past the real end can hang the process).
4. **Transforms** (``train_clip_transform``, ``eval_clip_views``): torchvision.transforms.v2 on the
   whole uint8 clip, so the random crop and flip are drawn once and applied to every frame alike.
5. **Dataset** (``VideoClipDataset``): training items are one augmented clip; evaluation items are
   every (clip, crop) view of a video. Unreadable videos are warned about once, remembered, counted,
   and replaced (training) or marked invalid (evaluation).

decord is imported only when a video is decoded, so lists, sampling and transforms work without it.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from seqvision.utils.checks import check_int
from seqvision.utils.extras import require

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAMPLING_MODES",
    "VIDEO_EXTENSIONS",
    "UnreadableDatasetError",
    "UnreadableVideoError",
    "VideoClipDataset",
    "VideoRecord",
    "decodable_frame_count",
    "decode_frames",
    "eval_clip_views",
    "load_video_list",
    "sample_frame_indices",
    "summarise_unreadable",
    "train_clip_transform",
]

_logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v")
SAMPLING_MODES = ("uniform", "dense", "random")
# ImageNet statistics (timm's IMAGENET_DEFAULT_MEAN / _STD): the backbones are pretrained on images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_KINETICS_COLUMNS = {"label", "youtube_id", "time_start", "time_end"}
_UCF_SPLIT_NAME = re.compile(r"^(train|test)list\d+\.txt$", re.IGNORECASE)
# A first row whose path column is one of these names is a header, not a video.
_HEADER_PATH_NAMES = {"path", "video", "video_path", "file", "filename", "file_name", "name", "clip"}


# ------------------------------------------------------------------------------------------- lists


@dataclass(frozen=True)
class VideoRecord:
    """One video of a list: its file and its class id (0-based, into the list's class names)."""

    path: Path
    label: int


def load_video_list(
    source: str | os.PathLike | None = None,
    *,
    root: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> tuple[list[VideoRecord], list[str]]:
    """Read a video list; return its records (in list order) and the class names (index = label).

    Formats, chosen by what ``source`` is:

    - **a folder**: one subfolder per class (UCF101 / HMDB51 layout, ``source/<class>/<video>``),
      searched recursively for files with a ``VIDEO_EXTENSIONS`` suffix. Classes are the
      subfolders' names sorted alphabetically (empty ones included, so ids do not depend on which
      videos are present).
    - **a Kinetics annotation CSV** (header ``label,youtube_id,time_start,time_end,split[,is_cc]``):
      the file of a row is ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4``, looked up in
      ``root/<label>/``, ``root/<label with spaces as _>/`` and ``root/`` (``root`` defaults to the
      CSV's folder). Classes: the CSV's labels sorted, from every row, downloaded or not.
    - **a CSV / TSV / text list** of ``path,label`` rows (tab-separated for ``.tsv``; a ``.txt``
      list may separate the label with spaces, the last field being the label). An optional header
      row is recognised by its path column name (``path``, ``video``, ``filename``, ...). Labels
      are all integer ids or all class names; paths are relative to ``root`` (default: the list
      file's folder) unless absolute. Classes: the sorted names, or ``"0" .. "<max id>"`` for ids.
    - **UCF101 split files** (``split_file=``, or a ``source`` named ``trainlist01.txt`` /
      ``testlist01.txt``), with ``root`` the video folder: ``trainlist`` rows are
      ``Class/v_Class_g08_c01.avi 1`` (1-based id from ``classInd.txt`` in the split file's
      folder), ``testlist`` rows ``Class/v_Class_g01_c01.avi`` (the class from the folder name).
      Classes: ``classInd.txt``'s names in id order.

    For list formats, listed files that do not exist are skipped with one warning that counts them.

    Args:
        source: the folder or list file (omit it when ``split_file`` is given).
        root: where list paths are relative to (list files; the video folder for UCF101 splits).
        split_file: a UCF101 ``trainlist0N.txt`` / ``testlist0N.txt``.
        classes: reuse these class names (a training set's) so labels match: a name not in them is
            an error naming it, and integer ids must be below ``len(classes)``.
        extensions: the file suffixes a class folder is searched for (videos by default; image
            classification passes image suffixes and reads the same layouts).

    Raises:
        FileNotFoundError: ``source``, ``root``, ``split_file`` or ``classInd.txt`` missing.
        ValueError: a malformed row (the message names file and line), an unknown class, mixed id
            and name labels, or no videos at all.
    """
    class_list = None if classes is None else [str(c) for c in classes]
    if class_list is not None and len(set(class_list)) != len(class_list):
        raise ValueError(f"classes: names must be unique, got {len(class_list)} with duplicates")
    if split_file is not None:
        if source is not None:
            raise ValueError("pass either source or split_file (with root, the video folder), not both")
        if root is None:
            raise ValueError("split_file needs root, the folder holding the <Class>/<video> files")
        return _finish(*_read_ucf_split(Path(split_file), Path(root), class_list), what=str(split_file))
    if source is None:
        raise ValueError("source: need a folder or a list file (or split_file= and root=)")
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or list file")
    if source.is_dir():
        if root is not None:
            raise ValueError(f"root applies to list files; {source} is a folder of class folders")
        suffixes = tuple(e.lower() for e in extensions)
        return _finish(*_read_class_folders(source, class_list, suffixes), what=str(source))
    if _UCF_SPLIT_NAME.match(source.name) and (source.parent / "classInd.txt").exists():
        if root is None:
            raise ValueError(f"{source}: a UCF101 split file needs root, the video folder")
        return _finish(*_read_ucf_split(source, Path(root), class_list), what=str(source))
    base = Path(root) if root is not None else source.parent
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such folder (root of the paths in {source})")
    rows = _read_rows(source)
    if rows and {field.strip().lower() for field in rows[0][1]} >= _KINETICS_COLUMNS:
        return _finish(*_read_kinetics(source, rows, base, class_list), what=str(source))
    return _finish(*_read_path_label_rows(source, rows, base, class_list), what=str(source))


def _finish(
    records: list[VideoRecord], classes: list[str], missing: list[Path], *, what: str
) -> tuple[list[VideoRecord], list[str]]:
    """Warn once about missing files and refuse an empty result."""
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        _logger.warning(
            "%s: %d of %d listed videos do not exist and were skipped: %s%s",
            what, len(missing), len(missing) + len(records), shown, more,
        )  # fmt: skip
    if not records:
        detail = f"; all {len(missing)} listed files are missing (check root)" if missing else ""
        raise ValueError(f"{what}: no videos found{detail}")
    return records, classes


def _has_suffix(path: Path, extensions: Sequence[str]) -> bool:
    return path.suffix.lower() in extensions and not path.name.startswith(".")


def _class_id(name: str, lookup: dict[str, int], where: str) -> int:
    """The id of class ``name`` (``lookup``: name -> id), or an error naming it and ``where``."""
    try:
        return lookup[name]
    except KeyError:
        known = ", ".join(repr(c) for c in list(lookup)[:5]) + (", ..." if len(lookup) > 5 else "")
        raise ValueError(
            f"{where}: unknown class {name!r}; expected one of the {len(lookup)} classes ({known})"
        ) from None


def _lookup(classes: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(classes)}


def _read_class_folders(
    folder: Path, classes: list[str] | None, extensions: Sequence[str]
) -> tuple[list[VideoRecord], list[str], list[Path]]:
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = [p.name for p in subfolders]
    classes = names if classes is None else classes
    lookup = _lookup(classes)
    records = []
    for sub in subfolders:
        label = _class_id(sub.name, lookup, str(sub))
        videos = sorted(p for p in sub.rglob("*") if p.is_file() and _has_suffix(p, extensions))
        records += [VideoRecord(p, label) for p in videos]
    return records, classes, []


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank, non-comment rows of a list file as (line number, fields)."""
    text = path.read_text()
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    lines = [(n, line) for n, line in lines if not line.lstrip().startswith("#")]
    if not lines:
        return []
    first = lines[0][1]
    if path.suffix.lower() == ".tsv" or "\t" in first:
        delimiter = "\t"
    elif "," in first:
        delimiter = ","
    else:  # "path label" text lists: the label is the last whitespace-separated field
        return [(n, line.strip().rsplit(None, 1)) for n, line in lines]
    reader = csv.reader([line for _, line in lines], delimiter=delimiter)
    return [(n, [f.strip() for f in fields]) for (n, _), fields in zip(lines, reader, strict=True)]


def _read_path_label_rows(
    path: Path, rows: list[tuple[int, list[str]]], base: Path, classes: list[str] | None
) -> tuple[list[VideoRecord], list[str], list[Path]]:
    if rows and rows[0][1][0].strip().lower() in _HEADER_PATH_NAMES:
        rows = rows[1:]
    entries = []
    for line, fields in rows:
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise ValueError(f"{path}:{line}: expected 'path,label', got {','.join(fields)!r}")
        entries.append((line, fields[0], fields[1]))
    is_id = [re.fullmatch(r"[+-]?\d+", label) is not None for _, _, label in entries]
    if classes is None and any(is_id) and not all(is_id):
        line = entries[is_id.index(not is_id[0])][0]
        raise ValueError(
            f"{path}:{line}: labels mix integer ids and class names; use one kind (or pass classes=)"
        )
    if classes is None:
        if all(is_id):
            top = max((int(label) for _, _, label in entries), default=-1)
            classes = [str(i) for i in range(top + 1)]
        else:
            classes = sorted({label for _, _, label in entries})
    lookup = _lookup(classes)
    records, missing = [], []
    for (line, name, label), numeric in zip(entries, is_id, strict=True):
        if numeric and label not in lookup:  # an id; a class may itself be named "3"
            label_id = int(label)
            if not 0 <= label_id < len(classes):
                raise ValueError(
                    f"{path}:{line}: label id {label_id} out of range for {len(classes)} classes"
                )
        else:
            label_id = _class_id(label, lookup, f"{path}:{line}")
        video = Path(name) if Path(name).is_absolute() else base / name
        if video.is_file():
            records.append(VideoRecord(video, label_id))
        else:
            missing.append(video)
    return records, classes, missing


def _read_kinetics(
    path: Path, rows: list[tuple[int, list[str]]], base: Path, classes: list[str] | None
) -> tuple[list[VideoRecord], list[str], list[Path]]:
    header = [field.strip().lower() for field in rows[0][1]]
    column = {name: header.index(name) for name in _KINETICS_COLUMNS}
    entries = []
    for line, fields in rows[1:]:
        if len(fields) < len(header):
            raise ValueError(f"{path}:{line}: expected {len(header)} fields ({','.join(header)})")
        try:
            start, end = (int(float(fields[column[key]])) for key in ("time_start", "time_end"))
        except ValueError:
            raise ValueError(f"{path}:{line}: time_start / time_end must be numbers") from None
        label = fields[column["label"]]
        entries.append((line, label, f"{fields[column['youtube_id']]}_{start:06d}_{end:06d}.mp4"))
    classes = sorted({label for _, label, _ in entries}) if classes is None else classes
    lookup = _lookup(classes)
    records, missing = [], []
    for line, label, name in entries:
        label_id = _class_id(label, lookup, f"{path}:{line}")
        candidates = [base / label / name, base / label.replace(" ", "_") / name, base / name]
        found = next((c for c in candidates if c.is_file()), None)
        if found:
            records.append(VideoRecord(found, label_id))
        else:
            missing.append(candidates[0])
    return records, classes, missing


def _read_ucf_split(
    split: Path, root: Path, classes: list[str] | None
) -> tuple[list[VideoRecord], list[str], list[Path]]:
    if not split.is_file():
        raise FileNotFoundError(f"{split}: no such split file")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such video folder")
    index_file = split.parent / "classInd.txt"
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file}: no classInd.txt next to the split file {split.name}")
    by_id: dict[int, str] = {}
    for line, fields in _read_rows(index_file):
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(f"{index_file}:{line}: expected '<1-based id> <ClassName>'")
        by_id[int(fields[0])] = fields[1]
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise ValueError(f"{index_file}: class ids must be 1..{len(by_id)} without gaps")
    index_classes = [by_id[i] for i in range(1, len(by_id) + 1)]
    classes = index_classes if classes is None else classes
    lookup = _lookup(classes)
    records, missing = [], []
    for line, fields in _read_rows(split):
        relative = fields[0].replace("\\", "/")
        folder_class = relative.split("/")[0] if "/" in relative else None
        if len(fields) > 1:  # trainlist: the 1-based id, which must agree with the folder
            if not fields[1].isdigit() or int(fields[1]) not in by_id:
                raise ValueError(f"{split}:{line}: class id {fields[1]!r} not in {index_file.name}")
            name = by_id[int(fields[1])]
            if folder_class is not None and folder_class != name:
                raise ValueError(
                    f"{split}:{line}: class id {fields[1]} is {name!r} but the video is in {folder_class}/"
                )
        elif folder_class is None:
            raise ValueError(f"{split}:{line}: expected 'Class/video.avi', got {relative!r}")
        else:
            name = folder_class
        label = _class_id(name, lookup, f"{split}:{line}")
        video = root / relative
        if video.is_file():
            records.append(VideoRecord(video, label))
        else:
            missing.append(video)
    return records, classes, missing


# ---------------------------------------------------------------------------------------- sampling


def sample_frame_indices(
    num_available: int,
    num_frames: int,
    mode: Literal["uniform", "dense", "random"] = "uniform",
    *,
    stride: int = 1,
    rng: np.random.Generator | None = None,
    clip_index: int = 0,
    num_clips: int = 1,
) -> np.ndarray:
    """The frame indices of one clip: int64 array of shape (num_frames,), each in [0, num_available).

    ``rng`` selects the regime: a generator means **training** (random draws from it), ``None``
    means **evaluation** (deterministic; ``num_clips`` clips per video, ``clip_index`` picks one).

    - ``'uniform'`` (TSN): the video is cut into ``num_frames`` equal segments (segment k covers
      [k n / F, (k + 1) n / F) of the n frames); training takes a random frame of each segment,
      evaluation the frame ``(clip_index + 0.5) / num_clips`` of the way through each segment (the
      middle for one clip). ``stride`` is ignored.
    - ``'dense'``: ``num_frames`` frames ``stride`` apart (a span of ``(num_frames - 1) * stride + 1``
      frames); training starts at a random frame, evaluation spreads the ``num_clips`` starts evenly
      from the first possible start to the last (one clip: centred).
    - ``'random'``: the training form of ``'dense'`` (a dense clip at a random start) and nothing
      else: it needs ``rng``. ``VideoClipDataset(train=False)`` evaluates it as ``'dense'``, the same
      clips at fixed starts.

    The indices are increasing, except for a video shorter than the clip (``num_available <
    num_frames`` for ``'uniform'``, shorter than the span for the dense modes): the clip then loops
    from frame 0, ``i * stride mod num_available`` for i = 0 .. num_frames - 1 (e.g. 0, 1, 2, 0, 1, 2),
    the same in training and evaluation.

    Raises:
        ValueError: ``num_available`` < 1 (a video without frames cannot be sampled), bad counts,
            an unknown mode, ``'random'`` without ``rng``, or ``num_clips`` != 1 with ``rng``.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, SAMPLING_MODES))}, got {mode!r}")
    if isinstance(num_available, int | np.integer) and num_available == 0:
        raise ValueError("num_available must be >= 1, got 0: a video without frames has no clip")
    n = check_int("num_available", num_available, 1)
    count = check_int("num_frames", num_frames, 1)
    stride = check_int("stride", stride, 1)
    num_clips = check_int("num_clips", num_clips, 1)
    clip_index = check_int("clip_index", clip_index, 0)
    if clip_index >= num_clips:
        raise ValueError(f"clip_index must be < num_clips ({num_clips}), got {clip_index}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator or None, got {type(rng).__name__}")
    if mode == "random" and rng is None:
        raise ValueError("mode 'random' is training-only and needs rng; evaluate with mode='dense'")
    if rng is not None and num_clips != 1:
        raise ValueError(
            f"num_clips applies to evaluation (rng=None); training draws one clip, got {num_clips}"
        )
    steps = np.arange(count, dtype=np.int64)
    if mode == "uniform":
        if n < count:
            return steps % n
        lo = steps * n // count  # integer segment bounds: exact, and never empty when n >= count
        if rng is not None:
            hi = (steps + 1) * n // count
            return rng.integers(lo, hi).astype(np.int64)
        # floor((k + (clip_index + 0.5) / num_clips) * n / count), in integers
        return ((2 * num_clips * steps + 2 * clip_index + 1) * n) // (2 * num_clips * count)
    span = (count - 1) * stride + 1
    if span > n:
        return steps * stride % n
    room = n - span  # the last possible start
    if rng is not None:
        start = int(rng.integers(0, room + 1))
    elif num_clips == 1:
        start = room // 2
    else:  # round(clip_index * room / (num_clips - 1)), half up, in integers
        start = (2 * clip_index * room + num_clips - 1) // (2 * (num_clips - 1))
    return start + steps * stride


# ---------------------------------------------------------------------------------------- decoding


class UnreadableDatasetError(RuntimeError):
    """More of a dataset's videos are unreadable than ``max_unreadable_fraction`` allows."""


class UnreadableVideoError(Exception):
    """A video that cannot be decoded: ``path`` and a short ``reason``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _decord():
    # decord has wheels for x86_64 only: elsewhere the video extra cannot install it.
    return require("decord", "video", "decoding videos (decord has x86_64 wheels only)")


# decord substitutes the nearest decoded frame for one it cannot produce, silently by default.
# ``fault_tol`` is a count, or a fraction of the frames when it parses as a float; a fraction this
# small truncates to 0, so the first substitution raises DECORDLimitReachedError. (An integer 0
# would mean "no limit" to decord.)
_STRICT = "1e-9"
_TOLERANT = "-1"


def _open_reader(path: Path, fault_tol: str = _STRICT) -> Any:
    decord = _decord()
    # num_threads=1: one decoding thread per reader. DataLoader workers are the parallelism; more
    # threads per worker would only compete for the same cores.
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, fault_tol=fault_tol)


def decodable_frame_count(reader: Any) -> int:
    """The number of frames ``reader`` decodes: ``len(reader)``, or fewer where that over-reports.

    decord counts a video's frames from its container (one per packet of the stream, or the
    header's count), and some files list more frames than they decode: truncated or damaged files,
    and packets that carry no picture, such as the not-coded VOPs of packed-bitstream DivX/XviD
    AVIs (common in UCF101 and HMDB51). Asked for an index past the real end, decord 0.6.0 returns
    a stale earlier frame without a word, raises, or spins forever in native code holding the GIL
    (dmlc/decord issues #373, #375), which no Python timeout can interrupt. So no index past the
    real end may reach ``get_batch``.

    The check seeks to the last keyframe (a real packet) and decodes forward frame by frame
    (``next()``) up to the reported count; the first frame that does not come (end of stream, an
    error, or a substituted frame, which raises when the reader was opened with decord's
    ``fault_tol`` at zero substitutions as ``decode_frames`` does) ends the count. Decoding forward
    is the path with decord's end-of-stream guards; seeking to a missing frame is the one that
    returns stale frames or hangs. It costs one seek and decoding the last group of pictures, and
    trusts the frames before the last keyframe (damage there surfaces as a decode error); when the
    last keyframe itself does not decode, the one before it is tried, and so on.

    Args:
        reader: a decord ``VideoReader`` (or anything with ``len()``, ``get_key_indices()``,
            ``seek(i)`` and ``next()``), best opened with ``fault_tol`` at zero substitutions.

    Returns:
        0 .. ``len(reader)``. The reader's position is left anywhere: seek before reading on.
    """
    reported = len(reader)
    if reported <= 0:
        return 0
    keys = sorted({int(k) for k in np.asarray(reader.get_key_indices()).reshape(-1) if 0 < k < reported})
    # From the last keyframe back: a keyframe that does not decode itself (a damaged last packet)
    # hands over to the one before it, down to frame 0.
    for start in [*reversed(keys), 0]:
        count = start
        try:
            reader.seek(start)
            while count < reported:
                reader.next()
                count += 1
        except Exception:  # StopIteration at the end; decord's RuntimeError, DECORDError ...
            pass
        if count > start or start == 0:
            return count
    return 0


def decode_frames(
    path: str | os.PathLike,
    choose: Callable[[int], np.ndarray],
    *,
    check_frame_count: bool = True,
) -> tuple[torch.Tensor, np.ndarray, int, int]:
    """Decode chosen frames of a video with decord.

    Opens one ``VideoReader`` (one decoding thread, substitutions of missing frames raising),
    counts its frames (``decodable_frame_count`` when ``check_frame_count``, else ``len(reader)``),
    calls ``choose(count)`` for the indices, decodes each distinct index once with ``get_batch``
    in increasing order (decord decodes forward from keyframes), and deletes the reader before
    returning: decord keeps its decoder and buffers until the reader is freed, so readers kept
    per video would grow memory over an epoch. When ``get_batch`` meets a damaged frame inside the
    video, a second reader that lets decord substitute the nearest frame (its default) retries: a
    few repeated frames do not make a clip useless.

    Frames come back through ``asnumpy()`` and ``torch.from_numpy``, not decord's torch bridge: the
    bridge is a per-thread setting (``decord.bridge.set_bridge``) that each DataLoader worker and
    thread would have to set again, and the copy it saves is small against decoding.

    Args:
        path: the video file.
        choose: maps the frame count (>= 1) to the frame indices wanted, any order and repeats,
            each in [0, count) (``sample_frame_indices`` fits).
        check_frame_count: guard against containers that over-report their frame count (see
            ``decodable_frame_count``); costs a seek and decoding the last group of pictures.

    Returns:
        ``(frames, indices, count, reported)``: uint8 frames (N, C, H, W) in ``indices`` order (N =
        ``len(indices)``), the int64 indices, the frames available and the container's count.

    Raises:
        UnreadableVideoError: missing or empty file, unknown format, no decodable frame, a decode
            error. Bad indices from ``choose`` are a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableVideoError(path, "no such file")
    if path.stat().st_size == 0:
        raise UnreadableVideoError(path, "empty file (0 bytes)")
    reader = None
    try:
        try:
            reader = _open_reader(path)
            reported = len(reader)
            count = decodable_frame_count(reader) if check_frame_count else reported
        except Exception as err:  # decord's errors have no common base but Exception
            raise UnreadableVideoError(path, f"cannot open: {_short(err)}") from None
        if count <= 0:
            raise UnreadableVideoError(path, f"no decodable frames (the container reports {reported})")
        indices = np.asarray(choose(count), dtype=np.int64).reshape(-1)
        if indices.size == 0 or indices.min() < 0 or indices.max() >= count:
            raise ValueError(f"choose({count}) must return indices in [0, {count}), got {indices.tolist()}")
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            batch = reader.get_batch(unique.tolist()).asnumpy()
        except Exception as first:  # as above
            reader = None  # free it before opening the next
            try:
                reader = _open_reader(path, _TOLERANT)
                batch = reader.get_batch(unique.tolist()).asnumpy()
            except Exception as err:  # as above
                raise UnreadableVideoError(path, f"decode error: {_short(err)}") from None
            _logger.debug("%s: decoded with substituted frames after %s", path, _short(first))
    finally:
        del reader
    if batch.ndim != 4 or batch.shape[0] != len(unique) or batch.shape[-1] != 3:
        raise UnreadableVideoError(path, f"the decoder returned frames of shape {batch.shape}")
    frames = torch.from_numpy(batch[inverse]).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return frames, indices, count, reported


def _short(err: BaseException) -> str:
    """decord's messages carry a timestamp, a source path and a stack; keep the gist."""
    text = " ".join(str(err).split())
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+\.cc:\d+: ", "", text)
    text = text.split(" Stack trace")[0]
    return f"{type(err).__name__}: {text[:200]}"


# -------------------------------------------------------------------------------------- transforms


def _size_pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def _normalize(mean: Sequence[float], std: Sequence[float]) -> Any:
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def train_clip_transform(
    size: int | Sequence[int] = 224,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training augmentation: uint8 clip (T, C, H, W) -> float32 (T, C, size_h, size_w).

    ``RandomResizedCrop`` (area fraction ``scale``, aspect ``ratio``, antialiased) and, with
    ``hflip``, ``RandomHorizontalFlip``, both from torchvision.transforms.v2 applied to the clip as
    a ``tv_tensors.Video``: v2 draws the parameters once per call and treats the leading axis as a
    batch, so every frame gets the same crop and the same flip (a per-frame crop would make objects
    jump between frames). Cropping runs on uint8 (cheaper), then ``[0, 1]`` scaling and
    ``Normalize(mean, std)``. Randomness comes from torch's global generator: seed it (or fork it,
    as ``VideoClipDataset`` does) for reproducible clips.

    Turn ``hflip`` off where left and right carry the label (Something-Something's "pushing
    something from left to right", direction-of-motion tasks).
    """
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    height, width = _size_pair(size, "size")
    steps = [v2.RandomResizedCrop((height, width), scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    augment = v2.Compose(steps)
    normalize = _normalize(mean, std)

    def transform(clip: torch.Tensor) -> torch.Tensor:
        _check_clip(clip)
        out = normalize(augment(tv_tensors.Video(clip)))
        return out.as_subclass(torch.Tensor)

    return transform


def eval_clip_views(
    clip: torch.Tensor,
    *,
    size: int | Sequence[int] = 224,
    resize: int = 256,
    num_crops: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Evaluation views of one clip: uint8 (T, C, H, W) -> float32 (num_crops, T, C, size_h, size_w).

    The short side is resized to ``resize`` (antialiased, aspect kept), then ``num_crops`` = 1 takes
    the centre crop, 3 takes crops at the start, centre and end of the long side (left / centre /
    right for landscape frames, top / centre / bottom for portrait), the usual three-crop test.
    Then ``[0, 1]`` scaling and ``Normalize(mean, std)``.
    """
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    _check_clip(clip)
    height, width = _size_pair(size, "size")
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops!r}")
    resized = v2.Resize(resize, antialias=True)(tv_tensors.Video(clip))
    H, W = resized.shape[-2:]
    if height > H or width > W:
        raise ValueError(f"size {height}x{width} is larger than the resized frames {H}x{W}; raise resize")
    top, left = (H - height) // 2, (W - width) // 2
    if num_crops == 1:
        corners = [(top, left)]
    elif W >= H:
        corners = [(top, 0), (top, left), (top, W - width)]
    else:
        corners = [(0, left), (top, left), (H - height, left)]
    normalize = _normalize(mean, std)
    views = [normalize(TF.crop(resized, t, l, height, width)) for t, l in corners]
    return torch.stack([v.as_subclass(torch.Tensor) for v in views])


def _check_clip(clip: Any) -> None:
    if not (
        isinstance(clip, torch.Tensor) and clip.ndim == 4 and clip.shape[1] == 3 and clip.dtype == torch.uint8
    ):
        got = f"{tuple(clip.shape)} {clip.dtype}" if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"clip must be a uint8 tensor (T, 3, H, W), got {got}")


# ----------------------------------------------------------------------------------------- dataset


class VideoClipDataset(Dataset):
    """Clips of labelled videos for recognition fine-tuning (training) and testing (evaluation).

    Training item ``i`` (``train=True``)::

        video       float32 (T, C, size_h, size_w)  one clip, augmented, normalised
        label       int64 ()                        the class of the video the clip came from
        index       int64 ()                        that video's position in ``records``
        unreadable  int64 ()                        unreadable videos skipped to produce this item

    Evaluation item ``i`` (``train=False``)::

        video       float32 (V, T, C, size_h, size_w)  V = num_clips * num_crops views, clip-major
                                                       (view v = clip v // num_crops, crop v % num_crops)
        label       int64 ()                           the class of video i
        index       int64 ()                           i
        valid       int64 ()                           1, or 0 for an unreadable video (views all zero)

    Sampling (``sample_frame_indices``): ``num_frames`` frames by ``sampling`` ('uniform', 'dense'
    with ``stride``, or 'random'; 'random' is a training mode, which evaluation replaces with
    'dense': the same clips at fixed starts, so one config serves both). Training randomness
    (frames, crop, flip) depends only on ``(seed, epoch, i)`` and the video used, so workers,
    resumed runs and processes agree; ``set_epoch`` selects the epoch (the training loop calls
    it). Evaluation is deterministic and ignores the epoch.

    Unreadable videos (missing, empty, corrupt, zero frames, decode errors) are warned about once
    per video and process (``logging.warning`` with path and reason) and remembered
    (``unreadable_videos()``). Training returns the next readable video instead (i + 1, i + 2, ...,
    wrapping) and counts the skipped ones in ``unreadable``; when more than
    ``max_unreadable_fraction`` of the videos are known unreadable in this process it raises a
    RuntimeError (a broken dataset, not a few bad files). Evaluation returns zero views with
    ``valid = 0`` so that every video is counted exactly once and the skipped ones reported.
    Each DataLoader worker is its own process with its own memory of unreadable videos.

    Args:
        records: the videos (``load_video_list``).
        num_frames: T, frames per clip.
        sampling: 'uniform' (TSN segments), 'dense' or 'random' (see ``sample_frame_indices``).
        stride: frame step of the dense modes.
        train: training items (one augmented clip) or evaluation items (all views).
        num_clips: evaluation clips per video (training: 1).
        num_crops: evaluation spatial crops per clip, 1 (centre) or 3 (training: 1).
        size: output crop, int or (height, width).
        resize: evaluation: the short side before cropping.
        mean, std: per-channel normalisation of [0, 1] pixels (ImageNet's by default).
        crop_scale, crop_ratio: training ``RandomResizedCrop`` area fraction and aspect ratio.
        hflip: training horizontal flips (off where direction matters for the label).
        seed: with the epoch and the index, determines every training clip.
        max_unreadable_fraction: training fails beyond this fraction of unreadable videos.
        check_frame_count: verify the decodable frame count of each video before sampling
            (``decodable_frame_count``; one extra seek per item). Turn off only for files known good.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        num_frames: int = 16,
        sampling: Literal["uniform", "dense", "random"] = "uniform",
        stride: int = 1,
        train: bool = True,
        num_clips: int = 1,
        num_crops: int = 1,
        size: int | Sequence[int] = 224,
        resize: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        seed: int = 0,
        max_unreadable_fraction: float = 0.1,
        check_frame_count: bool = True,
    ):
        super().__init__()
        if not all(isinstance(r, VideoRecord) for r in records):
            raise TypeError("records must be VideoRecords (see load_video_list)")
        # Paths as Path objects: unreadable videos are remembered by path.
        self.records = [VideoRecord(Path(r.path), int(r.label)) for r in records]
        if not self.records:
            raise ValueError("records: need at least one video")
        self.num_frames = check_int("num_frames", num_frames, 1)
        if sampling not in SAMPLING_MODES:
            raise ValueError(
                f"sampling must be one of {', '.join(map(repr, SAMPLING_MODES))}, got {sampling!r}"
            )
        self.stride = check_int("stride", stride, 1)
        self.num_clips = check_int("num_clips", num_clips, 1)
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops!r}")
        if train and (self.num_clips != 1 or num_crops != 1):
            raise ValueError(
                f"num_clips and num_crops apply to evaluation (train=False); got {num_clips} and {num_crops}"
            )
        self.size = _size_pair(size, "size")
        self.resize = check_int("resize", resize, 1)
        if not train and self.resize < min(self.size):
            raise ValueError(f"resize (the short side, {resize}) must be >= the crop size {size}")
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not 0.0 <= float(max_unreadable_fraction) <= 1.0:
            raise ValueError(f"max_unreadable_fraction must be in [0, 1], got {max_unreadable_fraction!r}")
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"mean and std must be 3 values (RGB), std > 0; got {mean!r}, {std!r}")
        # 'random' is dense sampling at random starts: evaluating it means dense clips at fixed starts.
        self.sampling = "dense" if sampling == "random" and not train else sampling
        self.train = bool(train)
        self.num_crops = int(num_crops)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.seed = seed
        self.epoch = 0
        self.max_unreadable_fraction = float(max_unreadable_fraction)
        self.check_frame_count = bool(check_frame_count)
        self._train_transform = (
            train_clip_transform(
                self.size, scale=crop_scale, ratio=crop_ratio, hflip=hflip, mean=mean, std=std
            )
            if train
            else None
        )
        self._unreadable: dict[Path, str] = {}
        self._clamped: set[Path] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose training clips ``__getitem__`` returns (0 at construction)."""
        if not (isinstance(epoch, int) and epoch >= 0):
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def unreadable_videos(self) -> dict[Path, str]:
        """The videos this process found unreadable: path -> reason (a copy)."""
        return dict(self._unreadable)

    @property
    def num_views(self) -> int:
        """V, the views per evaluation item (num_clips * num_crops); 1 in training."""
        return self.num_clips * self.num_crops

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        index %= len(self)
        return self._train_item(index) if self.train else self._eval_item(index)

    # -- training

    def _train_item(self, index: int) -> dict[str, torch.Tensor]:
        skipped = 0
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            record = self.records[candidate]
            if record.path in self._unreadable:
                skipped += 1
                continue
            # One generator per (seed, epoch, item, video tried): the clip does not depend on how many
            # failed attempts this process happened to make before (other workers know other files).
            rng = np.random.default_rng((self.seed, self.epoch, index, candidate))
            try:
                frames = self._decode(record.path, lambda n, rng=rng: self._indices(n, rng))
            except UnreadableVideoError as err:
                self._mark_unreadable(err)
                skipped += 1
                self._check_unreadable_fraction()
                continue
            # fork_rng: the v2 transforms draw from torch's global generator; seed a private copy
            # so the crop and flip follow (seed, epoch, index) and callers' streams are untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**63 - 1)))
                video = self._train_transform(frames)
            return {
                "video": video.contiguous(),
                "label": torch.tensor(record.label, dtype=torch.int64),
                "index": torch.tensor(candidate, dtype=torch.int64),
                "unreadable": torch.tensor(skipped, dtype=torch.int64),
            }
        raise UnreadableDatasetError(
            f"all {len(self)} videos are unreadable (see the warnings for the reasons)"
        )

    def _indices(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return sample_frame_indices(count, self.num_frames, self.sampling, stride=self.stride, rng=rng)

    # -- evaluation

    def _eval_item(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        item = {
            "label": torch.tensor(record.label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        T, (height, width) = self.num_frames, self.size

        def choose(count: int) -> np.ndarray:
            clips = [
                sample_frame_indices(
                    count, T, self.sampling, stride=self.stride, clip_index=c, num_clips=self.num_clips
                )
                for c in range(self.num_clips)
            ]
            return np.concatenate(clips)

        try:
            if record.path in self._unreadable:
                raise UnreadableVideoError(record.path, self._unreadable[record.path])
            frames = self._decode(record.path, choose)  # (num_clips * T, C, H, W), one reader
        except UnreadableVideoError as err:
            self._mark_unreadable(err)
            item["video"] = torch.zeros(self.num_views, T, 3, height, width)
            item["valid"] = torch.tensor(0, dtype=torch.int64)
            return item
        views = eval_clip_views(
            frames, size=self.size, resize=self.resize, num_crops=self.num_crops, mean=self.mean, std=self.std
        )  # (num_crops, num_clips * T, C, h, w): every clip resized and cropped alike in one call
        views = views.unflatten(1, (self.num_clips, T)).transpose(0, 1)  # (clips, crops, T, C, h, w)
        item["video"] = views.reshape(self.num_views, T, 3, height, width).contiguous()
        item["valid"] = torch.tensor(1, dtype=torch.int64)
        return item

    # -- shared

    def _decode(self, path: Path, choose: Callable[[int], np.ndarray]) -> torch.Tensor:
        frames, _, count, reported = decode_frames(path, choose, check_frame_count=self.check_frame_count)
        if count < reported and path not in self._clamped:
            self._clamped.add(path)
            _logger.warning(
                "%s: the container reports %d frames but only %d decode; sampling from the first %d",
                path, reported, count, count,
            )  # fmt: skip
        return frames

    def _mark_unreadable(self, err: UnreadableVideoError) -> None:
        if err.path not in self._unreadable:
            self._unreadable[err.path] = err.reason
            _logger.warning("%s: unreadable video, skipped (%s)", err.path, err.reason)

    def _check_unreadable_fraction(self) -> None:
        fraction = len(self._unreadable) / len(self)
        if fraction > self.max_unreadable_fraction:
            raise UnreadableDatasetError(
                f"{len(self._unreadable)} of {len(self)} videos ({fraction:.1%}) are unreadable, more than "
                f"max_unreadable_fraction={self.max_unreadable_fraction:g}; "
                + "; ".join(summarise_unreadable(self._unreadable, limit=3).splitlines())
            )


def summarise_unreadable(unreadable: dict[Path, str] | Iterable[tuple[Path, str]], limit: int = 10) -> str:
    """One line per unreadable video (``path: reason``), at most ``limit``, then how many more.

    Takes ``VideoClipDataset.unreadable_videos()`` (or the merged dicts of several processes) for
    the epoch-end report.
    """
    items = unreadable.items() if isinstance(unreadable, dict) else unreadable
    items = sorted(items, key=lambda item: str(item[0]))
    if not items:
        return "no unreadable videos"
    lines = [f"{path}: {reason}" for path, reason in items[:limit]]
    if len(items) > limit:
        lines.append(f"... and {len(items) - limit} more")
    return "\n".join(lines)
