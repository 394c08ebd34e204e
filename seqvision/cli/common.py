"""What the commands share: usage errors, the training-command pattern, tables, logging."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from seqvision.utils.checks import is_main_process

__all__ = [
    "TaskCommands",
    "add_training_arguments",
    "configure_logging",
    "csv_list",
    "evaluation_command",
    "finetune_command",
    "format_table",
    "training_command",
    "usage_error",
    "written",
]


def usage_error(command: str, err: BaseException) -> int:
    """Print ``seqvision <command>: <err>`` on stderr; return exit status 2 (a usage error)."""
    print(f"seqvision {command}: {err}", file=sys.stderr)
    return 2


def configure_logging() -> None:
    """seqvision's progress messages on the first process; other libraries' warnings only."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if is_main_process():
        logging.getLogger("seqvision").setLevel(logging.INFO)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def csv_list(item: Callable[[str], Any], what: str) -> Callable[[str], list]:
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


def add_training_arguments(parser: argparse.ArgumentParser, example_config: str, example_set: str) -> None:
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


def training_command(
    name: str,
    prepare: Callable[[], Any],
    run: Callable[[Any], Any],
    summary: Callable[[Any, Any], str],
) -> int:
    """What every training command does: check the config, train, summarise on the first process.

    ``prepare()`` reads and checks everything before training starts (a bad file, section or
    option is a usage error, exit 2); ``run(job)`` trains (a non-finite loss or a broken dataset
    ends with exit 1; anything else keeps its traceback); ``summary(job, outcome)`` is printed.
    """
    from seqvision.data.video import UnreadableDatasetError
    from seqvision.engine import NonFiniteLossError

    configure_logging()
    try:
        job = prepare()
    except (FileNotFoundError, ValueError, TypeError) as err:
        return usage_error(name, err)
    try:
        outcome = run(job)
    except (NonFiniteLossError, UnreadableDatasetError) as err:
        print(f"seqvision {name}: {err}", file=sys.stderr)
        return 1
    if is_main_process():
        print(summary(job, outcome))
    return 0


@dataclass(frozen=True)
class TaskCommands:
    """The ``finetune-<x>`` / ``eval-<x>`` pair of a task subpackage of ``seqvision.eval``."""

    task: str  # the subpackage: seqvision.eval.<task>, imported when a command runs
    train: str  # the training command's name
    train_help: str
    example_config: str
    example_set: str
    evaluate: str  # the evaluation command's name
    evaluate_help: str
    checkpoint: str  # what --checkpoint may also be, besides a run folder
    data: str  # what --data names
    evaluate_set: str
    format_metrics: Callable[[dict[str, float]], str]  # the last validation metrics after training
    report: Callable[[Any], list[str]]  # the evaluation's outcome as printed lines

    def add_parsers(self, commands: Any) -> None:
        train = commands.add_parser(self.train, help=self.train_help)
        add_training_arguments(train, self.example_config, self.example_set)
        train.set_defaults(run=self.finetune)
        score = commands.add_parser(self.evaluate, help=self.evaluate_help)
        checkpoint = f"a {self.train} run folder or {self.checkpoint}"
        score.add_argument("--checkpoint", required=True, help=checkpoint)
        score.add_argument("--data", default=None, help=f"{self.data} (default: the run's data.val)")
        score.add_argument("--output-dir", default=None, help="default: <run folder>/eval")
        example = f"e.g. --set {self.evaluate_set}"
        score.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=example)
        score.set_defaults(run=self.score)

    def module(self) -> Any:
        # Imported when a command runs, so that the parser needs none of the task's extras.
        return importlib.import_module(f"seqvision.eval.{self.task}")

    def finetune(self, args: argparse.Namespace) -> int:
        return finetune_command(self.train, self.module(), self.format_metrics)(args)

    def score(self, args: argparse.Namespace) -> int:
        return evaluation_command(self.evaluate, self.module().evaluate, self.report)(args)


def evaluation_command(
    name: str, evaluate: Callable[..., Any], report: Callable[[Any], list[str]]
) -> Callable[[argparse.Namespace], int]:
    """The handler of ``seqvision eval-<task>``: the task's ``evaluate(checkpoint, data=,
    output_dir=, overrides=)``, a usage error (exit 2) for a bad file or option, and ``report``'s
    lines (metrics, files written) printed by the first process."""

    def handler(args: argparse.Namespace) -> int:
        configure_logging()
        try:
            outcome = evaluate(
                args.checkpoint, data=args.data, output_dir=args.output_dir, overrides=args.set
            )
        except (FileNotFoundError, ValueError, TypeError) as err:
            return usage_error(name, err)
        if is_main_process():
            print("\n".join(report(outcome)))
        return 0

    return handler


def written(files: dict[str, Any]) -> list[str]:
    """``wrote <path>`` for every file an evaluation wrote."""
    return [f"wrote {path}" for path in files.values()]


def finetune_command(name: str, task: Any, format_metrics: Callable[[dict[str, float]], str]) -> Callable:
    """The handler of ``seqvision finetune-<task>`` for a task module of ``seqvision.eval`` (its
    ``prepare`` and ``run``): the last validation metrics and the model file are printed."""

    def handler(args: argparse.Namespace) -> int:
        def summary(job: Any, outcome: Any) -> str:
            path, result = outcome
            lines = [format_metrics(result.evaluations[-1])] if result.evaluations else []
            return "\n".join([*lines, f"fine-tuned {result.state.step} steps; model: {path}"])

        return training_command(
            name,
            lambda: task.prepare(args.config, output_dir=args.output_dir, overrides=args.set),
            lambda job: task.run(job, resume=args.resume),
            summary,
        )

    return handler
