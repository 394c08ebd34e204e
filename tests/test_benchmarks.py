"""Self-checks of benchmark scripts: kernels_gpu.py (Triton interpreter), video_io.py, gpu_session.sh."""

import csv
import functools
import importlib.util
import math
import os
import shlex
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
    assert "44 of 44 kernel checks within tolerance" in result.stdout
    assert "FAIL" not in result.stdout


def test_kernels_gpu_refuses_to_time_without_a_gpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 2
    assert "timing needs a CUDA device" in result.stderr


def test_kernels_gpu_timing_code_runs_under_the_interpreter(tmp_path):
    # --smoke walks every timing path (all five operators, fla and mamba-ssm absent) on tiny CPU
    # shapes, so a mistake there shows here rather than on the one GPU run.
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    with (tmp_path / "kernels_gpu.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    operators = {"cross_scan", "cross_merge", "linear_recurrence", "linear_attention", "selective_scan"}
    assert {row["op"] for row in rows} == operators
    assert len(rows) == 2 * 7  # per length: the two copies, the recurrence, 3 decays, the scan
    assert {row["status"] for row in rows} == {"ok"}
    for row in rows:  # every row against the memory floor; peers that do not import say so
        assert float(row["fwd_ms"]) > 0 and float(row["floor_fwd_ms"]) > 0
        assert float(row["fwd_of_floor"]) > 0 and float(row["fwd_bwd_of_floor"]) > 0
        if row["op"] == "linear_attention" and importlib.util.find_spec("fla") is None:
            assert row["peer"] == "fla not installed" and math.isnan(float(row["peer_fwd_bwd_ms"]))
        if row["op"] in ("cross_scan", "cross_merge"):  # a target at every length
            assert row["target_status"] in ("met", "missed")
    assert "targets (issue 19):" in result.stdout and "copy bandwidth" in result.stdout


def test_kernels_gpu_without_fla_says_so_and_measures_the_rest(monkeypatch):
    # Whether or not fla is installed here: with it absent the linear_attention rows run and name it.
    import torch

    from seqvision.bench.kernels import load_gpu_script

    script = load_gpu_script()
    monkeypatch.setattr(script, "_fla", lambda: None)
    build = functools.partial(script._attention_cases, head_dim=16, heads=1, dtype=torch.float16)
    rows = script._run_cases(("linear_attention",), build, 16, 1, torch.device("cpu"), 1e9, False, 1)
    assert [r["variant"].split(", ")[1] for r in rows] == ["per-head constant", "per-head data-dependent",
                                                           "per-key"]  # fmt: skip
    for r in rows:
        assert r["status"] == "ok" and r["peer"] == script.FLA_MISSING and r["fwd_bwd_ms"] > 0
        assert math.isnan(r["peer_fwd_bwd_ms"]) and math.isnan(r["vs_peer_fwd_bwd"])
    assert "fla not installed: fla's same-math rows did not run" in script.format_checks([])


def test_kernels_gpu_reports_targets_and_absent_peers():
    """The rows' targets: met / missed against the issue's numbers, "not measured" where fla did not
    run (L >= 1024), none below the lengths a target names."""
    from seqvision.bench.kernels import load_gpu_script

    script = load_gpu_script()
    row = script._row

    def attention(length, peer_both, peer="fla chunk_gla"):
        return row("linear_attention", "8 x 64, per-key, bfloat16", length, 65536 // length, 1.0, 2.0,
                   0.5, 1.0, peer, 1.0, peer_both, bandwidth=4e12)  # fmt: skip

    assert script.target_status(attention(256, 3.0)) == ("-", "-")
    assert script.target_status(attention(1024, 2.0))[1] == "met"  # 1.0x fla
    assert script.target_status(attention(4096, 1.9))[1] == "missed"
    absent = attention(1024, math.nan, script.FLA_MISSING)
    assert script.target_status(absent) == (script.TARGETS["linear_attention"], "not measured")
    scan = row("selective_scan", "D 768", 4096, 16, 2.0, 8.0, 1.0, 3.0)  # fwd at 50 % of its floor
    assert scan["fwd_of_floor"] == 0.5 and script.target_status(scan)[1] == "met"
    assert script.target_status(row("selective_scan", "D 768", 1024, 64, 2.0, 8.0, 0.1, 3.0))[1] == "-"
    copy = row("cross_merge", "4 routes", 256, 256, 1.0, 2.0, 0.84, 1.8)
    assert script.target_status(copy)[1] == "missed"
    failed = row("cross_scan", "", 256, 256, math.nan, math.nan, status="failed: OutOfMemoryError: ")
    assert script.target_status(failed)[1] == "not measured"
    summary = script.target_summary([attention(1024, 2.6), attention(4096, 2.2), absent, copy, scan])
    assert summary[0] == "MISSED: cross_merge: fwd >= 85 % of copy bandwidth: L=256: 84 %"
    assert summary[1].startswith("MET where measured: linear_attention: fwd+bwd >= 1.0x fla")
    assert summary[1].endswith(
        "L=1024 8 x 64, per-key: 1.30x; L=4096 8 x 64, per-key: 1.10x; L=1024 8 x 64, per-key: -"
    )
    assert summary[2] == "MISSED: linear_attention: goal fwd+bwd >= 1.2x fla at L >= 1024 (lowest 1.10x)"
    assert summary[3].startswith("MET: selective_scan") and len(summary) == 4
    assert script.target_summary([absent])[0].startswith("NOT MEASURED: linear_attention")
    table = script._format_timings([attention(1024, 2.6), absent, copy, failed])
    assert "fwd+bwd >= 1.0x fla at L >= 1024 (goal 1.2x): not measured" in table
    assert "failed: OutOfMemoryError" in table and "4000 GB/s" in table


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
    """benchmarks/gpu_session.sh runs only on a lent GPU: check here that bash parses it, that its
    parts come most important first within its total time limit, and that the parsers of the CLI and
    of kernels_gpu.py accept every command in it (DRY_RUN=1 prints them as bash expands them), so the
    one GPU call is not lost to a typo or a renamed option."""
    from seqvision.bench.kernels import load_gpu_script
    from seqvision.cli import build_parser

    script = SCRIPT.parent / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for wheel in ("fla_core-0.6.0", "einops-0.8.2", "timm-1.0.31", "packaging-26.4"):
        assert wheel in text  # the header names the wheels it expects in .whl/
    env = dict(os.environ, DRY_RUN="1", DIGITS_LIMIT="230", OUT="out")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    parts = [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("===")]
    names = [p[0] for p in parts]
    assert names == [
        "checks",
        "kernels",
        "models_targets",
        "vim_tiny",
        "models_eval",
        "models_train",
        "launch_options",
        "digits",
    ]
    # The parts up to models_train fit TOTAL_LIMIT; launch_options runs in what they leave.
    assert sum(int(p[1]) for p in parts[: names.index("launch_options")]) <= 480
    cli, kernels_gpu = build_parser(), load_gpu_script().build_parser()
    for name, _, *command in parts:
        if command[:3] == ["python3", "-m", "seqvision"]:
            args = cli.parse_args(command[3:])
            if command[3:5] == ["bench", "models"]:
                assert args.fill_batch == (64 if name == "vim_tiny" else 256) and args.device == "cuda"
        else:
            assert command[:2] == ["python3", "benchmarks/kernels_gpu.py"], name
            args = kernels_gpu.parse_args(command[2:])
            if name == "kernels":
                assert sorted(args.lengths) == [256, 1024, 4096, 16384, 65536] and args.head_dims == [64, 128]
            assert args.launch_options == (name == "launch_options")
    vim = cli.parse_args(parts[names.index("vim_tiny")][5:])
    assert (vim.models, vim.peer, vim.sizes) == (["vim_tiny_patch16_224"], "deit_tiny_patch16_224", [1248])
    targets = cli.parse_args(parts[names.index("models_targets")][5:])
    assert targets.peer == "vit_small_patch16_224" and targets.sizes == [224, 896]
    assert {"vir_small_patch16_224", "lightnet_small_patch16_224", "deit_small_patch16_224",
            "vim_small_patch16_224", "vmamba_tiny_224"} == set(targets.models)  # fmt: skip


def test_kernels_gpu_times_launch_options_against_those_they_replaced():
    # On a GPU this decides whether the options chosen from compiler reports stay; here it proves the
    # code runs and that each option is put back afterwards.
    import torch

    from seqvision.bench.kernels import load_gpu_script

    script = load_gpu_script()

    def options():
        return {op: getattr(module, name) for op, (module, name, *_) in script.LAUNCH_ALTERNATIVES.items()}

    before = options()
    rows = script.time_launch_options(torch.device("cpu"), small=True, rep_ms=1)
    assert [r["op"] for r in rows] == ["linear_attention"] * 3 + ["selective_scan"] * 2
    for r in rows:
        assert r["status"] == "ok" and r["current"] != r["replaced"]
        assert r["fwd_speedup"] > 0 and r["fwd_bwd_speedup"] > 0
    assert rows[0]["current"].endswith("16 warps, num_stages=1")
    assert rows[3]["current"].endswith("8 warps") and rows[3]["replaced"].endswith("4 warps")
    assert options() == before
    assert "current vs replaced" in script.format_launch_options(rows)
