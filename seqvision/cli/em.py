"""EM commands: ``synth-em``, ``finetune-seg``, ``demo``, ``segment`` and ``eval-seg`` (docs/EM.md)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from .common import add_training_arguments, configure_logging, format_table, training_command, usage_error


def synth_em(args: argparse.Namespace) -> int:
    from seqvision.data import synthetic_em_volume, write_cremi

    output = Path(args.output)
    if not output.parent.is_dir():
        return usage_error("synth-em", f"{output.parent}: no such folder")
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
        return usage_error("synth-em", err)
    write_cremi(output, raw, labels, resolution=tuple(args.voxel_size))
    blank = sum(int(section.min() == section.max()) for section in raw)
    print(
        f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s: "
        f"raw {'x'.join(map(str, raw.shape))} uint8 at {'x'.join(f'{v:g}' for v in args.voxel_size)} nm, "
        f"{int(labels.max())} neuron ids, missing sections: {blank} (seed {args.seed})"
    )
    return 0


def finetune_seg(args: argparse.Namespace) -> int:
    from seqvision.eval import em

    last: dict[str, float] = {}

    def run(job: Any) -> Any:
        return em.run(job, resume=args.resume, on_step_end=lambda state, logged: last.update(logged))

    def summary(job: Any, path: Any) -> str:
        loss = f" (loss {last['loss']:.4g})" if "loss" in last else ""
        return f"fine-tuned {job.loop.steps} steps{loss}; segmenter: {path}"

    return training_command(
        "finetune-seg",
        lambda: em.prepare(args.config, output_dir=args.output_dir, overrides=args.set),
        run,
        summary,
    )


def demo(args: argparse.Namespace) -> int:
    from seqvision.eval.em.demo import DEFAULT, FULL, QUICK, run_demo
    from seqvision.eval.em.demo.report import probe_table, summary_table

    if (args.jobs is not None and args.jobs < 1) or (args.threads is not None and args.threads < 1):
        return usage_error("demo", "--jobs and --threads must be >= 1")
    configure_logging()
    settings = QUICK if args.quick else FULL if args.full else DEFAULT
    if args.threads is not None:
        settings = dataclasses.replace(settings, threads=args.threads)
    try:
        result = run_demo(args.output_dir, settings=settings, jobs=args.jobs)
    except FileNotFoundError as err:
        return usage_error("demo", err)
    threshold = settings.thresholds[0]
    print(format_table(summary_table(result.summaries, result.baselines, threshold)))
    print(
        f"\nVOI sum and ARAND: mean ± sd over seeds {list(settings.seeds)}, each the mean over "
        f"{settings.test_volumes} held-out volume(s) {'x'.join(map(str, settings.test_shape))}, "
        f"agglomeration threshold {threshold:g}; difference = TokenUnify-initialised - scratch "
        f"(paired by seed, < 0: pretraining helps). {settings.pretrain_steps} pretraining steps "
        f"on {settings.corpus_volumes} unlabelled volumes, {settings.finetune_steps} fine-tuning "
        "steps per run.\n"
    )
    print(format_table(probe_table(result.probe)))
    print(
        "\nlinear probe: ROC AUC of boundary vs interior voxels of the held-out volumes, logistic "
        "regression on frozen features (mean ± sd over seeds)\n"
    )
    print("\n".join(result.headline))
    print(f"\n{result.seconds['total']:.0f} s with {result.jobs} job(s)")
    for name in ("summary_csv", "results_csv", "probe_csv", "results_json", "curve", "probe_figure"):
        print(f"wrote {result.files[name]}")
    return 0


def segment(args: argparse.Namespace) -> int:
    from seqvision.eval import em

    configure_logging()
    start = time.perf_counter()
    try:
        result = em.segment(
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
        return usage_error("segment", err)
    segments = ", ".join(
        f"{key}: {result.segments[t]} segments" for t, key in result.segmentation_keys.items()
    )
    print(
        f"wrote {result.path} in {time.perf_counter() - start:.1f} s: {result.affinities_key} "
        f"(3 x {'x'.join(map(str, result.shape))} float32), {segments}"
    )
    return 0


def eval_seg(args: argparse.Namespace) -> int:
    from seqvision.eval import em

    try:
        scores = em.evaluate(args.pred, args.gt, ignore_label=None if args.no_ignore else 0)
        if args.json:
            em.write_evaluation(args.json, scores, prediction=args.pred, ground_truth=args.gt)
    except (FileNotFoundError, ValueError, TypeError) as err:
        return usage_error("eval-seg", err)
    print(
        f"VOI split  {scores.voi_split:.4f}\n"
        f"VOI merge  {scores.voi_merge:.4f}\n"
        f"VOI sum    {scores.voi_sum:.4f}\n"
        f"ARAND      {scores.arand:.4f}\n"
        f"({scores.n_voxels} voxels scored, {scores.n_gt_labels} ground-truth neurons, "
        f"{scores.n_segments} segments)"
    )
    return 0


def add_parsers(commands: Any) -> None:
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
    synth.set_defaults(run=synth_em)

    finetune = commands.add_parser(
        "finetune-seg",
        help="fine-tune the EM affinity segmenter, from a pretrained encoder or from scratch",
    )
    add_training_arguments(
        finetune, "configs/finetune/em_seg_tiny.yaml", "model.pretrained_encoder=enc.safetensors"
    )
    finetune.set_defaults(run=finetune_seg)

    job = commands.add_parser(
        "demo",
        help="the main job: does TokenUnify pretraining help when labels are scarce? (synthetic EM)",
    )
    job.add_argument("--output-dir", default="seqvision_demo", help="default: ./seqvision_demo")
    size = job.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="under a minute: a smoke test, its numbers mean nothing"
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="the large grid (more budgets, seeds and steps): for a GPU, hours on a CPU",
    )
    job.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: one per core on a CPU, 1 on a GPU)"
    )
    job.add_argument(
        "--threads", type=int, default=None, help="torch threads per job (default 1, see docs/EM.md)"
    )
    job.set_defaults(run=demo)

    seg = commands.add_parser(
        "segment", help="EM neuron segmentation: sliding-window affinities, watershed, agglomeration"
    )
    seg.add_argument("--checkpoint", required=True, help="segmenter .safetensors (save_segmenter)")
    seg.add_argument("--input", required=True, help="raw volume, file.h5[:key] (default key volumes/raw)")
    seg.add_argument("--output", required=True, help="the .h5 file to write (atomically)")
    seg.add_argument("--window", type=int, nargs=3, metavar=("Z", "Y", "X"), default=[16, 160, 160])
    seg.add_argument("--overlap", type=float, default=0.25, help="fraction of a window (default 0.25)")
    seg.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    seg.add_argument(
        "--threshold", type=float, nargs="+", default=[0.5], help="agglomeration threshold(s) (default 0.5)"
    )
    seg.add_argument("--method", choices=("auto", "waterz", "skimage"), default="auto")
    seg.add_argument("--scoring", choices=("median", "mean"), default="median")
    seg.add_argument("--fragments", choices=("2d", "3d"), default="2d", help="watershed per section or 3-D")
    seg.add_argument("--seeds", choices=("maxima_distance", "minima"), default="maxima_distance")
    seg.add_argument("--boundary-threshold", type=float, default=0.5)
    seg.add_argument("--min-seed-distance", type=int, default=3)
    seg.add_argument("--affinities-key", default="volumes/affinities", help="dataset for the affinities")
    seg.add_argument("--config", default=None, help="architecture JSON/YAML, if the checkpoint lacks it")
    seg.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    seg.set_defaults(run=segment)

    score = commands.add_parser("eval-seg", help="VOI split/merge/sum and ARAND of a segmentation")
    score.add_argument("--pred", required=True, help="file.h5[:key] (default key volumes/labels/neuron_ids)")
    score.add_argument("--gt", required=True, help="file.h5[:key] (default key volumes/labels/neuron_ids)")
    score.add_argument("--json", default=None, help="also write the scores to this JSON file (atomically)")
    score.add_argument("--no-ignore", action="store_true", help="score ground-truth label 0 too")
    score.set_defaults(run=eval_seg)
