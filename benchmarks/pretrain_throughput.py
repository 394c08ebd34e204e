"""Throughput of TokenUnify pretraining on the CPU (1 and 2 processes) and the loss curve of a tiny run.

    python benchmarks/pretrain_throughput.py [--config configs/pretrain/tokenunify_em_tiny.yaml]
                                             [--timed-steps 20] [--warmup-steps 3]
                                             [--curve-steps 300] [--out benchmarks/out]

Throughput: ``seqvision.pretrain.train.pretrain`` on ``--config`` (checkpoints and trackers off) in a
fresh process per setting, timed from the end of step ``--warmup-steps`` to the end of the last step:

    1 process, 2 threads   plain ``python``: one process with PyTorch's default intra-op threads
    1 process, 1 thread    ``OMP_NUM_THREADS=1``
    2 processes, 1 thread  ``ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2``:
                           two gloo ranks (DDP), each its own micro-batch, gradients all-reduced

voxels/s = optimizer steps x global batch (batch size x processes) x voxels per crop / seconds.

Loss curve: ``--curve-steps`` steps of ``--config`` in one process with one thread (the fastest
setting on a shared 2-core machine), the loss logged at every step. Target: the mean loss of the
last 10% of the steps at most half that of the first 10% ("well below its start").

Prints a markdown table and the target, and writes ``pretrain_throughput.csv``,
``pretrain_loss.csv`` and ``pretrain_loss.png`` to ``--out``, each atomically. Before the runs the
script measures how busy the CPUs already are (other processes), which the numbers depend on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import (
    REPO_ROOT,
    agg_pyplot,
    cpu_busy_fraction,
    cpu_name,
    markdown_table,
)

from seqvision.utils.io import save_figure_atomic, write_csv_atomic

SETTINGS = (
    # name, processes, threads per process
    ("1 process, 2 threads", 1, None),
    ("1 process, 1 thread", 1, 1),
    ("2 processes, 1 thread", 2, 1),
)
QUIET = ["train.log_with=null", "train.keep_last=1"]


def worker(config: str, steps: int, save_every: int, output_dir: str, result_file: str) -> None:
    """Train ``steps`` steps and write (on rank 0) the end time of every step and the logged history."""
    from seqvision.pretrain.train import load_config, pretrain

    ends: list[float] = []
    overrides = [f"train.steps={steps}", f"train.save_every={save_every}", "train.log_every=1", *QUIET]
    result = pretrain(
        config,
        output_dir=output_dir,
        overrides=overrides,
        on_step_end=lambda s, _: ends.append(time.perf_counter()),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        values = load_config(config, overrides)
        crop = values["model"]["crop_size"]
        record = {
            "ends": ends,
            "history": result.history,
            "batch_size": values["train"]["batch_size"] * values["train"]["grad_accum"],
            "processes": int(os.environ.get("WORLD_SIZE", "1")),
            "voxels_per_crop": math.prod(crop),
        }
        Path(result_file).write_text(json.dumps(record))


def run_setting(config: str, processes: int, threads: int | None, steps: int, save_every: int) -> dict:
    """Run ``worker`` in fresh processes with this layout; return its record."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        args = ["--worker", config, str(steps), str(save_every), str(Path(tmp) / "run"), str(result_file)]
        if processes == 1:
            command = [sys.executable, __file__, *args]
        else:
            env["ACCELERATE_USE_CPU"] = "1"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += ["--nproc_per_node", str(processes), __file__, *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"{command} failed with exit code {done.returncode}")
        return json.loads(result_file.read_text())


def throughput(record: dict, warmup: int) -> tuple[float, float]:
    """(voxels/s, seconds per step) from the step end times after ``warmup`` steps."""
    ends = record["ends"]
    seconds = (ends[-1] - ends[warmup - 1]) / (len(ends) - warmup)
    voxels = record["batch_size"] * record["processes"] * record["voxels_per_crop"]
    return voxels / seconds, seconds


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    plt = agg_pyplot()
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("loss", "-"), ("masked", ":"), ("next_token", ":"), ("next_all", ":")):
        if name in history[0]:
            ax.plot(steps, [h[name] for h in history], style, lw=1.2 if name == "loss" else 0.9, label=name)
    window = max(1, len(history) // 20)
    smooth = [
        sum(h["loss"] for h in history[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1)
        for i in range(len(history))
    ]
    ax.plot(steps, smooth, "k-", lw=2, label=f"loss, mean of {window} steps")
    ax.set(xlabel="optimizer step", ylabel="loss (MSE)", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default=str(REPO_ROOT / "configs" / "pretrain" / "tokenunify_em_tiny.yaml")
    )
    parser.add_argument("--timed-steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--curve-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    busy = cpu_busy_fraction(2.0)
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs"
    print(f"machine: {machine}, busy {busy:.0%} before the runs (other processes)")
    rows, csv_rows = [], []
    steps = args.warmup_steps + args.timed_steps
    for name, processes, threads in SETTINGS:
        record = run_setting(args.config, processes, threads, steps, save_every=steps)
        voxels_per_s, seconds = throughput(record, args.warmup_steps)
        csv_rows.append(
            dict(setting=name, processes=processes, global_batch=record["batch_size"] * processes,
                 s_per_step=seconds, voxels_per_s=voxels_per_s)
        )  # fmt: skip
        print(f"  {name}: {voxels_per_s:,.0f} voxels/s", flush=True)
    reference = csv_rows[0]["voxels_per_s"]
    for row in csv_rows:
        speed = row["voxels_per_s"]
        cells = (f"{row['s_per_step']:.3f}", f"{speed:,.0f}", f"{speed / reference:.2f}x")
        rows.append((row["setting"], str(row["global_batch"]), *cells))
    write_csv_atomic(csv_rows, args.out / "pretrain_throughput.csv")
    print(markdown_table(("setting", "global batch", "s / step", "voxels/s", "vs 1 process"), rows))

    record = run_setting(args.config, 1, 1, args.curve_steps, save_every=args.curve_steps)
    history = record["history"]
    write_csv_atomic(history, args.out / "pretrain_loss.csv")
    tenth = max(1, len(history) // 10)
    start = sum(h["loss"] for h in history[:tenth]) / tenth
    end = sum(h["loss"] for h in history[-tenth:]) / tenth
    plot_loss(
        history, args.out / "pretrain_loss.png", f"TokenUnify, {Path(args.config).stem}, {len(history)} steps"
    )
    seconds = record["ends"][-1] - record["ends"][0]
    print(
        f"\nloss over {len(history)} steps ({seconds / 60:.1f} min): first {tenth} steps {start:.4f}, "
        f"last {tenth} steps {end:.4f} ({end / start:.2f}x); first step {history[0]['loss']:.4f}, "
        f"last step {history[-1]['loss']:.4f}"
    )
    print(f"target: the end at most 0.5x the start: {'met' if end <= 0.5 * start else 'MISSED'}")
    written = ", ".join(str(args.out / name) for name in ("pretrain_throughput.csv", "pretrain_loss.csv"))
    print(f"wrote {written}, {args.out / 'pretrain_loss.png'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        config, steps, save_every, output_dir, result_file = sys.argv[2:7]
        worker(config, int(steps), int(save_every), output_dir, result_file)
    else:
        main()
