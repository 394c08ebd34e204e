"""Captioning fine-tuning and evaluation end to end: configs, the shared loop, generation, metrics
files, video captions on PyAV-written clips, the CLI and the reliability rules.

The learning test is the one that matters: on pictures of coloured shapes, an LRCN captioner learns
in a few CPU minutes to say which colours and shapes it sees and where, scoring a CIDEr well above
the best constant caption.
"""

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import yaml
from caption_fixtures import write_shapes_dataset
from video_fixtures import write_motion_video

from seqvision.cli import main
from seqvision.engine import LoopConfig
from seqvision.engine.model_file import read_model_file
from seqvision.eval.captioning import build_model as build_captioner
from seqvision.eval.captioning import evaluate as evaluate_captioner
from seqvision.eval.captioning import finetune as finetune_captioner
from seqvision.eval.captioning import load_caption_records
from seqvision.eval.captioning import load_config as load_caption_config
from seqvision.eval.captioning import prepare as prepare_caption_finetune
from seqvision.eval.captioning.metrics import caption_scores

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train = write_shapes_dataset(root / "train", 300, seed=0)
    val = write_shapes_dataset(root / "val", 40, seed=1)
    return {"captions": str(train), "root": str(train.parent / "images")}, {
        "captions": str(val),
        "root": str(val.parent / "images"),
    }


def _config(train, val, output: Path, *, steps: int = 300, batch_size: int = 16) -> dict:
    """An LRCN2f captioner on timm's 0.4 M-parameter test ResNet, fine-tuned whole, at 32 x 32."""
    return {
        "model": {"encoder": "test_resnet", "hidden": 128, "dropout": 0.0, "variant": "factored"},
        "data": {
            "train": train,
            "val": val,
            "size": 32,
            "resize": 32,
            "crop_scale": [1.0, 1.0],  # a crop could cut a shape the caption names
            "crop_ratio": [1.0, 1.0],
            "max_len": 12,
        },
        "eval": {"method": "beam", "beam_size": 3, "batch_size": 20, "meteor": False},
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": 2e-3,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "warmup_steps": 10,
            "log_every": 25,
            "save_every": steps,
            "shuffle": True,
            "log_with": None,
            "mixed_precision": "no",
            "output_dir": str(output),
        },
    }


def _best_constant_cider(train: dict, val: dict) -> float:
    """CIDEr of the best of the 20 most frequent training captions, said of every picture."""
    references = {}
    for annotation in json.loads(Path(val["captions"]).read_text())["annotations"]:
        references.setdefault(str(annotation["image_id"]), []).append(annotation["caption"])
    counts = Counter(a["caption"] for a in json.loads(Path(train["captions"]).read_text())["annotations"])
    return max(
        caption_scores({key: caption for key in references}, references, meteor=False).cider
        for caption, _ in counts.most_common(20)
    )


# ------------------------------------------------------------------------------------------- learning


def test_captioner_learns_what_it_sees_well_above_a_constant_caption(shapes, tmp_path):
    train, val = shapes
    path, result = finetune_captioner(_config(train, val, tmp_path / "run"))
    scores = result.evaluations[-1]
    constant = _best_constant_cider(train, val)
    assert scores["samples"] == 40 and scores["skipped"] == 0
    assert scores["cider"] > 1.5 * constant, (scores, constant)
    assert scores["bleu_4"] > 0.3, scores
    assert "meteor" not in scores  # turned off in this config: absent, never 0

    # The run's files, and an evaluation from the model file alone that agrees with training's.
    saved = read_model_file(path, "caption")
    assert saved.extra["vocab"]["format"] == "seqvision-vocab"
    evaluation, files = evaluate_captioner(tmp_path / "run", output_dir=tmp_path / "again")
    assert evaluation.scores.cider == pytest.approx(scores["cider"])
    predictions = json.loads(files["predictions"].read_text())
    assert len(predictions) == 40 and {"image_id", "caption"} <= set(predictions[0])
    assert isinstance(predictions[0]["image_id"], int)
    metrics = json.loads(files["metrics"].read_text())
    assert metrics["cider"] == pytest.approx(scores["cider"]) and metrics["unreadable"] == []
    assert metrics["meteor"] is None and metrics["skipped"] == {"METEOR": "disabled with meteor=False"}
    assert files["grid"].read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "eval" / "captions.png").is_file()  # written at the end of training

    # Other decoders on the same model: greedy is beam 1; sampling is seeded, so repeatable.
    greedy, _ = evaluate_captioner(path, output_dir=tmp_path / "g", overrides=["eval.method=greedy"])
    beam1, _ = evaluate_captioner(path, output_dir=tmp_path / "b", overrides=["eval.beam_size=1"])
    assert greedy.predictions == beam1.predictions
    sampled = [
        evaluate_captioner(path, output_dir=tmp_path / f"s{i}", overrides=["eval.method=sample"])[0]
        for i in range(2)
    ]
    assert sampled[0].predictions == sampled[1].predictions


# ---------------------------------------------------------------------------------------------- video


