"""``seqvision demo``: TokenUnify pretraining vs training from scratch, end to end, on a CPU in minutes.

On synthetic EM volumes (``synthetic_em_volume``; nothing to download) ``run_demo``

1. pretrains a tiny EM encoder with TokenUnify's three objectives on the raw training volume
   (``configs/pretrain/tokenunify_em_tiny.yaml``, fewer steps);
2. fine-tunes the affinity segmenter (``configs/finetune/em_seg_tiny.yaml``) on the training
   volume's neuron ids, its encoder initialised from that pretraining;
3. fine-tunes the same segmenter from random weights, with the same steps, data and seed (the
   decoder starts from identical weights: the runs differ only in the encoder's initialisation);
4. segments a held-out volume (another seed) with both: sliding-window affinities, watershed
   fragments and agglomeration, as ``seqvision segment`` does;
5. scores both against the held-out ground truth (VOI split / merge / sum, ARAND) next to the
   trivial baseline (everything one segment) and the ceiling of the post-processing (the true
   affinities), and writes ``results.json``, ``results.csv`` and one PNG per model into the output
   folder, every file atomically.

The sizes and step counts (``DemoSettings``) are chosen for the time: ``FULL`` takes about 9
minutes on 2 CPU cores, ``QUICK`` under one; docs/EM.md has what they give.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqvision.data.synthetic import synthetic_em_volume
from seqvision.engine import LoopState
from seqvision.eval.em.affinity import affinity_targets
from seqvision.eval.em.checkpoint import load_segmenter
from seqvision.eval.em.figure import save_segmentation_figure
from seqvision.eval.em.finetune import finetune as finetune_segmenter
from seqvision.eval.em.infer import predict_affinities
from seqvision.eval.em.metrics import SegmentationScores, evaluate_segmentation
from seqvision.eval.em.postprocess import agglomerate, watershed_fragments
from seqvision.pretrain.train import ENCODER_FILE, pretrain
from seqvision.utils.io import atomic_path, write_json_atomic

__all__ = ["FULL", "QUICK", "DemoResult", "DemoRow", "DemoSettings", "default_config", "run_demo"]

_logger = logging.getLogger(__name__)

_CONFIGS = Path(__file__).resolve().parents[3] / "configs"  # the repository root
PRETRAIN_CONFIG = "pretrain/tokenunify_em_tiny.yaml"
FINETUNE_CONFIG = "finetune/em_seg_tiny.yaml"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
# One intra-op thread. On 2 cores `--quick` took 42 s with one thread and 33 s with two when the
# machine was idle, but 42 s and 319 s while another process kept one core busy: two threads wait
# for each other at every OpenMP barrier of these small operators, and a busy neighbour makes every
# wait long. `--threads 2` is for a machine known to be idle (docs/EM.md).
_DEFAULT_THREADS = 1
_LABELS = {
    "one_segment": "all one segment",
    "scratch": "scratch",
    "tokenunify": "TokenUnify-initialised",
    "true_affinities": "true affinities (ceiling)",
}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of ``run_demo``; volumes (Z, Y, X) in voxels at CREMI's 40 x 4 x 4 nm.

    Args:
        train_shape: the synthetic training volume: its raw for pretraining, raw and neuron ids for
            fine-tuning.
        test_shape: the held-out synthetic volume that is segmented and scored (seed + 1).
        pretrain_steps: TokenUnify steps (the tiny config's crops, 16 x 32 x 32, batch 2).
        finetune_steps: fine-tuning steps of each segmenter (batch 2).
        finetune_crop: fine-tuning crops (divisible by 16).
        window: the sliding window of inference (divisible by 16).
        overlap: the windows' overlap, a fraction of the window.
        thresholds: agglomeration thresholds scored; the first is the table's.
        threads: torch's intra-op threads during the run (restored after).
    """

    train_shape: tuple[int, int, int]
    test_shape: tuple[int, int, int]
    pretrain_steps: int
    finetune_steps: int
    finetune_crop: tuple[int, int, int] = (16, 32, 32)
    window: tuple[int, int, int] = (16, 64, 64)
    overlap: float = 0.25
    thresholds: tuple[float, ...] = (0.5, 0.3, 0.7)
    threads: int = _DEFAULT_THREADS


