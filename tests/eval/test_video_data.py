"""Video lists, frame sampling, decoding, clip transforms and the video dataset.

The videos are tiny (32 x 40 pixels, at most 40 frames) and written once per module by PyAV; an
'index' video's frame i has every pixel 4 * i, so the frames a clip holds can be read back from the
output, through resizing, cropping, flipping and normalisation with mean 0 and std 1.
"""

import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from video_fixtures import (
    OVERREPORTED_STEP,
    frame_indices,
    write_corrupt_video,
    write_empty_video,
    write_motion_video,
    write_overreported_video,
    write_test_video,
    write_zero_frame_video,
)

from seqvision.data import video as video_data
from seqvision.data.video import (
    UnreadableVideoError,
    VideoClipDataset,
    VideoRecord,
    decodable_frame_count,
    decode_frames,
    eval_clip_views,
    load_video_list,
    sample_frame_indices,
    summarise_unreadable,
    train_clip_transform,
)

decord = pytest.importorskip("decord")

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # outputs stay pixel / 255


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {
        "long": write_test_video(folder / "long.mp4", 40),
        "mkv": write_test_video(folder / "mid.mkv", 30),
        "short": write_test_video(folder / "short.avi", 5),
        "gradient": write_test_video(folder / "gradient.mp4", 8, content="gradient"),
        "corrupt": write_corrupt_video(folder / "corrupt.mp4"),
        "empty": write_empty_video(folder / "empty.mp4"),
        "zero": write_zero_frame_video(folder / "zero.mp4"),
        "over": write_overreported_video(folder / "over.avi", 12, 6),
    }


def records(videos, *names, label=0):
    return [VideoRecord(videos[name], label) for name in names]


# ------------------------------------------------------------------------------------------- lists


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_folder_per_class_sorted_recursive_and_only_videos(tmp_path):
    b = touch(tmp_path / "b_jump" / "v2.MP4")
    a1 = touch(tmp_path / "a_run" / "v1.avi")
    a2 = touch(tmp_path / "a_run" / "group" / "v3.mkv")
    touch(tmp_path / "a_run" / "notes.txt")
    touch(tmp_path / "a_run" / ".hidden.mp4")
    (tmp_path / "c_empty").mkdir()
    recs, classes = load_video_list(tmp_path)
    assert classes == ["a_run", "b_jump", "c_empty"]
    assert recs == [VideoRecord(a2, 0), VideoRecord(a1, 0), VideoRecord(b, 1)]
    # The evaluation split reuses the training classes: same names, same ids.
    recs, classes = load_video_list(tmp_path, classes=["x", "a_run", "b_jump", "c_empty"])
    assert [r.label for r in recs] == [1, 1, 2]
    with pytest.raises(ValueError, match="unknown class 'c_empty'"):
        load_video_list(tmp_path, classes=["a_run", "b_jump"])


def test_csv_with_names_header_and_missing_file(tmp_path, caplog):
    videos = [touch(tmp_path / "clips" / f"{i}.mp4") for i in range(3)]
    listing = tmp_path / "train.csv"
    listing.write_text(
        "path,label\nclips/0.mp4,swim\nclips/1.mp4, dive\n\nclips/2.mp4,swim\nclips/gone.mp4,dive\n"
    )
    with caplog.at_level(logging.WARNING, logger="seqvision.data.video"):
        recs, classes = load_video_list(listing)
    assert classes == ["dive", "swim"]
    assert recs == [VideoRecord(videos[0], 1), VideoRecord(videos[1], 0), VideoRecord(videos[2], 1)]
    warnings = [r.getMessage() for r in caplog.records]
    assert (
        len(warnings) == 1
        and "1 of 4 listed videos do not exist" in warnings[0]
        and "gone.mp4" in warnings[0]
    )


