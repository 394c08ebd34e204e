"""benchmarks/kernels_compile.py: recording launches under the interpreter and compiling them for
sm_90 without a GPU (ptxas ships with triton), so a kernel that would not compile or launch on the
card shows here rather than on the one GPU run."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqvision.kernels import linear_attention, triton_interpreted

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels_compile.py"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not triton_interpreted(),
    reason="needs triton, under TRITON_INTERPRET=1 (tests/conftest.py sets it)",
)


@pytest.fixture(scope="module")
def kernels_compile():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("kernels_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(SCRIPT.parent))


def _attention_call() -> list[torch.Tensor]:
    """A bfloat16 linear_attention with a per-head data-dependent decay, forward and backward."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=g, dtype=torch.bfloat16) for _ in range(3))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    decay = (-torch.rand(1, 2, 70, generator=g)).requires_grad_()
    out = linear_attention(q, k, v, decay, backend="triton")
    out.float().sum().backward()
    return [out, q.grad]


def test_launches_are_recorded_not_run_with_the_gpus_dot_mode(kernels_compile):
    with kernels_compile.recording_launches() as launches:
        out, grad = _attention_call()
    names = [launch["kernel"].split(":")[1] for launch in launches]
    assert names[0] == "_forward_chunk_kernel" and "_backward_dqk_kernel" in names
    module = "seqvision.kernels.linear_attention.triton:"
    assert all(launch["kernel"].startswith(module) for launch in launches)
    # Not executed: the outputs are the zero-filled buffers.
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(grad) == 0
    first = launches[0]
    assert first["kwargs"]["DOT"] == {"value": 2}  # bfloat16 tensor-core products, as on the GPU
    assert {"tensor": "bfloat16", "aligned": True} in first["args"]
    assert first["kwargs"]["num_warps"] == {"value": 8}
    # Outside the block the kernels run again (and the interpreter's own DOT mode is back).
    out, _ = _attention_call()
    assert torch.count_nonzero(out) > 0


def test_every_kernel_the_checks_launch_compiles_for_sm90_and_fits(tmp_path):
    # The correctness workload launches all 16 kernels in float32 and bfloat16 (92 variants): each
    # must compile for Hopper and fit its registers and shared memory. The interpreter proves none of
    # that; a kernel change that only the GPU compiler rejects fails here.
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--workloads", "checks", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (tmp_path / "kernels_compile.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({row["kernel"] for row in rows}) == 16
    assert {row["dtypes"] for row in rows} >= {"float32", "bfloat16/float32", "bfloat16"}
    for row in rows:
        assert row["verdict"] in ("ok", "ok, spills"), row
        assert 0 < int(row["registers"]) <= 255 and int(row["warps_per_sm"]) >= 4
    assert " 0 failed" in result.stdout


def test_a_launch_that_cannot_run_on_the_card_fails(kernels_compile):
    judge = kernels_compile.judge
    fits = {"num_warps": 8, "registers": 128, "spill_store_bytes": 0, "shared_bytes": 40_000}
    assert judge(fits, 232_448) == ("ok", 16)  # 65,536 registers / (128 x 256 threads): 2 blocks
    assert judge({**fits, "spill_store_bytes": 36}, 232_448)[0] == "ok, spills"
    verdict, _ = judge({**fits, "shared_bytes": 240_000}, 232_448)
    assert verdict.startswith("FAILED: asks 240000 B of shared memory")
    verdict, warps = judge({**fits, "num_warps": 16, "registers": 255}, 232_448)
    assert verdict.startswith("FAILED") and warps == 0
    assert judge({"error": "CompilationError: x"}, 232_448)[0] == "FAILED: CompilationError: x"


def test_the_script_refuses_to_record_without_the_interpreter(kernels_compile, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(SystemExit) as raised:
        kernels_compile.main(["--workloads", "checks"])
    assert raised.value.code == 2


def _launch_options(launches: list[dict], kernel: str) -> set[tuple[int, int | None]]:
    """(num_warps, num_stages or None where the launch leaves Triton's default) of ``kernel``'s launches."""
    options = set()
    for launch in launches:
        if launch["kernel"].endswith(":" + kernel):
            stages = launch["kwargs"].get("num_stages", {}).get("value")
            options.add((launch["kwargs"]["num_warps"]["value"], stages))
    return options


def test_the_launch_options_chosen_from_compiler_reports_are_in_effect(kernels_compile):
    # float32 linear_attention's output and dv kernels: 16 warps, 1 stage; bfloat16 and the other
    # tile kernels: 8 warps, 2 stages. selective_scan's full tiles: 8 warps; smaller ones: 4.
    from seqvision.kernels import selective_scan

    g = torch.Generator().manual_seed(0)
    for dtype, output_options in ((torch.float32, {(16, 1)}), (torch.bfloat16, {(8, 2)})):
        q, k, v = (torch.randn(1, 1, 64, 64, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
        with kernels_compile.recording_launches() as launches:
            linear_attention(q, k, v, backend="triton").float().sum().backward()
        assert _launch_options(launches, "_forward_output_kernel") == output_options
        assert _launch_options(launches, "_backward_dv_kernel") == output_options
        assert _launch_options(launches, "_backward_dqk_kernel") == {(8, 2)}
    for dim, warps in ((32, 8), (4, 4)):  # 16 channels x 64 steps per program, then 4 x 64
        u, delta, z = (torch.randn(1, dim, 64, generator=g).requires_grad_() for _ in range(3))
        A = -torch.rand(dim, 4, generator=g)
        B, C = (torch.randn(1, 4, 64, generator=g) for _ in range(2))
        with kernels_compile.recording_launches() as launches:
            selective_scan(u, delta, A, B, C, z=z, backend="triton").sum().backward()
        assert _launch_options(launches, "_rescan_kernel") == {(warps, None)}
        assert _launch_options(launches, "_backward_kernel") == {(warps, None)}
