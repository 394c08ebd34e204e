"""``seqvision bench models`` / ``seqvision bench kernels`` and the counting and skipping behind them.

The smoke runs measure in fresh processes forked from one template (the first one starts it, a few
seconds); each run is seconds on tiny models and lengths, and its numbers mean nothing.
"""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seqvision.bench import kernels, models
from seqvision.cli import main


def _csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _table_rows(text, first_cell):
    """The cells of the markdown-table lines whose first cell is ``first_cell``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_bench_models_smoke_writes_csv_png_and_ratio_table(tmp_path, capsys):
    assert main(["bench", "models", "--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _csv(tmp_path / "bench_models.csv")
    # vit_tiny (peer) and vir_tiny x 32/64 px x batch 1/2 x eval/train
    assert len(rows) == 16
    assert {r["status"] for r in rows} == {"ok"}, [r["reason"] for r in rows]
    for r in rows:
        assert float(r["images_per_s"]) > 0 and float(r["gflops_per_image"]) > 0
        if r["model"] == "vit_tiny_patch16_224":
            assert float(r["throughput_vs_peer"]) == 1.0 and float(r["flops_vs_peer"]) == 1.0
    assert (tmp_path / "bench_models.png").stat().st_size > 10_000
    assert len(_csv(tmp_path / "bench_models_scaling.csv")) == 2

    header = next(line for line in out.splitlines() if line.startswith("| model"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    peer_rows = _table_rows(out, "vit_tiny_patch16_224")
    assert len(peer_rows) == 8 + 1  # its 8 cells, then its row of the scaling-exponent table
    for cells in peer_rows[:8]:
        assert cells[columns.index("vs vit_tiny_patch16_224")] == "1.00x"
        assert cells[columns.index("mem vs peer")] == "1.00x"
        assert cells[columns.index("FLOPs vs peer")] == "1.00x"
    assert len(_table_rows(out, "vir_tiny_patch16_224")) == 8 + 1
    assert "scaling exponents" in out and "FlopCounterMode" in out


def test_bench_kernels_smoke_writes_csv_png_and_ratio_table(tmp_path, capsys):
    argv = ["bench", "kernels", "--device", "cpu", "--smoke", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = _csv(tmp_path / "kernels_cpu.csv")
    # linear_attention: recurrent, parallel, chunk; selective_scan: recurrent, chunk; at L = 64 and 128
    assert [(r["op"], r["form"]) for r in rows if r["L"] == "64"] == [
        ("linear_attention", "recurrent"), ("linear_attention", "parallel"), ("linear_attention", "chunk"),
        ("selective_scan", "recurrent"), ("selective_scan", "chunk"),
    ]  # fmt: skip
    assert len(rows) == 10
    assert (tmp_path / "kernels_cpu.png").stat().st_size > 10_000
    recurrent = [c for c in _table_rows(out, "linear_attention") + _table_rows(out, "selective_scan")
                 if c[2] == "recurrent"]  # fmt: skip
    assert len(recurrent) == 4 and all(c[4] == "1.00x" for c in recurrent)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "224,abc"], "'224,abc' is not a comma-separated list of positive integers"),
        (["--sizes", "0"], "is not a comma-separated list of positive integers"),
        (["--batch-sizes", ","], "is not a comma-separated list of positive integers"),
        (["--modes", "eval,infer"], "is not a comma-separated list of modes"),
    ],
)
def test_bench_models_bad_lists_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "models", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_models_unknown_model_exits_2_before_measuring(tmp_path, capsys):
    argv = ["bench", "models", "--models", "vir_tiny_patch16_224,no_such_model", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "unknown model(s) no_such_model" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert main(["bench", "models", "--models", "vir_tiny_patch16_224:fast"]) == 2
    assert "must be 'chunk' or 'streaming'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_bench_cuda_without_a_gpu_is_a_clear_usage_error(capsys):
    assert main(["bench", "models", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["bench", "kernels", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_sweep_reports_failed_and_skipped_cells_and_goes_on():
    peer = models.parse_spec("vit_tiny_patch16_224")
    streaming = models.parse_spec("vit_tiny_patch16_224:streaming")  # ViT has no forward_streaming
    lines = []
    rows = models.run_sweep(
        [peer, streaming], [32, 48], [1], ["eval", "train"], peer=peer.label, repeats=1, threads=1,
        max_call_s=1e-9, count_operations=False, report=lines.append, progress=False,
    )  # fmt: skip
    status = {(r["model"], r["img_size"], r["mode"]): (r["status"], r["reason"]) for r in rows}
    assert status[(peer.label, 32, "eval")][0] == "ok"
    assert status[(peer.label, 32, "train")][0] == "ok"
    # estimated from the 32 px cell of the same model and mode: over the (absurd) time limit
    assert status[(peer.label, 48, "eval")][0] == "skipped"
    assert "> --max-call-seconds" in status[(peer.label, 48, "eval")][1]
    assert status[(streaming.label, 32, "eval")] == (
        "failed", "TypeError: vit_tiny_patch16_224:streaming: VisionTransformer has no forward_streaming()"
    )  # fmt: skip
    assert status[(streaming.label, 32, "train")][1].endswith("is inference-only")
    assert len(lines) == sum(r["status"] != "ok" for r in rows)
    table = models.format_ratio_table(rows, peer.label)
    assert "failed" in table and "skipped" in table


def test_skip_reason_scales_memory_by_batch_and_pixels():
    done = {"model": "m", "mode": "train", "status": "ok", "img_size": 224, "batch": 1,
            "weights_mib": 100.0, "peak_mib": 1024.0, "time_s": 1.0}  # fmt: skip
    big = dict(done, img_size=896, batch=2, status="")  # 32x the batch x pixels of the measured cell
    reason = models._skip_reason(big, [done], max_memory_gib=8, max_call_s=math.inf)
    assert reason.startswith("estimated 32.1 GiB (224 px batch 1 scaled x32) > --max-memory-gib 8")
    assert models._skip_reason(big, [done], max_memory_gib=64, max_call_s=math.inf) is None
    oom = dict(done, status="oom", img_size=448)
    assert "ran out of memory" in models._skip_reason(big, [oom], math.inf, math.inf)


class _Attention(nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


def test_count_ops_gives_the_analytic_numbers():
    # nn.Linear(in, out): 2 * in * out FLOPs per sample (the bias add is not counted).
    assert models.count_ops(nn.Linear(16, 4), torch.randn(3, 16)).flops == 3 * 2 * 16 * 4
    # conv 3x3, 3 -> 8 channels on 10x10 with padding: 2 * Cin * Cout * 9 per output pixel; the ReLU
    # is one elementwise op per output element, which FlopCounterMode does not count.
    counted = models.count_ops(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), torch.randn(1, 3, 10, 10)
    )
    assert counted == models.OpCount(flops=2 * 3 * 8 * 9 * 100, elementwise=8 * 100)
    # attention on the CPU (missing from FlopCounterMode's own table): q k^T and p v, 2 * L * L * E each
    B, H, L, E = 1, 2, 8, 4
    assert models.count_ops(_Attention(), torch.randn(B, H, L, E)).flops == 2 * (2 * B * H * L * L * E)


def test_gpu_report_formats_and_plots_kernels_gpu_rows(tmp_path):
    # The CUDA path's own code (the table, the targets and the plot over kernels_gpu.py's rows),
    # without a GPU.
    script = kernels.load_gpu_script()
    rows = [
        script._row("linear_attention", "8 x 64, per-key, bfloat16", L, 65536 // L, 1.0, 2.0, 0.5, 1.0,
                    "fla chunk_gla", 2.0, 8.0, bandwidth=4e12)
        for L in (1024, 4096)
    ] + [
        script._row("cross_scan", "(B, 96, 32, 32) -> 4 routes, float32", 1024, 64, 0.1, 0.2, 0.09, 0.18),
        script._row("cross_scan", "(B, 96, 64, 64) -> 4 routes, float32", 4096, 16, math.nan, math.nan,
                    status="failed: OutOfMemoryError: CUDA out of memory"),
    ]  # fmt: skip
    table = kernels.format_gpu_table(rows)
    assert "4.00x" in table and "50 %" in table and "linear_attention" in table
    assert "fwd >= 85 % of copy bandwidth: met" in table and "failed: OutOfMemoryError" in table
    targets = kernels.gpu_targets(rows)
    assert targets[0].startswith("MET where measured: cross_scan") and "L=1024: 90 %" in targets[0]
    assert targets[1].startswith("MET: linear_attention") and targets[2].startswith(
        "MET: linear_attention: goal"
    )
    kernels.plot_gpu(rows, tmp_path / "kernels_gpu.png", "test")
    assert (tmp_path / "kernels_gpu.png").stat().st_size > 10_000


def _out_of_memory_above_two(model, x):
    """A model call that runs out of memory for batches above 2 (top level: it is pickled)."""
    if x.shape[0] > 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    return model(x)


def test_fill_halves_the_batch_on_out_of_memory(one_thread):
    spec = models.ModelSpec("vit_tiny_patch16_224", "vit_tiny_patch16_224", call=_out_of_memory_above_two)
    measured = models.measure_cell(spec, 32, 8, "eval", "cpu", 1, 1, False, fill=True)
    assert measured["batch"] == 2 and measured["reason"] == "batch 8 ran out of memory, halved to 2"
    assert measured["images_per_s"] == pytest.approx(2 / measured["time_s"])
    with pytest.raises(torch.cuda.OutOfMemoryError):  # without fill an out-of-memory cell fails
        models.measure_cell(spec, 32, 8, "eval", "cpu", 1, 1, False)


def test_fill_start_fits_the_estimates_and_ratios_compare_per_image():
    done = {"model": "m", "mode": "eval", "status": "ok", "img_size": 224, "batch": 256,
            "weights_mib": 0.0, "peak_mib": 1024.0, "time_s": 0.1}  # fmt: skip
    row = dict(done, img_size=896, batch=256, batch_start=256, status="")  # 16x the pixels
    assert models._fill_start(row, [done], max_memory_gib=math.inf, max_call_s=1.0) == 128  # 0.8 s
    assert models._fill_start(row, [done], max_memory_gib=2.0, max_call_s=math.inf) == 32  # 2 GiB
    assert models._fill_start(dict(row, batch_start=100), [], math.inf, math.inf) == 64  # a power of 2
    assert models._fill_start(row, [done], max_memory_gib=0.01, max_call_s=math.inf) == 1
    rows = [
        dict.fromkeys(models.ROW_KEYS, math.nan)
        | {"model": m, "img_size": 896, "batch": b, "batch_start": 256, "mode": "eval", "status": "ok",
           "images_per_s": ips, "peak_mib": peak, "gflops_per_image": 1.0}
        for m, b, ips, peak in (("peer", 64, 100.0, 6400.0), ("ours", 16, 250.0, 800.0))
    ]  # fmt: skip
    models._add_ratios(rows, "peer")
    assert rows[1]["throughput_vs_peer"] == 2.5 and rows[1]["memory_vs_peer"] == 0.5  # 50 vs 100 MiB/image
    lines = models.model_targets(
        [dict(rows[1], model="vir_small_patch16_224", img_size=896)], "vit_small_patch16_224"
    )
    assert lines == [
        "MET: vir_small_patch16_224 eval vs vit_small_patch16_224 at 896 px >= 2.0x: 2.50x (batch 16)"
    ]


def test_bench_models_fill_batch_runs_and_records_the_batch(tmp_path, capsys):
    argv = ["bench", "models", "--models", "vir_tiny_patch16_224", "--peer", "vit_tiny_patch16_224",
            "--sizes", "32", "--modes", "eval", "--fill-batch", "3", "--repeats", "1", "--threads", "1",
            "--no-flops", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    rows = _csv(tmp_path / "bench_models.csv")
    assert [(r["model"], r["batch"], r["batch_start"], r["fill"], r["status"]) for r in rows] == [
        ("vit_tiny_patch16_224", "2", "3", "True", "ok"), ("vir_tiny_patch16_224", "2", "3", "True", "ok"),
    ]  # fmt: skip
    assert "halved on out-of-memory" in capsys.readouterr().out
    assert main([*argv[:-2], "--batch-sizes", "2", "--out", str(tmp_path)]) == 2
    assert "--fill-batch and --batch-sizes exclude each other" in capsys.readouterr().err
