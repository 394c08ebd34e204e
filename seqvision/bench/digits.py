"""An accuracy comparison on real data that runs on a CPU: scikit-learn's handwritten digits at 32x32.

``run_digits_comparison`` trains every model of ``MODELS`` from scratch with ONE shared recipe on
a fixed split of scikit-learn's bundled digits, for several seeds, through the shared training loop
(``seqvision.engine.train`` with ``ClassifierWithLoss``), scores each run on the test split
(``gather_outputs`` + ``classification_report``) and judges every seqvision backbone against the
best timm peer of its size class. Behind ``seqvision bench digits``.

Data (``load_digits_split``, ``build_digits_datasets``):
    1,797 real 8x8 scans (values 0..16) from ``sklearn.datasets.load_digits`` (shipped with
    scikit-learn, no download). Fixed stratified split: ``train_test_split(indices, test_size=0.25,
    stratify=labels, random_state=0)`` -> 1,347 train / 450 test images, every class in both in the
    proportions of the whole set. Pixels / 16 -> [0, 1], resized to 32x32 (``F.interpolate``,
    bilinear, ``align_corners=False``), standardised with the mean and std of the TRAIN split (one
    scalar each: the scans are grey), replicated to 3 channels. No augmentation: every item is a
    fixed tensor, so the data a run sees depends only on its seed (which orders the batches).

Models (``MODELS``): all from scratch (``pretrained=False``, ``num_classes=10``) and configured for
32x32 inputs with comparable token counts: the patch models (ViR, LightNet, Vim, ViT, DeiT) with
``img_size=32, patch_size=4`` (an 8x8 grid of 64 tokens); VMamba's stem is a 4x4 patch convolution
(``patch_size=4``, its default), so its first stage also sees 8x8 tokens (then 4x4, 2x2, 1x1);
ResNet-18's stride-4 stem gives an 8x8 map too; ``lrcn_resnet18`` gets the (B, 3, 32, 32) images
as one-frame clips (its documented 4-D input) with the registered defaults (dropout 0.5, LSTM 256).

Size classes and peers (``SIZE_CLASSES``): the target is "each seqvision backbone within 1 point of
the best timm peer of its size". ViR-T, LightNet-T and Vim-T (5.4-6.8 M parameters) are judged
against ViT-T and DeiT-T (5.4 M); LRCN-ResNet-18 (12.0 M) and VMamba-T (22.1 M) against ResNet-18
(11.2 M), the only timm model of the comparison in their range. NOTE: timm's
``deit_tiny_patch16_224`` and ``vit_tiny_patch16_224`` are the same architecture (they differ in
their pretrained weights only), so from scratch with the same seed they are the same run on a CPU
(a determinism check); on a GPU, whose backward kernels add in varying order, they drift apart
over a long run like two seeds would.

Recipe (``Recipe``): AdamW (the loop's groups: no weight decay on biases, norms and
``no_weight_decay()`` names), one lr / weight decay / warmup / cosine schedule, batch size, number
of optimizer steps, gradient clipping and no label smoothing for every model; float32; one thread
by default (on a loaded 2-core machine two threads that wait for each other at every parallel
region are slower than one). The seed sets the initialisation (``set_seed`` before the model is
built) and the batch order (the loop's seedable sampler). The default budget, 1,000 steps of 64
(47 epochs), is where the timm peers' training loss has flattened; it costs seconds per run on a
GPU and 30-45 minutes per run for the ViT-size models on one CPU core (Vim-T: about a minute per
step there).

Where and how (``run_digits_comparison``): on the GPU when Accelerate picks one (CUDA unless
``ACCELERATE_USE_CPU=1``), else on the CPU; every run records its device. ``jobs`` trains several
runs at once in worker processes (the accuracies do not change; the time per step then includes
the sharing). Runs are written after each one finishes, and ``resume`` / ``runs_from`` reuse
finished runs of the same recipe, also from other machines; ``report_only`` tabulates what exists.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from seqvision.utils.checks import positive_int
from seqvision.utils.extras import require
from seqvision.utils.io import atomic_path, write_json_atomic

__all__ = [
    "DEFAULT_MODELS",
    "MODELS",
    "SIZE_CLASSES",
    "SMOKE",
    "DigitsDataset",
    "DigitsSplit",
    "ModelSpec",
    "Recipe",
    "RunResult",
    "add_arguments",
    "build_digits_datasets",
    "format_table",
    "judge",
    "load_digits_split",
    "main",
    "run_device",
    "run_digits_comparison",
    "run_from_args",
    "summarize_runs",
    "train_and_evaluate",
]

_LOG = logging.getLogger(__name__)

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_SIZE = 0.25
SPLIT_SEED = 0
TOLERANCE_POINTS = 1.0  # "within 1 point of the best timm peer of its size"


# ------------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelSpec:
    """How one model of the comparison is created.

    Attributes:
        family: 'seqvision' (judged) or 'timm' (a peer).
        size_class: the key of ``SIZE_CLASSES``; a seqvision model is judged against the timm models
            of its class.
        kwargs: ``timm.create_model`` arguments besides ``pretrained=False, num_classes=10``.
        tokens: what the model's first token mixer / stage sees at 32x32 (for the report).
    """

    family: str
    size_class: str
    kwargs: Mapping[str, Any]
    tokens: str


_PATCH4 = {"img_size": IMAGE_SIZE, "patch_size": 4}

MODELS: dict[str, ModelSpec] = {
    "vir_tiny_patch16_224": ModelSpec("seqvision", "tiny", _PATCH4, "8x8 patches + class token"),
    "lightnet_tiny_patch16_224": ModelSpec("seqvision", "tiny", _PATCH4, "8x8 patches"),
    "vim_tiny_patch16_224": ModelSpec("seqvision", "tiny", _PATCH4, "8x8 patches + class token"),
    "vmamba_tiny_224": ModelSpec("seqvision", "small", {}, "8x8 after the 4x4 stem, then 4x4/2x2/1x1"),
    "lrcn_resnet18": ModelSpec("seqvision", "small", {}, "ResNet-18 maps 8x8..1x1, LSTM over T=1"),
    "vit_tiny_patch16_224": ModelSpec("timm", "tiny", _PATCH4, "8x8 patches + class token"),
    "deit_tiny_patch16_224": ModelSpec("timm", "tiny", _PATCH4, "8x8 patches + class token"),
    "resnet18": ModelSpec("timm", "small", {}, "stride-4 stem: 8x8, then 4x4/2x2/1x1"),
}
DEFAULT_MODELS = tuple(MODELS)

SIZE_CLASSES = {
    "tiny": "ViT-Ti size (5-7 M parameters): judged against vit_tiny / deit_tiny",
    "small": "ResNet-18 size and up (11-22 M parameters): judged against resnet18",
}


def create_model(name: str) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name].kwargs)``."""
    import timm

    import seqvision  # noqa: F401  (registers the seqvision models in timm)

    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **MODELS[name].kwargs)


