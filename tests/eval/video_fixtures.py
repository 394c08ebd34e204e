"""Small test videos written with PyAV: known frame content, broken files, moving squares.

Import from tests (``from video_fixtures import write_test_video``; pytest puts tests/eval on the
path) and from benchmarks/video_io.py. Every writer returns the path it wrote.

- ``write_test_video``: ``content='index'`` makes every pixel of frame i equal ``INDEX_STEP * i``
  (i < 64), so ``frame_indices`` recovers which frames a decoder returned, even after resizing,
  cropping or flipping (a uniform frame stays uniform); ``'gradient'`` is the same horizontal ramp
  in every frame, for crops and flips.
- ``write_corrupt_video`` / ``write_empty_video`` / ``write_zero_frame_video``: files a loader must
  skip; ``write_overreported_video``: a file that lists more frames than it decodes.
- ``write_motion_video``: a bright square moving left or right, for learning tests.

Sizes: decord 0.6.0 fails on frames 8, 16, 24, 48 or 72 pixels wide (it copies rows padded to
another width: "Check failed: from_size == to_size"), so the default is 32 x 40 (H x W). Codec:
``libx264`` at qp 0 (lossless luma; PyAV's wheels include it) keeps pixel values within 1 of what
was written; without it ``mpeg4`` at its best quality is used, which is close but not exact.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

__all__ = [
    "DEFAULT_SIZE",
    "INDEX_STEP",
    "MAX_INDEX_FRAMES",
    "OVERREPORTED_STEP",
    "default_codec",
    "frame_indices",
    "has_libx264",
    "write_corrupt_video",
    "write_empty_video",
    "write_motion_video",
    "write_overreported_video",
    "write_test_video",
    "write_zero_frame_video",
]

DEFAULT_SIZE = (32, 40)
INDEX_STEP = 4
"""Frame i of an 'index' video has every pixel equal to INDEX_STEP * i: values 4 apart survive
compression and YUV conversion (errors of 1-2) and still round back to i."""
MAX_INDEX_FRAMES = 256 // INDEX_STEP


def has_libx264() -> bool:
    return "libx264" in av.codecs_available


def default_codec() -> str:
    return "libx264" if has_libx264() else "mpeg4"


def _codec_options(codec: str, lossless: bool, gop: int) -> dict[str, str]:
    options = {"g": str(gop)}
    if codec == "libx264":
        options.update({"qp": "0"} if lossless else {"crf": "23"})
        options.update(preset="veryfast", bf="0")  # no B-frames: decode order = display order
    elif codec == "mpeg4":
        options["qscale"] = "1" if lossless else "4"
    return options


def _write(
    path: str | os.PathLike,
    frames: Sequence[np.ndarray] | np.ndarray,
    *,
    fps: int,
    codec: str | None,
    lossless: bool,
    gop: int,
) -> Path:
    """Encode (H, W, 3) uint8 RGB frames into ``path`` (the container from its suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or default_codec()
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = height, width
        stream.pix_fmt = "yuv420p"
        stream.options = _codec_options(codec, lossless, gop)
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_test_video(
    path: str | os.PathLike,
    num_frames: int,
    size: tuple[int, int] = DEFAULT_SIZE,
    fps: int = 10,
    codec: str | None = None,
    content: str = "index",
    gop: int = 8,
) -> Path:
    """Write a video of ``num_frames`` frames of ``size`` (H, W) whose content is known.

    ``content='index'``: every pixel of frame i is ``INDEX_STEP * (i % 64)`` in all channels (so
    videos longer than 64 frames repeat their values). ``'gradient'``: every frame the same
    horizontal ramp, 30 at the left edge to 230 at the right, equal in all channels.
    ``gop``: a keyframe every ``gop`` frames, so decoders have to seek between keyframes.
    """
    height, width = size
    if content == "index":
        values = INDEX_STEP * (np.arange(num_frames) % MAX_INDEX_FRAMES)
        frames = [np.full((height, width, 3), v, np.uint8) for v in values]
    elif content == "gradient":
        ramp = np.round(30 + 200 * np.arange(width) / max(width - 1, 1)).astype(np.uint8)
        frame = np.repeat(np.broadcast_to(ramp, (height, width))[..., None], 3, axis=2)
        frames = [frame] * num_frames
    else:
        raise ValueError(f"content must be 'index' or 'gradient', got {content!r}")
    return _write(path, frames, fps=fps, codec=codec, lossless=True, gop=gop)


def frame_indices(frames, step: int = INDEX_STEP) -> list[int]:
    """The frame index of each frame of an 'index' video: round(mean pixel / step).

    ``frames``: (N, ...) uint8 pixels (0..255), or floats in [0, 1] (a clip scaled by 1/255 with
    mean 0 and std 1), numpy or torch.
    """
    array = np.asarray(frames, dtype=np.float64)
    means = array.reshape(len(array), -1).mean(axis=1)
    if np.issubdtype(np.asarray(frames).dtype, np.floating):
        means = means * 255.0
    return [int(i) for i in np.rint(means / step)]


def write_corrupt_video(path: str | os.PathLike, num_bytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under a video name (no container can read them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8).tobytes())
    return path


def write_empty_video(path: str | os.PathLike) -> Path:
    """A 0-byte file under a video name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_zero_frame_video(path: str | os.PathLike, size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """A well-formed container with one video stream and no frames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(default_codec(), rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # write the header although no frame follows
    return path


OVERREPORTED_STEP = 16
"""Frame i of ``write_overreported_video`` has every pixel equal to OVERREPORTED_STEP * i: MPEG-4
part 2 quantises intra DC coarsely (steps of 8), so its values need to lie further apart."""


def _not_coded_vop(time_increment: int, increment_bits: int) -> bytes:
    """An MPEG-4 part 2 VOP with vop_coded = 0: a packet that decodes to no picture.

    Bits after the VOP start code: vop_coding_type '01' (P), modulo_time_base '0', marker '1',
    vop_time_increment, marker '1', vop_coded '0', then stuffing ('0' and '1's) to a byte boundary.
    """
    bits = "01" + "0" + "1" + format(time_increment, f"0{increment_bits}b") + "1" + "0"
    bits += "0" + "1" * ((8 - (len(bits) + 1) % 8) % 8)
    return b"\x00\x00\x01\xb6" + int(bits, 2).to_bytes(len(bits) // 8, "big")


def write_overreported_video(
    path: str | os.PathLike,
    num_frames: int,
    extra: int,
    size: tuple[int, int] = DEFAULT_SIZE,
    fps: int = 10,
) -> Path:
    """An MPEG-4 part 2 video (AVI by its suffix) that lists ``extra`` frames more than it decodes.

    Frame i (< ``num_frames`` <= 16) has every pixel ``OVERREPORTED_STEP * i``. After them come
    ``extra`` not-coded VOPs, packets without a picture, as DivX/XviD encoders write for dropped or
    packed frames: containers and decord count ``num_frames + extra`` frames (``len(VideoReader)``),
    decoders produce ``num_frames`` (FFmpeg may repeat the last one once), and decord answers an
    index past ``num_frames - 1`` with a stale earlier frame. Read indices back with
    ``frame_indices(frames, step=OVERREPORTED_STEP)``.
    """
    if not 0 < num_frames <= 256 // OVERREPORTED_STEP:
        raise ValueError(f"num_frames must be in 1..{256 // OVERREPORTED_STEP}, got {num_frames}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = height, width
        stream.pix_fmt = "yuv420p"
        stream.options = _codec_options("mpeg4", lossless=True, gop=8)
        last = None
        for i in range(num_frames):
            image = np.full((height, width, 3), OVERREPORTED_STEP * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
                last = packet
        for packet in stream.encode():
            container.mux(packet)
            last = packet
        # The encoder's vop_time_increment_resolution is the frame rate, coded in ceil(log2(fps)) bits.
        increment_bits = max(1, int(fps - 1).bit_length())
        step = max(1, round(1 / (fps * last.time_base)))
        for k in range(1, extra + 1):
            packet = av.Packet(_not_coded_vop((num_frames - 1 + k) % fps, increment_bits))
            packet.stream = stream
            packet.time_base = last.time_base
            packet.pts, packet.dts, packet.duration = last.pts + k * step, last.dts + k * step, step
            container.mux(packet)
    return path


def write_motion_video(
    path: str | os.PathLike,
    direction: str,
    num_frames: int = 16,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    *,
    square: int = 6,
    speed: int = 2,
    fps: int = 10,
    codec: str | None = None,
) -> Path:
    """A bright square moving ``direction`` ('left' or 'right') over a dark, noisy background.

    The square (``square`` pixels, value 220) starts at a random position and moves ``speed``
    pixels per frame, wrapping around the frame's edges, so its position in any single frame is
    uniform whatever the direction: only the motion between frames tells left from right. The
    background is a random texture (values 10-50) fixed per video plus fresh noise (+-6) per frame.
    Everything follows ``seed``. Encoded lossy (x264 crf 23) to stay small.
    """
    if direction not in ("left", "right"):
        raise ValueError(f"direction must be 'left' or 'right', got {direction!r}")
    height, width = size
    if not 0 < square < min(height, width):
        raise ValueError(f"square must be in (0, {min(height, width)}) for size {size}, got {square}")
    rng = np.random.default_rng(seed)
    texture = rng.integers(10, 51, (height, width), dtype=np.int16)
    top, left = int(rng.integers(0, height - square + 1)), int(rng.integers(0, width))
    sign = 1 if direction == "right" else -1
    frames = []
    for t in range(num_frames):
        image = texture + rng.integers(-6, 7, (height, width), dtype=np.int16)
        columns = (left + sign * speed * t + np.arange(square)) % width
        image[top : top + square, columns] = 220
        frames.append(np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return _write(path, frames, fps=fps, codec=codec, lossless=False, gop=12)