def test_csv_with_integer_labels_and_root(tmp_path):
    videos = [touch(tmp_path / "data" / f"{i}.mp4") for i in range(2)]
    listing = tmp_path / "lists" / "val.csv"
    listing.parent.mkdir()
    listing.write_text(f"0.mp4,2\n{videos[1]},0\n")  # relative to root, and an absolute path
    recs, classes = load_video_list(listing, root=tmp_path / "data")
    assert classes == ["0", "1", "2"]
    assert recs == [VideoRecord(videos[0], 2), VideoRecord(videos[1], 0)]
    recs, _ = load_video_list(listing, root=tmp_path / "data", classes=["a", "b", "c"])
    assert [r.label for r in recs] == [2, 0]
    with pytest.raises(ValueError, match="label id 2 out of range for 2 classes"):
        load_video_list(listing, root=tmp_path / "data", classes=["a", "b"])


def test_tsv_and_space_separated_lists(tmp_path):
    video = touch(tmp_path / "my clip.mp4")
    (tmp_path / "list.tsv").write_text("video\tclass\nmy clip.mp4\tboxing\n")
    (tmp_path / "list.txt").write_text("my clip.mp4 4\n")
    assert load_video_list(tmp_path / "list.tsv") == ([VideoRecord(video, 0)], ["boxing"])
    recs, classes = load_video_list(tmp_path / "list.txt")
    assert recs == [VideoRecord(video, 4)] and len(classes) == 5


def test_list_errors(tmp_path):
    touch(tmp_path / "a.mp4")
    (tmp_path / "mixed.csv").write_text("a.mp4,1\na.mp4,run\n")
    with pytest.raises(ValueError, match=r"mixed.csv:2: labels mix integer ids and class names"):
        load_video_list(tmp_path / "mixed.csv")
    (tmp_path / "short.csv").write_text("a.mp4\n")
    with pytest.raises(ValueError, match=r"short.csv:1: expected 'path,label'"):
        load_video_list(tmp_path / "short.csv")
    (tmp_path / "none.csv").write_text("b.mp4,run\n")
    with pytest.raises(ValueError, match="no videos found; all 1 listed files are missing"):
        load_video_list(tmp_path / "none.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no videos found"):
        load_video_list(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError):
        load_video_list(tmp_path / "nothing_here.csv")
    with pytest.raises(ValueError, match="unknown class 'run'"):
        load_video_list(tmp_path / "none.csv", classes=["walk"])


def test_kinetics_annotation_csv(tmp_path, caplog):
    a = touch(tmp_path / "abseiling" / "abc_000014_000024.mp4")
    b = touch(tmp_path / "air_drumming" / "d-e_000000_000010.mp4")  # spaces as underscores
    c = touch(tmp_path / "zumba_flat_000005_000015.mp4")  # directly under root
    listing = tmp_path / "train.csv"
    listing.write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "abseiling,abc,14,24,train,0\n"
        '"air drumming",d-e,0,10,train,0\n'
        "zumba,zumba_flat,5,15,train,0\n"
        "abseiling,gone,1,11,train,0\n"
        "yoga,gone2,1,11,train,0\n"
    )
    with caplog.at_level(logging.WARNING, logger="seqvision.data.video"):
        recs, classes = load_video_list(listing)
    # Classes come from every row, so ids do not depend on which videos were downloaded.
    assert classes == ["abseiling", "air drumming", "yoga", "zumba"]
    assert recs == [VideoRecord(a, 0), VideoRecord(b, 1), VideoRecord(c, 3)]
    assert len(caplog.records) == 1 and "2 of 5 listed videos do not exist" in caplog.records[0].getMessage()