# Measured on 2 Xeon cores at 2.5 GHz, one thread (docs/EM.md): FULL 521 s, QUICK 42 s.
FULL = DemoSettings(
    train_shape=(32, 128, 128), test_shape=(32, 128, 128), pretrain_steps=300, finetune_steps=300
)
QUICK = DemoSettings(train_shape=(16, 64, 64), test_shape=(16, 64, 64), pretrain_steps=20, finetune_steps=20)


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table: a segmentation of the held-out volume and its scores."""

    key: str  # stable name in results.json / .csv: one_segment, scratch, tokenunify, true_affinities
    label: str  # how the table shows it
    scores: SegmentationScores
    by_threshold: dict[float, SegmentationScores] = field(default_factory=dict)
    final_loss: float | None = None  # the fine-tuning loss of the last logged steps

    def to_dict(self) -> dict[str, Any]:
        values = {"key": self.key, "label": self.label, **self.scores.to_dict()}
        values["final_loss"] = self.final_loss
        values["by_threshold"] = {f"{t:g}": s.to_dict() for t, s in self.by_threshold.items()}
        return values


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote."""

    rows: list[DemoRow]
    output_dir: Path
    files: dict[str, Path]  # results_json, results_csv, figure_scratch, figure_tokenunify
    seconds: dict[str, float]  # wall time per stage and "total"
    settings: DemoSettings
    seed: int


def default_config(name: str) -> Path:
    """A config of the repository's ``configs/`` folder (``name`` relative to it)."""
    path = _CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such config. The demo reads the repository's configs/ (a source checkout "
            "installed with pip install -e .); pass pretrain_config= and finetune_config= otherwise"
        )
    return path


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads, restoring torch's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stages:
    """Logs each stage as it starts and records its wall time."""

    def __init__(self, count: int):
        self.count, self.index, self.seconds = count, 0, {}

    @contextmanager
    def __call__(self, key: str, description: str) -> Iterator[None]:
        self.index += 1
        _logger.info("demo stage %d/%d: %s", self.index, self.count, description)
        start = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - start
        _logger.info("demo stage %d/%d done in %.1f s", self.index, self.count, self.seconds[key])


def _run_overrides(steps: int, seed: int, shape: tuple[int, int, int]) -> list[str]:
    """Overrides shared by the demo's training runs: budget, data, seed, and only a final checkpoint."""
    return [
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"train.save_every={steps}",
        "train.keep_last=1",
        "train.log_with=null",  # the loop's log lines and the results file say what is needed
        f"data.synthetic.shape=[{','.join(map(str, shape))}]",
        f"data.synthetic.seed={seed}",
    ]


def _finetune(
    config: str | os.PathLike | Mapping[str, Any],
    output_dir: Path,
    settings: DemoSettings,
    seed: int,
    encoder: Path | None,
) -> tuple[Path, float | None]:
    """Fine-tune one segmenter; returns its checkpoint and the loss of its last logged steps."""
    last: dict[str, float] = {}

    def keep_last_log(state: LoopState, logged: dict[str, float]) -> None:
        last.update(logged)

    overrides = _run_overrides(settings.finetune_steps, seed, settings.train_shape)
    overrides += [
        f"data.crop_size=[{','.join(map(str, settings.finetune_crop))}]",
        f"model.pretrained_encoder={'null' if encoder is None else encoder}",
    ]
    path = finetune_segmenter(config, output_dir=output_dir, overrides=overrides, on_step_end=keep_last_log)
    return path, last.get("loss")


def _segment(
    affinities: np.ndarray, labels: np.ndarray, thresholds: tuple[float, ...]
) -> tuple[list[np.ndarray], dict[float, SegmentationScores]]:
    """Watershed + agglomeration at every threshold, each scored against ``labels``."""
    fragments = watershed_fragments(affinities)
    segmentations = agglomerate(affinities, fragments, thresholds)
    scores = {t: evaluate_segmentation(s, labels) for t, s in zip(thresholds, segmentations, strict=True)}
    return segmentations, scores


