"""``seqvision bench digits``: the fixed split, the inputs, the statistics, a smoke run, a model that learns.

The learning test trains ResNet-18 on one thread for a short recipe (tens of seconds on a shared
2-core machine); everything else takes seconds.
"""

import csv
import math
import statistics

import numpy as np
import pytest
import torch

from seqvision.bench import digits
from seqvision.cli import main


def test_split_is_fixed_and_stratified():
    first, second = digits.load_digits_split(), digits.load_digits_split()
    np.testing.assert_array_equal(first.train_indices, second.train_indices)
    np.testing.assert_array_equal(first.test_indices, second.test_indices)
    assert len(first.train_indices) == 1347 and len(first.test_indices) == 450
    everything = np.concatenate([first.train_indices, first.test_indices])
    assert len(np.unique(everything)) == 1797  # disjoint, and together all of the data

    whole = np.bincount(first.labels, minlength=10)
    train, test = np.array(first.class_counts("train")), np.array(first.class_counts("test"))
    np.testing.assert_array_equal(train + test, whole)
    # Stratified: every class holds a quarter of its images in the test split (to the rounding).
    assert np.all(np.abs(test - 0.25 * whole) <= 1), (test, whole)
    assert test.tolist() == [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]  # the split the results refer to

    other = digits.load_digits_split(random_state=1)
    assert not np.array_equal(other.test_indices, first.test_indices)
    with pytest.raises(ValueError, match="test_size"):
        digits.load_digits_split(test_size=1.5)


def test_images_are_normalised_3x32x32_and_labels_int64():
    train, test, info = digits.build_digits_datasets()
    assert (len(train), len(test)) == (1347, 450)
    item = train[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    # Standardised with the train split's statistics: mean 0 and std 1 there, close to it on the test split.
    assert abs(float(train.images.mean())) < 1e-4 and abs(float(train.images.std()) - 1) < 1e-3
    assert abs(float(test.images.mean())) < 0.1 and abs(float(test.images.std()) - 1) < 0.1
    torch.testing.assert_close(train.images[:, 0], train.images[:, 2])  # grey, replicated
    assert info["train_class_counts"] == digits.load_digits_split().class_counts("train")
    assert info["augmentation"] == "none"

    # The images are the scans: the mean test image of a class correlates best with its own train mean.
    means = torch.stack([train.images[train.labels == k].mean(0).flatten() for k in range(10)])
    test_means = torch.stack([test.images[test.labels == k].mean(0).flatten() for k in range(10)])
    similarity = torch.corrcoef(torch.cat([means, test_means]))[10:, :10]
    assert torch.equal(similarity.argmax(dim=1), torch.arange(10))


def _runs():
    rows = [
        ("vit_tiny_patch16_224", "timm", "tiny", [80.0, 82.0, 84.0]),
        ("deit_tiny_patch16_224", "timm", "tiny", [70.0, 71.0, 72.0]),
        ("vir_tiny_patch16_224", "seqvision", "tiny", [81.5, 81.0, 82.0]),
        ("vim_tiny_patch16_224", "seqvision", "tiny", [75.0, 80.0, 79.0]),
        ("resnet18", "timm", "small", [95.0, 96.0]),
        ("lrcn_resnet18", "seqvision", "small", [97.0, 96.0]),
        ("lightnet_tiny_patch16_224", "seqvision", "nowhere", [50.0]),
    ]
    runs = []
    for model, family, size_class, accuracies in rows:
        for seed, top1 in enumerate(accuracies):
            runs.append(
                {
                    "model": model, "family": family, "size_class": size_class, "params": 1000 + seed,
                    "seed": seed, "top1_pct": top1, "ms_per_step": 10.0 * (seed + 1), "total_s": 2.0 * seed,
                    "final_loss": 0.1 * seed,
                }
            )  # fmt: skip
    return runs


def test_summary_statistics_and_verdicts_from_a_hand_made_list():
    summaries = digits.summarize_runs(_runs())
    by_model = {s["model"]: s for s in summaries}
    assert [s["model"] for s in summaries][:2] == ["vit_tiny_patch16_224", "deit_tiny_patch16_224"]
    vit = by_model["vit_tiny_patch16_224"]
    assert vit["runs"] == 3 and vit["params"] == 1000
    assert vit["top1_mean"] == pytest.approx(82.0)
    assert vit["top1_std"] == pytest.approx(2.0)  # sample std (n - 1) of 80, 82, 84
    assert (vit["top1_min"], vit["top1_max"]) == (80.0, 84.0)
    assert vit["ms_per_step"] == 20.0  # the median of the runs' 10, 20, 30
    assert vit["total_s_mean"] == pytest.approx(2.0) and vit["final_loss_mean"] == pytest.approx(0.1)
    vim = by_model["vim_tiny_patch16_224"]
    assert vim["top1_mean"] == pytest.approx(78.0)
    assert vim["top1_std"] == pytest.approx(statistics.stdev([75.0, 80.0, 79.0]))
    assert math.isnan(by_model["lightnet_tiny_patch16_224"]["top1_std"])  # one run: no spread

    verdicts = {v["model"]: v for v in digits.judge(summaries)}
    assert set(verdicts) == {"vir_tiny_patch16_224", "vim_tiny_patch16_224", "lrcn_resnet18",
                             "lightnet_tiny_patch16_224"}  # fmt: skip
    vir = verdicts["vir_tiny_patch16_224"]  # 81.5 vs the better peer (ViT 82.0): -0.5, within 1 point
    assert vir["peer"] == "vit_tiny_patch16_224" and vir["gap_points"] == pytest.approx(-0.5)
    assert vir["verdict"] == "PASS"
    assert verdicts["vim_tiny_patch16_224"]["verdict"] == "MISS"
    assert verdicts["vim_tiny_patch16_224"]["gap_points"] == pytest.approx(-4.0)
    assert verdicts["lrcn_resnet18"]["peer"] == "resnet18" and verdicts["lrcn_resnet18"]["verdict"] == "PASS"
    assert verdicts["lightnet_tiny_patch16_224"]["verdict"] == "n/a"  # no timm model in its class

    table = digits.format_table(summaries, list(verdicts.values()))
    assert "82.0 ± 2.0" in table and "MISS" in table and "-4.00 vs vit_tiny_patch16_224" in table

    # Runs of one model on two machines: the devices are listed and their times are not pooled.
    vit_runs = [r for r in _runs() if r["model"] == "vit_tiny_patch16_224"]
    mixed = digits.summarize_runs(
        [{**r, "device": d} for r, d in zip(vit_runs, ["gpu", "cpu", "cpu"], strict=True)]
    )
    assert mixed[0]["device"] == "gpu + cpu"
    assert mixed[0]["ms_per_step_by_device"] == f"{vit_runs[0]['ms_per_step']:.0f} / " + format(
        statistics.median([vit_runs[1]["ms_per_step"], vit_runs[2]["ms_per_step"]]), ".0f"
    )

    with pytest.raises(KeyError, match="top1_pct"):
        digits.summarize_runs([{"model": "resnet18"}])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="models: expected names"):
        digits.run_digits_comparison(models=["resnet1000"])
    with pytest.raises(ValueError, match="seeds"):
        digits.run_digits_comparison(models=["resnet18"], seeds=[0, 0])
    with pytest.raises(ValueError, match="steps"):
        digits.Recipe(steps=0)
    with pytest.raises(ValueError, match="jobs: expected an int >= 1, got 0"):
        digits.run_digits_comparison(models=["resnet18"], jobs=0)


