"""``seqvision <command>``: thin entry points that parse arguments and call one library function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

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
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not r.ok for r in rows)
    lines.append(
        f"\n{len(rows) - failed} of {len(rows)} checks within tolerance ({args.dtype}, seed {args.seed})"
    )
    print("\n".join(lines))
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


def _pretrain(args: argparse.Namespace) -> int:
    from seqvision.pretrain.loop import LoopConfig, NonFiniteLossError
    from seqvision.pretrain.train import ENCODER_FILE, load_config, pretrain

    _configure_logging()
    try:  # a bad file, section or option is a usage error; anything later keeps its traceback
        config = load_config(args.config, args.set)
        LoopConfig.from_dict(config["train"])
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"seqvision pretrain: {err}", file=sys.stderr)
        return 2
    try:
        result = pretrain(config, resume=args.resume, output_dir=args.output_dir)
    except NonFiniteLossError as err:
        print(f"seqvision pretrain: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.history[-1] if result.history else {}
        loss = f", loss {last['loss']:.4g}" if "loss" in last else ""
        print(
            f"pretrained {result.state.step} steps ({result.state.skipped_steps} skipped{loss}); "
            f"encoder weights: {result.output_dir / ENCODER_FILE}; last checkpoint: {result.checkpoint}"
        )
    return 0


def _configure_logging() -> None:
    """seqvision's progress messages on the first process; other libraries' warnings only."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("RANK", "0")) == 0:
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
    from seqvision.eval._io import write_json_atomic
    from seqvision.eval.em_segmentation import evaluate_files

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
    pre.add_argument(
        "--config", required=True, help="a YAML file, e.g. configs/pretrain/tokenunify_em_tiny.yaml"
    )
    pre.add_argument(
        "--resume", default=None, help="'latest' (newest complete checkpoint, if any) or a checkpoint folder"
    )
    pre.add_argument("--output-dir", default=None, help="replaces train.output_dir")
    pre.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set train.steps=20; repeatable",
    )
    pre.set_defaults(run=_pretrain)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