def _write_csv(path: Path, rows: list[DemoRow]) -> Path:
    columns = ["key", "label", "voi_split", "voi_merge", "voi_sum", "arand", "n_segments", "final_loss"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(row.to_dict() for row in rows)
    with atomic_path(path) as temporary:
        temporary.write_text(buffer.getvalue())
    return path


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(threads: int) -> dict[str, Any]:
    """Where the timings were taken."""
    return {
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def run_demo(
    output_dir: str | os.PathLike = "seqvision_demo",
    *,
    quick: bool = False,
    seed: int = 0,
    settings: DemoSettings | None = None,
    pretrain_config: str | os.PathLike | Mapping[str, Any] | None = None,
    finetune_config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> DemoResult:
    """Pretrain, fine-tune from the pretrained encoder and from scratch, segment and score (module doc).

    Args:
        output_dir: where the runs (``pretrain/``, ``finetune_tokenunify/``, ``finetune_scratch/``)
            and the results (``results.json``, ``results.csv``, ``segmentation_<model>.png``) go;
            created if needed. Earlier results there are replaced, each file atomically.
        quick: the ``QUICK`` settings (about a minute) instead of ``FULL`` (about ten).
        seed: the training volume's and the training runs' seed; the held-out volume uses seed + 1.
        settings: explicit sizes and budgets, replacing ``quick``'s choice.
        pretrain_config, finetune_config: the configs the runs start from (default: the
            repository's tiny ones); their encoder architectures must match.

    Returns:
        a ``DemoResult``: the table's rows (all one segment, scratch, TokenUnify-initialised, true
        affinities), the files written and the wall time of every stage.
    """
    settings = settings or (QUICK if quick else FULL)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    pretrain_config = pretrain_config or default_config(PRETRAIN_CONFIG)
    finetune_config = finetune_config or default_config(FINETUNE_CONFIG)
    stages = _Stages(4)
    start = time.perf_counter()
    with _torch_threads(settings.threads):
        with stages("pretrain", f"TokenUnify pretraining, {settings.pretrain_steps} steps"):
            overrides = _run_overrides(settings.pretrain_steps, seed, settings.train_shape)
            run = pretrain(pretrain_config, output_dir=output / "pretrain", overrides=overrides)
            encoder = run.output_dir / ENCODER_FILE
        trained = {}
        for key, init in (("tokenunify", encoder), ("scratch", None)):
            what = "the pretrained encoder" if init else "random weights"
            with stages(f"finetune_{key}", f"fine-tuning from {what}, {settings.finetune_steps} steps"):
                trained[key] = _finetune(finetune_config, output / f"finetune_{key}", settings, seed, init)
        with stages("segment", f"segmenting a held-out volume {settings.test_shape} (seed {seed + 1})"):
            raw, labels = synthetic_em_volume(settings.test_shape, seed=seed + 1)
            rows, predictions = _score_all(raw, labels, trained, settings)
    seconds = {**stages.seconds, "total": time.perf_counter() - start}
    files = _write_figures(output, raw, labels, rows, predictions, seed)
    files.update(_write_tables(output, rows, seconds, settings, seed))
    _logger.info("demo finished in %.1f s; results in %s", time.perf_counter() - start, output)
    return DemoResult(rows, output, files, seconds, settings, seed)


def _score_all(
    raw: np.ndarray,
    labels: np.ndarray,
    trained: Mapping[str, tuple[Path, float | None]],
    settings: DemoSettings,
) -> tuple[list[DemoRow], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The table's rows for the held-out volume: raw uint8 (Z, Y, X), labels uint64 (Z, Y, X).

    Returns the rows and, per trained model, its affinities float32 (3, Z, Y, X) and its
    segmentation uint64 (Z, Y, X) at the table's threshold.
    """
    threshold = settings.thresholds[0]
    one_segment = evaluate_segmentation(np.ones_like(labels), labels)
    rows = [DemoRow("one_segment", _LABELS["one_segment"], one_segment)]
    predictions = {}
    for key in ("scratch", "tokenunify"):
        path, loss = trained[key]
        model = load_segmenter(path, device="cuda" if torch.cuda.is_available() else "cpu")
        affinities = predict_affinities(model, raw, settings.window, settings.overlap)
        segmentations, scores = _segment(affinities, labels, settings.thresholds)
        rows.append(DemoRow(key, _LABELS[key], scores[threshold], scores, loss))
        predictions[key] = (affinities, segmentations[0])
    true_affinities, _ = affinity_targets(labels)
    _, scores = _segment(true_affinities, labels, settings.thresholds)
    rows.append(DemoRow("true_affinities", _LABELS["true_affinities"], scores[threshold], scores))
    return rows, predictions


def _write_figures(
    output: Path,
    raw: np.ndarray,
    labels: np.ndarray,
    rows: list[DemoRow],
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    seed: int,
) -> dict[str, Path]:
    """One PNG per trained model: raw, its affinities, its segmentation, the ground truth."""
    files = {}
    voi = {row.key: row.scores.voi_sum for row in rows}
    for key, (affinities, segmentation) in predictions.items():
        title = f"{_LABELS[key]}, held-out volume (seed {seed + 1}): VOI {voi[key]:.3f}"
        path = output / f"segmentation_{key}.png"
        save_segmentation_figure(path, raw, affinities, segmentation, labels, title=title)
        files[f"figure_{key}"] = path
    return files


def _write_tables(
    output: Path, rows: list[DemoRow], seconds: Mapping[str, float], settings: DemoSettings, seed: int
) -> dict[str, Path]:
    """results.csv (the table) and results.json (the table, every threshold, settings, timings)."""
    summary = {
        "rows": [row.to_dict() for row in rows],
        "table_threshold": settings.thresholds[0],
        "settings": asdict(settings),
        "seed": seed,
        "test_seed": seed + 1,
        "seconds": dict(seconds),
        "machine": _machine(settings.threads),
    }
    return {
        "results_csv": _write_csv(output / RESULTS_CSV, rows),
        "results_json": write_json_atomic(output / RESULTS_JSON, summary),
    }
