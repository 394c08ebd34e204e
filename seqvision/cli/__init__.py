"""``seqvision <command>``: thin entry points that parse arguments and call one library function.

One module per task, each holding its commands' parsers beside their handlers (``add_parsers``):
``check`` (the kernels' self-check), ``convert`` (the authors' weights), ``pretrain``, ``em``
(synthetic volumes, fine-tuning, the demo, segmentation, scoring), ``video``, ``captioning``,
``classification`` and ``bench``. A command checks its inputs before it works: a bad file, config
section or option, or a missing extra (``pip install 'seqvision[em]'``), is one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from seqvision.utils.extras import MissingExtraError

from . import bench, captioning, check, classification, convert, em, pretrain, video
from .common import usage_error

__all__ = ["build_parser", "main"]

COMMAND_MODULES = (check, convert, em, pretrain, video, captioning, classification, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqvision", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MissingExtraError as err:  # a task's libraries are an extra: say which one to install
        return usage_error(args.command, err)
