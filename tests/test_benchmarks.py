"""Self-checks of benchmark scripts: kernels_gpu.py (Triton interpreter), video_io.py, gpu_session.sh."""

import csv
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels_gpu.py"


def test_kernels_gpu_check_only_passes_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check-only"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "36 of 36 kernel checks within tolerance" in result.stdout
    assert "FAIL" not in result.stdout


def test_kernels_gpu_refuses_to_time_without_a_gpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 2
    assert "timing needs a CUDA device" in result.stderr


def test_kernels_gpu_timing_code_runs_under_the_interpreter(tmp_path):
    # --smoke walks every timing path (all four operators, peers absent) on tiny CPU shapes, so a
    # mistake there shows here rather than on the one GPU run.
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (tmp_path / "kernels_gpu.csv").read_text().splitlines()
    operators = {line.split(",")[0] for line in lines[1:]}
    assert operators == {"cross_scan", "linear_recurrence", "linear_attention", "selective_scan"}
    assert len(lines) == 1 + 2 * 6  # header, then 6 rows for each of the 2 lengths


def test_video_io_smoke_run_writes_every_measurement(tmp_path):
    # --smoke writes two tiny videos and walks every path of benchmarks/video_io.py: both decoders,
    # the dataset's checked decode, and the DataLoader with and without worker processes.
    script = SCRIPT.parent / "video_io.py"
    out = tmp_path / "video_io.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    measured = [row["measurement"] for row in rows]
    expected = ["full decode"] * 2 + ["uniform 16 frames"] * 3 + ["DataLoader train clips"] * 2
    assert measured == expected
    assert all(float(row["clips_per_s"]) > 0 for row in rows)
    assert "| uniform 16 frames" in result.stdout


def test_gpu_session_script_is_valid_and_uses_existing_options():
    """benchmarks/gpu_session.sh runs only on a lent GPU: check here that bash parses it and that
    the CLI's parser accepts every `seqvision bench` command in it, so the one GPU call is not lost
    to a typo or a renamed option."""
    import shlex

    from seqvision.cli import build_parser

    script = SCRIPT.parent / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    for variable, value in {
        "$DIGITS_STEPS": "1000",
        "$DIGITS_BATCH": "64",
        "$OUT": "out",
        "$length": "1024",
    }.items():
        text = text.replace(variable, value)
    digits = text.split("digits=(python3 -m seqvision ", 1)[1].split(")", 1)[0]
    commands = []
    for line in text.splitlines():
        if '"${digits[@]}"' in line:
            commands.append(digits + line.split('"${digits[@]}"', 1)[1])
        elif "python3 -m seqvision bench" in line and not line.startswith("digits=("):
            commands.append(line.split("python3 -m seqvision ", 1)[1])
    assert len(commands) == 3  # the digits comparison, digits alone, the models
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command))
