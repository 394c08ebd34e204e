"""`seqvision finetune-cls` / `eval-cls`: an ImageFolder the test writes, timm's data pipeline,
layer-wise LR decay, mixup, an EMA that survives resume, unreadable images, the CLI."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from seqvision.cli import main
from seqvision.data.video import UnreadableDatasetError
from seqvision.engine import LoopConfig
from seqvision.engine.model_file import read_model_file
from seqvision.eval.classification import evaluate as evaluate_classifier
from seqvision.eval.classification import finetune as finetune_classifier
from seqvision.eval.classification import load_config as load_classification_config
from seqvision.eval.classification import prepare as prepare_classification_finetune
from seqvision.eval.classification.finetune import ImageClassDataset, layer_decay_scales

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"
COLOURS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220)}


def _write_image_folder(root: Path, per_class: int, seed: int) -> Path:
    """root/<colour>/*.png: noisy 24 x 24 pictures dominated by one colour, one folder per class."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _config(train: Path, val: Path | None, output: Path, *, steps: int = 30, model: str = "resnet18") -> dict:
    return {
        "model": {"name": model, "kwargs": {}, "label_smoothing": 0.0},
        "data": {
            "train": str(train),
            "val": str(val) if val else None,
            "input_size": [3, 32, 32],
            "scale": [0.5, 1.0],
            "color_jitter": 0.0,
        },
        "eval": {"batch_size": 16},
        "train": {
            "steps": steps,
            "batch_size": 8,
            "lr": 2e-3,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "warmup_steps": 2,
            "log_every": 10,
            "save_every": steps,
            "shuffle": True,
            "log_with": None,
            "mixed_precision": "no",
            "output_dir": str(output),
        },
    }


class _InterruptedError(Exception):
    pass


def _interrupt_at(step: int):
    def on_step_end(state, logged):
        if state.step == step:
            raise _InterruptedError

    return on_step_end


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return _write_image_folder(root / "train", 12, seed=0), _write_image_folder(root / "val", 5, seed=1)


def test_finetune_cls_learns_an_image_folder_and_evaluates_from_the_file(folders, tmp_path):
    train, val = folders
    path, result = finetune_classifier(_config(train, val, tmp_path / "run"))
    metrics = result.evaluations[-1]
    assert metrics["samples"] == 15 and metrics["skipped"] == 0
    assert metrics["top1"] > 0.8, result.evaluations  # three colours: far above chance (1/3)
    assert read_model_file(path, "classification").extra["classes"] == ["blue", "green", "red"]
    report, _, files = evaluate_classifier(tmp_path / "run", output_dir=tmp_path / "again")
    assert report.top1 == pytest.approx(metrics["top1"])
    assert json.loads(files["metrics"].read_text())["samples"] == 15
    assert files["confusion"].read_bytes()[:4] == b"\x89PNG"
    # The preprocessing is recorded as resolved, so evaluation uses what training used.
    assert read_model_file(path, "classification").config["data"]["input_size"] == [3, 32, 32]


def test_a_seqvision_backbone_with_layer_decay_mixup_and_ema_resumes(folders, tmp_path):
    train, val = folders
    config = _config(train, val, tmp_path / "run", steps=4, model="vir_tiny_patch16_224")
    config["model"].update(
        kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3},
        layer_decay=0.5,
        ema_decay=0.9,
    )
    config["data"].update(mixup=0.8, cutmix=1.0)
    config["train"]["save_every"] = 2
    job = prepare_classification_finetune(config)
    scales = job.loop.lr_scales
    assert scales["model.head.weight"] == 1.0
    assert scales["model.patch_embed.proj.weight"] == pytest.approx(0.5**3)  # stem, 2 blocks, head
    assert job.mixup is not None and job.model.label_smoothing == 0.0
    with pytest.raises(_InterruptedError):  # killed after the checkpoint of step 2
        finetune_classifier(config, on_step_end=_interrupt_at(2))
    _, resumed = finetune_classifier(config, resume="latest")
    assert resumed.state.step == 4 and {"ema_top1", "ema_top5"} <= set(resumed.evaluations[-1])
    straight_config = {**config, "train": {**config["train"], "output_dir": str(tmp_path / "straight")}}
    finetune_classifier(straight_config)
    ema_resumed = read_model_file(tmp_path / "run" / "model_ema.safetensors", "classification").state
    ema_straight = read_model_file(tmp_path / "straight" / "model_ema.safetensors", "classification").state
    for name, value in ema_straight.items():  # the EMA is part of the checkpoint
        torch.testing.assert_close(ema_resumed[name], value, rtol=1e-5, atol=1e-6)


def test_layer_decay_follows_the_group_matcher():
    model = timm.create_model("vit_tiny_patch16_224", depth=3, num_classes=2)
    scales = layer_decay_scales(model, 0.5)
    assert set(scales) == {name for name, _ in model.named_parameters()}
    assert scales["head.weight"] == 1.0
    assert scales["blocks.2.mlp.fc1.weight"] == 0.5 and scales["blocks.0.attn.qkv.weight"] == 0.125
    assert scales["cls_token"] == 0.0625


def test_unreadable_images_are_skipped_counted_and_limited(tmp_path, caplog):
    train = _write_image_folder(tmp_path / "train", 4, seed=2)
    (train / "red" / "broken.png").write_bytes(b"not a png")
    job = prepare_classification_finetune(
        _config(train, train, tmp_path / "run", steps=1), overrides=["data.max_unreadable_fraction=0.2"]
    )
    assert isinstance(job.train_set, ImageClassDataset)
    index = [r.path.name for r in job.train_set.records].index("broken.png")
    with caplog.at_level(logging.WARNING):
        item = job.train_set[index]
    assert item["unreadable"] == 1 and "broken.png" in caplog.text
    assert job.val_set[index]["valid"] == 0
    strict = prepare_classification_finetune(
        _config(train, None, tmp_path / "strict", steps=1), overrides=["data.max_unreadable_fraction=0.01"]
    )
    with pytest.raises(UnreadableDatasetError, match="unreadable"):
        strict.train_set[index]


def test_config_mistakes_are_clear_errors(folders, tmp_path):
    train, _ = folders
    base = _config(train, None, tmp_path / "run")
    with pytest.raises(ValueError, match=r"model\.name is required"):
        load_classification_config({**base, "model": {}})
    with pytest.raises(ValueError, match=r"unknown data option\(s\) \['size'\]"):
        load_classification_config({**base, "data": {**base["data"], "size": 3}})
    with pytest.raises(ValueError, match=r"model\.layer_decay"):
        load_classification_config({**base, "model": {**base["model"], "layer_decay": 2}})
    with pytest.raises(ValueError, match=r"model\.name"):
        prepare_classification_finetune({**base, "model": {"name": "no_such_net"}})
    with pytest.raises(ValueError, match="must be even"):
        prepare_classification_finetune(base, overrides=["data.mixup=0.8", "train.batch_size=7"])


def test_cli_finetunes_and_evaluates_an_image_folder(folders, tmp_path, capsys):
    train, val = folders
    path = tmp_path / "cls.yaml"
    path.write_text(yaml.safe_dump(_config(train, val, tmp_path / "run", steps=3)))
    assert main(["finetune-cls", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out and "fine-tuned 3 steps" in out
    assert main(["eval-cls", "--checkpoint", str(tmp_path / "run"), "--data", str(val)]) == 0
    assert "mean class acc." in capsys.readouterr().out
    assert main(["finetune-cls", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_shipped_config_is_valid():
    values = load_classification_config(CONFIGS / "cls_vir_tiny.yaml")
    LoopConfig.from_dict(values["train"])
