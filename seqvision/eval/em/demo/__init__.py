"""``seqvision demo``: does TokenUnify pretraining pay off where its paper says it should, when
unlabelled volumes are many and labels are few?

On synthetic EM volumes (``synthetic_em_volume``; nothing to download) ``run_demo``

1. draws a **corpus** of unlabelled volumes, each with its own tissue parameters, a labelled
   **pool** cut into crops, and held-out labelled **test volumes** (``demo.data``);
2. **pretrains** the tiny EM encoder once on the corpus with TokenUnify's three objectives
   (``configs/pretrain/tokenunify_em_tiny.yaml``);
3. **fine-tunes** the affinity segmenter (``configs/finetune/em_seg_tiny.yaml``) from the
   pretrained encoder and from scratch on each labelled budget (1, 4 and 16 crops by default) and
   seed: both initialisations of a seed get the same crops, decoder weights, data order and steps;
4. **segments and scores** every test volume with every run (sliding-window affinities, watershed,
   agglomeration; VOI and ARAND), next to the trivial baseline (all one segment) and the ceiling of
   the post-processing (the true affinities);
5. **probes** the frozen encoders: a logistic regression of boundary voxels on the features of the
   pretrained encoder, of the random encoders the scratch runs start from, and on raw intensity;
6. writes the per-run results (``results.csv``), the per-budget summary with the paired difference
   pretrained - scratch and its 95% interval (``summary.csv``), the probe (``probe.csv``), all of it
   with the settings, timings and machine (``results.json``), the curve
   (``label_efficiency.png``), the probe plot (``probe.png``) and segmentation figures of the first
   seed (``segmentation_<init>_<budget>crops.png``), each file atomically.

The runs go to ``jobs`` worker processes of one torch thread each (``demo.runs``): two on a 2-core
CPU, where ``DEFAULT`` takes about 7 minutes; ``QUICK`` is a smoke test of under a minute, ``FULL``
the grid for a GPU.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from seqvision.eval.em.demo.data import POOL_SEED, TEST_SEED, DemoData, budget_tiles, write_demo_data
from seqvision.eval.em.demo.report import (
    BudgetSummary,
    budget_summaries,
    headline,
    probe_rows,
    probe_summary,
    run_rows,
    save_label_efficiency_figure,
    save_probe_figure,
    summary_rows,
    write_tables,
)
from seqvision.eval.em.demo.runs import (
    PretrainSpec,
    ProbeSpec,
    RunResult,
    RunSpec,
    baseline_scores,
    execute,
)
from seqvision.eval.em.demo.settings import DEFAULT, FULL, QUICK, DemoSettings
from seqvision.eval.em.demo.stats import Spread
from seqvision.eval.em.finetune import load_config as load_finetune_config
from seqvision.eval.em.metrics import SegmentationScores
from seqvision.pretrain.train import load_config as load_pretrain_config
from seqvision.utils.checks import check_int
from seqvision.utils.machine import cpu_name

__all__ = [
    "DEFAULT",
    "FULL",
    "QUICK",
    "DemoResult",
    "DemoSettings",
    "default_config",
    "default_jobs",
    "run_demo",
]

_logger = logging.getLogger(__name__)

_CONFIGS = Path(__file__).resolve().parents[4] / "configs"  # the repository root
PRETRAIN_CONFIG = "pretrain/tokenunify_em_tiny.yaml"
FINETUNE_CONFIG = "finetune/em_seg_tiny.yaml"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
PROBE_CSV = "probe.csv"
CURVE_PNG = "label_efficiency.png"
PROBE_PNG = "probe.png"
PRETRAIN_SEED = 0  # the one pretraining run's


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote."""

    settings: DemoSettings
    output_dir: Path
    runs: list[RunResult]  # by budget, initialisation, seed
    summaries: list[BudgetSummary]  # per budget, at the table's threshold
    baselines: dict[
        str, list[dict[float, SegmentationScores]]
    ]  # one_segment, true_affinities per test volume
    probe: dict[str, dict[str, Spread]]  # ROC AUC spread per encoder and level set
    headline: list[str]  # the verdict per budget, one sentence each
    files: dict[str, Path]
    seconds: dict[str, float]  # data, pretrain, finetune (summed over runs), probe, total
    jobs: int


