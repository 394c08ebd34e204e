"""``seqvision pretrain``: TokenUnify pretraining of an EM encoder."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_training_arguments, training_command


def pretrain(args: argparse.Namespace) -> int:
    from seqvision.pretrain.train import ENCODER_FILE, prepare, run

    def summary(job: Any, result: Any) -> str:
        last = result.history[-1] if result.history else {}
        loss = f", loss {last['loss']:.4g}" if "loss" in last else ""
        return (
            f"pretrained {result.state.step} steps ({result.state.skipped_steps} skipped{loss}); "
            f"encoder weights: {result.output_dir / ENCODER_FILE}; last checkpoint: {result.checkpoint}"
        )

    return training_command(
        "pretrain",
        lambda: prepare(args.config, output_dir=args.output_dir, overrides=args.set),
        lambda job: run(job, resume=args.resume),
        summary,
    )


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "pretrain",
        help="TokenUnify pretraining of an EM encoder (run it under accelerate launch or torchrun)",
    )
    add_training_arguments(parser, "configs/pretrain/tokenunify_em_tiny.yaml", "train.steps=20")
    parser.set_defaults(run=pretrain)
