"""Video recognition fine-tuning and evaluation end to end: configs, the shared loop, multi-view
evaluation, unreadable videos, the CLI and a multi-process evaluation that counts every video once.

The learning test is the one that matters: LRCN with a frozen ResNet-18 learns a moving square's
direction, which no single frame shows, and the same model on one-frame clips stays at chance.
"""

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from video_fixtures import write_corrupt_video, write_motion_video

from seqvision.cli import main
from seqvision.data.video import UnreadableDatasetError
from seqvision.engine import LoopConfig
from seqvision.engine.model_file import MODEL_FILE, read_model_file
from seqvision.eval.video import build_model as build_video_model
from seqvision.eval.video import evaluate as evaluate_video
from seqvision.eval.video import finetune as finetune_video
from seqvision.eval.video import load_config as load_video_config
from seqvision.eval.video import prepare as prepare_video_finetune
from seqvision.eval.video.finetune import _source

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"
SIZE = (32, 40)  # decord 0.6 cannot decode some widths (8, 16, 24, 48, 72): see video_fixtures


def _write_motion_set(root: Path, per_class: int, seed: int) -> Path:
    """root/left/*.mp4 and root/right/*.mp4: squares moving left or right, 16 frames each."""
    for direction in ("left", "right"):
        (root / direction).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            video_seed = seed + i + (5000 if direction == "left" else 0)
            write_motion_video(root / direction / f"{i:03d}.mp4", direction, 16, SIZE, seed=video_seed)
    return root


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    return _write_motion_set(root / "train", 60, seed=0), _write_motion_set(root / "val", 20, seed=1000)


def _config(
    train: Path, val: Path | None, output: Path, *, frames: int = 8, steps: int = 150, batch_size: int = 8
) -> dict:
    """LRCN on a frozen, randomly initialised ResNet-18 (no download in tests) at 32 x 32 pixels.

    ``zero_init_last=False``: timm zero-initialises the last norm of every residual branch, which
    leaves a random ResNet only its shortcut path, a strided subsampling that sees one pixel of the
    8 x 8 stem map; with random branches the features encode where the square is.
    """
    return {
        "model": {
            "name": "lrcn_resnet18",
            "kwargs": {
                "lstm_hidden": 64,
                "dropout": 0.0,
                "freeze_encoder": True,
                "feature_norm": True,
                "encoder_kwargs": {"zero_init_last": False},
            },
        },
        "data": {
            "train": str(train),
            "val": str(val) if val else None,
            "num_frames": frames,
            "sampling": "uniform",
            "size": 32,
            "resize": 32,
            "hflip": False,  # a flip turns a left-moving square into a right-moving one
            "crop_scale": [1.0, 1.0],
            "crop_ratio": [1.0, 1.0],
        },
        "eval": {"batch_size": 4, "num_clips": 2},
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": 3e-3,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "warmup_steps": 5,
            "log_every": 10,
            "save_every": steps,
            "shuffle": True,
            "log_with": None,
            "mixed_precision": "no",
            "output_dir": str(output),
        },
    }


# ------------------------------------------------------------------------------------------- learning


def test_lrcn_learns_motion_that_no_single_frame_shows(motion, tmp_path):
    train, val = motion
    path, result = finetune_video(_config(train, val, tmp_path / "clips"))
    clips = result.evaluations[-1]
    assert clips["samples"] == 40 and clips["skipped"] == 0
    assert clips["top1"] > 0.9, result.evaluations

    # The same model and budget on one-frame clips: the direction is not in a frame.
    _, single = finetune_video(_config(train, val, tmp_path / "frame", frames=1))
    assert 0.3 <= single.evaluations[-1]["top1"] <= 0.7, single.evaluations

    # What the run left behind, and an evaluation from the file alone that agrees with it.
    saved = read_model_file(path, "video")
    assert saved.extra["classes"] == ["left", "right"]
    evaluation, classes, files = evaluate_video(tmp_path / "clips", output_dir=tmp_path / "again")
    assert evaluation.report.top1 == pytest.approx(clips["top1"])
    assert classes == ["left", "right"]
    metrics = json.loads(files["metrics"].read_text())
    assert metrics["samples"] == 40 and len(metrics["confusion"]) == 2
    rows = list(csv.DictReader(files["predictions"].open()))
    assert len(rows) == 40 and {r["label"] for r in rows} == {"left", "right"}
    assert sum(int(r["correct"]) for r in rows) == round(evaluation.report.top1 * 40)
    assert files["confusion"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "clips" / "eval" / "confusion.png").is_file()  # written at the end of training


# -------------------------------------------------------------------------------- unreadable videos


def _small_set(root: Path, per_class: int = 3) -> Path:
    return _write_motion_set(root, per_class, seed=7)


def test_unreadable_training_videos_are_skipped_counted_and_reported(tmp_path, caplog):
    train = _small_set(tmp_path / "train", per_class=6)
    write_corrupt_video(train / "left" / "broken.mp4")
    (train / "right" / "empty.mp4").write_bytes(b"")
    config = _config(train, None, tmp_path / "run", frames=4, steps=7, batch_size=2)  # one epoch
    config["data"]["max_unreadable_fraction"] = 0.5
    with caplog.at_level(logging.WARNING):
        finetune_video(config)
    text = caplog.text
    assert "broken.mp4" in text and "empty.mp4" in text
    assert "epoch 1: 2 unreadable video(s) skipped" in text  # the count at the end of the epoch

    config["data"]["max_unreadable_fraction"] = 0.05
    config["train"]["output_dir"] = str(tmp_path / "strict")
    with pytest.raises(UnreadableDatasetError, match="unreadable"):
        finetune_video(config)