def _csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_writes_csv_png_and_table(tmp_path, capsys, one_thread):
    assert main(["bench", "digits", "--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    runs = _csv(tmp_path / "runs.csv")
    assert [(r["model"], r["seed"]) for r in runs] == [("lrcn_resnet18", "0"), ("resnet18", "0")]
    for r in runs:
        assert r["steps"] == str(digits.SMOKE["steps"]) and 0 <= float(r["top1_pct"]) <= 100
        assert float(r["ms_per_step"]) > 0 and int(r["params"]) > 10_000_000
    assert len(_csv(tmp_path / "curves.csv")) == 2 * digits.SMOKE["steps"]  # one log per step
    summary = _csv(tmp_path / "summary.csv")
    assert summary[0]["verdict"] in ("PASS", "MISS") and summary[0]["peer"] == "resnet18"
    assert (tmp_path / "digits.png").stat().st_size > 10_000
    assert (tmp_path / "summary.json").is_file()
    table = (tmp_path / "table.md").read_text()
    assert "| lrcn_resnet18" in table and "| resnet18" in table and "| lrcn_resnet18" in out
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind

    # --resume reuses the finished runs (same recipe) instead of training them again.
    assert main(["bench", "digits", "--smoke", "--resume", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("(reused from runs.csv)") == 2
    assert _csv(tmp_path / "runs.csv") == runs
    assert len(_csv(tmp_path / "curves.csv")) == 2 * digits.SMOKE["steps"]

    # --jobs 2 trains the two runs in worker processes at once: the same runs, the same accuracies.
    parallel = tmp_path / "parallel"
    assert main(["bench", "digits", "--smoke", "--jobs", "2", "--out", str(parallel)]) == 0
    assert "2 runs at a time" in (parallel / "table.md").read_text()
    in_workers = _csv(parallel / "runs.csv")
    assert [(r["model"], r["seed"]) for r in in_workers] == [("lrcn_resnet18", "0"), ("resnet18", "0")]
    for ran, worker in zip(runs, in_workers, strict=True):
        assert (worker["top1_pct"], worker["final_loss"]) == (ran["top1_pct"], ran["final_loss"])

    # --report-only tabulates finished runs from other folders (other machines) and trains nothing.
    merged = tmp_path / "merged"
    result = digits.run_digits_comparison(
        ["lrcn_resnet18", "resnet18", "vit_tiny_patch16_224"], [0], digits.SMOKE["steps"], merged,
        batch_size=digits.SMOKE["batch_size"], runs_from=[tmp_path], report_only=True,
    )  # fmt: skip
    assert result["missing"] == [["vit_tiny_patch16_224", 0]]
    assert _csv(merged / "runs.csv") == runs and runs[0]["device"] == digits.run_device()
    merged_table = (merged / "table.md").read_text()
    assert "| lrcn_resnet18" in merged_table and "vit_tiny_patch16_224: not judged" in merged_table
    with pytest.raises(FileNotFoundError, match=r"runs_from: .* has no runs\.csv"):
        digits.run_digits_comparison(["resnet18"], [0], runs_from=[tmp_path / "nowhere"], report_only=True)
    with pytest.raises(ValueError, match="report_only: no finished run"):
        digits.run_digits_comparison(
            ["resnet18"], [0], out=tmp_path / "other", runs_from=[tmp_path], report_only=True
        )


def test_resnet18_learns_the_digits(one_thread, tmp_path):
    """The shared recipe, shortened: ResNet-18 from scratch gets far above chance (10 %) on the test split."""
    train, test, _ = digits.build_digits_datasets()
    recipe = digits.Recipe(steps=60, batch_size=16)
    run = digits.train_and_evaluate("resnet18", 0, recipe, train, test, workdir=tmp_path)
    assert run.top1_pct > 50, run
    assert run.final_loss < run.history[0]["loss"]
    assert list(tmp_path.iterdir()) == []  # the run's checkpoint folder is removed
