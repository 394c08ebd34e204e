"""The shared Accelerate training loop: schedule, optimizer groups, clipping, accumulation, NaN policies,
atomic checkpoints, bit-identical resume and a two-process CPU run."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import set_seed
from loop_toys import ToyMasked, ToyRegressor, ToyVolumes
from safetensors.torch import load_file

from seqvision.engine import (
    CHECKPOINT_MARKER,
    CheckpointManager,
    LoopConfig,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    lr_factor,
    lr_scale_of,
    train,
)
from seqvision.engine.loop import _check_launch

TOYS = Path(__file__).with_name("loop_toys.py")


def _config(tmp_path: Path, name: str = "run", **overrides) -> LoopConfig:
    values = dict(steps=4, batch_size=2, lr=1e-2, save_every=2, log_every=1, output_dir=tmp_path / name)
    values["log_with"] = None
    return LoopConfig(**{**values, **overrides})


def _checkpoints(config: LoopConfig) -> list[str]:
    return [p.name for p in CheckpointManager(Path(config.output_dir) / "checkpoints").complete()]


def _weights(config: LoopConfig, step: int) -> dict[str, torch.Tensor]:
    return load_file(Path(config.output_dir) / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def _optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.bin", weights_only=True)


class _InterruptError(Exception):
    pass


# ------------------------------------------------------------------------------------- schedule, groups


def test_lr_factor_warms_up_linearly_then_follows_a_half_cosine():
    steps, warmup = 110, 10
    assert [lr_factor(s, steps, warmup) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, steps, warmup) == pytest.approx(1.0)  # the cosine starts at the peak
    assert lr_factor(60, steps, warmup) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(35, steps, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, steps, warmup) == pytest.approx(0.0)
    assert lr_factor(110, steps, warmup, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(60, steps, warmup, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(0, 5, 0) == pytest.approx(1.0)  # no warmup: the first step has the peak


def test_scheduler_gives_each_step_its_lr(tmp_path):
    config = _config(tmp_path, steps=20, warmup_steps=4, lr=1e-3, min_lr=1e-4)
    optimizer = build_optimizer(ToyRegressor(), config)
    scheduler = build_scheduler(optimizer, config, config.lr)
    seen = []
    for _ in range(config.steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-3 * lr_factor(s, 20, 4, min_ratio=0.1) for s in range(20)]
    assert seen == pytest.approx(expected)
    assert seen[3] == pytest.approx(1e-3) and seen[-1] > 1e-4


def test_logged_lr_is_the_lr_of_the_logged_step(tmp_path):
    config = _config(tmp_path, steps=6, warmup_steps=2, lr=1e-2, min_lr=1e-3)
    history = train(ToyRegressor(), ToyVolumes(), config).history
    assert [h["lr"] for h in history] == pytest.approx([1e-2 * lr_factor(s, 6, 2, 0.1) for s in range(6)])


def test_no_weight_decay_on_biases_norms_and_listed_names():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = ToyRegressor()  # lists "gain" (2-D) relative to itself
            self.head = ToyMasked()

    wrapper = Wrapper()
    optimizer = build_optimizer(wrapper, LoopConfig(weight_decay=0.05))
    by_id = {id(p): n for n, p in wrapper.named_parameters()}
    decayed = {by_id[id(p)] for p in optimizer.param_groups[0]["params"]}
    plain = {by_id[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert decayed == {"encoder.lin.weight", "head.proj.weight", "head.out.weight"}
    assert plain == {
        "encoder.lin.bias",
        "encoder.gain",  # 2-D, but listed by ToyRegressor.no_weight_decay()
        "head.proj.bias",
        "head.norm.weight",
        "head.norm.bias",
        "head.out.bias",
    }
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_lr_scales_split_the_groups_by_longest_prefix(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = ToyRegressor()
            self.head = ToyMasked()

    assert lr_scale_of("encoder.lin.weight", {"encoder.": 0.1, "encoder.lin.": 0.5}) == 0.5
    assert lr_scale_of("encoder.gain", {"encoder.": 0.1, "encoder.lin.": 0.5}) == 0.1
    assert lr_scale_of("head.out.bias", {"encoder.": 0.1}) == 1.0
    wrapper = Wrapper()
    config = _config(
        tmp_path, steps=10, warmup_steps=2, lr=1e-2, lr_scales={"encoder.": 0.1}, weight_decay=0.05
    )
    optimizer = build_optimizer(wrapper, config)
    by_id = {id(p): n for n, p in wrapper.named_parameters()}
    groups = [
        (g["weight_decay"], g["lr_scale"], g["lr"], sorted(by_id[id(p)] for p in g["params"]))
        for g in optimizer.param_groups
    ]
    assert groups == [
        (0.05, 1.0, 1e-2, ["head.out.weight", "head.proj.weight"]),
        (0.05, 0.1, pytest.approx(1e-3), ["encoder.lin.weight"]),
        (0.0, 1.0, 1e-2, ["head.norm.bias", "head.norm.weight", "head.out.bias", "head.proj.bias"]),
        (0.0, 0.1, pytest.approx(1e-3), ["encoder.gain", "encoder.lin.bias"]),
    ]
    # The schedule scales every group alike; the logged LR is the unscaled one.
    scheduler = build_scheduler(optimizer, config, config.lr)
    optimizer.step()  # no gradients: changes nothing, but keeps the documented step order
    scheduler.step()
    assert [g["lr"] / g["lr_scale"] for g in optimizer.param_groups] == pytest.approx([1e-2] * 4)
    with pytest.raises(ValueError, match="lr_scales must map"):
        LoopConfig(lr_scales={"encoder.": 0})
    frozen = ToyRegressor().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, config)


def test_evaluate_runs_every_eval_every_steps_and_at_the_end_in_eval_mode(tmp_path):
    calls = []

    def evaluate(accelerator, model, state):
        calls.append((state.step, model.training, torch.is_grad_enabled()))
        return {"score": float(state.step)}

    seen = []
    config = _config(tmp_path, steps=5, eval_every=2)
    result = train(
        ToyRegressor(),
        ToyVolumes(),
        config,
        evaluate=evaluate,
        on_step_end=lambda s, logged: seen.append(logged),
    )
    assert calls == [(2, False, False), (4, False, False), (5, False, False)]
    assert result.evaluations == [
        {"step": 2, "score": 2.0},
        {"step": 4, "score": 4.0},
        {"step": 5, "score": 5.0},
    ]
    assert [logged.get("eval/score") for logged in seen] == [None, 2.0, None, 4.0, 5.0]


def test_after_optimizer_step_sees_every_applied_update_and_extra_state_is_checkpointed(tmp_path):
    class Counter:
        def __init__(self):
            self.count = 0

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    counter = Counter()

    steps = []

    def count(model, step):
        assert isinstance(model, ToyMasked)  # unwrapped
        counter.count += 1
        steps.append(step)

    config = _config(tmp_path, steps=4, nan_policy="skip")
    train(
        ToyMasked(nan_at=(1,)), ToyVolumes(), config, after_optimizer_step=count, checkpoint_objects=[counter]
    )
    assert counter.count == 3  # step 2 (index 1) was skipped: no update, no call
    assert steps == [1, 3, 4]
    restored = Counter()
    more = _config(tmp_path, steps=5, nan_policy="skip")
    train(ToyMasked(), ToyVolumes(), more, resume="latest", checkpoint_objects=[restored])
    assert restored.count == 3  # loaded from the step-4 checkpoint


def test_a_launch_accelerate_does_not_connect_is_refused(monkeypatch):
    # torchrun on a CPU-only machine without ACCELERATE_USE_CPU=1: every rank would think it is alone
    # and all would write the same checkpoints.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="set ACCELERATE_USE_CPU=1"):
        _check_launch(SimpleNamespace(num_processes=1))
    _check_launch(SimpleNamespace(num_processes=2))


def test_config_rejects_unknown_and_bad_options():
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['stpes'\]"):
        LoopConfig.from_dict({"stpes": 10})
    with pytest.raises(ValueError, match="nan_policy must be"):
        LoopConfig(nan_policy="ignore")
    with pytest.raises(ValueError, match="grad_accum must be an int >= 1"):
        LoopConfig(grad_accum=0)
    assert LoopConfig.from_dict({"betas": [0.9, 0.99]}).betas == (0.9, 0.99)


# ---------------------------------------------------------------------------------- clipping, accumulation


def test_gradients_are_clipped_before_the_optimizer_step(tmp_path):
    # Adam's first moment after one step is (1 - beta1) * g for the gradient g the step used: 0.1 * 1.0
    # in norm when g was clipped to 1.0 first, about 0.1 * 1e6 when clipping came after the step.
    config = _config(tmp_path, steps=1, save_every=1, clip_grad_norm=1.0)
    result = train(ToyMasked(loss_scale=1e6, random_masks=False), ToyVolumes(), config)
    assert result.history[0]["grad_norm"] > 1e4  # the norm before clipping is what is logged
    moments = [s["exp_avg"] for s in _optimizer_state(result.checkpoint)["state"].values()]
    assert torch.sqrt(sum((m**2).sum() for m in moments)).item() == pytest.approx(0.1, rel=1e-4)


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    # Micro-batches of 2 accumulated twice see the same 4 samples per step as batches of 4 (12 samples
    # per epoch: both layouts use every sample).
    weights = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        set_seed(0)
        model = ToyRegressor()
        config = _config(tmp_path, f"b{batch_size}", steps=5, batch_size=batch_size, grad_accum=grad_accum)
        result = train(model, ToyVolumes(12), config)
        assert result.state.samples_seen == 20
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ NaN


def test_nan_loss_stops_naming_the_step_and_saves_nothing_after_it(tmp_path):
    config = _config(tmp_path, steps=5, save_every=1, keep_last=None)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan \(micro-batch 1 of 1\) at step 3") as error:
        train(ToyMasked(nan_at=(2,)), ToyVolumes(), config)
    assert error.value.step == 3
    assert "step_00000002" in str(error.value)
    assert _checkpoints(config) == ["step_00000001", "step_00000002"]
    assert not list((Path(config.output_dir) / "checkpoints").glob(".tmp-*"))
    assert all(torch.isfinite(v).all() for v in _weights(config, 2).values())


def test_nan_loss_under_skip_drops_that_update_and_goes_on(tmp_path):
    config = _config(tmp_path, steps=4, save_every=1, keep_last=None, nan_policy="skip", grad_accum=2)
    result = train(ToyMasked(nan_at=(1,)), ToyVolumes(), config)
    assert result.state.step == 4 and result.state.skipped_steps == 1
    assert [h["skipped_steps"] for h in result.history] == [0, 1, 1, 1]
    before, skipped, after = (_weights(config, s) for s in (1, 2, 3))
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # step 2 changed nothing
    assert not all(torch.equal(skipped[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


# ---------------------------------------------------------------------------------------- checkpoints


def test_keeps_the_last_n_checkpoints_and_logs_to_tensorboard(tmp_path):
    config = _config(tmp_path, steps=5, save_every=1, keep_last=2, log_with="tensorboard")
    result = train(ToyRegressor(), ToyVolumes(), config)
    assert _checkpoints(config) == ["step_00000004", "step_00000005"]
    assert result.checkpoint == Path(config.output_dir) / "checkpoints" / "step_00000005"
    saved = json.loads((result.checkpoint / CHECKPOINT_MARKER).read_text())
    assert saved["step"] == 5 and saved["samples_seen"] == 10 and saved["num_processes"] == 1
    assert list((Path(config.output_dir) / "logs").rglob("events.out.tfevents.*"))


def test_resume_latest_ignores_interrupted_saves(tmp_path):
    config = _config(tmp_path, steps=4)
    train(ToyRegressor(), ToyVolumes(), config)
    root = Path(config.output_dir) / "checkpoints"
    # A save killed before its rename, and one whose folder lacks the marker (never written by the
    # loop, but what a non-atomic copy would leave): both newer than step 4, both must be ignored.
    (root / ".tmp-step_00000006").mkdir()
    (root / ".tmp-step_00000006" / "model.safetensors").write_bytes(b"half a file")
    shutil.copytree(root / "step_00000004", root / "step_00000008")
    (root / "step_00000008" / CHECKPOINT_MARKER).unlink()
    (root / "step_00000008" / "model.safetensors").write_bytes(b"half a file")
    assert CheckpointManager(root).latest() == root / "step_00000004"

    steps_run = []
    longer = _config(tmp_path, steps=6)
    result = train(
        ToyRegressor(),
        ToyVolumes(),
        longer,
        resume="latest",
        on_step_end=lambda s, _: steps_run.append(s.step),
    )
    assert steps_run == [5, 6] and result.state.samples_seen == 12
    assert not (root / ".tmp-step_00000006").exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train(ToyRegressor(), ToyVolumes(), longer, resume=root / "step_00000008")


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    result = train(ToyRegressor(), ToyVolumes(), _config(tmp_path, steps=2), resume="latest")
    assert result.state.step == 2


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, shuffle):
    # 10 samples, micro-batches of 2, 2 per step: epochs end in the middle of steps. The model draws
    # random masks from the global RNG. The interrupted run dies after step 5 (checkpoint at 4), so
    # the resume redoes step 5 from the RNG, data position and optimizer state of step 4.
    def run(name, resume=None, stop_after=None):
        def on_step_end(state, logged):
            if state.step == stop_after:
                raise _InterruptError

        set_seed(0)
        model = ToyMasked()
        config = _config(tmp_path, name, steps=9, grad_accum=2, shuffle=shuffle)
        result = train(model, ToyVolumes(10), config, resume=resume, on_step_end=on_step_end)
        return model, result

    straight, straight_result = run("straight")
    with pytest.raises(_InterruptError):
        run("resumed", stop_after=5)
    resumed, resumed_result = run("resumed", resume="latest")

    assert resumed_result.state == straight_result.state
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    moments = [_optimizer_state(r.checkpoint)["state"] for r in (straight_result, resumed_result)]
    for index, values in moments[0].items():
        assert all(torch.equal(values[k], moments[1][index][k]) for k in values)


# ------------------------------------------------------------------------------------- two processes


def test_two_cpu_processes_train_like_one_with_the_global_batch(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(TOYS), str(tmp_path / "ddp"), "4", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done step=4 samples=16") == 2  # both ranks, global batch 2 x 2
    # 7 evaluation samples over 2 processes: Accelerate pads one rank's share; gather_outputs drops
    # the padding, so every process sees every index exactly once.
    assert result.stdout.count(f"eval indices={list(range(7))}") == 2

    checkpoint = tmp_path / "ddp" / "checkpoints" / "step_00000004"
    assert {p.name for p in checkpoint.iterdir()} >= {
        "random_states_0.pkl",
        "random_states_1.pkl",
        CHECKPOINT_MARKER,
    }
    assert json.loads((checkpoint / CHECKPOINT_MARKER).read_text())["num_processes"] == 2
    # DDP averages the two ranks' gradients: the same update as one process with batches of 4.
    set_seed(0)
    single = ToyRegressor()
    config = LoopConfig(
        steps=4, batch_size=4, lr=1e-2, save_every=2, output_dir=tmp_path / "one", log_with=None
    )
    train(single, ToyVolumes(16), config)
    ddp = load_file(checkpoint / "model.safetensors")
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6)


def test_progress_false_hides_the_step_bar(tmp_path, capsys):
    train(ToyRegressor(), ToyVolumes(), _config(tmp_path / "shown", steps=2))
    assert "train:" in capsys.readouterr().err
    train(ToyRegressor(), ToyVolumes(), _config(tmp_path / "hidden", steps=2, progress=False))
    assert "train:" not in capsys.readouterr().err
