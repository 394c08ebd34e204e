"""The demo's work as tasks: one pretraining, the fine-tuning runs (each scored on the test volumes
as soon as it ends) and the linear probe, run by ``jobs`` worker processes or, for one job, here.

The from-scratch runs do not need the pretrained encoder, so they start next to the pretraining;
the pretrained runs and the probe are queued when it ends. Every task is a fixed function of its
arguments (seeded, one torch thread), so results do not depend on ``jobs`` or on which worker ran
what. Workers report their steps through a queue to one progress bar here.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queue_module
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from seqvision.engine import LoopState
from seqvision.eval.em.affinity import affinity_targets
from seqvision.eval.em.checkpoint import load_segmenter
from seqvision.eval.em.figure import save_segmentation_figure
from seqvision.eval.em.finetune import build_segmenter
from seqvision.eval.em.finetune import finetune as finetune_segmenter
from seqvision.eval.em.infer import predict_affinities
from seqvision.eval.em.metrics import SegmentationScores, evaluate_segmentation
from seqvision.eval.em.postprocess import agglomerate, watershed_fragments
from seqvision.eval.em.probe import (
    LinearProbe,
    boundary_voxels,
    encoder_features,
    probe_scores,
    sample_balanced,
    stack_levels,
)
from seqvision.pretrain.train import ENCODER_FILE, pretrain

__all__ = [
    "INITS",
    "INIT_LABELS",
    "LEVEL_SETS",
    "PretrainSpec",
    "ProbeSpec",
    "RunResult",
    "RunSpec",
    "baseline_scores",
    "crops_label",
    "execute",
    "score_segmentation",
]

_logger = logging.getLogger(__name__)

INITS = ("scratch", "tokenunify")  # the two initialisations, in table order
INIT_LABELS = {"scratch": "scratch", "tokenunify": "TokenUnify-initialised"}


def crops_label(budget: int) -> str:
    """'1 labelled crop', '4 labelled crops'."""
    return f"{budget} labelled crop{'s' if budget != 1 else ''}"


# Where this process reports finished training steps: the progress bar's update (one job), a
# worker's queue (several), or nowhere.
_report: Callable[[int], Any] | None = None


def _step_reporter(state: LoopState, logged: dict[str, float]) -> None:
    if _report is not None:
        _report(1)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(path: Path) -> np.ndarray:
    return np.load(path)


# ---------------------------------------------------------------------------------------- pretraining


@dataclass(frozen=True)
class PretrainSpec:
    """The one pretraining run: a full config mapping (corpus paths filled in) and its folder."""

    config: Mapping[str, Any]
    output_dir: Path


def pretrain_task(spec: PretrainSpec) -> tuple[Path, float | None, float]:
    """Pretrain; returns the encoder export, the last logged loss and the wall time in seconds."""
    start, last = time.perf_counter(), {}

    def on_step_end(state: LoopState, logged: dict[str, float]) -> None:
        last.update(logged)
        _step_reporter(state, logged)

    result = pretrain(spec.config, output_dir=spec.output_dir, on_step_end=on_step_end)
    shutil.rmtree(result.output_dir / "checkpoints", ignore_errors=True)  # the export is what is used
    return result.output_dir / ENCODER_FILE, last.get("loss"), time.perf_counter() - start


# ------------------------------------------------------------------------------- fine-tuning + scoring


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run and how to score it.

    ``config`` is a full fine-tuning config mapping: its ``data.raw`` / ``data.labels`` are the
    run's labelled crops and ``model.pretrained_encoder`` its initialisation.
    """

    init: str  # 'scratch' or 'tokenunify'
    budget: int
    seed: int
    config: Mapping[str, Any]
    output_dir: Path
    tests: Sequence[tuple[Path, Path]]  # (raw, labels) .npy files
    window: tuple[int, int, int]
    overlap: float
    thresholds: tuple[float, ...]
    figure: Path | None = None  # where to draw the first test volume's segmentation, if anywhere


