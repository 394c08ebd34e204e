"""The correctness part of benchmarks/kernels_gpu.py runs on the CPU through Triton's interpreter."""

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
    assert "14 of 14 kernel checks within tolerance" in result.stdout
    assert "FAIL" not in result.stdout


def test_kernels_gpu_refuses_to_time_without_a_gpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 2
    assert "timing needs a CUDA device" in result.stderr
