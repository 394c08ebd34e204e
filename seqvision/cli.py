"""``seqvision <command>``: thin entry points that parse arguments and call one library function."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from seqvision.utils.checks import is_main_process, positive_int

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _check(args: argparse.Namespace) -> int:
    from seqvision.kernels.check import run_checks

    rows = run_checks(dtype=_DTYPES[args.dtype], seed=args.seed)
    header = ("operator", "case", "form", "rel. error", "tolerance", "ms", "")
    table = [header] + [
        (
            r.operator,
            r.case,
            r.form,
            f"{r.rel_error:.2e}",
            f"{r.tolerance:.0e}",
            f"{r.milliseconds:.1f}",
            "ok" if r.ok else "FAIL",
        )
        for r in rows
    ]
    failed = sum(not r.ok for r in rows)
    print(_format_table(table))
    print(f"\n{len(rows) - failed} of {len(rows)} checks within tolerance ({args.dtype}, seed {args.seed})")
    return 1 if failed else 0


def _synth_em(args: argparse.Namespace) -> int:
    from seqvision.pretrain import synthetic_em_volume, write_cremi

    output = Path(args.output)
    if not output.parent.is_dir():
        print(f"seqvision synth-em: {output.parent}: no such folder", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        raw, labels = synthetic_em_volume(
            tuple(args.shape),
            seed=args.seed,
            voxel_size=tuple(args.voxel_size),
            missing_sections=args.missing_sections,
            progress=True,
        )
    except ValueError as err:
        print(f"seqvision synth-em: {err}", file=sys.stderr)
        return 2
    write_cremi(output, raw, labels, resolution=tuple(args.voxel_size))
    blank = sum(int(section.min() == section.max()) for section in raw)
    print(
        f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s: "
        f"raw {'x'.join(map(str, raw.shape))} uint8 at {'x'.join(f'{v:g}' for v in args.voxel_size)} nm, "
        f"{int(labels.max())} neuron ids, missing sections: {blank} (seed {args.seed})"
    )
    return 0


def _training_command(
    name: str,
    args: argparse.Namespace,
    prepare: Callable[[], Any],
    run: Callable[[Any], Any],
    summary: Callable[[Any, Any], str],
) -> int:
    """What every training command does: check the config, train, summarise on the first process.

    ``prepare()`` reads and checks everything before training starts (a bad file, section or
    option is a usage error, exit 2); ``run(job)`` trains (a non-finite loss or a broken dataset
    ends with exit 1; anything else keeps its traceback); ``summary(job, outcome)`` is printed.
    """
    from seqvision.eval.video_data import UnreadableDatasetError
    from seqvision.pretrain.loop import NonFiniteLossError

    _configure_logging()
    try:
        job = prepare()
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"seqvision {name}: {err}", file=sys.stderr)
        return 2
    try:
        outcome = run(job)
    except (NonFiniteLossError, UnreadableDatasetError) as err:
        print(f"seqvision {name}: {err}", file=sys.stderr)
        return 1
    if is_main_process():
        print(summary(job, outcome))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from seqvision.pretrain.loop import LoopConfig
    from seqvision.pretrain.train import ENCODER_FILE, load_config, pretrain

    def prepare() -> dict:
        config = load_config(args.config, args.set)
        LoopConfig.from_dict(config["train"])
        return config

    def summary(config: dict, result: Any) -> str:
        last = result.history[-1] if result.history else {}
        loss = f", loss {last['loss']:.4g}" if "loss" in last else ""
        return (
            f"pretrained {result.state.step} steps ({result.state.skipped_steps} skipped{loss}); "
            f"encoder weights: {result.output_dir / ENCODER_FILE}; last checkpoint: {result.checkpoint}"
        )

    return _training_command(
        "pretrain",
        args,
        prepare,
        lambda config: pretrain(config, resume=args.resume, output_dir=args.output_dir),
        summary,
    )


def _finetune_seg(args: argparse.Namespace) -> int:
    from seqvision.eval.em_finetune import prepare_finetune, run_finetune

    last: dict[str, float] = {}

    def run(job: Any) -> Any:
        return run_finetune(job, resume=args.resume, on_step_end=lambda state, logged: last.update(logged))

    def summary(job: Any, path: Any) -> str:
        loss = f" (loss {last['loss']:.4g})" if "loss" in last else ""
        return f"fine-tuned {job.loop.steps} steps{loss}; segmenter: {path}"

    return _training_command(
        "finetune-seg",
        args,
        lambda: prepare_finetune(args.config, output_dir=args.output_dir, overrides=args.set),
        run,
        summary,
    )


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from seqvision.eval.em_demo import FULL, QUICK, run_demo

    if args.seed < 0 or (args.threads is not None and args.threads < 1):
        print("seqvision demo: --seed must be >= 0 and --threads >= 1", file=sys.stderr)
        return 2
    _configure_logging()
    settings = QUICK if args.quick else FULL
    if args.threads is not None:
        settings = dataclasses.replace(settings, threads=args.threads)
    try:
        result = run_demo(args.output_dir, seed=args.seed, settings=settings)
    except FileNotFoundError as err:
        print(f"seqvision demo: {err}", file=sys.stderr)
        return 2
    header = ("model", "VOI split", "VOI merge", "VOI sum", "ARAND", "segments")
    table = [header] + [
        (
            row.label,
            f"{row.scores.voi_split:.4f}",
            f"{row.scores.voi_merge:.4f}",
            f"{row.scores.voi_sum:.4f}",
            f"{row.scores.arand:.4f}",
            str(row.scores.n_segments),
        )
        for row in result.rows
    ]
    print(_format_table(table))
    settings = result.settings
    print(
        f"\nheld-out synthetic volume {'x'.join(map(str, settings.test_shape))} (seed {result.seed + 1}), "
        f"agglomeration threshold {settings.thresholds[0]:g}; {settings.pretrain_steps} pretraining "
        f"steps, {settings.finetune_steps} fine-tuning steps per model; {result.seconds['total']:.0f} s"
    )
    for name in ("results_csv", "results_json", "figure_scratch", "figure_tokenunify"):
        print(f"wrote {result.files[name]}")
    return 0


def _finetune_video(args: argparse.Namespace) -> int:
    from seqvision.eval.video import prepare_video_finetune, run_video_finetune

    def summary(job: Any, outcome: Any) -> str:
        path, result = outcome
        lines = [_format_classification(result.evaluations[-1], "validation")] if result.evaluations else []
        return "\n".join([*lines, f"fine-tuned {result.state.step} steps; model: {path}"])

    return _training_command(
        "finetune-video",
        args,
        lambda: prepare_video_finetune(args.config, output_dir=args.output_dir, overrides=args.set),
        lambda job: run_video_finetune(job, resume=args.resume),
        summary,
    )


def _eval_video(args: argparse.Namespace) -> int:
    from seqvision.eval.video import evaluate_video

    _configure_logging()
    try:
        result, _, files = evaluate_video(
            args.checkpoint, data=args.data, output_dir=args.output_dir, overrides=args.set
        )
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"seqvision eval-video: {err}", file=sys.stderr)
        return 2
    if is_main_process():
        print(_format_classification(result.report.metrics(), "evaluation"))
        for path in files.values():
            print(f"wrote {path}")
    return 0


def _finetune_cls(args: argparse.Namespace) -> int:
    from seqvision.eval.classification import prepare_classification_finetune, run_classification_finetune

    def summary(job: Any, outcome: Any) -> str:
        path, result = outcome
        lines = [_format_classification(result.evaluations[-1], "validation")] if result.evaluations else []
        return "\n".join([*lines, f"fine-tuned {result.state.step} steps; model: {path}"])

    return _training_command(
        "finetune-cls",
        args,
        lambda: prepare_classification_finetune(args.config, output_dir=args.output_dir, overrides=args.set),
        lambda job: run_classification_finetune(job, resume=args.resume),
        summary,
    )


def _eval_cls(args: argparse.Namespace) -> int:
    from seqvision.eval.classification import evaluate_classifier

    _configure_logging()
    try:
        report, _, files = evaluate_classifier(
            args.checkpoint, data=args.data, output_dir=args.output_dir, overrides=args.set
        )
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"seqvision eval-cls: {err}", file=sys.stderr)
        return 2
    if is_main_process():
        print(_format_classification(report.metrics(), "evaluation"))
        for path in files.values():
            print(f"wrote {path}")
    return 0


def _format_classification(metrics: dict[str, float], what: str) -> str:
    """top-1 / top-5 / mean class accuracy as a two-column table."""
    rows = [("metric", what)]
    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("mean_class_accuracy", "mean class acc.")):
        rows.append((label, f"{100 * metrics[key]:.2f} %"))
    rows.append(("scored", str(int(metrics["samples"]))))
    rows.append(("unreadable", str(int(metrics["skipped"]))))
    return _format_table(rows)


def _finetune_caption(args: argparse.Namespace) -> int:
    from seqvision.eval.captioning import prepare_caption_finetune, run_caption_finetune

    def summary(job: Any, outcome: Any) -> str:
        path, result = outcome
        lines = [_format_caption_metrics(result.evaluations[-1])] if result.evaluations else []
        return "\n".join([*lines, f"fine-tuned {result.state.step} steps; model: {path}"])

    return _training_command(
        "finetune-caption",
        args,
        lambda: prepare_caption_finetune(args.config, output_dir=args.output_dir, overrides=args.set),
        lambda job: run_caption_finetune(job, resume=args.resume),
        summary,
    )


def _eval_caption(args: argparse.Namespace) -> int:
    from seqvision.eval.captioning import evaluate_captioner

    _configure_logging()
    try:
        result, files = evaluate_captioner(
            args.checkpoint, data=args.data, output_dir=args.output_dir, overrides=args.set
        )
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"seqvision eval-caption: {err}", file=sys.stderr)
        return 2
    if is_main_process():
        print(result.scores.table() if result.scores else "no caption could be scored")
        print(f"{len(result.predictions)} captioned, {len(result.skipped)} unreadable")
        for path in files.values():
            print(f"wrote {path}")
    return 0


def _format_caption_metrics(metrics: dict[str, float]) -> str:
    """BLEU-1..4, METEOR (or why it was skipped), ROUGE-L and CIDEr as a two-column table."""
    rows = [("metric", "value")]
    names = (("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"))
    names += (("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"))
    for key, label in names:
        rows.append(
            (label, f"{metrics[key]:.4f}" if key in metrics else "skipped (eval.meteor=false or no java)")
        )
    rows.append(("captioned", str(int(metrics["samples"]))))
    rows.append(("unreadable", str(int(metrics["skipped"]))))
    return _format_table(rows)


def _format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _configure_logging() -> None:
    """seqvision's progress messages on the first process; other libraries' warnings only."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if is_main_process():
        logging.getLogger("seqvision").setLevel(logging.INFO)


