"""Caption files (COCO, Karpathy, video CSV/TSV, MSR-VTT JSON, JSON lists) and CaptionDataset.

Images are tiny PNGs written with PIL; videos are 32 x 40 clips written by video_fixtures (decord
0.6 cannot decode some widths, 8/16/24/48/72 among them).
"""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from video_fixtures import write_motion_video, write_test_video

from seqvision.data.captions import (
    CaptionDataset,
    CaptionRecord,
    UnreadableImageError,
    load_coco_captions,
    load_video_captions,
    read_image,
    references,
)
from seqvision.data.video import UnreadableDatasetError
from seqvision.eval.captioning.vocab import Vocabulary

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # outputs stay pixel / 255
SIZE = (32, 40)

CAPTIONS = {
    1: ["A red square on a black background.", "a red box"],
    2: ["A green gradient from left to right"],
    5: ["Blue noise everywhere", "lots of blue dots in the picture"],
}


def write_png(path, seed, size=(36, 44)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def coco(tmp_path):
    """A COCO captions file: images 1, 2 and 5 with captions, 3 listed but absent, 4 without captions."""
    root = tmp_path / "images"
    root.mkdir()
    for image_id in (1, 2, 4, 5):
        write_png(root / f"{image_id:012d}.png", image_id)
    data = {
        "info": {},
        "images": [{"id": i, "file_name": f"{i:012d}.png", "width": 44} for i in (1, 2, 3, 4, 5)],
        "annotations": [
            {"id": n, "image_id": image_id, "caption": caption}
            for n, (image_id, caption) in enumerate(
                [(i, c) for i, cs in CAPTIONS.items() for c in cs] + [(3, "a missing picture")]
            )
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    return path, root


@pytest.fixture
def vocab():
    return Vocabulary.build([c for cs in CAPTIONS.values() for c in cs])


# ------------------------------------------------------------------------------------------ readers


def test_coco_reader_groups_captions_and_counts_missing(coco, caplog):
    path, root = coco
    with caplog.at_level(logging.INFO, logger="seqvision.data.captions"):
        records, missing = load_coco_captions(path, root)
    assert missing == 1
    assert [r.key for r in records] == ["1", "2", "5"]
    assert records[0] == CaptionRecord(root / "000000000001.png", tuple(CAPTIONS[1]), "1")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 of 4 images" in warnings[0] and "000000000003.png" in warnings[0]
    assert any("1 listed images have no caption" in r.getMessage() for r in caplog.records)
    assert references(records)["5"] == CAPTIONS[5]


def test_coco_reader_without_usable_pairs_raises(coco, tmp_path):
    path, _ = coco
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no usable \(image, caption\) pairs.*6 annotations, 5 images"):
        load_coco_captions(path, empty)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="expected COCO captions JSON"):
        load_coco_captions(bad, empty)
    with pytest.raises(ValueError, match="split applies to Karpathy"):
        load_coco_captions(path, empty, split="train")
    with pytest.raises(FileNotFoundError):
        load_coco_captions(tmp_path / "nope.json", empty)


def test_karpathy_split_file(coco, tmp_path):
    _, root = coco
    data = {
        "dataset": "coco",
        "images": [
            {"filepath": "images", "filename": "000000000001.png", "cocoid": 1, "split": "train",
             "sentences": [{"raw": "A red square.", "tokens": ["a", "red", "square"]}]},
            {"filepath": "images", "filename": "000000000002.png", "cocoid": 2, "split": "restval",
             "sentences": [{"tokens": ["a", "gradient"]}]},
            {"filepath": "images", "filename": "000000000005.png", "cocoid": 5, "split": "test",
             "sentences": [{"raw": "blue noise"}]},
        ],
    }  # fmt: skip
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    records, missing = load_coco_captions(path, tmp_path, split=("train", "restval"))
    assert missing == 0
    assert [(r.key, r.captions) for r in records] == [("1", ("A red square.",)), ("2", ("a gradient",))]
    assert records[1].path == root / "000000000002.png"
    assert [r.key for r in load_coco_captions(path, tmp_path)[0]] == ["1", "2", "5"]


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "videos"
    return {
        "a": write_test_video(folder / "a.mp4", 20, SIZE),
        "b": write_motion_video(folder / "sub" / "b.mp4", "left", 12, SIZE),
    }


def test_video_csv_headerless_with_commas_and_missing(clips, tmp_path, caplog):
    path = tmp_path / "videos" / "captions.csv"
    path.write_text(
        "a.mp4,a grey square, fading in\n\nsub/b.mp4,a dot moves left\na.mp4,the screen brightens\n"
        "gone.mp4,never written\n"
    )
    with caplog.at_level(logging.WARNING, logger="seqvision.data.captions"):
        records, missing = load_video_captions(path)
    assert missing == 1
    assert [(r.key, r.path, r.captions) for r in records] == [
        ("a", clips["a"], ("a grey square, fading in", "the screen brightens")),
        ("sub/b", clips["b"], ("a dot moves left",)),
    ]
    assert len(caplog.records) == 1 and "gone.mp4" in caplog.records[0].getMessage()


def test_video_tsv_with_header_picks_columns(clips, tmp_path):
    path = tmp_path / "list.tsv"
    path.write_text("split\tcaption\tvideo\ntrain\tsomething moves\tb.mp4\ntrain\tgrey\ta.mp4\n")
    records, missing = load_video_captions(path, video_root=tmp_path / "videos" / "sub")
    assert missing == 1 and [(r.key, r.captions) for r in records] == [("b", ("something moves",))]
    bad = tmp_path / "bad.csv"
    bad.write_text("a.mp4,\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: expected 'video,caption'"):
        load_video_captions(bad, video_root=tmp_path / "videos")


def test_msrvtt_json_ids_splits_and_no_usable_pairs(clips, tmp_path):
    root = tmp_path / "videos"
    write_test_video(root / "video0.mp4", 10, SIZE)
    write_test_video(root / "video3.avi", 10, SIZE)
    data = {
        "info": {},
        "videos": [
            {"video_id": "video0", "split": "train"},
            {"video_id": "video1", "split": "train"},  # not on disk
            {"video_id": "video2", "split": "train"},  # no sentence
            {"video_id": "video3", "split": "test"},
        ],
        "sentences": [
            {"video_id": "video0", "caption": "a man talks", "sen_id": 0},
            {"video_id": "video1", "caption": "a car drives", "sen_id": 1},
            {"video_id": "video0", "caption": "someone speaks", "sen_id": 2},
            {"video_id": "video3", "caption": "a cat", "sen_id": 3},
        ],
    }
    path = tmp_path / "train_val_videodatainfo.json"
    path.write_text(json.dumps(data))
    records, missing = load_video_captions(path, root, split="train")
    assert missing == 1
    assert [(r.key, r.path.name, r.captions) for r in records] == [
        ("video0", "video0.mp4", ("a man talks", "someone speaks"))
    ]
    records, _ = load_video_captions(path, root)
    assert [(r.key, r.path.name) for r in records] == [("video0", "video0.mp4"), ("video3", "video3.avi")]
    with pytest.raises(ValueError, match=r"pairs: read 4 sentences \(keeping.*0 videos listed"):
        load_video_captions(path, root, split="validate")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing_all = r"4 videos listed, 3 of those with captions missing on disk, 1 without captions"
    with pytest.raises(ValueError, match=r"videodatainfo.json: no usable.*" + missing_all):
        load_video_captions(path, empty)


def test_json_list_of_videos(clips, tmp_path):
    path = tmp_path / "videos" / "list.json"
    path.write_text(
        json.dumps(
            [
                {"video": "a.mp4", "captions": ["one", "two"]},
                {"video": "sub/b.mp4", "caption": "three", "id": "clip-b"},
                {"video": "c.mp4", "captions": []},
            ]
        )
    )
    records, missing = load_video_captions(path)
    assert missing == 0
    assert [(r.key, r.captions) for r in records] == [("a", ("one", "two")), ("clip-b", ("three",))]


def test_references_refuses_duplicate_keys(tmp_path):
    records = [CaptionRecord(tmp_path / "x.png", ("a",), "1"), CaptionRecord(tmp_path / "y.png", ("b",), "1")]
    with pytest.raises(ValueError, match="the key '1' occurs twice"):
        references(records)


# ------------------------------------------------------------------------------------------ dataset


def test_train_items_token_layout_and_truncation(coco, vocab, caplog):
    path, root = coco
    records, _ = load_coco_captions(path, root)
    long = CaptionRecord(records[0].path, (*records[0].captions, "red " * 30), "9")
    with caplog.at_level(logging.INFO, logger="seqvision.data.captions"):
        ds = CaptionDataset([*records, long], vocab, train=True, max_len=7, size=32, **RAW)
    # pairs: 2 + 1 + 2 + 3 (the long record repeats record 0's two captions); over 7 tokens: "a red
    # square on a black background ." (8, twice) and the long one
    assert len(ds) == 8 and ds.truncated_count == 3
    assert any("3 of 8 training captions longer than max_len=7" in r.getMessage() for r in caplog.records)
    item = ds[1]
    assert set(item) == {"image", "tokens", "length", "index", "unreadable"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["tokens"].shape == (9,) and item["tokens"].dtype == torch.int64
    ids, _ = vocab.encode("a red box")
    assert item["tokens"].tolist() == [*ids, 0, 0, 0, 0] and item["length"].item() == 5
    assert item["index"].item() == 0 and item["unreadable"].item() == 0
    tokens = ds[7]["tokens"].tolist()
    assert len(tokens) == 9 and tokens[0] == 1 and tokens[-1] == 2 and 0 not in tokens  # cut, EOS kept
    assert ds[7]["length"].item() == 9 and ds[7]["index"].item() == 3
    assert vocab.decode(tokens) == "red red red red red red red"
    # Pixels are the image's, scaled: uniform colour survives any crop.
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0


def test_eval_items_and_unreadable_image(coco, vocab, caplog):
    path, root = coco
    records, _ = load_coco_captions(path, root)
    (root / "000000000002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)  # truncated PNG
    with pytest.raises(UnreadableImageError):
        read_image(root / "000000000002.png")
    ds = CaptionDataset(records, train=False, size=24, resize=28, **RAW)
    assert len(ds) == 3 and ds.input_key == "image"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="seqvision.data.captions"):
        items = [ds[i] for i in range(3)] + [ds[1]]
    assert [int(it["valid"]) for it in items] == [1, 0, 1, 0]
    assert all(it["image"].shape == (3, 24, 24) and set(it) == {"image", "index", "valid"} for it in items)
    assert items[1]["image"].abs().sum() == 0 and items[2]["index"].item() == 2
    assert len(caplog.records) == 1 and "unreadable image" in caplog.records[0].getMessage()

    train = CaptionDataset(records, vocab, train=True, size=24, max_unreadable_fraction=1.0, **RAW)
    item = train[2]  # pair 2 is record 1's only caption: replaced by record 2's first pair
    assert item["index"].item() == 2 and item["unreadable"].item() == 1
    assert item["tokens"].tolist()[: item["length"]] == vocab.encode(CAPTIONS[5][0])[0]
    assert list(train.unreadable_files()) == [root / "000000000002.png"]
    strict = CaptionDataset(records, vocab, train=True, size=24, max_unreadable_fraction=0.2)
    with pytest.raises(UnreadableDatasetError, match="1 of 3 files"):
        strict[2]


def test_training_items_are_deterministic_per_seed_epoch_index(coco, vocab):
    path, root = coco
    records, _ = load_coco_captions(path, root)

    def build(seed=0):
        return CaptionDataset(records, vocab, train=True, size=24, crop_scale=(0.2, 1), hflip=True, seed=seed)

    a, b = build(), build()
    torch.manual_seed(1)
    first = a[3]["image"]
    torch.manual_seed(2)
    assert torch.equal(first, b[3]["image"])
    b.set_epoch(1)
    assert not torch.equal(first, b[3]["image"])
    b.set_epoch(0)
    assert torch.equal(first, b[3]["image"])
    assert not torch.equal(first, build(seed=1)[3]["image"])
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        b.set_epoch(-1)


def test_dataset_argument_errors(coco, vocab, clips):
    path, root = coco
    records, _ = load_coco_captions(path, root)
    with pytest.raises(ValueError, match="vocab: training"):
        CaptionDataset(records, train=True)
    mixed = [*records, CaptionRecord(clips["a"], ("x",), "a")]
    with pytest.raises(ValueError, match="records mix videos and images"):
        CaptionDataset(mixed, train=False)
    with pytest.raises(ValueError, match="resize"):
        CaptionDataset(records, train=False, size=64, resize=32)
    with pytest.raises(TypeError, match="CaptionRecords"):
        CaptionDataset([("a.png", "x")], vocab, train=True)
    with pytest.raises(IndexError):
        CaptionDataset(records, train=False)[3]


def test_video_items(clips, tmp_path):
    path = tmp_path / "videos" / "captions.csv"
    path.write_text("video,caption\na.mp4,grey frames getting brighter\nsub/b.mp4,a square moves left\n")
    records, _ = load_video_captions(path)
    vocab = Vocabulary.build([c for r in records for c in r.captions])
    train = CaptionDataset(records, vocab, train=True, num_frames=4, size=24, max_len=5, **RAW)
    assert train.input_key == "video" and len(train) == 2
    item = train[0]
    assert item["video"].shape == (4, 3, 24, 24) and item["video"].dtype == torch.float32
    assert item["tokens"].shape == (7,) and item["length"].item() == 6
    ev = CaptionDataset(records, train=False, num_frames=4, size=24, resize=28, **RAW)
    item = ev[0]
    assert item["video"].shape == (4, 3, 24, 24) and item["valid"].item() == 1
    # 'uniform' evaluation takes the middles of 4 segments of 20 frames: 2, 7, 12, 17 (pixel 4 * i)
    means = (item["video"].mean(dim=(1, 2, 3)) * 255 / 4).round().tolist()
    assert means == [2, 7, 12, 17]
    (tmp_path / "videos" / "a.mp4").write_bytes(b"not a video" * 100)
    broken = CaptionDataset(records, train=False, num_frames=4, size=24, resize=28)
    assert broken[0]["valid"].item() == 0 and broken[0]["video"].shape == (4, 3, 24, 24)


def test_dataloader_with_workers(coco, vocab):
    path, root = coco
    records, _ = load_coco_captions(path, root)
    ds = CaptionDataset(records, vocab, train=True, size=24, max_len=8)
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [3, 2]
    assert batches[0]["tokens"].shape == (3, 10) and batches[0]["length"].shape == (3,)
    assert torch.equal(batches[1]["image"][1], ds[4]["image"])  # workers give the same items
    ev = CaptionDataset(records, train=False, size=24, resize=24)
    batch = next(iter(DataLoader(ev, batch_size=3, num_workers=2)))
    assert batch["image"].shape == (3, 3, 24, 24) and batch["valid"].tolist() == [1, 1, 1]