def test_ucf101_split_files(tmp_path):
    splits, root = tmp_path / "ucfTrainTestlist", tmp_path / "UCF-101"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n3 BabyCrawling\n")
    (splits / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nArchery/v_Archery_g08_c01.avi 2\r\n"
    )
    (splits / "testlist01.txt").write_text(
        "Archery/v_Archery_g01_c01.avi\nBabyCrawling/v_BabyCrawling_g01_c01.avi\n"
    )
    train = [
        touch(root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi"),
        touch(root / "Archery" / "v_Archery_g08_c01.avi"),
    ]
    test = [
        touch(root / "Archery" / "v_Archery_g01_c01.avi"),
        touch(root / "BabyCrawling" / "v_BabyCrawling_g01_c01.avi"),
    ]
    classes = ["ApplyEyeMakeup", "Archery", "BabyCrawling"]
    assert load_video_list(split_file=splits / "trainlist01.txt", root=root) == (
        [VideoRecord(train[0], 0), VideoRecord(train[1], 1)], classes,
    )  # fmt: skip
    assert load_video_list(splits / "testlist01.txt", root=root) == (
        [VideoRecord(test[0], 1), VideoRecord(test[1], 2)], classes,
    )  # fmt: skip
    (splits / "trainlist02.txt").write_text("Archery/v_Archery_g08_c01.avi 1\n")
    with pytest.raises(ValueError, match="class id 1 is 'ApplyEyeMakeup' but the video is in Archery/"):
        load_video_list(split_file=splits / "trainlist02.txt", root=root)
    with pytest.raises(ValueError, match="split_file needs root"):
        load_video_list(split_file=splits / "trainlist01.txt")


# ---------------------------------------------------------------------------------------- sampling


def test_uniform_sampling():
    assert sample_frame_indices(40, 8, "uniform").tolist() == [2, 7, 12, 17, 22, 27, 32, 37]
    first, second = (
        sample_frame_indices(40, 8, "uniform", clip_index=c, num_clips=2).tolist() for c in (0, 1)
    )
    assert first == [1, 6, 11, 16, 21, 26, 31, 36] and second == [3, 8, 13, 18, 23, 28, 33, 38]
    assert sample_frame_indices(5, 8, "uniform").tolist() == [0, 1, 2, 3, 4, 0, 1, 2]  # looped
    draws = [sample_frame_indices(40, 8, "uniform", rng=np.random.default_rng(s)) for s in range(50)]
    for draw in draws:
        assert ((draw // 5) == np.arange(8)).all()  # one frame from each 5-frame segment
    assert len({tuple(d) for d in draws}) > 40
    again = sample_frame_indices(40, 8, "uniform", rng=np.random.default_rng(3))
    assert (again == draws[3]).all()


def test_dense_sampling():
    assert sample_frame_indices(40, 8, "dense", stride=2).tolist() == list(range(12, 27, 2))  # centred
    starts = [sample_frame_indices(40, 8, "dense", stride=2, clip_index=c, num_clips=3)[0] for c in range(3)]
    assert starts == [0, 13, 25]  # 25 = 40 - span 15: the first to the last possible start
    assert sample_frame_indices(5, 4, "dense", stride=2).tolist() == [0, 2, 4, 1]  # looped
    assert sample_frame_indices(5, 8, "dense").tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    starts = {
        int(sample_frame_indices(40, 8, "dense", stride=2, rng=np.random.default_rng(s))[0])
        for s in range(400)
    }
    assert starts == set(range(26))
    random = sample_frame_indices(40, 8, "random", stride=2, rng=np.random.default_rng(1))
    assert (random == sample_frame_indices(40, 8, "dense", stride=2, rng=np.random.default_rng(1))).all()


def test_sampling_argument_errors():
    with pytest.raises(ValueError, match="num_available must be >= 1, got 0"):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError, match="training-only and needs rng"):
        sample_frame_indices(40, 8, "random")
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_frame_indices(40, 8, "middle")
    with pytest.raises(ValueError, match="clip_index must be < num_clips"):
        sample_frame_indices(40, 8, clip_index=2, num_clips=2)
    with pytest.raises(ValueError, match="num_clips applies to evaluation"):
        sample_frame_indices(40, 8, num_clips=2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        sample_frame_indices(40, 8, "dense", stride=0)
    with pytest.raises(TypeError, match="rng must be a numpy Generator"):
        sample_frame_indices(40, 8, rng=np.random.RandomState(0))


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 500),
    count=st.integers(1, 64),
    mode=st.sampled_from(["uniform", "dense", "random"]),
    stride=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1) | st.none(),
    clips=st.integers(1, 5),
    data=st.data(),
)
def test_sampling_properties(n, count, mode, stride, seed, clips, data):
    if mode == "random" and seed is None:
        seed = 0
    rng = None if seed is None else np.random.default_rng(seed)
    num_clips = 1 if rng is not None else clips
    clip_index = data.draw(st.integers(0, num_clips - 1))
    indices = sample_frame_indices(
        n, count, mode, stride=stride, rng=rng, clip_index=clip_index, num_clips=num_clips
    )
    assert indices.dtype == np.int64 and indices.shape == (count,)
    assert indices.min() >= 0 and indices.max() < n
    needed = count if mode == "uniform" else (count - 1) * stride + 1
    if n >= needed:  # not looped: strictly increasing, dense ones exactly stride apart
        assert (np.diff(indices) > 0).all()
        if mode != "uniform":
            assert (np.diff(indices) == stride).all()
    else:
        step = 1 if mode == "uniform" else stride
        assert indices.tolist() == [(i * step) % n for i in range(count)]