@dataclass
class RunResult:
    """A fine-tuning run's scores: one ``{threshold: scores}`` per test volume."""

    init: str
    budget: int
    seed: int
    scores: list[dict[float, SegmentationScores]]
    final_loss: float | None
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)

    def mean(self, threshold: float, metric: str) -> float:
        """A metric ('voi_sum', 'arand', ...) at ``threshold``, averaged over the test volumes."""
        return float(np.mean([getattr(volume[threshold], metric) for volume in self.scores]))


def score_segmentation(
    affinities: np.ndarray, labels: np.ndarray, thresholds: Sequence[float]
) -> tuple[list[np.ndarray], dict[float, SegmentationScores]]:
    """Watershed + agglomeration at every threshold, each scored against ``labels``: the
    segmentations uint64 (Z, Y, X) and ``{threshold: scores}``."""
    fragments = watershed_fragments(affinities)
    segmentations = agglomerate(affinities, fragments, thresholds)
    scores = {t: evaluate_segmentation(s, labels) for t, s in zip(thresholds, segmentations, strict=True)}
    return segmentations, scores


def finetune_task(spec: RunSpec) -> RunResult:
    """Fine-tune, then segment and score every test volume (and draw the first if asked)."""
    start, last = time.perf_counter(), {}

    def on_step_end(state: LoopState, logged: dict[str, float]) -> None:
        last.update(logged)
        _step_reporter(state, logged)

    path = finetune_segmenter(spec.config, output_dir=spec.output_dir, on_step_end=on_step_end)
    shutil.rmtree(spec.output_dir / "checkpoints", ignore_errors=True)  # the segmenter file is what is used
    model = load_segmenter(path, device=_device())
    scores, files = [], {}
    for index, (raw_path, labels_path) in enumerate(spec.tests):
        raw, labels = _load(raw_path), _load(labels_path)
        affinities = predict_affinities(model, raw, spec.window, spec.overlap, progress=False)
        segmentations, by_threshold = score_segmentation(affinities, labels, spec.thresholds)
        scores.append(by_threshold)
        if spec.figure is not None and index == 0:
            voi = by_threshold[spec.thresholds[0]].voi_sum
            title = (
                f"{spec.init}, {spec.budget} labelled crop(s), seed {spec.seed}: test volume 0, VOI {voi:.3f}"
            )
            files["figure"] = save_segmentation_figure(
                spec.figure, raw, affinities, segmentations[0], labels, title=title
            )
    return RunResult(
        spec.init, spec.budget, spec.seed, scores, last.get("loss"), time.perf_counter() - start, files
    )


# ---------------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class ProbeSpec:
    """The linear probe: fitted on ``train`` (a labelled volume's ``region``), scored on ``tests``.

    ``model`` is the fine-tuning config's model section (the encoder architecture); the random
    encoder of seed s is the one the from-scratch run of seed s starts from.
    """

    model: Mapping[str, Any]
    encoder: Path  # the pretrained export
    train: tuple[Path, Path]
    region: tuple[int, int, int]  # the corner of ``train`` the probe is fitted on
    tests: Sequence[tuple[Path, Path]]
    seeds: tuple[int, ...]
    voxels: int  # per class


# L2 penalty of the probes on standardised features. The deepest level (stride 16) lets a probe
# memorise the training volume's cell layout; 1e-2 was picked on a random encoder alone, so that
# the probe of all levels together is not below its best single level on held-out volumes.
PROBE_WEIGHT_DECAY = 1e-2
LEVEL_SETS = ("level_1", "level_2", "level_3", "level_4", "all")  # encoder stages 1-4 (stride 2-16), all


def _encoder(model: Mapping[str, Any], pretrained: Path | None, seed: int) -> torch.nn.Module:
    set_seed(seed)  # as fine-tuning's prepare: the same random weights as that seed's scratch run
    _, segmenter = build_segmenter({**model, "pretrained_encoder": pretrained})
    return segmenter.encoder


