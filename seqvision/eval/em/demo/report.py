"""What the demo measured, summarised: the label-efficiency table and curve, the probe table and
plot, the verdict per budget, and the files (CSV, JSON, PNG), each written atomically."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqvision.eval.em.demo.runs import INIT_LABELS, INITS, LEVEL_SETS, RunResult, crops_label
from seqvision.eval.em.demo.stats import PairedDifference, Spread, paired_difference, spread, verdict
from seqvision.eval.em.metrics import SegmentationScores
from seqvision.utils.extras import require
from seqvision.utils.io import save_figure_atomic, write_csv_atomic, write_json_atomic

__all__ = [
    "BudgetSummary",
    "budget_summaries",
    "headline",
    "probe_summary",
    "probe_table",
    "save_label_efficiency_figure",
    "save_probe_figure",
    "summary_table",
]

PROBE_LABELS = {
    "raw_intensity": "raw intensity",
    "random": "random encoder",
    "tokenunify": "TokenUnify encoder",
}
BASELINE_LABELS = {"one_segment": "all one segment", "true_affinities": "true affinities (ceiling)"}
METRICS = ("voi_sum", "arand")


@dataclass(frozen=True)
class BudgetSummary:
    """One labelled budget over the seeds: each initialisation's spread and the paired difference
    TokenUnify-initialised minus scratch, per metric (``METRICS``), at the table's threshold."""

    budget: int
    spreads: dict[str, dict[str, Spread]]  # metric -> init -> spread over seeds
    differences: dict[str, PairedDifference]  # metric -> paired difference
    verdict: str  # from the VOI sum's difference: helped, hurt, no detectable difference

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "spreads": {
                m: {i: s.to_dict() for i, s in by_init.items()} for m, by_init in self.spreads.items()
            },
            "differences": {m: d.to_dict() for m, d in self.differences.items()},
            "verdict": self.verdict,
        }


def budget_summaries(runs: Sequence[RunResult], threshold: float) -> list[BudgetSummary]:
    """Per budget: spread per initialisation and paired difference over the seeds both have."""
    summaries = []
    for budget in sorted({run.budget for run in runs}):
        by_init = {init: {r.seed: r for r in runs if r.budget == budget and r.init == init} for init in INITS}
        seeds = sorted(set(by_init["scratch"]) & set(by_init["tokenunify"]))
        spreads, differences = {}, {}
        for metric in METRICS:
            values = {init: [by_init[init][s].mean(threshold, metric) for s in seeds] for init in INITS}
            spreads[metric] = {init: spread(values[init]) for init in INITS}
            differences[metric] = paired_difference(values["tokenunify"], values["scratch"])
        summaries.append(BudgetSummary(budget, spreads, differences, verdict(differences["voi_sum"])))
    return summaries


def probe_summary(
    probe: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]],
) -> dict[str, dict[str, Spread]]:
    """ROC AUC spread over seeds per encoder and level set."""
    return {
        kind: {name: spread([score["auc"] for score in scores]) for name, scores in by_level.items()}
        for kind, by_level in probe.items()
    }


def headline(summaries: Sequence[BudgetSummary]) -> list[str]:
    """One sentence per budget: the VOI sum difference, its interval and the verdict."""
    lines = []
    for s in summaries:
        d = s.differences["voi_sum"]
        lines.append(
            f"{crops_label(s.budget)}: TokenUnify-initialised minus scratch VOI sum {d.mean:+.3f}, "
            f"{100 * d.confidence:.0f}% CI [{d.ci_low:+.3f}, {d.ci_high:+.3f}] over {d.n} seeds "
            f"(pretrained lower in {d.a_lower} of {d.n}): {s.verdict}"
        )
    return lines


def _mean_sd(value: Spread) -> str:
    return f"{value.mean:.3f}" if math.isnan(value.sd) else f"{value.mean:.3f} ± {value.sd:.3f}"


def _interval(d: PairedDifference) -> str:
    return f"{d.mean:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"


def summary_table(
    summaries: Sequence[BudgetSummary],
    baselines: Mapping[str, list[dict[float, SegmentationScores]]],
    threshold: float,
) -> list[tuple[str, ...]]:
    """The label-efficiency table (header first): per budget both initialisations (mean ± sd over
    seeds) and their paired difference with its interval; then the baselines (mean over volumes)."""
    rows = [("labelled crops", "initialisation", "VOI sum", "ARAND")]
    for s in summaries:
        for init in INITS:
            rows.append(
                (
                    str(s.budget),
                    INIT_LABELS[init],
                    _mean_sd(s.spreads["voi_sum"][init]),
                    _mean_sd(s.spreads["arand"][init]),
                )
            )
        rows.append(
            (
                str(s.budget),
                "difference (95% CI)",
                _interval(s.differences["voi_sum"]),
                _interval(s.differences["arand"]),
            )
        )
    for key, volumes in baselines.items():
        voi = np.mean([v[threshold].voi_sum for v in volumes])
        arand = np.mean([v[threshold].arand for v in volumes])
        rows.append(("-", BASELINE_LABELS[key], f"{voi:.3f}", f"{arand:.3f}"))
    return rows


def probe_table(summary: Mapping[str, Mapping[str, Spread]]) -> list[tuple[str, ...]]:
    """Probe ROC AUC (mean ± sd over seeds) per encoder and level set (header first)."""
    rows = [("features", *(name.replace("_", " ") for name in LEVEL_SETS))]
    for kind, by_level in summary.items():
        if kind == "raw_intensity":
            cells = ["-"] * (len(LEVEL_SETS) - 1) + [_mean_sd(by_level["raw"])]
        else:
            cells = [_mean_sd(by_level[name]) for name in LEVEL_SETS]
        rows.append((PROBE_LABELS[kind], *cells))
    return rows