# ---------------------------------------------------------------------------------------- decoding


def test_decode_frames_returns_requested_order_and_repeats(videos):
    frames, indices, count, reported = decode_frames(videos["long"], lambda n: np.array([30, 2, 2, n - 1, 0]))
    assert frames.shape == (5, 3, 32, 40) and frames.dtype == torch.uint8
    assert (count, reported) == (40, 40)
    assert frame_indices(frames) == indices.tolist() == [30, 2, 2, 39, 0]
    with pytest.raises(ValueError, match=r"choose\(40\) must return indices in \[0, 40\)"):
        decode_frames(videos["long"], lambda n: np.array([n]))


@pytest.mark.parametrize("name", ["corrupt", "empty", "zero"])
def test_decode_frames_unreadable(videos, name):
    with pytest.raises(UnreadableVideoError) as info:
        decode_frames(videos[name], lambda n: np.arange(n))
    assert info.value.path == videos[name] and info.value.reason
    with pytest.raises(UnreadableVideoError, match="no such file"):
        decode_frames(videos[name].with_name("missing.mp4"), lambda n: np.arange(n))


def test_overreported_frame_count_is_clamped(videos, caplog):
    # The file lists 18 frames; frames 12..17 are packets without a picture. Unchecked, decord
    # answers them with a stale frame (frame 11) and says nothing.
    path = videos["over"]
    reader = decord.VideoReader(str(path), num_threads=1, fault_tol="1e-9")
    assert len(reader) == 18
    assert decodable_frame_count(reader) == 12
    del reader
    frames, _, count, reported = decode_frames(path, lambda n: np.arange(n))
    assert (count, reported) == (12, 18)
    assert frame_indices(frames, step=OVERREPORTED_STEP) == list(range(12))
    stale, *_ = decode_frames(path, lambda n: np.array([n - 1]), check_frame_count=False)
    assert frame_indices(stale, step=OVERREPORTED_STEP)[0] < 12  # frame 17 "is" an earlier frame
    dataset = VideoClipDataset(records(videos, "over"), num_frames=6, train=False, size=32, resize=32, **RAW)
    with caplog.at_level(logging.WARNING, logger="seqvision.data.video"):
        item = dataset[0]
        dataset[0]
    assert item["valid"] == 1
    expected = sample_frame_indices(12, 6, "uniform").tolist()
    assert frame_indices(item["video"][0], step=OVERREPORTED_STEP) == expected
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "reports 18 frames but only 12 decode" in messages[0]


class StubReader:
    """A reader whose container lists ``reported`` frames of which ``real`` decode, like decord:
    seeking or batch-reading past the real end is where decord hangs, so the stub fails the test;
    reading forward past it raises, as decord does with zero fault tolerance."""

    def __init__(self, reported, real, keys):
        self.reported, self.real, self.keys, self.position = reported, real, keys, 0

    def __len__(self):
        return self.reported

    def get_key_indices(self):
        return list(self.keys)

    def seek(self, index):
        assert index < self.real, f"seek to {index}, past the real end {self.real}: decord could hang"
        self.position = index

    def next(self):
        if self.position >= self.real:
            raise RuntimeError("You have received more than 0 duplicate frames")  # decord's limit error
        self.position += 1
        return np.full((4, 5, 3), self.position - 1, np.uint8)

    def get_batch(self, indices):
        assert max(indices) < self.real, (
            f"get_batch({indices}) past the real end {self.real}: decord could hang"
        )
        batch = np.stack([np.full((4, 5, 3), i, np.uint8) for i in indices])
        return type("NDArray", (), {"asnumpy": lambda self: batch})()