def _feature_rows(levels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """(N, C) voxel rows per level set of ``LEVEL_SETS``."""
    rows = {f"level_{i + 1}": stack_levels(levels, [i]) for i in range(len(levels))}
    rows["all"] = stack_levels(levels)
    return rows


def _intensity(raw: np.ndarray) -> torch.Tensor:
    """Raw uint8 (Z, Y, X) -> (Z * Y * X, 1) voxel rows in [0, 1]."""
    return torch.from_numpy(raw.reshape(-1, 1).astype(np.float32) / 255.0)


def probe_task(spec: ProbeSpec) -> tuple[dict[str, dict[str, list[dict[str, float | int]]]], float]:
    """Fit and score the probes: ``{encoder: {level set: [scores per seed]}}``, encoders
    'raw_intensity' (level set 'raw'), 'random' and 'tokenunify'; and the wall time in seconds."""
    start = time.perf_counter()
    region = tuple(slice(0, s) for s in spec.region)
    train_raw = _load(spec.train[0])[region]
    train_target = boundary_voxels(_load(spec.train[1])[region]).ravel()
    samples = {seed: sample_balanced(train_target, spec.voxels, seed) for seed in spec.seeds}
    raws = [_load(raw) for raw, _ in spec.tests]
    targets = [boundary_voxels(_load(labels)) for _, labels in spec.tests]

    def fit(features: torch.Tensor, seed: int) -> LinearProbe:
        sample = samples[seed]
        target = torch.from_numpy(train_target[sample])
        return LinearProbe.fit(features[sample], target, weight_decay=PROBE_WEIGHT_DECAY)

    results: dict[str, dict[str, list]] = {"raw_intensity": {"raw": []}, "random": {}, "tokenunify": {}}
    for seed in spec.seeds:
        probe = fit(_intensity(train_raw), seed)
        logits = [probe.logits(_intensity(raw)) for raw in raws]
        results["raw_intensity"]["raw"].append(_pooled_scores(logits, targets))
    # A random encoder is probed on its own seed's voxels, the pretrained one on every seed's.
    encoders = [("random", _encoder(spec.model, None, seed), [seed]) for seed in spec.seeds]
    encoders.append(("tokenunify", _encoder(spec.model, spec.encoder, 0), list(spec.seeds)))
    for kind, encoder, seeds in encoders:
        rows = _feature_rows(encoder_features(encoder, train_raw))
        probes = {(seed, name): fit(features, seed) for seed in seeds for name, features in rows.items()}
        del rows
        logits: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in probes}
        for raw in raws:  # one test volume's features at a time: they are large
            rows = _feature_rows(encoder_features(encoder, raw))
            for (seed, name), probe in probes.items():
                logits[seed, name].append(probe.logits(rows[name]))
            del rows
        for (_, name), volume_logits in logits.items():
            results[kind].setdefault(name, []).append(_pooled_scores(volume_logits, targets))
    return results, time.perf_counter() - start


def _pooled_scores(logits: list[torch.Tensor], targets: list[np.ndarray]) -> dict[str, float | int]:
    """Scores over the voxels of all test volumes together."""
    return probe_scores(torch.cat(logits), np.concatenate([t.ravel() for t in targets])).to_dict()


# ------------------------------------------------------------------------------------------ execution


def baseline_scores(
    tests: Sequence[tuple[Path, Path]], thresholds: Sequence[float]
) -> dict[str, list[dict[float, SegmentationScores]]]:
    """Per test volume: everything one segment, and the true affinities through the same
    post-processing (the ceiling of what better affinities can give)."""
    one_segment, ceiling = [], []
    for _, labels_path in tests:
        labels = _load(labels_path)
        single = evaluate_segmentation(np.ones_like(labels), labels)
        one_segment.append(dict.fromkeys(thresholds, single))
        true_affinities, _ = affinity_targets(labels)
        ceiling.append(score_segmentation(true_affinities, labels, thresholds)[1])
    return {"one_segment": one_segment, "true_affinities": ceiling}