def default_config(name: str) -> Path:
    """A config of the repository's ``configs/`` folder (``name`` relative to it)."""
    path = _CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such config. The demo reads the repository's configs/ (a source checkout "
            "installed with pip install -e .); pass pretrain_config= and finetune_config= otherwise"
        )
    return path


def default_jobs(settings: DemoSettings) -> int:
    """One job on a GPU (the runs would queue on it anyway); else one per usable core (at
    ``settings.threads`` each), at most one per fine-tuning run."""
    if torch.cuda.is_available():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // settings.threads, settings.n_runs))


def _machine(settings: DemoSettings, jobs: int) -> dict[str, Any]:
    """Where the timings were taken."""
    return {
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "jobs": jobs,
        "torch_threads_per_job": settings.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def _loop_overrides(steps: int, seed: int) -> list[str]:
    """The demo's runs: their budget and seed, one final checkpoint, no tracker, no bar of their own."""
    return [
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"train.save_every={steps}",
        "train.keep_last=1",
        "train.log_with=null",
        "train.progress=false",
    ]


def _pretrain_spec(config: Any, output: Path, data: DemoData, settings: DemoSettings) -> PretrainSpec:
    values = load_pretrain_config(config, _loop_overrides(settings.pretrain_steps, PRETRAIN_SEED))
    values["data"].pop("synthetic", None)
    values["data"]["volumes"] = [str(path) for path in data.corpus]
    return PretrainSpec(values, output / "pretrain")


def _run_spec(
    config: Any,
    output: Path,
    data: DemoData,
    settings: DemoSettings,
    init: str,
    budget: int,
    seed: int,
    encoder: Path | None,
) -> RunSpec:
    values = load_finetune_config(config, _loop_overrides(settings.finetune_steps, seed))
    tiles = [data.tiles[i] for i in budget_tiles(len(data.tiles), budget, seed)]
    values["data"].pop("synthetic", None)
    values["data"].update(
        raw=[str(raw) for raw, _ in tiles],
        labels=[str(labels) for _, labels in tiles],
        crop_size=list(settings.finetune_crop),
    )
    values["model"]["pretrained_encoder"] = None if encoder is None else str(encoder)
    name = f"{init}_{budget:02d}crops_seed{seed}"
    figure = output / f"segmentation_{init}_{budget}crops.png" if seed == settings.seeds[0] else None
    return RunSpec(
        init, budget, seed, values, output / "runs" / name, data.tests, settings.window, settings.overlap,
        settings.thresholds, figure,
    )  # fmt: skip


def _check_architectures(pretrain: Mapping[str, Any], finetune: Mapping[str, Any]) -> None:
    """The fine-tuning encoder must be the pretrained one: fail before minutes of pretraining."""
    pretrained = (
        pretrain["model"].get("encoder", "emmamba_base"),
        pretrain["model"].get("encoder_kwargs") or {},
    )
    tuned = (
        finetune["model"].get("encoder_name", "emmamba_base"),
        finetune["model"].get("encoder_kwargs") or {},
    )
    if pretrained != tuned:
        raise ValueError(
            f"pretrain_config's encoder {pretrained} differs from finetune_config's {tuned}: the pretrained "
            "encoder must load into the segmenter"
        )


def run_demo(
    output_dir: str | os.PathLike = "seqvision_demo",
    *,
    settings: DemoSettings = DEFAULT,
    jobs: int | None = None,
    pretrain_config: str | os.PathLike | Mapping[str, Any] | None = None,
    finetune_config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> DemoResult:
    """The label-efficiency experiment and the probe (module doc).

    Args:
        output_dir: where the data (``data/``), the runs (``pretrain/``, ``runs/``) and the results
            go; created if needed. Earlier results there are replaced, each file atomically.
        settings: ``DEFAULT``, ``QUICK``, ``FULL`` or your own ``DemoSettings``.
        jobs: worker processes (None: ``default_jobs``); 1 runs everything in this process. The
            results do not depend on it.
        pretrain_config, finetune_config: the configs the runs start from (default: the
            repository's tiny ones); their encoder architectures must match.

    Returns:
        a ``DemoResult``.
    """
    jobs = default_jobs(settings) if jobs is None else jobs
    check_int("jobs", jobs, 1)
    pretrain_config = pretrain_config or default_config(PRETRAIN_CONFIG)
    finetune_config = finetune_config or default_config(FINETUNE_CONFIG)
    finetune_values = load_finetune_config(finetune_config)
    _check_architectures(load_pretrain_config(pretrain_config), finetune_values)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _logger.info(
        "demo: %d fine-tuning runs (budgets %s x seeds %s x 2 initialisations), %d job(s)",
        settings.n_runs, list(settings.budgets), list(settings.seeds), jobs,
    )  # fmt: skip
    data = write_demo_data(output / "data", settings)
    seconds = {"data": time.perf_counter() - start}

    def run_specs(init: str, encoder: Path | None) -> list[RunSpec]:
        return [
            _run_spec(finetune_config, output, data, settings, init, budget, seed, encoder)
            for budget in settings.budgets
            for seed in settings.seeds
        ]

    def probe_spec(encoder: Path) -> ProbeSpec:
        return ProbeSpec(
            finetune_values["model"], encoder, data.pool, settings.test_shape, data.tests, settings.seeds,
            settings.probe_voxels,
        )  # fmt: skip

    executed = execute(
        _pretrain_spec(pretrain_config, output, data, settings),
        run_specs("scratch", None),
        lambda encoder: run_specs("tokenunify", encoder),
        probe_spec,
        jobs=jobs,
        threads=settings.threads,
        total_steps=settings.pretrain_steps + settings.n_runs * settings.finetune_steps,
    )
    threshold = settings.thresholds[0]
    baselines = baseline_scores(data.tests, settings.thresholds)
    summaries = budget_summaries(executed.runs, threshold)
    probe = probe_summary(executed.probe)
    lines = headline(summaries)
    seconds.update(executed.seconds)
    files = {f"figure_{r.init}_{r.budget}": r.files["figure"] for r in executed.runs if "figure" in r.files}
    files["curve"] = save_label_efficiency_figure(
        output / CURVE_PNG, executed.runs, summaries, baselines, threshold
    )
    files["probe_figure"] = save_probe_figure(output / PROBE_PNG, probe)
    seconds["total"] = time.perf_counter() - start
    results = {
        "headline": lines,
        "table_threshold": threshold,
        "summaries": [s.to_dict() for s in summaries],
        "probe": {
            "summary": {k: {n: v.to_dict() for n, v in by.items()} for k, by in probe.items()},
            "per_seed": executed.probe,
        },
        "runs": [_run_json(run) for run in executed.runs],
        "baselines": {k: [_scores_json(v) for v in volumes] for k, volumes in baselines.items()},
        "pretrain_final_loss": executed.pretrain_loss,
        "data": {
            "corpus_parameters": data.corpus_parameters,
            "pool_seed": POOL_SEED,
            "test_seeds": [TEST_SEED + j for j in range(settings.test_volumes)],
            "tiles": {
                f"{b}@{s}": budget_tiles(len(data.tiles), b, s)
                for b in settings.budgets
                for s in settings.seeds
            },
        },
        "settings": asdict(settings),
        "seconds": seconds,
        "machine": _machine(settings, jobs),
    }
    tables = {
        "results": run_rows(executed.runs, threshold),
        "summary": summary_rows(summaries),
        "probe": probe_rows(probe),
    }
    files.update(write_tables(output, tables, results))
    for line in lines:
        _logger.info("%s", line)
    _logger.info("demo finished in %.0f s; results in %s", seconds["total"], output)
    return DemoResult(
        settings, output, executed.runs, summaries, baselines, probe, lines, files, seconds, jobs
    )


def _scores_json(by_threshold: Mapping[float, SegmentationScores]) -> dict[str, Any]:
    return {f"{t:g}": s.to_dict() for t, s in by_threshold.items()}


def _run_json(run: RunResult) -> dict[str, Any]:
    return {
        "initialisation": run.init,
        "labelled_crops": run.budget,
        "seed": run.seed,
        "final_loss": run.final_loss,
        "seconds": run.seconds,
        "test_volumes": [_scores_json(volume) for volume in run.scores],
    }
