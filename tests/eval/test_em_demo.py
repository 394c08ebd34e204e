"""`seqvision demo --quick` end to end: the printed table, results.json / .csv, the figures, and the
two fine-tuning runs differing only in the encoder's initialisation."""

import contextlib
import csv
import io
import json
import math

import pytest
import yaml

from seqvision.cli import main
from seqvision.eval.em.demo import QUICK, RESULTS_CSV, RESULTS_JSON

LABELS = ("all one segment", "scratch", "TokenUnify-initialised", "true affinities (ceiling)")
KEYS = ["one_segment", "scratch", "tokenunify", "true_affinities"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The output folder and the printed output of one `seqvision demo --quick` run."""
    out = tmp_path_factory.mktemp("demo") / "seqvision_demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    return out, printed.getvalue()


def test_prints_the_table_with_both_models_and_the_baselines(demo):
    out, printed = demo
    lines = printed.splitlines()
    assert lines[0].split()[:3] == ["model", "VOI", "split"]
    rows = {label: line for label in LABELS for line in lines if line.startswith(label)}
    assert set(rows) == set(LABELS)
    for line in rows.values():  # VOI split, merge, sum, ARAND, segments
        assert len(line.split()[-5:]) == 5 and all(float(v) >= 0 for v in line.split()[-5:])
    assert f"{QUICK.pretrain_steps} pretraining steps, {QUICK.finetune_steps} fine-tuning steps" in printed
    assert f"wrote {out / RESULTS_JSON}" in printed


def test_writes_json_csv_and_figures_atomically(demo):
    out, _ = demo
    results = json.loads((out / RESULTS_JSON).read_text())
    assert [row["key"] for row in results["rows"]] == KEYS
    rows = {row["key"]: row for row in results["rows"]}
    assert rows["one_segment"]["voi_split"] == 0 and rows["one_segment"]["n_segments"] == 1
    assert rows["true_affinities"]["voi_sum"] < 0.1  # the post-processing itself loses almost nothing
    for key in ("scratch", "tokenunify"):
        assert math.isfinite(rows[key]["voi_sum"]) and math.isfinite(rows[key]["final_loss"])
        assert set(rows[key]["by_threshold"]) == {f"{t:g}" for t in QUICK.thresholds}
        assert rows[key]["voi_sum"] == rows[key]["by_threshold"][f"{QUICK.thresholds[0]:g}"]["voi_sum"]
    assert results["settings"]["test_shape"] == list(QUICK.test_shape) and results["test_seed"] == 1
    assert set(results["seconds"]) >= {
        "pretrain",
        "finetune_tokenunify",
        "finetune_scratch",
        "segment",
        "total",
    }

    with (out / RESULTS_CSV).open() as file:
        table = list(csv.DictReader(file))
    assert [row["key"] for row in table] == KEYS
    assert [float(row["voi_sum"]) for row in table] == pytest.approx([r["voi_sum"] for r in results["rows"]])
    for key in ("scratch", "tokenunify"):
        assert (out / f"segmentation_{key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_the_two_fine_tuning_runs_differ_only_in_the_encoder(demo):
    out, _ = demo
    configs = {
        key: yaml.safe_load((out / f"finetune_{key}" / "config.yaml").read_text()) for key in KEYS[1:3]
    }
    assert configs["tokenunify"]["model"].pop("pretrained_encoder") == str(
        out / "pretrain" / "encoder.safetensors"
    )
    assert configs["scratch"]["model"].pop("pretrained_encoder") is None
    for config in configs.values():
        config["train"].pop("output_dir")
    assert configs["tokenunify"] == configs["scratch"]
    assert configs["scratch"]["train"]["steps"] == QUICK.finetune_steps


def test_bad_options_are_usage_errors(tmp_path, capsys):
    assert main(["demo", "--seed", "-1", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "--seed must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