def test_clamp_on_a_reader_stub(monkeypatch, tmp_path):
    assert decodable_frame_count(StubReader(40, 30, [0, 10, 20])) == 30
    assert decodable_frame_count(StubReader(40, 40, [0, 10, 20, 30])) == 40
    assert decodable_frame_count(StubReader(40, 0, [])) == 0

    class BadLastKey(StubReader):  # the last keyframe's packet itself is damaged
        def seek(self, index):
            if index == 30:
                raise RuntimeError("seek failed")
            super().seek(index)

    assert decodable_frame_count(BadLastKey(40, 35, [0, 10, 20, 30])) == 35  # counted from keyframe 20
    path = write_test_video(tmp_path / "stub.mp4", 2)  # decode_frames checks that the file exists
    monkeypatch.setattr(
        video_data, "_open_reader", lambda path, fault_tol="": StubReader(40, 30, [0, 10, 20])
    )
    frames, indices, count, reported = decode_frames(path, lambda n: sample_frame_indices(n, 6, "uniform"))
    assert (count, reported) == (30, 40)
    assert frames[:, 0, 0, 0].tolist() == indices.tolist() == [2, 7, 12, 17, 22, 27]


def test_readers_are_released(videos):
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc")
    dataset = VideoClipDataset(records(videos, "long", "mkv", "short"), num_frames=4, size=16)
    dataset[0]  # the first reader loads decord's libraries
    before = len(os.listdir(fd_dir))
    for epoch in range(10):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            dataset[i]
    assert len(os.listdir(fd_dir)) <= before  # no file left open by a reader


# -------------------------------------------------------------------------------------- transforms


def test_train_transform_shares_crop_and_flip_across_frames():
    ramp = torch.linspace(0, 255, 40).round().to(torch.uint8)
    clip = ramp.expand(6, 3, 32, 40).contiguous()  # six identical frames: a horizontal ramp
    clip[:, :, :16] //= 2  # and a darker top half, so that crops differ vertically too
    transform = train_clip_transform((16, 16), **RAW)
    flipped, crops = set(), set()
    for seed in range(16):
        torch.manual_seed(seed)
        out = transform(clip)
        assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32 and type(out) is torch.Tensor
        assert torch.equal(out, out[:1].expand_as(out))  # every frame cropped and flipped alike
        row = out[0, 0, -1]
        flipped.add(bool(row[0] > row[-1]))
        crops.add(tuple(out[0, 0, :, 0].tolist()))
    assert flipped == {True, False} and len(crops) > 8
    no_flip = train_clip_transform(16, hflip=False, **RAW)
    for seed in range(8):
        torch.manual_seed(seed)
        row = no_flip(clip)[0, 0, -1]
        assert row[0] < row[-1]  # the ramp still rises to the right
    with pytest.raises(ValueError, match=r"clip must be a uint8 tensor \(T, 3, H, W\)"):
        transform(clip.float())