class _Inline:
    """An executor for one job: runs each task when it is submitted, in this process."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


def _init_worker(reports: Any, threads: int) -> None:
    global _report
    _report = reports.put
    torch.set_num_threads(threads)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The runs' own messages (every logged step of 18 runs): a worker does not show them either.
_RUN_LOGGERS = (
    "seqvision.engine",
    "seqvision.pretrain",
    "seqvision.eval.em.finetune",
    "seqvision.eval.em.checkpoint",
)


@contextmanager
def _quiet_runs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _RUN_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextmanager
def _executor(jobs: int, threads: int, bar: tqdm) -> Iterator[tuple[Any, Callable[[], None]]]:
    """An executor and a function that moves the workers' step reports onto ``bar``."""
    global _report
    if jobs == 1:
        _report = bar.update
        try:
            with _torch_threads(threads), _quiet_runs():
                yield _Inline(), lambda: None
        finally:
            _report = None
        return
    # spawn, not fork: a forked child inherits torch's thread pools and locks in whatever state.
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()

    def drain() -> None:
        while True:
            try:
                bar.update(reports.get_nowait())
            except queue_module.Empty:
                return

    pool = ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(reports, threads)
    )
    try:
        yield pool, drain
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        drain()


@dataclass
class Executed:
    """What ``execute`` returns."""

    encoder: Path
    pretrain_loss: float | None
    runs: list[RunResult]
    probe: dict[str, dict[str, list[dict[str, float | int]]]]
    seconds: dict[str, float]  # each task's own wall time: pretrain, probe, finetune (sum over runs)


def execute(
    pretraining: PretrainSpec,
    scratch: Sequence[RunSpec],
    pretrained: Callable[[Path], list[RunSpec]],
    probe: Callable[[Path], ProbeSpec],
    *,
    jobs: int,
    threads: int,
    total_steps: int,
) -> Executed:
    """Run everything on ``jobs`` workers (``module doc``); ``pretrained`` and ``probe`` build their
    specs from the encoder export once the pretraining has written it."""
    runs: list[RunResult] = []
    seconds: dict[str, float] = {"finetune": 0.0}
    outcome: dict[str, Any] = {}
    with tqdm(total=total_steps, desc="demo", unit="step") as bar:
        bar.set_postfix(runs=f"0/{len(scratch) * 2}")
        with _executor(jobs, threads, bar) as (pool, drain):
            pretrain_future = pool.submit(pretrain_task, pretraining)
            probe_future: Future | None = None
            waiting = {pretrain_future, *(pool.submit(finetune_task, spec) for spec in scratch)}
            while waiting:
                done, waiting = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    if future is pretrain_future:
                        encoder, outcome["pretrain_loss"], seconds["pretrain"] = future.result()
                        outcome["encoder"] = encoder
                        _logger.info("pretraining done in %.0f s; encoder %s", seconds["pretrain"], encoder)
                        probe_future = pool.submit(probe_task, probe(encoder))
                        waiting |= {
                            probe_future,
                            *(pool.submit(finetune_task, s) for s in pretrained(encoder)),
                        }
                    elif future is probe_future:
                        outcome["probe"], seconds["probe"] = future.result()
                    else:
                        result = future.result()
                        runs.append(result)
                        seconds["finetune"] += result.seconds
                        bar.set_postfix(runs=f"{len(runs)}/{len(scratch) * 2}")
                        _logger.info(
                            "fine-tuned %s on %d crop(s), seed %d, in %.0f s",
                            result.init,
                            result.budget,
                            result.seed,
                            result.seconds,
                        )
    order = {init: i for i, init in enumerate(INITS)}
    runs.sort(key=lambda r: (r.budget, order[r.init], r.seed))
    return Executed(outcome["encoder"], outcome.get("pretrain_loss"), runs, outcome["probe"], seconds)
