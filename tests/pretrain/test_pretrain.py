"""TokenUnify pretraining end to end: configs, the CLI under `accelerate launch`, a run killed while
saving and resumed bit-identically, and the exported encoder loaded through timm."""

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import seqvision  # noqa: F401  (registers the emmamba_* encoders in timm)
from seqvision.cli import main
from seqvision.engine import CHECKPOINT_MARKER, CheckpointManager, LoopConfig
from seqvision.pretrain.tokenunify import TokenUnify
from seqvision.pretrain.train import CONFIG_FILE, ENCODER_FILE, build_dataset, load_config, pretrain

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "pretrain" / "tokenunify_em_tiny.yaml"
# Even smaller than the tiny config: a few seconds per run on a 2-core CPU. 7 samples per epoch in
# micro-batches of 2: epochs end every 3 steps, so a resume at step 2 starts inside an epoch.
FAST = [
    "train.steps=4",
    "train.save_every=1",
    "train.keep_last=null",
    "train.log_every=1",
    "train.log_with=null",
    "data.synthetic.shape=[16,64,64]",
    "data.samples_per_epoch=7",
]
ENCODER_KWARGS = load_config(TINY)["model"]["encoder_kwargs"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_every_config_is_valid():
    configs = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
    assert {p.stem for p in configs} >= {
        f"tokenunify_em_{s}" for s in ("tiny", "base", "small", "mid", "large")
    }
    for path in configs:
        values = load_config(path)
        loop = LoopConfig.from_dict(values["train"])
        inspect.signature(TokenUnify).bind(**values["model"])
        if path.stem != "tokenunify_em_tiny":  # the paper's settings
            assert values["model"]["crop_size"] == [16, 160, 160] and values["model"]["patch_size"] == [
                4,
                16,
                16,
            ]
            assert (loop.betas, loop.weight_decay, loop.lr, loop.scale_lr) == ((0.9, 0.95), 0.05, 1e-3, True)
    base = load_config(ROOT / "configs" / "pretrain" / "tokenunify_em_base.yaml")
    assert sum(p.numel() for p in TokenUnify(**base["model"]).encoder.parameters()) == pytest.approx(
        6.89e6, rel=1e-3
    )


def test_accelerate_configs_load_and_fsdp_finds_the_encoder_stages():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.dataclasses import get_module_class_from_name

    from seqvision.engine.loop import _inherit_no_split_modules
    from seqvision.vision.em import EMMambaStage

    kinds = {p.stem: load_config_from_file(str(p)) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert {k: c.distributed_type.value for k, c in kinds.items()} == {
        "ddp_1node": "MULTI_GPU",
        "ddp_multinode": "MULTI_GPU",
        "fsdp": "FSDP",
    }
    assert kinds["ddp_multinode"].num_machines == 2
    assert kinds["fsdp"].fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in kinds["fsdp"].fsdp_config  # _no_split_modules
    model = TokenUnify(**load_config(TINY)["model"])
    _inherit_no_split_modules(model)  # what the loop does under FSDP: Accelerate reads the top module
    assert list(model._no_split_modules) == ["EMMambaStage"]
    assert get_module_class_from_name(model, "EMMambaStage") is EMMambaStage


def test_config_overrides_and_errors(tmp_path, capsys):
    values = load_config(TINY, ["train.steps=7", "model.crop_size=[16,48,48]", "data.synthetic.seed=3"])
    assert values["train"]["steps"] == 7 and values["model"]["crop_size"] == [16, 48, 48]
    assert values["data"]["synthetic"] == {"shape": [32, 128, 128], "seed": 3}
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trian'\]"):
        load_config(TINY, ["trian.steps=3"])
    with pytest.raises(ValueError, match=r"unknown data option\(s\) \['volume'\]"):
        load_config({"data": {"volume": "a.h5"}})
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(TINY), "--set", "train.stpes=3"]) == 2
    assert "unknown training option(s) ['stpes']" in capsys.readouterr().err