# -------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed split of scikit-learn's digits: raw 8x8 scans (0..16), labels and sorted indices."""

    images: np.ndarray  # (1797, 8, 8) float64
    labels: np.ndarray  # (1797,) int64
    train_indices: np.ndarray  # sorted
    test_indices: np.ndarray  # sorted
    test_size: float
    random_state: int

    def class_counts(self, part: str) -> list[int]:
        """Images per class (0..9) in 'train' or 'test'."""
        indices = {"train": self.train_indices, "test": self.test_indices}[part]
        return np.bincount(self.labels[indices], minlength=NUM_CLASSES).tolist()


def load_digits_split(test_size: float = TEST_SIZE, random_state: int = SPLIT_SEED) -> DigitsSplit:
    """Load the bundled digits and split them, stratified by class, with a fixed ``random_state``.

    The same arguments give the same indices on every call (the split is part of the benchmark's
    definition, not of a run's randomness).
    """
    load_digits = require("sklearn.datasets", "bench", "the digits benchmark").load_digits
    train_test_split = require("sklearn.model_selection", "bench", "the digits benchmark").train_test_split

    if not 0 < test_size < 1:
        raise ValueError(f"test_size: expected a fraction in (0, 1), got {test_size!r}")
    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=random_state
    )
    return DigitsSplit(
        np.asarray(digits.images, dtype=np.float64),
        labels,
        np.sort(train),
        np.sort(test),
        test_size,
        random_state,
    )


def _resize(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 8, 8) scans in 0..16 -> (N, 1, size, size) float32 in [0, 1], bilinear."""
    x = torch.from_numpy(images).float().div_(16.0).unsqueeze(1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class DigitsDataset(Dataset):
    """In-memory images and labels: item ``i`` is ``{"image": (3, 32, 32) float32, "label": int64}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.float32:
            raise ValueError(
                f"images: expected (N, 3, H, W) float32, got {tuple(images.shape)} {images.dtype}"
            )
        if labels.shape != images.shape[:1] or labels.dtype != torch.int64:
            raise ValueError(
                f"labels: expected ({images.shape[0]},) int64, got {tuple(labels.shape)} {labels.dtype}"
            )
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def build_digits_datasets(split: DigitsSplit | None = None) -> tuple[DigitsDataset, DigitsDataset, dict]:
    """The train and test datasets of ``split`` (default: ``load_digits_split()``) and their facts.

    Normalisation uses the train split's statistics only, so nothing about the test images leaks
    into the inputs. Returns ``(train, test, info)``; ``info`` records the split and the constants.
    """
    split = split or load_digits_split()
    pixels = _resize(split.images)
    train_pixels = pixels[split.train_indices]
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    images = ((pixels - mean) / std).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(split.labels)

    def part(indices: np.ndarray) -> DigitsDataset:
        index = torch.from_numpy(indices)
        return DigitsDataset(images[index].contiguous(), labels[index].contiguous())

    info = {
        "source": "sklearn.datasets.load_digits (1,797 8x8 scans, 0..16)",
        "split": (
            f"train_test_split(test_size={split.test_size}, stratify=labels, "
            f"random_state={split.random_state})"
        ),
        "train_images": len(split.train_indices),
        "test_images": len(split.test_indices),
        "train_class_counts": split.class_counts("train"),
        "test_class_counts": split.class_counts("test"),
        "resize": f"bilinear 8x8 -> {IMAGE_SIZE}x{IMAGE_SIZE} (align_corners=False), 3 channels",
        "normalise_mean": mean,
        "normalise_std": std,
        "augmentation": "none",
    }
    return part(split.train_indices), part(split.test_indices), info


