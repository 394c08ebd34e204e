"""Video decoding throughput: decord against PyAV on the same files, and the training DataLoader.

    python benchmarks/video_io.py [--videos 16] [--frames 64] [--size 240x320] [--folder DIR]
                                  [--repeats 3] [--loader-epochs 2] [--out benchmarks/out/video_io.csv]
                                  [--smoke]

Without ``--folder`` the script writes ``--videos`` clips of ``--frames`` frames at ``--size`` (H x W,
UCF101's 240 x 320 by default) into a temporary folder: a square moving over a noisy background
(tests/eval/video_fixtures.py), H.264 at crf 23 with a keyframe every 12 frames. With ``--folder``
it reads the first ``--videos`` video files found there instead. Then, in one process, on the same
files:

    full decode          every frame to RGB uint8: decord ``get_batch(range(len))`` against PyAV
                         ``decode()`` + ``to_ndarray('rgb24')``; frames/s = frames / seconds
    uniform 16 frames    the 16 frames of TSN's evaluation sampling: decord ``get_batch`` on
                         ``len(reader)``; decord through ``decode_frames`` (the dataset's path,
                         with the check of the decodable frame count); PyAV decoding forward and
                         keeping the 16; clips/s = videos / seconds
    DataLoader           ``VideoClipDataset`` training clips (uniform 16 frames, 224 x 224 random
                         resized crop, flip, normalisation) through ``DataLoader`` with 0 and 2
                         worker processes, batch size 4, ``--loader-epochs`` epochs, worker start-up
                         included; clips/s

Every decoder uses one thread (decord ``num_threads=1``, PyAV ``thread_count=1``), as a DataLoader
worker does. Decode timings are the median of ``--repeats`` passes over all files, after one
warm-up file. Prints a markdown table and writes it as CSV to ``--out`` (atomically: a temporary
file renamed over the target). Before the runs the script measures how busy the CPUs already are:
the numbers depend on it. ``--smoke`` is a few-second run on tiny files that walks every path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _measure import REPO_ROOT, cpu_busy_fraction, cpu_name, markdown_table

from seqvision.utils.io import write_csv_atomic

sys.path.insert(1, str(REPO_ROOT / "tests" / "eval"))  # the test-video writers

import av
import decord
import torch
from torch.utils.data import DataLoader
from video_fixtures import write_motion_video

from seqvision.data.video import (
    VIDEO_EXTENSIONS,
    VideoClipDataset,
    VideoRecord,
    decode_frames,
    sample_frame_indices,
)

CLIP_FRAMES = 16


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be HxW, e.g. 240x320, got {text!r}") from None
    if height < 16 or width < 16:
        raise argparse.ArgumentTypeError(f"--size must be at least 16x16, got {text!r}")
    return height, width


def write_videos(folder: Path, count: int, frames: int, size: tuple[int, int]) -> list[Path]:
    square = max(4, min(size) // 6)
    return [
        write_motion_video(
            folder / f"clip_{i:03d}.mp4", "left" if i % 2 else "right", frames, size, seed=i, square=square
        )
        for i in range(count)
    ]


def find_videos(folder: Path, count: int) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not found:
        raise SystemExit(f"{folder}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return found[:count]


# -- decoders: each returns the number of frames it handed back


def decord_full(path: Path) -> int:
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    try:
        return len(reader.get_batch(list(range(len(reader)))).asnumpy())
    finally:
        del reader


def pyav_full(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        count = 0
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")  # the RGB conversion decord's frames include
            count += 1
        return count


def decord_uniform(path: Path) -> int:
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    try:
        indices = sample_frame_indices(len(reader), CLIP_FRAMES, "uniform")
        return len(reader.get_batch(indices.tolist()).asnumpy())
    finally:
        del reader


def decord_checked_uniform(path: Path) -> int:
    frames, *_ = decode_frames(path, lambda n: sample_frame_indices(n, CLIP_FRAMES, "uniform"))
    return len(frames)


def pyav_uniform(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        # The frame count from the container (PyAV cannot seek by frame index reliably); decode
        # forward and keep the wanted frames, stopping after the last.
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        if not stream.frames:
            container.seek(0)
        wanted = sample_frame_indices(total, CLIP_FRAMES, "uniform")
        last, kept = int(wanted.max()), []
        for i, frame in enumerate(container.decode(stream)):
            kept += [frame.to_ndarray(format="rgb24")] * int((wanted == i).sum())
            if i >= last:
                break
        return len(kept)


def time_decoder(decoder: Callable[[Path], int], paths: list[Path], repeats: int) -> tuple[float, int]:
    """Median seconds of ``repeats`` passes over ``paths``, and the frames one pass returns."""
    decoder(paths[0])  # warm-up: libraries, codec tables, file cache
    times, frames = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        frames = sum(decoder(path) for path in paths)
        times.append(time.perf_counter() - start)
    return statistics.median(times), frames


def time_loader(
    paths: list[Path], workers: int, epochs: int, batch_size: int, size: int
) -> tuple[float, int]:
    """Seconds for ``epochs`` epochs of training clips through a DataLoader, and the clips."""
    records = [VideoRecord(path, i % 2) for i, path in enumerate(paths)]
    dataset = VideoClipDataset(records, num_frames=CLIP_FRAMES, size=size, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    clips = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)  # workers (re)start each epoch and copy the dataset with its epoch
        for batch in loader:
            clips += len(batch["video"])
    seconds = time.perf_counter() - start
    if dataset.unreadable_videos():
        print(f"warning: unreadable videos: {dataset.unreadable_videos()}", file=sys.stderr)
    return seconds, clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=16, help="number of videos (default 16)")
    parser.add_argument("--frames", type=int, default=64, help="frames per written video (default 64)")
    parser.add_argument("--size", type=parse_size, default=(240, 320), help="HxW of written videos")
    parser.add_argument("--folder", type=Path, help="read videos from here instead of writing them")
    parser.add_argument("--repeats", type=int, default=3, help="decode passes, median taken (default 3)")
    parser.add_argument("--loader-epochs", type=int, default=2, help="DataLoader epochs (default 2)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out" / "video_io.csv")
    parser.add_argument("--smoke", action="store_true", help="a few-second run on tiny videos")
    args = parser.parse_args()
    if args.smoke:
        args.videos, args.frames, args.size, args.repeats, args.loader_epochs = 2, 20, (48, 64), 1, 1
    if args.videos < 1 or args.frames < 1 or args.repeats < 1 or args.loader_epochs < 1:
        parser.error("--videos, --frames, --repeats and --loader-epochs must be >= 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    crop = 224 if not args.smoke else 32
    batch_size = 4 if not args.smoke else 2

    busy = cpu_busy_fraction(1.0)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, busy {busy:.0%} before the runs (other processes)")
    print(f"torch {torch.__version__}, decord {decord.__version__}, PyAV {av.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder is not None:
            paths = find_videos(args.folder, args.videos)
            source = f"{len(paths)} videos from {args.folder}"
        else:
            start = time.perf_counter()
            paths = write_videos(Path(tmp), args.videos, args.frames, args.size)
            source = (
                f"{len(paths)} written videos, {args.frames} frames of {args.size[0]}x{args.size[1]} "
                f"(H.264 crf 23, keyframe every 12), written in {time.perf_counter() - start:.1f} s"
            )
        print(source, flush=True)
        size_text = "per file" if args.folder is not None else f"{args.size[0]}x{args.size[1]}"
        rows = []

        def add(measurement: str, method: str, seconds: float, frames: int, clips: int) -> None:
            rows.append(
                dict(measurement=measurement, method=method, videos=len(paths), size=size_text,
                     clips=clips, frames_returned=frames, seconds=round(seconds, 4),
                     frames_per_s=round(frames / seconds, 1), clips_per_s=round(clips / seconds, 2))
            )  # fmt: skip
            print(
                f"  {measurement}, {method}: {frames / seconds:,.0f} frames/s, {clips / seconds:.1f} clips/s"
            )

        for method, decoder in (("decord", decord_full), ("PyAV", pyav_full)):
            seconds, frames = time_decoder(decoder, paths, args.repeats)
            add("full decode", method, seconds, frames, len(paths))
        uniform = (
            ("decord get_batch", decord_uniform),
            ("decord + frame-count check", decord_checked_uniform),
            ("PyAV decode forward", pyav_uniform),
        )
        for method, decoder in uniform:
            seconds, frames = time_decoder(decoder, paths, args.repeats)
            add(f"uniform {CLIP_FRAMES} frames", method, seconds, frames, len(paths))
        for workers in (0, 2):
            seconds, clips = time_loader(paths, workers, args.loader_epochs, batch_size, crop)
            method = f"{workers} workers, batch {batch_size}, {crop}x{crop}, {args.loader_epochs} epochs"
            add("DataLoader train clips", method, seconds, clips * CLIP_FRAMES, clips)

    write_csv_atomic(rows, args.out)
    header = ("measurement", "method", "s", "frames/s", "clips/s")
    cells = [
        (
            r["measurement"],
            r["method"],
            f"{r['seconds']:.3f}",
            f"{r['frames_per_s']:,.0f}",
            f"{r['clips_per_s']:.1f}",
        )
        for r in rows
    ]
    print(markdown_table(header, cells))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