def _segment(args: argparse.Namespace) -> int:
    from seqvision.eval.em_segmentation import segment_file

    _configure_logging()
    start = time.perf_counter()
    try:
        result = segment_file(
            args.checkpoint,
            args.input,
            args.output,
            window=tuple(args.window),
            overlap=args.overlap,
            batch_size=args.batch_size,
            thresholds=args.threshold,
            method=args.method,
            scoring=args.scoring,
            mode=args.fragments,
            seed_method=args.seeds,
            boundary_threshold=args.boundary_threshold,
            min_seed_distance=args.min_seed_distance,
            affinities_key=args.affinities_key,
            config=args.config,
            device=args.device,
        )
    except (FileNotFoundError, ValueError, TypeError, ImportError) as err:
        print(f"seqvision segment: {err}", file=sys.stderr)
        return 2
    segments = ", ".join(
        f"{key}: {result.segments[t]} segments" for t, key in result.segmentation_keys.items()
    )
    print(
        f"wrote {result.path} in {time.perf_counter() - start:.1f} s: {result.affinities_key} "
        f"(3 x {'x'.join(map(str, result.shape))} float32), {segments}"
    )
    return 0


def _eval_seg(args: argparse.Namespace) -> int:
    from seqvision.eval.em_segmentation import evaluate_files
    from seqvision.utils.io import write_json_atomic

    try:
        scores = evaluate_files(args.pred, args.gt, ignore_label=None if args.no_ignore else 0)
        if args.json:
            write_json_atomic(
                args.json, {**scores.to_dict(), "prediction": args.pred, "ground_truth": args.gt}
            )
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"seqvision eval-seg: {err}", file=sys.stderr)
        return 2
    print(
        f"VOI split  {scores.voi_split:.4f}\n"
        f"VOI merge  {scores.voi_merge:.4f}\n"
        f"VOI sum    {scores.voi_sum:.4f}\n"
        f"ARAND      {scores.arand:.4f}\n"
        f"({scores.n_voxels} voxels scored, {scores.n_gt_labels} ground-truth neurons, "
        f"{scores.n_segments} segments)"
    )
    return 0


