"""`seqvision demo --quick` end to end: the printed tables, results.json / the CSVs / the figures, the
pairing of the two initialisations, and the same numbers from two worker processes as from one."""

import contextlib
import csv
import io
import json
import math

import pytest
import yaml

from seqvision.cli import main
from seqvision.eval.em.demo import QUICK, RESULTS_JSON, run_demo
from seqvision.eval.em.demo.data import budget_tiles

INITS = ("scratch", "tokenunify")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The output folder and the printed output of one `seqvision demo --quick --jobs 1` run."""
    out = tmp_path_factory.mktemp("demo") / "seqvision_demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--jobs", "1", "--output-dir", str(out)]) == 0
    return out, printed.getvalue()


def _rows(printed, first_cell):
    return [line.split("  ") for line in printed.splitlines() if line.startswith(first_cell)]


def test_prints_the_label_efficiency_table_the_probe_and_a_verdict_per_budget(demo):
    out, printed = demo
    lines = printed.splitlines()
    table = lines[: lines.index("")]
    assert table[0].split()[:2] == ["labelled", "crops"] and "VOI sum" in table[0] and "ARAND" in table[0]
    for budget in QUICK.budgets:
        rows = [line for line in table if line.split()[:1] == [str(budget)]]
        labels = " ".join(rows)
        assert len(rows) == 3 and "scratch" in labels and "TokenUnify-initialised" in labels
        assert "difference (95% CI)" in labels
    for label in ("all one segment", "true affinities (ceiling)"):
        assert any(label in line for line in table)
    for label in ("raw intensity", "random encoder", "TokenUnify encoder"):
        assert any(line.startswith(label) for line in lines)
    verdicts = [line for line in lines if "minus scratch VOI sum" in line]
    assert len(verdicts) == len(QUICK.budgets)
    assert all(line.endswith(("helped", "hurt", "no detectable difference")) for line in verdicts)
    assert f"wrote {out / RESULTS_JSON}" in printed


def test_writes_results_summary_probe_and_figures_atomically(demo):
    out, _ = demo
    results = json.loads((out / RESULTS_JSON).read_text())
    runs = results["runs"]
    assert len(runs) == QUICK.n_runs == 2 * len(QUICK.budgets) * len(QUICK.seeds)
    assert {(r["initialisation"], r["labelled_crops"], r["seed"]) for r in runs} == {
        (i, b, s) for i in INITS for b in QUICK.budgets for s in QUICK.seeds
    }
    for run in runs:
        assert len(run["test_volumes"]) == QUICK.test_volumes and math.isfinite(run["final_loss"])
        for volume in run["test_volumes"]:
            assert set(volume) == {f"{t:g}" for t in QUICK.thresholds}
            assert all(math.isfinite(s["voi_sum"]) and 0 <= s["arand"] <= 1 for s in volume.values())
    one_segment = results["baselines"]["one_segment"][0]["0.5"]
    assert one_segment["voi_split"] == 0 and one_segment["n_segments"] == 1
    assert (
        results["baselines"]["true_affinities"][0]["0.5"]["voi_sum"] < 0.1
    )  # the post-processing loses little
    assert [s["budget"] for s in results["summaries"]] == list(QUICK.budgets)
    assert len(results["headline"]) == len(QUICK.budgets)
    assert len(results["data"]["corpus_parameters"]) == QUICK.corpus_volumes
    assert set(results["seconds"]) >= {"data", "pretrain", "finetune", "probe", "total"}

    probe = results["probe"]["per_seed"]
    assert set(probe) == {"raw_intensity", "random", "tokenunify"}
    assert (
        set(probe["random"])
        == set(probe["tokenunify"])
        == {"level_1", "level_2", "level_3", "level_4", "all"}
    )
    for by_level in probe.values():
        for scores in by_level.values():
            assert len(scores) == len(QUICK.seeds) and all(0 <= s["auc"] <= 1 for s in scores)

    with (out / "results.csv").open() as file:
        table = list(csv.DictReader(file))
    assert len(table) == QUICK.n_runs
    run = next(r for r in runs if (r["initialisation"], r["labelled_crops"], r["seed"]) == ("scratch", 1, 0))
    row = next(
        r for r in table if (r["initialisation"], r["labelled_crops"], r["seed"]) == ("scratch", "1", "0")
    )
    assert float(row["voi_sum"]) == pytest.approx(run["test_volumes"][0]["0.5"]["voi_sum"])
    with (out / "summary.csv").open() as file:
        summary = list(csv.DictReader(file))
    assert [int(r["labelled_crops"]) for r in summary] == list(QUICK.budgets)
    for r in summary:  # the interval is around the mean difference, and the mean is the arms' difference
        assert (
            float(r["difference_voi_sum_ci_low"])
            <= float(r["difference_voi_sum_mean"])
            <= float(r["difference_voi_sum_ci_high"])
        )
        assert float(r["difference_voi_sum_mean"]) == pytest.approx(
            float(r["tokenunify_voi_sum_mean"]) - float(r["scratch_voi_sum_mean"])
        )
    with (out / "probe.csv").open() as file:
        assert len(list(csv.DictReader(file))) == 1 + 5 + 5

    figures = ["label_efficiency.png", "probe.png"]
    figures += [f"segmentation_{init}_{budget}crops.png" for init in INITS for budget in QUICK.budgets]
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert not list(out.rglob("checkpoints"))  # the runs keep their segmenter, not their training state
    assert (out / "pretrain" / "encoder.safetensors").is_file()


def test_the_two_initialisations_of_a_seed_differ_only_in_the_encoder(demo):
    out, _ = demo
    for budget in QUICK.budgets:
        for seed in QUICK.seeds:
            configs = {
                init: yaml.safe_load(
                    (out / "runs" / f"{init}_{budget:02d}crops_seed{seed}" / "config.yaml").read_text()
                )
                for init in INITS
            }
            assert configs["tokenunify"]["model"].pop("pretrained_encoder") == str(
                out / "pretrain" / "encoder.safetensors"
            )
            assert configs["scratch"]["model"].pop("pretrained_encoder") is None
            for config in configs.values():
                config["train"].pop("output_dir")
            assert configs["tokenunify"] == configs["scratch"]
            config = configs["scratch"]
            assert config["train"]["steps"] == QUICK.finetune_steps and config["train"]["seed"] == seed
            tiles = budget_tiles(QUICK.n_tiles, budget, seed)
            assert config["data"]["raw"] == [str(out / "data" / f"tile_{i:03d}_raw.npy") for i in tiles]


def test_pretraining_sees_only_the_unlabelled_corpus(demo):
    out, _ = demo
    config = yaml.safe_load((out / "pretrain" / "config.yaml").read_text())
    assert config["data"]["volumes"] == [
        str(out / "data" / f"corpus_{i:02d}.npy") for i in range(QUICK.corpus_volumes)
    ]
    assert config["train"]["steps"] == QUICK.pretrain_steps


def test_two_worker_processes_give_the_same_numbers_as_one(demo, tmp_path):
    out, _ = demo
    parallel = run_demo(tmp_path / "parallel", settings=QUICK, jobs=2)
    assert parallel.jobs == 2
    one, two = (json.loads((folder / RESULTS_JSON).read_text()) for folder in (out, tmp_path / "parallel"))
    for key in ("runs", "baselines", "summaries", "headline"):
        if key == "runs":
            for run in one[key] + two[key]:
                run.pop("seconds")
        assert one[key] == two[key], key
    assert one["probe"]["per_seed"] == two["probe"]["per_seed"]


def test_bad_options_are_usage_errors(tmp_path, capsys):
    assert main(["demo", "--jobs", "0", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "--jobs and --threads must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--full"])
    assert exit_info.value.code == 2