def test_evaluation_scores_readable_videos_and_counts_the_rest(tmp_path):
    train = _small_set(tmp_path / "train")
    val = _small_set(tmp_path / "val", per_class=2)
    write_corrupt_video(val / "right" / "broken.mp4")
    _, result = finetune_video(_config(train, val, tmp_path / "run", frames=4, steps=2, batch_size=2))
    assert result.evaluations[-1]["samples"] == 4
    assert result.evaluations[-1]["skipped"] == 1
    rows = list(csv.DictReader((tmp_path / "run" / "eval" / "predictions.csv").open()))
    assert len(rows) == 5 and [r["top5"] for r in rows if r["name"].endswith("broken.mp4")] == ["unreadable"]


# ------------------------------------------------------------------------------------ config errors


def test_config_mistakes_are_clear_errors(tmp_path):
    train = _small_set(tmp_path / "train")
    base = _config(train, None, tmp_path / "run", frames=4, steps=2, batch_size=2)
    with pytest.raises(ValueError, match=r"unknown data option\(s\) \['frames'\]"):
        load_video_config({**base, "data": {**base["data"], "frames": 4}})
    with pytest.raises(ValueError, match=r"model\.name is required"):
        load_video_config({**base, "model": {}})
    with pytest.raises(ValueError, match=r"model\.name"):
        prepare_video_finetune({**base, "model": {"name": "no_such_model"}})
    with pytest.raises(ValueError, match=r"eval\.average"):
        load_video_config({**base, "eval": {"average": "vote"}})
    # A validation set with a class the training set lacks cannot be scored with its labels.
    val = tmp_path / "val"
    write_motion_video(val / "up" / "0.mp4", "left", 16, SIZE, seed=1)
    with pytest.raises(ValueError, match="up"):
        prepare_video_finetune({**base, "data": {**base["data"], "val": str(val)}})
    with pytest.raises(ValueError, match=r"data\.train"):
        prepare_video_finetune({**base, "data": {**base["data"], "train": None}})


def test_encoder_lr_scale_becomes_a_slower_encoder_group(tmp_path):
    train = _small_set(tmp_path / "train")
    config = _config(train, None, tmp_path / "run", frames=4, steps=2, batch_size=2)
    config["model"]["kwargs"]["freeze_encoder"] = False
    config["model"]["encoder_lr_scale"] = 0.1
    job = prepare_video_finetune(config)
    assert job.loop.lr_scales == {"encoder.": 0.1}
    assert job.config["train"]["lr_scales"] == {"encoder.": 0.1}


# ------------------------------------------------------------------------------ other backbones, CLI


def test_a_video_backbone_plugs_into_the_same_loop(tmp_path):
    # LightNet's video variant takes (B, C, T, H, W) tubelets; clip_layout 'auto' finds that.
    train = _small_set(tmp_path / "train")
    config = _config(train, train, tmp_path / "run", frames=4, steps=2, batch_size=2)
    config["model"] = {
        "name": "lightnet_small_video_patch16_224",
        "kwargs": {"img_size": 32, "num_frames": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
    }
    job = prepare_video_finetune(config)
    assert job.model.clip_layout == "BCTHW"
    _, result = finetune_video(config)
    assert result.state.step == 2 and result.evaluations[-1]["samples"] == 6


def test_cli_finetunes_from_a_yaml_config_and_evaluates(tmp_path, capsys):
    train = _small_set(tmp_path / "train")
    config = _config(train, train, tmp_path / "run", frames=4, steps=3, batch_size=2)
    path = tmp_path / "video.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["finetune-video", "--config", str(path), "--set", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out and "fine-tuned 2 steps" in out
    assert (tmp_path / "run" / MODEL_FILE).is_file()

    assert main(["eval-video", "--checkpoint", str(tmp_path / "run"), "--set", "eval.num_crops=3"]) == 0
    out = capsys.readouterr().out
    assert "mean class acc." in out and "metrics.json" in out

    assert main(["finetune-video", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval-video", "--checkpoint", str(path)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_two_processes_evaluate_every_video_exactly_once(tmp_path):
    # 5 videos (one unreadable) over 2 gloo ranks: Accelerate pads one rank's share, and
    # gather_for_metrics drops the padding again.
    train = _small_set(tmp_path / "train", per_class=2)
    val = _small_set(tmp_path / "val", per_class=2)
    write_corrupt_video(val / "left" / "broken.mp4")
    finetune_video(_config(train, None, tmp_path / "run", frames=4, steps=1, batch_size=2))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "seqvision", "eval-video", "--checkpoint", str(tmp_path / "run"), "--data", str(val)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert (metrics["samples"], metrics["skipped"]) == (4, 1)
    rows = list(csv.DictReader((tmp_path / "run" / "eval" / "predictions.csv").open()))
    assert sorted(Path(r["name"]).name for r in rows) == sorted(p.name for p in val.rglob("*.mp4"))
    assert result.stdout.count("top-1") == 1  # printed by the first process only
    torch.testing.assert_close(torch.tensor(metrics["confusion"]).sum(), torch.tensor(4))


@pytest.mark.parametrize("name", ["video_lrcn_resnet18_ucf101.yaml", "video_tiny.yaml"])
def test_shipped_configs_are_valid(name):
    values = load_video_config(CONFIGS / name)
    LoopConfig.from_dict(values["train"])
    for split in ("train", "val"):
        _source(values["data"][split], f"data.{split}")
    model = build_video_model(values["model"], num_classes=5, pretrained=False)  # no download
    assert model.model.num_classes == 5