def _model_argument(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a YAML value (``img_size=448``, ``depths=[2,2,9,2]``); else a usage error."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a Python name as KEY, got {text!r}")
    return key, yaml.safe_load(value)


def _convert(args: argparse.Namespace) -> int:
    import json

    from safetensors.torch import save_file

    from seqvision.utils.io import atomic_path
    from seqvision.vision.weights import convert_checkpoint

    start = time.perf_counter()
    kwargs = dict(args.arg)
    try:
        model, state = convert_checkpoint(args.source, args.model, **kwargs)
        metadata = {
            "format": "seqvision",
            "model": args.model,
            "model_kwargs": json.dumps(kwargs, sort_keys=True),
            "source": Path(args.source).name,
        }
        with atomic_path(args.output) as temporary:
            # Tensors that share storage (tied weights) are written as separate copies.
            save_file({k: v.clone() for k, v in state.items()}, str(temporary), metadata=metadata)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:
        print(f"seqvision convert: {err}", file=sys.stderr)
        return 2
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.output} in {time.perf_counter() - start:.1f} s: {len(state)} tensors, "
        f"{parameters / 1e6:.2f} M parameters of {args.model} ({type(model).__name__}) from {args.source}"
    )
    return 0


def _csv_list(item: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """An argparse type for comma-separated lists (``224,896``); a bad entry is a usage error (exit 2)."""

    def parse(text: str) -> list:
        try:
            values = [item(part.strip()) for part in text.split(",") if part.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}")
        return values

    return parse


def _mode(text: str) -> str:
    if text not in ("eval", "train"):
        raise ValueError(text)
    return text


def _bench_models(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from seqvision.bench import models

    if args.smoke:
        vars(args).update(models.SMOKE)
    try:
        device = models.resolve_device(args.device)
        specs = models.resolve_specs(args.models, args.peer, args.chunk_size, args.chunk_tokens)
    except ValueError as err:
        print(f"seqvision bench models: {err}", file=sys.stderr)
        return 2
    max_memory_gib, max_call_s = models.default_limits(device)
    result = models.bench_models(
        specs,
        args.sizes,
        args.batch_sizes or ([1, 32] if device == "cuda" else [1]),
        args.modes,
        args.out,
        peer=specs[0].label,
        device=device,
        repeats=args.repeats,
        threads=args.threads,
        max_memory_gib=args.max_memory_gib or max_memory_gib,
        max_call_s=args.max_call_seconds or max_call_s,
        count_operations=not args.no_flops,
        report=lambda line: tqdm.write(line, file=sys.stderr),
    )
    print(models.format_report(result))
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    from seqvision.bench import kernels

    try:
        device = kernels.resolve_kernels_device(args.device, args.smoke)
        if device == "cuda":
            kernels.load_gpu_script()  # benchmarks/kernels_gpu.py of the source tree
    except (ValueError, FileNotFoundError) as err:
        print(f"seqvision bench kernels: {err}", file=sys.stderr)
        return 2
    result = kernels.bench_kernels(
        device, args.out, ops=args.ops, lengths=args.lengths, repeats=args.repeats, threads=args.threads,
        tokens=args.tokens, smoke=args.smoke, check=not args.no_check,
    )  # fmt: skip
    print(kernels.format_kernels_report(result))
    return 1 if result.failed_checks else 0


def _bench_digits(args: argparse.Namespace) -> int:
    from seqvision.bench import digits

    return digits.run_from_args(args)


def _add_bench_parser(commands: Any) -> None:
    """``seqvision bench models`` and ``seqvision bench kernels`` (docs/PERFORMANCE.md)."""
    from seqvision.bench.kernels import FORMS
    from seqvision.bench.models import DEFAULT_MODELS, DEFAULT_PEER

    bench = commands.add_parser("bench", help="benchmarks: backbones against a peer, operator forms")
    which = bench.add_subparsers(dest="benchmark", required=True)
    models = which.add_parser(
        "models",
        help="throughput, peak memory and FLOPs of backbones against a peer model by image size",
        description="Each (model, size, batch, mode) cell runs in a fresh process; the peer is measured "
        "in the same run and every ratio divides by it. Prints a markdown table, writes CSV and PNG. "
        "On the CPU the default batch size is 1 (eval and train): batch 32 at 896 px takes minutes "
        "per call on 2 cores; cells estimated over --max-call-seconds or --max-memory-gib are skipped.",
    )
    models.add_argument(
        "--models", type=_csv_list(str, "model names"), default=list(DEFAULT_MODELS), metavar="M1,M2"
    )
    models.add_argument("--peer", default=DEFAULT_PEER, help="the reference model (default: %(default)s)")
    models.add_argument("--sizes", type=_csv_list(positive_int, "positive integers"), default=[224, 896])
    models.add_argument(
        "--batch-sizes",
        type=_csv_list(positive_int, "positive integers"),
        default=None,
        help="default: 1 on the CPU, 1,32 on CUDA",
    )
    models.add_argument("--modes", type=_csv_list(_mode, "modes (eval, train)"), default=["eval", "train"])
    models.add_argument("--repeats", type=positive_int, default=3, help="timed calls after the warm-up")
    models.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    models.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    models.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_models"))
    models.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="default: 8 on the CPU (half the available memory if less), 90%% of the GPU's",
    )
    models.add_argument(
        "--max-call-seconds", type=float, default=None, help="default: 120 on the CPU, none on CUDA"
    )
    models.add_argument("--chunk-size", type=positive_int, default=64, help="chunk_size of MODEL:chunk")
    models.add_argument(
        "--chunk-tokens", type=positive_int, default=256, help="chunk_tokens of MODEL:streaming"
    )
    models.add_argument("--no-flops", action="store_true", help="do not count operations")
    models.add_argument(
        "--smoke", action="store_true", help="seconds: vir_tiny vs vit_tiny, 32/64 px, batch 1/2, 1 repeat"
    )
    models.set_defaults(run=_bench_models)
    kernels = which.add_parser(
        "kernels",
        help="every operator form on the CPU, or the Triton kernels on CUDA, with ratio tables",
        description="CPU: time and peak memory of every form (fresh process each) against the recurrent "
        "and parallel forms. CUDA: benchmarks/kernels_gpu.py's checks and timings (Triton against the "
        "PyTorch chunk form and fla / mamba-ssm where installed). Prints a table, writes CSV and PNG.",
    )
    kernels.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    kernels.add_argument("--ops", nargs="+", choices=list(FORMS), default=list(FORMS), help="CPU only")
    kernels.add_argument(
        "--lengths",
        type=_csv_list(positive_int, "positive integers"),
        default=None,
        help="default: 1024,4096,16384 (CPU), 1024,4096,16384,65536 (CUDA)",
    )
    kernels.add_argument("--repeats", type=positive_int, default=3, help="CPU: timed calls after the warm-up")
    kernels.add_argument("--threads", type=positive_int, default=None, help="CPU: torch threads")
    kernels.add_argument("--tokens", type=positive_int, default=65536, help="CUDA: batch x L, held constant")
    kernels.add_argument("--no-check", action="store_true", help="CUDA: skip the correctness checks")
    kernels.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_kernels"))
    kernels.add_argument(
        "--smoke", action="store_true", help="seconds: tiny lengths, 1 repeat (numbers meaningless)"
    )
    kernels.set_defaults(run=_bench_kernels)
    from seqvision.bench.digits import add_arguments as add_digits_arguments

    digits = which.add_parser(
        "digits",
        help="test accuracy of every backbone trained from scratch on scikit-learn's digits (CPU)",
        description="One shared recipe, several seeds, each seqvision model judged against the best timm "
        "peer of its size; prints a markdown table, writes CSV, JSON and PNG.",
    )
    add_digits_arguments(digits)
    digits.set_defaults(run=_bench_digits)


def _add_training_arguments(parser: argparse.ArgumentParser, example_config: str, example_set: str) -> None:
    """--config, --resume, --output-dir and --set: what every training command takes."""
    parser.add_argument("--config", required=True, help=f"a YAML file, e.g. {example_config}")
    parser.add_argument(
        "--resume", default=None, help="'latest' (newest complete checkpoint, if any) or a checkpoint folder"
    )
    parser.add_argument("--output-dir", default=None, help="replaces train.output_dir")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a config value (YAML syntax), e.g. --set {example_set}; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqvision", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="compare every form of every operator with its recurrent form")
    check.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=_check)
    synth = commands.add_parser(
        "synth-em", help="write a synthetic EM volume with its neuron ids as a CREMI-layout HDF5 file"
    )
    synth.add_argument("output", help="the .h5 file to write (replaced atomically if it exists)")
    synth.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=[32, 256, 256])
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), default=[40.0, 4.0, 4.0], help="in nm"
    )
    synth.add_argument(
        "--missing-sections", type=int, default=None, help="sections to blank (default: one per 32)"
    )
    synth.set_defaults(run=_synth_em)
    pre = commands.add_parser(
        "pretrain",
        help="TokenUnify pretraining of an EM encoder (run it under accelerate launch or torchrun)",
    )
    _add_training_arguments(pre, "configs/pretrain/tokenunify_em_tiny.yaml", "train.steps=20")
    pre.set_defaults(run=_pretrain)
    finetune = commands.add_parser(
        "finetune-seg",
        help="fine-tune the EM affinity segmenter, from a pretrained encoder or from scratch",
    )
    _add_training_arguments(
        finetune, "configs/finetune/em_seg_tiny.yaml", "model.pretrained_encoder=enc.safetensors"
    )
    finetune.set_defaults(run=_finetune_seg)
    demo = commands.add_parser(
        "demo",
        help="the main job: TokenUnify pretraining vs scratch on synthetic EM, segmented and scored",
    )
    demo.add_argument("--output-dir", default="seqvision_demo", help="default: ./seqvision_demo")
    demo.add_argument("--quick", action="store_true", help="about one minute: smaller volumes, fewer steps")
    demo.add_argument("--seed", type=int, default=0, help="training seed; the held-out volume uses seed + 1")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default 1, see docs/EM.md)")
    demo.set_defaults(run=_demo)
    segment = commands.add_parser(
        "segment", help="EM neuron segmentation: sliding-window affinities, watershed, agglomeration"
    )
    segment.add_argument("--checkpoint", required=True, help="segmenter .safetensors (save_segmenter)")
    segment.add_argument("--input", required=True, help="raw volume, file.h5[:key] (default key volumes/raw)")
    segment.add_argument("--output", required=True, help="the .h5 file to write (atomically)")
    segment.add_argument("--window", type=int, nargs=3, metavar=("Z", "Y", "X"), default=[16, 160, 160])
    segment.add_argument("--overlap", type=float, default=0.25, help="fraction of a window (default 0.25)")
    segment.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    segment.add_argument(
        "--threshold", type=float, nargs="+", default=[0.5], help="agglomeration threshold(s) (default 0.5)"
    )
    segment.add_argument("--method", choices=("auto", "waterz", "skimage"), default="auto")
    segment.add_argument("--scoring", choices=("median", "mean"), default="median")
    segment.add_argument(
        "--fragments", choices=("2d", "3d"), default="2d", help="watershed per section or 3-D"
    )
    segment.add_argument("--seeds", choices=("maxima_distance", "minima"), default="maxima_distance")
    segment.add_argument("--boundary-threshold", type=float, default=0.5)
    segment.add_argument("--min-seed-distance", type=int, default=3)
    segment.add_argument("--affinities-key", default="volumes/affinities", help="dataset for the affinities")
    segment.add_argument("--config", default=None, help="architecture JSON/YAML, if the checkpoint lacks it")
    segment.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    segment.set_defaults(run=_segment)
    eval_seg = commands.add_parser("eval-seg", help="VOI split/merge/sum and ARAND of a segmentation")
    eval_seg.add_argument(
        "--pred", required=True, help="file.h5[:key] (default key volumes/labels/neuron_ids)"
    )
    eval_seg.add_argument("--gt", required=True, help="file.h5[:key] (default key volumes/labels/neuron_ids)")
    eval_seg.add_argument("--json", default=None, help="also write the scores to this JSON file (atomically)")
    eval_seg.add_argument("--no-ignore", action="store_true", help="score ground-truth label 0 too")
    eval_seg.set_defaults(run=_eval_seg)
    convert = commands.add_parser(
        "convert",
        help="convert the authors' published weights (Vim, VMamba, TokenUnify, LRCN) to a seqvision file",
    )
    convert.add_argument("source", help="the authors' file (.pth / .caffemodel) or a seqvision .safetensors")
    convert.add_argument("output", help="the .safetensors file to write (atomically)")
    convert.add_argument("--model", required=True, help="the seqvision model, e.g. vim_tiny_patch16_224")
    convert.add_argument(
        "--arg",
        type=_model_argument,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model argument (YAML value), e.g. --arg img_size=448; repeatable",
    )
    convert.set_defaults(run=_convert)
    video = commands.add_parser(
        "finetune-video",
        help="fine-tune a clip classifier (LRCN, LightNet video, ...) on a video folder or list",
    )
    _add_training_arguments(video, "configs/finetune/video_lrcn_resnet18_ucf101.yaml", "train.steps=100")
    video.set_defaults(run=_finetune_video)
    eval_video = commands.add_parser(
        "eval-video", help="top-1/top-5 of a fine-tuned video model, K clips x crops per video"
    )
    eval_video.add_argument(
        "--checkpoint", required=True, help="a finetune-video run folder or its model.safetensors"
    )
    eval_video.add_argument("--data", default=None, help="videos to evaluate (default: the run's data.val)")
    eval_video.add_argument("--output-dir", default=None, help="default: <run folder>/eval")
    eval_video.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="e.g. --set eval.num_clips=10"
    )
    eval_video.set_defaults(run=_eval_video)
    caption = commands.add_parser(
        "finetune-caption", help="fine-tune an LRCN captioner on COCO-style image or video captions"
    )
    _add_training_arguments(caption, "configs/finetune/caption_lrcn_coco.yaml", "eval.method=sample")
    caption.set_defaults(run=_finetune_caption)
    eval_caption = commands.add_parser(
        "eval-caption", help="BLEU/METEOR/ROUGE-L/CIDEr of a fine-tuned captioner, predictions and a picture"
    )
    eval_caption.add_argument(
        "--checkpoint", required=True, help="a finetune-caption run folder or its model.safetensors"
    )
    eval_caption.add_argument(
        "--data", default=None, help="a caption file to caption and score (default: the run's data.val)"
    )
    eval_caption.add_argument("--output-dir", default=None, help="default: <run folder>/eval")
    eval_caption.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="e.g. --set eval.beam_size=5"
    )
    eval_caption.set_defaults(run=_eval_caption)
    cls = commands.add_parser(
        "finetune-cls",
        help="fine-tune an image classifier (any timm or seqvision model) on an ImageFolder or list",
    )
    _add_training_arguments(cls, "configs/finetune/cls_vir_tiny.yaml", "model.layer_decay=0.75")
    cls.set_defaults(run=_finetune_cls)
    eval_cls = commands.add_parser("eval-cls", help="top-1/top-5 of a fine-tuned image classifier")
    eval_cls.add_argument(
        "--checkpoint",
        required=True,
        help="a finetune-cls run folder, its model.safetensors or model_ema.safetensors",
    )
    eval_cls.add_argument("--data", default=None, help="images to evaluate (default: the run's data.val)")
    eval_cls.add_argument("--output-dir", default=None, help="default: <run folder>/eval")
    eval_cls.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="e.g. --set eval.batch_size=128",
    )
    eval_cls.set_defaults(run=_eval_cls)
    _add_bench_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