def test_train_transform_normalises():
    clip = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    out = train_clip_transform(4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(clip)
    assert torch.allclose(out[:, 0], torch.tensor(2.0)) and torch.allclose(out[:, 2], torch.tensor(0.5))


def test_eval_views_three_crops_along_the_long_side():
    ramp = torch.arange(40, dtype=torch.uint8) * 6
    clip = ramp.expand(3, 3, 32, 40).contiguous()
    views = eval_clip_views(clip, size=32, resize=32, num_crops=3, **RAW)
    assert views.shape == (3, 3, 3, 32, 32)
    first_columns = (views[:, 0, 0, 0, 0] * 255).round().tolist()
    assert first_columns == [0, 24, 48]  # left (column 0), centre (4), right (8)
    portrait = clip.transpose(-1, -2).contiguous()
    views = eval_clip_views(portrait, size=32, resize=32, num_crops=3, **RAW)
    assert (views[:, 0, 0, 0, 0] * 255).round().tolist() == [0, 24, 48]  # top, centre, bottom
    centre = eval_clip_views(clip, size=(16, 20), resize=16, **RAW)  # 32x40 -> 16x20: no crop left
    assert centre.shape == (1, 3, 3, 16, 20)
    with pytest.raises(ValueError, match="larger than the resized frames"):
        eval_clip_views(clip, size=64, resize=32)


# ----------------------------------------------------------------------------------------- dataset


def test_eval_items_hold_the_expected_frames(videos):
    recs = records(videos, "long", "short")
    dataset = VideoClipDataset(recs, num_frames=8, train=False, size=32, resize=32, **RAW)
    item = dataset[0]
    assert set(item) == {"video", "label", "index", "valid"}
    assert item["video"].shape == (1, 8, 3, 32, 32) and item["video"].dtype == torch.float32
    assert frame_indices(item["video"][0]) == [2, 7, 12, 17, 22, 27, 32, 37]
    assert item["index"].dtype == torch.int64 and item["index"].ndim == 0 and item["valid"] == 1
    assert frame_indices(dataset[1]["video"][0]) == [0, 1, 2, 3, 4, 0, 1, 2]  # 5 frames, looped


def test_eval_multi_clip_multi_crop_views_are_clip_major(videos):
    dataset = VideoClipDataset(
        records(videos, "long"), num_frames=4, sampling="dense", stride=3, train=False,
        num_clips=3, num_crops=3, size=32, resize=32, **RAW,
    )  # fmt: skip
    video = dataset[0]["video"]
    assert video.shape == (9, 4, 3, 32, 32)
    for view in range(9):
        clip = view // 3
        expected = sample_frame_indices(40, 4, "dense", stride=3, clip_index=clip, num_clips=3).tolist()
        assert frame_indices(video[view]) == expected
    assert [frame_indices(video[3 * c])[0] for c in range(3)] == [0, 15, 30]


def test_training_clips_follow_seed_epoch_and_index(videos):
    recs = records(videos, "long", "mkv")
    make = lambda seed=0: VideoClipDataset(recs, num_frames=8, size=16, seed=seed, **RAW)  # noqa: E731
    dataset = make()
    item = dataset[0]
    assert set(item) == {"video", "label", "index", "unreadable"}
    assert item["video"].shape == (8, 3, 16, 16) and item["unreadable"] == 0
    first = frame_indices(item["video"])
    assert ((np.array(first) // 5) == np.arange(8)).all()  # one frame per 5-frame segment
    assert torch.equal(make()[0]["video"], item["video"])  # a new dataset (a resumed run) agrees
    dataset.set_epoch(1)
    later = dataset[0]["video"]
    assert frame_indices(later) != first
    dataset.set_epoch(0)
    assert torch.equal(dataset[0]["video"], item["video"])
    assert frame_indices(make(seed=1)[0]["video"]) != first
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        dataset.set_epoch(-1)


def test_training_crop_and_flip_are_the_same_for_every_frame(videos):
    dataset = VideoClipDataset(records(videos, "gradient"), num_frames=8, size=16, **RAW)
    directions = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        video = dataset[0]["video"]
        assert torch.allclose(video, video[:1].expand_as(video), atol=1 / 255)
        row = video[0, 0, 8]
        directions.add(bool(row[0] > row[-1]))
    assert directions == {True, False}  # flipped in some epochs, never within a clip


def test_unreadable_videos_are_skipped_warned_once_and_counted(videos, caplog):
    recs = records(videos, "long", "corrupt", "empty", "zero", "mkv")
    dataset = VideoClipDataset(recs, num_frames=4, size=16, max_unreadable_fraction=0.6, **RAW)
    with caplog.at_level(logging.WARNING, logger="seqvision.data.video"):
        item = dataset[1]
        again = dataset[2]
        dataset[3]
    assert (item["index"], item["unreadable"]) == (4, 3)  # 1, 2 and 3 skipped; video 4 returned
    assert (again["index"], again["unreadable"]) == (4, 2)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and all("unreadable video, skipped" in w for w in warned)
    assert {Path(w.split(": unreadable")[0]) for w in warned} == {
        videos[n] for n in ("corrupt", "empty", "zero")
    }
    unreadable = dataset.unreadable_videos()
    assert set(unreadable) == {videos["corrupt"], videos["empty"], videos["zero"]}
    assert unreadable[videos["empty"]] == "empty file (0 bytes)"
    # Another process that has not met the bad files yet returns the very same clip.
    fresh = VideoClipDataset(recs, num_frames=4, size=16, max_unreadable_fraction=0.6, **RAW)
    assert torch.equal(fresh[1]["video"], item["video"])
    report = summarise_unreadable(unreadable).splitlines()
    assert len(report) == 3 and f"{videos['empty']}: empty file (0 bytes)" in report
    assert summarise_unreadable(unreadable, limit=1).splitlines()[-1] == "... and 2 more"


def test_too_many_unreadable_videos_is_an_error(videos):
    recs = records(videos, "long", "corrupt", "mkv", "short", "gradient")
    dataset = VideoClipDataset(recs, num_frames=4, size=16)
    with pytest.raises(
        RuntimeError, match=r"1 of 5 videos \(20.0%\) are unreadable, more than max_unreadable_fraction=0.1"
    ):
        dataset[1]
    everything_bad = VideoClipDataset(
        records(videos, "corrupt", "empty"), num_frames=4, size=16, max_unreadable_fraction=1.0
    )
    with pytest.raises(RuntimeError, match="all 2 videos are unreadable"):
        everything_bad[0]


def test_eval_item_of_an_unreadable_video_is_marked_invalid(videos):
    recs = records(videos, "corrupt", "long")
    dataset = VideoClipDataset(recs, num_frames=4, train=False, num_clips=2, size=32, resize=32)
    bad, good = dataset[0], dataset[1]
    assert bad["valid"] == 0 and good["valid"] == 1
    assert bad["video"].shape == good["video"].shape == (2, 4, 3, 32, 32)
    assert not bad["video"].any() and bad["index"] == 0
    assert list(dataset.unreadable_videos()) == [videos["corrupt"]]


def test_dataset_argument_errors(videos):
    recs = records(videos, "long")
    with pytest.raises(ValueError, match="num_clips and num_crops apply to evaluation"):
        VideoClipDataset(recs, num_clips=2)
    assert VideoClipDataset(recs, sampling="random", train=False).sampling == "dense"  # its eval form
    with pytest.raises(ValueError, match="resize"):
        VideoClipDataset(recs, train=False, size=224, resize=128)
    with pytest.raises(ValueError, match="records: need at least one video"):
        VideoClipDataset([])
    with pytest.raises(IndexError):
        VideoClipDataset(recs)[1]


def test_dataloader_with_two_workers_matches_the_main_process(videos):
    recs = records(videos, "long", "mkv", "corrupt", "short", "gradient", "long")
    make = lambda: VideoClipDataset(recs, num_frames=4, size=16, seed=5, max_unreadable_fraction=0.5)  # noqa: E731
    dataset = make()
    dataset.set_epoch(2)
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert len(batches) == 3
    assert batches[0]["video"].shape == (2, 4, 3, 16, 16)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert indices == [0, 1, 3, 3, 4, 5]  # video 2 (corrupt) replaced by video 3
    assert torch.cat([b["unreadable"] for b in batches]).tolist() == [0, 0, 1, 0, 0, 0]
    reference = make()
    reference.set_epoch(2)
    for b, batch in enumerate(batches):  # worker processes decode exactly what the main process would
        for row in range(2):
            assert torch.equal(batch["video"][row], reference[2 * b + row]["video"])


def test_motion_video_direction_is_not_in_a_single_frame(tmp_path):
    left = write_motion_video(tmp_path / "left.mp4", "left", num_frames=8, seed=1)
    right = write_motion_video(tmp_path / "right.mp4", "right", num_frames=8, seed=2)
    for path, sign in ((left, -1), (right, 1)):
        frames, *_ = decode_frames(path, lambda n: np.arange(n))
        bright = frames[:, 0] > 150  # (T, H, W): the square's pixels
        columns = [set(torch.nonzero(b.any(0)).flatten().tolist()) for b in bright]
        assert all(len(c) == 6 for c in columns)  # a 6-pixel square, possibly split by the edge
        edges = [next(c for c in cols if (c - 1) % 40 not in cols) for cols in columns]  # its left edge
        assert all((b - a) % 40 == (2 * sign) % 40 for a, b in itertools.pairwise(edges))
