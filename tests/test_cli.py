"""`seqvision check`: the table of every form against the recurrent form."""

import subprocess
import sys

import pytest
import torch

from seqvision.cli import main
from seqvision.kernels.check import run_checks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_operator_and_form_is_checked_and_passes(dtype):
    rows = run_checks(dtype=dtype, seed=1)
    covered = {(r.operator, r.form) for r in rows}
    assert covered >= {
        ("linear_attention", "parallel"),
        ("linear_attention", "chunk"),
        ("selective_scan", "chunk"),
        ("linear_recurrence", "chunk"),
        ("scan_orders", "cross_scan"),
        ("scan_orders", "snake"),
    }
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_run_checks_rejects_other_dtypes():
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_checks(dtype=torch.float16)


def test_check_command_prints_a_table(capsys):
    assert main(["check", "--dtype", "float32", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "selective_scan" in out and "cross_merge adjoint" in out
    assert "FAIL" not in out
    assert "within tolerance (float32, seed 3)" in out


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "seqvision", "check"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "52 of 52 checks within tolerance" in result.stdout


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        main(["train-everything"])
    assert exc.value.code == 2
