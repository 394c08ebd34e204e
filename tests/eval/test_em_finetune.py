"""`seqvision finetune-seg`: configs, from scratch and from a pretraining export, resume, the saved
segmenter, and clear errors for bad configs and encoder exports of another architecture."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seqvision.cli import main
from seqvision.data import synthetic_em_volume, write_cremi
from seqvision.engine import CONFIG_FILE, CheckpointManager, LoopConfig
from seqvision.eval.em import SegmenterConfig, load_segmenter
from seqvision.eval.em import finetune as finetune_segmenter
from seqvision.eval.em import load_config as load_finetune_config
from seqvision.eval.em import prepare as prepare_finetune
from seqvision.eval.em.finetune import SEGMENTER_FILE, build_segmentation_dataset
from seqvision.pretrain.train import ENCODER_FILE, load_config, pretrain

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "finetune" / "em_seg_tiny.yaml"
PRETRAIN_TINY = ROOT / "configs" / "pretrain" / "tokenunify_em_tiny.yaml"
# A few seconds per run on a 2-core CPU: the tiny segmenter on 16 x 32 x 32 crops of a small volume.
FAST = [
    "train.steps=2",
    "train.save_every=1",
    "train.keep_last=null",
    "train.log_every=1",
    "train.log_with=null",
    "data.synthetic.shape=[16,48,48]",
    "data.crop_size=[16,32,32]",
    "data.samples_per_epoch=5",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory):
    """The encoder.safetensors of a one-step run of the tiny pretraining config."""
    out = tmp_path_factory.mktemp("pretrain")
    overrides = ["train.steps=1", "train.log_with=null", "data.synthetic.shape=[16,48,48]"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(PRETRAIN_TINY, output_dir=out, overrides=[*overrides, "data.samples_per_epoch=2"])
    finally:
        torch.set_num_threads(threads)
    return out / ENCODER_FILE


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_configs_are_valid_and_the_tiny_encoder_is_the_tiny_pretraining_encoder():
    configs = {
        path.stem: load_finetune_config(path)
        for path in (ROOT / "configs" / "finetune").glob("em_seg_*.yaml")
    }
    assert set(configs) >= {"em_seg_tiny", "em_seg_base"}
    for values in configs.values():
        LoopConfig.from_dict(values["train"])
    tiny, pretraining = configs["em_seg_tiny"], load_config(PRETRAIN_TINY)
    assert tiny["model"]["encoder_name"] == pretraining["model"]["encoder"]
    assert tiny["model"]["encoder_kwargs"] == pretraining["model"]["encoder_kwargs"]
    base = configs["em_seg_base"]
    loop = LoopConfig.from_dict(base["train"])  # the authors' settings: Adam, constant lr 1e-4, batch 8
    assert (loop.lr, loop.min_lr, loop.weight_decay, loop.warmup_steps, loop.batch_size) == (
        1e-4,
        1e-4,
        0,
        0,
        8,
    )
    assert base["data"]["crop_size"] == [16, 160, 160]
    with torch.device("meta"):
        architecture = {k: v for k, v in base["model"].items() if k != "pretrained_encoder"}
        model = SegmenterConfig.from_dict(architecture).build()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(28.30e6, rel=1e-3)


def test_from_scratch_then_resume_latest_matches_an_uninterrupted_run(tmp_path):
    straight = finetune_segmenter(TINY, output_dir=tmp_path / "straight", overrides=[*FAST, "train.steps=3"])
    assert straight == tmp_path / "straight" / SEGMENTER_FILE

    first = finetune_segmenter(TINY, output_dir=tmp_path / "resumed", overrides=FAST)
    root = tmp_path / "resumed" / "checkpoints"
    assert [p.name for p in CheckpointManager(root).complete()] == ["step_00000001", "step_00000002"]
    resumed = finetune_segmenter(
        TINY, resume="latest", output_dir=tmp_path / "resumed", overrides=[*FAST, "train.steps=3"]
    )
    assert resumed == first and CheckpointManager(root).latest().name == "step_00000003"
    expected, got = _weights(straight), _weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert load_finetune_config(tmp_path / "resumed" / CONFIG_FILE)["train"]["steps"] == 3

    model = load_segmenter(resumed)  # the saved segmenter names its architecture and runs
    with torch.no_grad():
        affinities = model(torch.rand(1, 1, 16, 32, 32))
    assert affinities.shape == (1, 3, 16, 32, 32) and 0 <= affinities.min() <= affinities.max() <= 1


def test_the_encoder_starts_from_the_pretraining_export(tmp_path, encoder_export):
    exported = _weights(encoder_export)
    job = prepare_finetune(
        TINY, output_dir=tmp_path / "run", overrides=[*FAST, f"model.pretrained_encoder={encoder_export}"]
    )
    encoder = job.model.segmenter.encoder.state_dict()
    assert exported.keys() <= encoder.keys()
    assert all(torch.equal(encoder[k], exported[k]) for k in exported)
    # The same seed builds a different (random) encoder without the export, and the same decoder.
    scratch = prepare_finetune(TINY, output_dir=tmp_path / "scratch", overrides=FAST).model.segmenter
    assert not torch.equal(scratch.encoder.stem.weight, encoder["stem.weight"])
    assert torch.equal(scratch.head.weight, job.model.segmenter.head.weight)

    command = ["finetune-seg", "--config", str(TINY), "--output-dir", str(tmp_path / "cli")]
    assert main([*command, *_set(*FAST, f"model.pretrained_encoder={encoder_export}")]) == 0
    saved = load_segmenter(tmp_path / "cli" / SEGMENTER_FILE).encoder.state_dict()
    # Two steps of fine-tuning moved the encoder away from the export, but not far.
    assert not torch.equal(saved["stem.weight"], exported["stem.weight"])
    assert torch.allclose(saved["stem.weight"], exported["stem.weight"], atol=0.05)


def _set(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def test_an_encoder_of_another_architecture_is_a_clear_error(tmp_path, capsys):
    other = {"dims": [8, 8, 8, 8], "depths": [0, 0, 0, 1]}
    export = tmp_path / "other_encoder.safetensors"
    encoder = SegmenterConfig(encoder_kwargs=other).build().encoder
    save_file(
        {k: v.contiguous() for k, v in encoder.state_dict().items()},
        str(export),
        metadata={"format": "pt", "encoder": "emmamba_base", "encoder_kwargs": '{"dims": [8, 8, 8, 8]}'},
    )
    overrides = [*FAST, f"model.pretrained_encoder={export}"]
    with pytest.raises(ValueError, match="does not fit") as error:
        prepare_finetune(TINY, output_dir=tmp_path / "run", overrides=overrides)
    message = str(error.value)
    assert "shapes:" in message and "pretrained as 'emmamba_base'" in message and str(export) in message

    command = ["finetune-seg", "--config", str(TINY), "--output-dir", str(tmp_path / "run")]
    assert main([*command, *_set(*overrides)]) == 2
    assert "does not fit model.encoder_name='emmamba_base'" in capsys.readouterr().err
    missing = [*FAST, f"model.pretrained_encoder={tmp_path / 'missing.safetensors'}"]
    assert main(["finetune-seg", "--config", str(TINY), *_set(*missing)]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


def test_config_mistakes_are_errors_before_training(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['encoder'\]"):
        load_finetune_config(TINY, ["model.encoder=emmamba_base"])
    with pytest.raises(ValueError, match=r"unknown data option\(s\) \['volumes'\]"):
        load_finetune_config(TINY, ["data.volumes=[a.h5]"])
    with pytest.raises(ValueError, match="divisible by 16"):
        prepare_finetune(TINY, overrides=[*FAST, "data.crop_size=[16,40,40]"])
    with pytest.raises(ValueError, match="one label volume per raw volume"):
        build_segmentation_dataset({"raw": ["a.h5", "b.h5"], "labels": ["a.h5"]}, seed=0)
    assert main(["finetune-seg", "--config", str(TINY), "--set", "train.stpes=3"]) == 2
    assert "unknown training option(s) ['stpes']" in capsys.readouterr().err


def test_cremi_files_named_in_the_config(tmp_path):
    raw, labels = synthetic_em_volume((16, 40, 48), seed=2)
    sample = write_cremi(tmp_path / "sample.h5", raw, labels)
    data = {
        "raw": f"{sample}:volumes/raw",
        "labels": [str(sample)],
        "crop_size": [16, 32, 32],
        "augment": False,
    }
    item = build_segmentation_dataset({**data, "samples_per_epoch": 3}, seed=0)[1]
    assert item["raw"].shape == (1, 16, 32, 32) and item["labels"].shape == (16, 32, 32)
    assert set(item["labels"].unique().tolist()) <= set(range(1, int(labels.max()) + 1))