def test_a_missing_or_corrupt_volume_is_one_line_before_any_training(tmp_path, capsys):
    # The volumes are opened when the job is prepared, as every other command checks its inputs.
    missing = tmp_path / "missing.h5"
    output = tmp_path / "run"
    args = ["pretrain", "--config", str(TINY), "--output-dir", str(output)]
    assert main([*args, "--set", f'data.volumes=["{missing}"]']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seqvision pretrain:" in err and str(missing) in err
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"this is not an HDF5 file")
    assert main([*args, "--set", f'data.volumes=["{corrupt}"]']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(corrupt) in err
    assert not output.exists()  # nothing started: no run folder, no checkpoint


def test_cli_exits_with_1_and_names_the_step_on_a_nan_loss(monkeypatch, capsys):
    import seqvision.pretrain.train as train_module
    from seqvision.engine import NonFiniteLossError

    def diverge(*args, **kwargs):
        raise NonFiniteLossError(12, "loss is nan (micro-batch 1 of 1)", None)

    monkeypatch.setattr(train_module, "run", diverge)  # after prepare: the config and data are fine
    assert main(["pretrain", "--config", str(TINY)]) == 1
    assert "loss is nan (micro-batch 1 of 1) at step 12" in capsys.readouterr().err


def test_ddp_looks_for_unused_parameters_only_when_some_objective_can_be_idle():
    from seqvision.pretrain.train import _needs_unused_parameters

    model = load_config(TINY)["model"]
    assert not _needs_unused_parameters(TokenUnify(**model))  # joint, all three objectives
    assert _needs_unused_parameters(TokenUnify(**{**model, "schedule": "alternate"}))
    assert _needs_unused_parameters(TokenUnify(**{**model, "objectives": ["masked", "next_all"]}))


def test_dataset_defaults_to_a_synthetic_volume():
    dataset = build_dataset(
        {"synthetic": {"shape": [16, 40, 40]}, "samples_per_epoch": 3}, (16, 32, 32), seed=1
    )
    item = dataset[2]["raw"]
    assert item.shape == (1, 16, 32, 32) and item.dtype == torch.float32
    assert item.min() >= 0 and item.max() <= 1 and len(dataset) == 3


def test_cli_under_accelerate_launch_trains_saves_and_exports_for_timm(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "seqvision", "pretrain", "--config", str(TINY), "--output-dir", str(out)]
    command += [
        arg
        for override in [*FAST, "train.steps=2", "train.log_with=tensorboard"]
        for arg in ("--set", override)
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrained 2 steps (0 skipped" in result.stdout

    assert [p.name for p in CheckpointManager(out / "checkpoints").complete()] == [
        "step_00000001",
        "step_00000002",
    ]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert load_config(out / CONFIG_FILE)["train"]["steps"] == 2  # the config as run, overrides applied
    # The export is the encoder of the last checkpoint, under timm's keys, and timm loads it.
    trained = load_file(out / "checkpoints" / "step_00000002" / "model.safetensors")
    exported = load_file(out / ENCODER_FILE)
    assert exported.keys() == {k.removeprefix("encoder.") for k in trained if k.startswith("encoder.")}
    encoder = timm.create_model(
        "emmamba_base",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / ENCODER_FILE)),
        **ENCODER_KWARGS,
    )
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, trained[f"encoder.{name}"]), name


def test_two_gloo_processes_under_torchrun_pretrain_and_export(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "seqvision", "pretrain", "--config", str(TINY), "--output-dir", str(out)]
    command += [arg for override in [*FAST, "train.steps=2"] for arg in ("--set", override)]
    result = subprocess.run(
        command, capture_output=True, text=True, env=dict(_env(), ACCELERATE_USE_CPU="1"), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("pretrained 2 steps") == 1  # printed by rank 0 only
    checkpoint = out / "checkpoints" / "step_00000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    saved = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    assert saved["num_processes"] == 2 and saved["samples_seen"] == 8  # 2 steps x 2 ranks x batch 2
    trained = load_file(checkpoint / "model.safetensors")
    exported = load_file(out / ENCODER_FILE)
    assert all(torch.equal(v, trained[f"encoder.{k}"]) for k, v in exported.items())


_KILL_WHILE_SAVING = """
import os, signal, sys
import seqvision.engine.checkpoint as checkpoint
from seqvision.pretrain.train import pretrain

write_json = checkpoint._write_json

def write_json_then_die(path, values):
    # Step 3's files are in its temporary folder, its marker not yet: die as a preempted job would.
    if ".tmp-step_00000003" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(path, values)

checkpoint._write_json = write_json_then_die
pretrain(sys.argv[1], output_dir=sys.argv[2], overrides=sys.argv[3:])
"""


def test_run_killed_while_saving_resumes_to_bit_identical_weights(tmp_path):
    straight = pretrain(TINY, output_dir=tmp_path / "straight", overrides=FAST)
    assert straight.state.step == 4

    script = [
        sys.executable,
        "-c",
        textwrap.dedent(_KILL_WHILE_SAVING),
        str(TINY),
        str(tmp_path / "killed"),
        *FAST,
    ]
    killed = subprocess.run(script, capture_output=True, text=True, env=_env(), timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    root = tmp_path / "killed" / "checkpoints"
    assert (root / ".tmp-step_00000003" / "model.safetensors").is_file()
    assert not (root / ".tmp-step_00000003" / CHECKPOINT_MARKER).exists()
    assert CheckpointManager(root).latest() == root / "step_00000002"

    resumed = pretrain(TINY, resume="latest", output_dir=tmp_path / "killed", overrides=FAST)
    assert resumed.state == straight.state
    assert not (root / ".tmp-step_00000003").exists()
    for name in ("checkpoints/step_00000004/model.safetensors", ENCODER_FILE):
        expected, got = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    saved = json.loads((root / "step_00000004" / CHECKPOINT_MARKER).read_text())
    assert saved["samples_seen"] == 8 and saved["skipped_steps"] == 0