# ----------------------------------------------------------------------------------------------- files


def run_rows(runs: Sequence[RunResult], threshold: float) -> list[dict[str, Any]]:
    """results.csv: one row per run, scores averaged over the test volumes."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"initialisation": run.init, "labelled_crops": run.budget, "seed": run.seed}
        for metric in ("voi_split", "voi_merge", "voi_sum", "arand", "n_segments"):
            row[metric] = run.mean(threshold, metric)
        row["final_loss"] = run.final_loss
        row["seconds"] = round(run.seconds, 1)
        rows.append(row)
    return rows


def summary_rows(summaries: Sequence[BudgetSummary]) -> list[dict[str, Any]]:
    """summary.csv: one row per budget."""
    rows = []
    for s in summaries:
        row: dict[str, Any] = {"labelled_crops": s.budget, "seeds": s.differences["voi_sum"].n}
        for metric in METRICS:
            for init in INITS:
                row[f"{init}_{metric}_mean"] = s.spreads[metric][init].mean
                row[f"{init}_{metric}_sd"] = s.spreads[metric][init].sd
            d = s.differences[metric]
            row[f"difference_{metric}_mean"] = d.mean
            row[f"difference_{metric}_ci_low"] = d.ci_low
            row[f"difference_{metric}_ci_high"] = d.ci_high
        row["verdict"] = s.verdict
        rows.append(row)
    return rows


def probe_rows(summary: Mapping[str, Mapping[str, Spread]]) -> list[dict[str, Any]]:
    """probe.csv: one row per encoder and level set."""
    return [
        {"features": kind, "levels": name, "auc_mean": value.mean, "auc_sd": value.sd, "seeds": value.n}
        for kind, by_level in summary.items()
        for name, value in by_level.items()
    ]


def write_tables(
    output: Path, tables: Mapping[str, list[dict[str, Any]]], results: Mapping[str, Any]
) -> dict[str, Path]:
    """``<name>.csv`` per table and results.json."""
    files = {f"{name}_csv": write_csv_atomic(rows, output / f"{name}.csv") for name, rows in tables.items()}
    files["results_json"] = write_json_atomic(output / "results.json", results)
    return files


# --------------------------------------------------------------------------------------------- figures


def _figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot: no global backend, no registry)."""
    require("matplotlib", "em", "the demo's figures")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(figure)
    return figure


def save_label_efficiency_figure(
    path: Path,
    runs: Sequence[RunResult],
    summaries: Sequence[BudgetSummary],
    baselines: Mapping[str, list[dict[float, SegmentationScores]]],
    threshold: float,
) -> Path:
    """VOI sum and ARAND against the labelled budget, one line per initialisation (mean, with every
    seed as a dot), and the paired difference with its interval."""
    fig = _figure((14, 4.2))
    axes = fig.subplots(1, 3)
    budgets = [s.budget for s in summaries]
    colors = {"scratch": "tab:gray", "tokenunify": "tab:blue"}  # as the probe figure's encoders
    for ax, metric, title in zip(
        axes[:2], METRICS, ("VOI sum (lower is better)", "ARAND (lower is better)"), strict=True
    ):
        for init in INITS:
            means = [s.spreads[metric][init].mean for s in summaries]
            ax.plot(budgets, means, "-o", color=colors[init], label=INIT_LABELS[init])
            dots = [(r.budget, r.mean(threshold, metric)) for r in runs if r.init == init]
            ax.scatter(*zip(*dots, strict=True), s=12, color=colors[init], alpha=0.45)
        ceiling = np.mean([getattr(v[threshold], metric) for v in baselines["true_affinities"]])
        ax.axhline(ceiling, color="tab:green", linestyle=":", label=BASELINE_LABELS["true_affinities"])
        ax.set(xscale="log", xlabel="labelled crops", title=title)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.legend(fontsize=8)
    ax = axes[2]
    for offset, metric in zip((0.97, 1.03), METRICS, strict=True):
        d = [s.differences[metric] for s in summaries]
        low = [x.mean - x.ci_low for x in d]
        high = [x.ci_high - x.mean for x in d]
        ax.errorbar(
            [b * offset for b in budgets],
            [x.mean for x in d],
            yerr=[low, high],
            fmt="o",
            capsize=4,
            label=metric,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xscale="log", xlabel="labelled crops", title="TokenUnify - scratch, 95% CI (< 0: helps)")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def save_probe_figure(path: Path, summary: Mapping[str, Mapping[str, Spread]]) -> Path:
    """Probe ROC AUC per level set, one bar per encoder (mean and sd over seeds), raw intensity as a line."""
    fig = _figure((7, 4))
    ax = fig.subplots()
    positions = np.arange(len(LEVEL_SETS))
    for i, (kind, color) in enumerate((("random", "tab:gray"), ("tokenunify", "tab:blue"))):
        means = [summary[kind][name].mean for name in LEVEL_SETS]
        sds = [0.0 if math.isnan(summary[kind][name].sd) else summary[kind][name].sd for name in LEVEL_SETS]
        ax.bar(
            positions + (i - 0.5) * 0.38,
            means,
            0.38,
            yerr=sds,
            capsize=3,
            color=color,
            label=PROBE_LABELS[kind],
        )
    ax.axhline(
        summary["raw_intensity"]["raw"].mean,
        color="tab:red",
        linestyle="--",
        label=PROBE_LABELS["raw_intensity"],
    )
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xticks(positions, [name.replace("_", " ") for name in LEVEL_SETS])
    ax.set(
        ylim=(0.4, 1.0),
        ylabel="ROC AUC, boundary vs interior voxels",
        title="Linear probe on frozen encoder features",
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure_atomic(fig, path)