def _write_clip_captions(root: Path, count: int) -> Path:
    """Clips of a square moving left or right and a ``video,caption`` CSV, two captions per clip."""
    rows = []
    for i in range(count):
        direction = ("left", "right")[i % 2]
        write_motion_video(root / f"clip{i}.mp4", direction, 8, (32, 40), seed=i)
        rows += [
            (f"clip{i}.mp4", f"a square moves {direction}"),
            (f"clip{i}.mp4", f"the square goes {direction}"),
        ]
    path = root / "captions.csv"
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([("video", "caption"), *rows])
    return path


@pytest.mark.parametrize("video_features", ["mean", "per_step"])
def test_video_captioning_runs_on_pyav_clips(tmp_path, video_features):
    captions = _write_clip_captions(tmp_path / "clips", 6)
    spec = {"captions": str(captions), "root": str(captions.parent)}
    config = _config(spec, spec, tmp_path / "run", steps=3, batch_size=4)
    config["model"]["video_features"] = video_features
    config["data"].update(num_frames=4, size=32, resize=32)
    path, result = finetune_captioner(config)
    assert result.evaluations[-1]["samples"] == 6
    assert read_model_file(path, "caption").config["data"]["num_frames"] == 4
    predictions = json.loads((tmp_path / "run" / "eval" / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == [f"clip{i}" for i in range(6)]


def test_per_step_features_need_videos(shapes, tmp_path):
    train, val = shapes
    config = _config(train, val, tmp_path / "run")
    config["model"]["video_features"] = "per_step"
    with pytest.raises(ValueError, match="per_step"):
        prepare_caption_finetune(config)


# ----------------------------------------------------------------------------------------- reliability


def test_missing_images_are_skipped_and_long_captions_truncated_and_counted(tmp_path, caplog):
    annotations = write_shapes_dataset(tmp_path / "set", 12, seed=3)
    (tmp_path / "set" / "images" / "00002.png").unlink()
    data = json.loads(annotations.read_text())
    data["annotations"].append({"id": 999, "image_id": 1, "caption": " ".join(["very"] * 30) + " long"})
    annotations.write_text(json.dumps(data))
    spec = {"captions": str(annotations), "root": str(tmp_path / "set" / "images")}
    with caplog.at_level(logging.INFO):
        job = prepare_caption_finetune(_config(spec, None, tmp_path / "run", steps=1))
    assert len(job.train_set.records) == 11  # 12 listed, one missing on disk
    assert job.train_set.truncated_count == 1
    text = caplog.text
    assert "1 listed file(s) missing" in text and "truncated" in text


def test_caption_file_and_vocabulary_mistakes_are_clear_errors(tmp_path):
    annotations = write_shapes_dataset(tmp_path / "set", 4, seed=3)
    spec = {"captions": str(annotations), "root": str(tmp_path / "set" / "images")}
    with pytest.raises(ValueError, match="no usable"):
        load_caption_records({**spec, "root": str(tmp_path)}, "train")  # every image missing
    with pytest.raises(ValueError, match="min_count"):
        prepare_caption_finetune(
            {**_config(spec, None, tmp_path / "r"), "data": {"train": spec, "min_count": 1000}}
        )
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_caption_records({"captions": str(tmp_path / "none.json")}, "train")
    with pytest.raises(ValueError, match=r"unknown data option\(s\) \['vocab'\]"):
        load_caption_config({"data": {"vocab": 3}})
    with pytest.raises(ValueError, match=r"eval\.method"):
        load_caption_config({"eval": {"method": "nucleus"}})
    with pytest.raises(ValueError, match=r"data\.train: unknown key"):
        load_caption_records({**spec, "images": "x"}, "train")


# ------------------------------------------------------------------------------------------- commands


def test_cli_finetunes_and_evaluates_captions(tmp_path, capsys):
    annotations = write_shapes_dataset(tmp_path / "set", 16, seed=5)
    spec = {"captions": str(annotations), "root": str(tmp_path / "set" / "images")}
    config = tmp_path / "caption.yaml"
    config.write_text(yaml.safe_dump(_config(spec, spec, tmp_path / "run", steps=3, batch_size=4)))
    assert main(["finetune-caption", "--config", str(config), "--set", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "CIDEr" in out and "BLEU-4" in out and "fine-tuned 2 steps" in out

    assert main(["eval-caption", "--checkpoint", str(tmp_path / "run"), "--set", "eval.meteor=null"]) == 0
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and "predictions.json" in out and "captions.png" in out
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    # METEOR runs when java is on PATH and is reported as skipped (with the reason) when not.
    assert metrics["meteor"] is not None or metrics["skipped"]["METEOR"] == "java not found on PATH"

    assert main(["finetune-caption", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval-caption", "--checkpoint", str(config)]) == 2


@pytest.mark.parametrize("name", ["caption_lrcn_coco.yaml", "caption_video_tiny.yaml"])
def test_shipped_configs_are_valid(name):
    values = load_caption_config(CONFIGS / name)
    LoopConfig.from_dict(values["train"])
    captioner = build_captioner(values["model"], vocab_size=50, download=False)
    assert captioner.variant == values["model"]["variant"]