# ------------------------------------------------------------------------------------------------ recipe


@dataclass(frozen=True)
class Recipe:
    """The one training recipe every model gets (see the module docstring)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    min_lr: float = 1e-5
    clip_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    eval_batch_size: int = 150

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: expected a fraction in [0, 1), got {self.warmup_fraction!r}")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)

    @property
    def tag(self) -> str:
        """Every field in one string: a finished run is reused (``resume``) only under an equal tag."""
        return ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    def loop_config(self, seed: int, output_dir: str | os.PathLike) -> Any:
        """The ``LoopConfig`` of one run: checkpoint only at the end (into a temporary folder), no tracker."""
        from seqvision.engine import LoopConfig

        return LoopConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            min_lr=self.min_lr,
            clip_grad_norm=self.clip_grad_norm,
            mixed_precision="no",
            seed=seed,
            save_every=self.steps,
            keep_last=1,
            log_every=max(1, self.steps // 20),
            output_dir=str(output_dir),
            input_key="image",
            shuffle=True,
            log_with=None,
            project_name="digits",
        )


SMOKE = {"models": ("lrcn_resnet18", "resnet18"), "seeds": (0,), "steps": 4, "batch_size": 16}
"""``--smoke``: one seqvision model and its timm peer, one seed, a handful of steps (seconds)."""


# -------------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    """One (model, seed) run. Accuracies in percent; times in seconds except ``ms_per_step``.

    ``ms_per_step`` is the median wall time of the optimizer steps between the first (which
    includes Accelerate's set-up) and the last (which includes the checkpoint and the evaluation).
    ``train_s`` runs from ``train()`` to the start of the evaluation (the final checkpoint
    included); ``total_s`` also counts model creation, evaluation and clean-up.
    ``other_cpu_busy`` is the fraction of all CPUs that other processes used during the run;
    ``recipe`` is ``Recipe.tag``; ``device`` is where the run trained (``run_device``).
    """

    model: str
    family: str
    size_class: str
    params: int
    seed: int
    recipe: str
    steps: int
    batch_size: int
    top1_pct: float
    top5_pct: float
    mean_class_accuracy_pct: float
    final_loss: float
    final_train_accuracy_pct: float
    loss_drop_last_quarter: float
    ms_per_step: float
    device: str
    train_s: float
    eval_s: float
    total_s: float
    threads: int
    other_cpu_busy: float
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        """The CSV row (without the loss curve)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "history"}


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` intra-op threads (None: leave torch's setting), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an int >= 1 or None, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _other_cpu_busy(before: tuple[int, int] | None, own_cpu_s: float, wall_s: float) -> float:
    """The fraction of all CPUs that OTHER processes kept busy since ``before`` (NaN where unknown).

    All CPUs' busy fraction minus this process's own CPU time over the same wall time: the load
    that slowed the run down (PyTorch threads that wait for a busy core lose more than that share).
    """
    from seqvision.bench.measure import cpu_ticks

    after = cpu_ticks()
    if before is None or after is None or after[1] <= before[1] or wall_s <= 0:
        return math.nan
    busy_all = (after[0] - before[0]) / (after[1] - before[1])
    return max(0.0, busy_all - own_cpu_s / (wall_s * (os.cpu_count() or 1)))


def _step_median_ms(start: float, ends: Sequence[float]) -> float:
    """Median step time (ms) from the step-end timestamps, without the first and last step when possible."""
    durations = np.diff([start, *ends])
    if len(durations) >= 3:
        durations = durations[1:-1]
    return float(np.median(durations) * 1000) if len(durations) else math.nan


def _step_done(model: torch.nn.Module) -> float:
    """The time a step ended: on CUDA after its kernels finished, so ``ms_per_step`` is not launch time."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_device() -> str:
    """Where ``train_and_evaluate`` trains: the GPU that Accelerate picks (CUDA unless
    ACCELERATE_USE_CPU=1), else the CPU; returned as the device's name."""
    from accelerate.utils import parse_flag_from_env

    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return torch.cuda.get_device_name()
    from seqvision.bench.measure import cpu_name

    return cpu_name()


def _loss_drop_last_quarter(history: Sequence[Mapping[str, float]]) -> float:
    """How much the logged training loss fell over the last quarter of the run (> 0: still falling).

    Compares the mean of the logged windows in the third quarter with those of the fourth: a
    clearly positive number at the end of a run says it stopped before it converged.
    """
    if len(history) < 4:
        return math.nan
    last = history[-1]["step"]
    third = [h["loss"] for h in history if 0.5 * last < h["step"] <= 0.75 * last]
    fourth = [h["loss"] for h in history if h["step"] > 0.75 * last]
    return float(np.mean(third) - np.mean(fourth)) if third and fourth else math.nan


def train_and_evaluate(
    name: str,
    seed: int,
    recipe: Recipe,
    train_set: Dataset,
    test_set: Dataset,
    *,
    workdir: str | os.PathLike | None = None,
) -> RunResult:
    """Train ``name`` from scratch with ``recipe`` and ``seed`` on ``train_set``; score it on ``test_set``.

    Checkpoints go to a temporary folder under ``workdir`` (default: the system's) that is deleted
    afterwards. Runs with torch's current thread setting.
    """
    from accelerate.utils import set_seed

    from seqvision.engine import gather_outputs, train
    from seqvision.eval.classification.classifier import ClassifierWithLoss, classifier_forward
    from seqvision.eval.classification.metrics import classification_report

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    spec = MODELS.get(name)
    if spec is None:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    from seqvision.bench.measure import cpu_ticks

    begin, ticks, cpu_begin = time.perf_counter(), cpu_ticks(), time.process_time()
    set_seed(seed)  # the initialisation; the loop re-seeds for dropout and orders the data by the seed
    model = ClassifierWithLoss(
        create_model(name), clip_layout="image", label_smoothing=recipe.label_smoothing
    )
    params = sum(p.numel() for p in model.parameters())
    reports: list[Any] = []
    step_ends: list[float] = []
    eval_times: list[float] = []

    def predict(module: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = module(batch["image"])["logits"]
        return {"probs": logits.float().softmax(dim=-1), "label": batch["label"]}

    def evaluate(accelerator: Any, module: torch.nn.Module, state: Any) -> dict[str, float]:
        eval_times.append(time.perf_counter())
        loader = accelerator.prepare(DataLoader(test_set, batch_size=recipe.eval_batch_size, shuffle=False))
        outputs = gather_outputs(accelerator, module, loader, predict, desc=f"test {name}")
        report = classification_report(outputs["probs"], outputs["label"])
        reports.append(report)
        eval_times.append(time.perf_counter())
        return report.metrics()

    with tempfile.TemporaryDirectory(prefix="seqvision-digits-", dir=workdir) as folder:
        start = time.perf_counter()
        result = train(
            model,
            train_set,
            recipe.loop_config(seed, folder),
            forward=functools.partial(classifier_forward, input_key="image"),
            evaluate=evaluate,
            on_step_end=lambda state, logged: step_ends.append(_step_done(model)),
        )
    report = reports[-1]
    last = result.history[-1] if result.history else {}
    total_s = time.perf_counter() - begin
    return RunResult(
        model=name,
        family=spec.family,
        size_class=spec.size_class,
        params=params,
        seed=seed,
        recipe=recipe.tag,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        top1_pct=100 * report.top1,
        top5_pct=100 * report.top5,
        mean_class_accuracy_pct=100 * report.mean_class_accuracy,
        final_loss=float(last.get("loss", math.nan)),
        final_train_accuracy_pct=100 * float(last.get("accuracy", math.nan)),
        loss_drop_last_quarter=_loss_drop_last_quarter(result.history),
        ms_per_step=_step_median_ms(start, step_ends),
        device=run_device(),
        train_s=eval_times[0] - start,
        eval_s=eval_times[1] - eval_times[0],
        total_s=total_s,
        threads=torch.get_num_threads(),
        other_cpu_busy=_other_cpu_busy(ticks, time.process_time() - cpu_begin, total_s),
        history=[{k: float(v) for k, v in h.items()} for h in result.history],
    )


# ------------------------------------------------------------------------------------------- statistics

_SUMMARY_KEYS = (
    "model",
    "family",
    "size_class",
    "params",
    "top1_pct",
    "ms_per_step",
    "total_s",
    "final_loss",
)


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); NaN for a single value, which has no spread to estimate."""
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _by_device(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """The runs' ms/step grouped by device, in order of first appearance."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(str(row.get("device", "")), []).append(float(row["ms_per_step"]))
    return groups


def summarize_runs(runs: Sequence[Mapping[str, Any] | RunResult]) -> list[dict[str, Any]]:
    """Per model (in order of first appearance): params, runs, top-1 mean / sample std / min / max
    (percent), the median of the runs' ms/step, the mean seconds per run and the mean final loss.

    Each run needs the keys of ``_SUMMARY_KEYS``; ``final_train_accuracy_pct``,
    ``loss_drop_last_quarter`` and ``other_cpu_busy`` are averaged (as ``<key>_mean``) when present.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        row = run.row() if isinstance(run, RunResult) else run
        missing = [k for k in _SUMMARY_KEYS if k not in row]
        if missing:
            raise KeyError(
                f"runs: every run needs the keys {list(_SUMMARY_KEYS)}; one lacks {missing}: {row!r}"
            )
        groups.setdefault(row["model"], []).append(row)
    summaries = []
    for model, rows in groups.items():
        top1 = [float(r["top1_pct"]) for r in rows]
        summary = {
            "model": model,
            "family": rows[0]["family"],
            "size_class": rows[0]["size_class"],
            "params": int(rows[0]["params"]),
            "runs": len(rows),
            "top1_mean": statistics.fmean(top1),
            "top1_std": _std(top1),
            "top1_min": min(top1),
            "top1_max": max(top1),
            "ms_per_step": statistics.median(float(r["ms_per_step"]) for r in rows),
            # Where the runs trained (a resumed comparison can hold runs from several machines), and
            # the median time per step on each: times of different machines are not pooled.
            "device": " + ".join(by_device := _by_device(rows)),
            "ms_per_step_by_device": " / ".join(f"{statistics.median(v):.0f}" for v in by_device.values()),
            "total_s_mean": statistics.fmean(float(r["total_s"]) for r in rows),
            "final_loss_mean": statistics.fmean(float(r["final_loss"]) for r in rows),
        }
        for key in ("final_train_accuracy_pct", "loss_drop_last_quarter", "other_cpu_busy"):
            if all(key in r for r in rows):
                summary[f"{key}_mean"] = statistics.fmean(float(r[key]) for r in rows)
        summaries.append(summary)
    return summaries


def judge(summaries: Sequence[Mapping[str, Any]], tolerance_points: float = TOLERANCE_POINTS) -> list[dict]:
    """For every seqvision model: the best timm peer of its size class (highest mean top-1), the gap
    (model - peer, percentage points) and 'PASS' when the gap is >= -tolerance, 'MISS' otherwise;
    'n/a' when no peer of its class was run."""
    verdicts = []
    for summary in summaries:
        if summary["family"] != "seqvision":
            continue
        peers = [s for s in summaries if s["family"] == "timm" and s["size_class"] == summary["size_class"]]
        if not peers:
            verdicts.append(
                {
                    "model": summary["model"],
                    "peer": "",
                    "peer_top1_mean": math.nan,
                    "gap_points": math.nan,
                    "verdict": "n/a",
                }
            )
            continue
        best = max(peers, key=lambda s: s["top1_mean"])
        gap = summary["top1_mean"] - best["top1_mean"]
        verdicts.append(
            {
                "model": summary["model"],
                "peer": best["model"],
                "peer_top1_mean": best["top1_mean"],
                "gap_points": gap,
                "verdict": "PASS" if gap >= -tolerance_points else "MISS",
            }
        )
    return verdicts


def _diagnosis(summary: Mapping[str, Any]) -> str:
    """A heuristic reading of the end of the training curves (for the table; the report explains)."""
    train_acc = summary.get("final_train_accuracy_pct_mean", math.nan)
    drop = summary.get("loss_drop_last_quarter_mean", math.nan)
    notes = [f"train loss {summary['final_loss_mean']:.2f}"]
    if math.isfinite(drop):
        notes.append(f"{'still falling' if drop > 0.05 else 'flat'} in the last quarter ({drop:+.2f})")
    if math.isfinite(train_acc):
        gap = train_acc - summary["top1_mean"]
        notes.append(f"train acc {train_acc:.0f}% ({'overfits' if gap > 10 else 'no overfitting'})")
    return ", ".join(notes)


def _fmt(value: float, spec: str) -> str:
    return "n/a" if not math.isfinite(value) else format(value, spec)


def format_table(summaries: Sequence[Mapping[str, Any]], verdicts: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of the summary (one row per model) and the verdict lines under it."""
    from seqvision.bench.measure import markdown_table

    by_model = {v["model"]: v for v in verdicts}
    header = (
        "model",
        "family",
        "params (M)",
        "top-1 % mean ± std",
        "min",
        "max",
        "ms/step",
        "device",
        "s/run",
        "final loss",
        "gap to best peer",
        "verdict",
    )
    rows = []
    for s in summaries:
        verdict = by_model.get(s["model"])
        gap = "" if verdict is None else f"{_fmt(verdict['gap_points'], '+.2f')} vs {verdict['peer'] or '-'}"
        rows.append(
            (
                s["model"],
                s["family"],
                f"{s['params'] / 1e6:.2f}",
                f"{s['top1_mean']:.1f} ± {_fmt(s['top1_std'], '.1f')}",
                f"{s['top1_min']:.1f}",
                f"{s['top1_max']:.1f}",
                s.get("ms_per_step_by_device") or _fmt(s["ms_per_step"], ".0f"),
                s.get("device", ""),
                f"{s['total_s_mean']:.0f}",
                _fmt(s["final_loss_mean"], ".3f"),
                gap,
                "" if verdict is None else verdict["verdict"],
            )
        )
    lines = [markdown_table(header, rows), ""]
    summary_of = {s["model"]: s for s in summaries}
    for v in verdicts:
        s = summary_of[v["model"]]
        if v["verdict"] == "n/a":
            lines.append(f"- {v['model']}: n/a (no timm model of its size class was run)")
            continue
        lines.append(
            f"- {v['model']}: {v['verdict']} ({s['top1_mean']:.1f} % vs {v['peer']} "
            f"{v['peer_top1_mean']:.1f} %, gap {v['gap_points']:+.2f} points, "
            f"tolerance -{TOLERANCE_POINTS:g}); {_diagnosis(s)}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- outputs


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``write_csv_atomic`` with floats to 6 significant digits."""
    from seqvision.utils.io import write_csv_atomic

    formatted = [{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows]
    write_csv_atomic(formatted, path)


def _finished_runs(out: Path, recipe: Recipe) -> dict[tuple[str, int], RunResult]:
    """The runs of an earlier, interrupted comparison in ``out`` (runs.csv + curves.csv) under ``recipe``."""
    import csv

    if not (out / "runs.csv").is_file():
        return {}
    with (out / "runs.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("recipe") == recipe.tag]
    curves: dict[tuple[str, int], list[dict[str, float]]] = {}
    if (out / "curves.csv").is_file():
        with (out / "curves.csv").open(newline="") as f:
            for r in csv.DictReader(f):
                curves.setdefault((r["model"], int(r["seed"])), []).append(
                    {
                        "step": float(r["step"]),
                        "loss": float(r["loss"]),
                        "accuracy": float(r["train_accuracy_pct"]) / 100,
                        "lr": float(r["lr"]),
                    }
                )
    types = {"str": str, "int": int, "float": float}
    finished = {}
    for row in rows:
        values = {
            f.name: types[f.type](row[f.name]) for f in dataclasses.fields(RunResult) if f.name != "history"
        }
        key = (values["model"], values["seed"])
        finished[key] = RunResult(**values, history=curves.get(key, []))
    return finished


def _curve_rows(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    return [
        {
            "model": run.model,
            "seed": run.seed,
            "step": int(h["step"]),
            "loss": h.get("loss", math.nan),
            "train_accuracy_pct": 100 * h.get("accuracy", math.nan),
            "lr": h.get("lr", math.nan),
        }
        for run in runs
        for h in run.history
    ]


def _short(name: str) -> str:
    """'vit_tiny_patch16_224' -> 'vit_tiny' (the figure's labels; the 224 / 16 of the names do not apply)."""
    return name.replace("_patch16_224", "").replace("_224", "")


def plot_comparison(
    path: Path, summaries: Sequence[Mapping[str, Any]], runs: Sequence[RunResult], title: str
) -> None:
    """Three panels: mean test top-1 with min/max error bars, top-1 against ms/step, mean loss curves."""
    from seqvision.bench.measure import agg_pyplot
    from seqvision.utils.io import save_figure_atomic

    plt = agg_pyplot()
    colors = {"seqvision": "tab:blue", "timm": "tab:gray"}
    figure, (bars, scatter, curves) = plt.subplots(1, 3, figsize=(18, 5.5), dpi=100)
    names = [s["model"] for s in summaries]
    means = np.array([s["top1_mean"] for s in summaries])
    low = means - np.array([s["top1_min"] for s in summaries])
    high = np.array([s["top1_max"] for s in summaries]) - means
    bars.bar(
        range(len(names)), means, yerr=[low, high], capsize=4, color=[colors[s["family"]] for s in summaries]
    )
    bars.set_xticks(range(len(names)), [_short(n) for n in names], rotation=35, ha="right")
    bars.axhline(100 / NUM_CLASSES, color="k", linestyle=":", linewidth=1, label="chance")
    bars.set_ylabel("test top-1 (%): mean over seeds, bars min..max")
    bars.set_ylim(0, 100)
    bars.legend(loc="upper right")
    for s in summaries:
        scatter.scatter(s["ms_per_step"], s["top1_mean"], color=colors[s["family"]], s=40)
        scatter.annotate(
            _short(s["model"]),
            (s["ms_per_step"], s["top1_mean"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    scatter.set_xscale("log")
    scatter.set_xlabel("train ms / optimizer step (median, log scale)")
    if len({s.get("device", "") for s in summaries}) > 1:  # e.g. runs gathered from a GPU and a CPU
        scatter.set_title("times from different machines: compare within one machine (table)", fontsize=9)
    scatter.set_ylabel("test top-1 (%), mean over seeds")
    for s in summaries:
        model_runs = [r for r in runs if r.model == s["model"] and r.history]
        if not model_runs:
            continue
        steps = [h["step"] for h in model_runs[0].history]
        loss = np.mean([[h["loss"] for h in r.history] for r in model_runs], axis=0)
        style = "-" if s["family"] == "seqvision" else "--"
        curves.plot(steps, loss, style, label=_short(s["model"]))
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("training loss (logged window mean, mean over seeds)")
    curves.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure_atomic(figure, path)
    plt.close(figure)


# -------------------------------------------------------------------------------------------- comparison


def _check_models(models: Sequence[str]) -> tuple[str, ...]:
    models = tuple(models)
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        raise ValueError(
            f"models: expected names from {list(MODELS)}, got {list(models)} (unknown: {unknown})"
        )
    if len(set(models)) != len(models):
        raise ValueError(f"models: expected each name once, got {list(models)}")
    return models


@functools.cache
def _worker_datasets() -> tuple[DigitsDataset, DigitsDataset]:
    train_set, test_set, _ = build_digits_datasets()
    return train_set, test_set


def _train_in_worker(name: str, seed: int, recipe: Recipe, threads: int | None) -> RunResult:
    """One run in a worker process of ``run_digits_comparison(jobs > 1)``; datasets built once per worker."""
    if threads is not None:
        torch.set_num_threads(threads)
    result = train_and_evaluate(name, seed, recipe, *_worker_datasets())
    gc.collect()
    return result


def _runs_in_workers(
    keys: Sequence[tuple[str, int]], recipe: Recipe, threads: int | None, jobs: int
) -> Iterator[RunResult]:
    """Train the (model, seed) ``keys`` in ``jobs`` fresh worker processes; yield each run as it finishes."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from seqvision.bench.measure import fresh_process_context

    # Fresh processes (a fork server that imported torch only): no CUDA context or threads inherited.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=fresh_process_context()) as pool:
        futures = [pool.submit(_train_in_worker, name, seed, recipe, threads) for name, seed in keys]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if (
        not seeds
        or len(set(seeds)) != len(seeds)
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise ValueError(f"seeds: expected distinct ints >= 0, got {list(seeds)}")
    return seeds


def run_digits_comparison(
    models: Sequence[str] = DEFAULT_MODELS,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = Recipe.steps,
    out: str | os.PathLike = "benchmarks/out/digits",
    threads: int | None = 1,
    *,
    batch_size: int = Recipe.batch_size,
    recipe: Recipe | None = None,
    report: Callable[[str], None] | None = None,
    command: str = "",
    resume: bool = False,
    jobs: int = 1,
    runs_from: Sequence[str | os.PathLike] = (),
    report_only: bool = False,
) -> dict[str, Any]:
    """Train and score every model for every seed, sequentially in this process; write the results.

    Args:
        models: names from ``MODELS``.
        seeds: one run per seed and model (initialisation and batch order).
        steps: optimizer steps of every run (ignored when ``recipe`` is given).
        out: folder for ``runs.csv``, ``curves.csv``, ``summary.csv``, ``summary.json``, ``table.md``
            and ``digits.png`` (created; every file is written atomically, ``runs.csv`` after every run).
        threads: torch intra-op threads during the comparison (None: torch's setting).
        batch_size: samples per optimizer step (ignored when ``recipe`` is given).
        recipe: the whole recipe, overriding ``steps`` and ``batch_size``.
        report: called with one line per finished run (default: ``tqdm.write``).
        command: the command line, recorded in ``summary.json``.
        resume: reuse the runs (and loss curves) that an interrupted comparison with the same recipe
            left in ``out``, instead of training them again (listed as ``resumed`` in summary.json).
        jobs: runs trained at the same time, each in its own worker process (1: in this process).
            Above 1 the accuracies are those of a sequential comparison with the same seeds (each
            run is seeded on its own), but ``ms_per_step`` is measured while the runs share the
            CPUs or the GPU, so it is no longer the time of a run alone.
        runs_from: more folders whose finished runs (same recipe) are reused like ``resume``'s, e.g.
            runs trained on other machines; a (model, seed) found twice keeps the later folder's run.
        report_only: train nothing: tabulate the reused runs of ``models`` x ``seeds`` that exist and
            list the others as ``missing`` in summary.json.

    Returns:
        ``{"summaries", "verdicts", "runs", "table", "recipe", "data", "machine", "wall_s", "out"}``.
    """
    from tqdm.auto import tqdm

    from seqvision.bench.measure import cpu_busy_fraction, cpu_name

    models, seeds = _check_models(models), _check_seeds(seeds)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an int >= 1, got {jobs!r}")
    recipe = recipe or Recipe(steps=steps, batch_size=batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = report or tqdm.write
    begin = time.perf_counter()
    # Measured while this process is idle: how much of the CPUs other work takes (it slows every run).
    busy_before = cpu_busy_fraction(1.0)
    train_set, test_set, data_info = build_digits_datasets()
    finished: dict[tuple[str, int], RunResult] = {}
    for folder in [*([out] if resume else []), *map(Path, runs_from)]:
        if not (folder / "runs.csv").is_file():
            raise FileNotFoundError(f"runs_from: {folder} has no runs.csv")
        finished |= _finished_runs(folder, recipe)
    # Seeds outermost: a comparison stopped early still has every model at the first seeds.
    order = [(name, seed) for seed in seeds for name in models]
    resumed = [key for key in order if key in finished]
    done: dict[tuple[str, int], RunResult] = {}

    def record(run: RunResult, reused: bool) -> None:
        done[(run.model, run.seed)] = run
        # After every run, so a long comparison that is stopped keeps what it finished.
        finished_runs = [done[key] for key in order if key in done]
        _write_csv(out / "runs.csv", [r.row() for r in finished_runs])
        _write_csv(out / "curves.csv", _curve_rows(finished_runs))
        report(
            f"{run.model} seed {run.seed}: top-1 {run.top1_pct:.1f} %, final loss {run.final_loss:.3f}, "
            f"{run.ms_per_step:.0f} ms/step, {run.total_s:.0f} s"
            + (" (reused from runs.csv)" if reused else "")
        )
        progress.update(1)

    todo = [] if report_only else [key for key in order if key not in finished]
    missing = [key for key in order if key not in finished and key not in todo]
    if len(missing) == len(order):
        raise ValueError(
            f"report_only: no finished run of {list(models)} x seeds {list(seeds)} under this recipe"
        )
    with _threads(threads) as used_threads:
        progress = tqdm(total=len(order), desc="digits runs", unit="run")
        try:
            for key in resumed:
                record(finished[key], reused=True)
            if jobs == 1:
                for name, seed in todo:
                    progress.set_postfix(model=name, seed=seed)
                    record(train_and_evaluate(name, seed, recipe, train_set, test_set), reused=False)
                    gc.collect()  # the run's model, optimizer and accelerator, before the next one
            else:
                for run in _runs_in_workers(todo, recipe, threads, jobs):
                    record(run, reused=False)
        finally:
            progress.close()
    runs = [done[key] for key in order if key in done]
    busy_after = cpu_busy_fraction(1.0)
    summaries = summarize_runs(runs)
    verdicts = judge(summaries)
    table = format_table(summaries, verdicts)
    ran = {run.model for run in runs}
    for name in models:
        if name not in ran:
            table += f"\n- {name}: not judged (no finished run under this recipe)"
    wall_s = time.perf_counter() - begin
    machine = {
        "device": run_device(),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": used_threads,
        "jobs": jobs,
        "cpu_busy_fraction_before": busy_before,
        "cpu_busy_fraction_after": busy_after,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    verdict_of = {v["model"]: v for v in verdicts}
    verdict_keys = ("peer", "peer_top1_mean", "gap_points", "verdict")
    summary_rows = [
        {**s, **{k: verdict_of.get(s["model"], {}).get(k, "") for k in verdict_keys}} for s in summaries
    ]
    _write_csv(out / "summary.csv", summary_rows)  # runs.csv and curves.csv: written by record()
    title = (
        f"sklearn digits at 32x32, {len(seeds)} seed(s), {recipe.steps} steps x batch {recipe.batch_size}, "
        f"AdamW lr {recipe.lr:g}; trained on {' + '.join(dict.fromkeys(run.device for run in runs))}"
        + (f"; {jobs} runs at a time (ms/step measured while sharing)" if jobs > 1 else "")
    )
    plot_comparison(out / "digits.png", summaries, runs, title)
    _write_text(out / "table.md", f"{title}\n\n{table}\n")
    result = {
        "command": command,
        "recipe": dataclasses.asdict(recipe)
        | {
            "warmup_steps": recipe.warmup_steps,
            "optimizer": "AdamW",
            "betas": "loop default (0.9, 0.95)",
            "schedule": "linear warmup, cosine to min_lr",
        },
        "models": {
            m: {
                "family": MODELS[m].family,
                "size_class": MODELS[m].size_class,
                "kwargs": dict(MODELS[m].kwargs),
                "tokens": MODELS[m].tokens,
            }
            for m in models
        },
        "size_classes": SIZE_CLASSES,
        "seeds": list(seeds),
        "resumed": [list(key) for key in resumed],
        "missing": [list(key) for key in missing],
        "data": data_info,
        "machine": machine,
        "wall_s": wall_s,
        "summaries": summaries,
        "verdicts": verdicts,
    }
    write_json_atomic(out / "summary.json", _json_safe(result))
    return {**result, "runs": runs, "table": table, "out": out}


def _json_safe(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------- CLI


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated names from {list(MODELS)}, got {text!r}")
    return names


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated ints >= 0, e.g. 0,1,2, got {text!r}"
        )
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``seqvision bench digits`` (and of ``python -m seqvision.bench.digits``)."""
    parser.add_argument(
        "--models",
        type=_name_list,
        default=list(DEFAULT_MODELS),
        metavar="M1,M2",
        help="default: all of " + ",".join(DEFAULT_MODELS),
    )
    parser.add_argument("--seeds", type=_seed_list, default=[0, 1, 2], metavar="0,1,2")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=Recipe.steps,
        help="optimizer steps (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=Recipe.batch_size, help="default %(default)s"
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/digits"))
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="runs trained at the same time, each in a worker process (default %(default)s); above 1 "
        "ms/step is measured while the runs share the machine",
    )
    parser.add_argument(
        "--resume", action="store_true", help="reuse the finished runs of an interrupted comparison in --out"
    )
    parser.add_argument(
        "--runs-from",
        type=Path,
        nargs="+",
        default=[],
        metavar="DIR",
        help="also reuse the finished runs (same recipe) in these folders, e.g. from other machines",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the reused runs that exist (the others are listed as missing)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"seconds: {' and '.join(SMOKE['models'])}, seed 0, {SMOKE['steps']} steps of batch "
        f"{SMOKE['batch_size']} (numbers meaningless)",
    )


def run_from_args(args: argparse.Namespace, prog: str = "seqvision bench digits") -> int:
    """Run the comparison that ``args`` (from ``add_arguments``) describe and print its table."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.smoke:
        args.models, args.seeds = list(SMOKE["models"]), list(SMOKE["seeds"])
        args.steps, args.batch_size = SMOKE["steps"], SMOKE["batch_size"]
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])  # as typed, for summary.json
    try:
        result = run_digits_comparison(
            args.models,
            args.seeds,
            args.steps,
            args.out,
            args.threads,
            batch_size=args.batch_size,
            command=command,
            resume=args.resume,
            jobs=args.jobs,
            runs_from=args.runs_from,
            report_only=args.report_only,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(result["table"])
    if result["missing"]:
        print("\nnot run (--report-only): " + ", ".join(f"{m} seed {s}" for m, s in result["missing"]))
    machine = result["machine"]
    print(
        f"\nwall time {result['wall_s']:.0f} s; CPU busy with other work before / after: "
        f"{machine['cpu_busy_fraction_before']:.0%} / {machine['cpu_busy_fraction_after']:.0%}; "
        f"files in {result['out']}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m seqvision.bench.digits [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m seqvision.bench.digits", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), prog="python -m seqvision.bench.digits")


if __name__ == "__main__":
    sys.exit(main())
