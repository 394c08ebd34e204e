"""Self-checks of benchmark scripts: kernels_gpu.py (under Triton's interpreter) and video_io.py --smoke."""

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
