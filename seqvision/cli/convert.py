"""``seqvision convert``: the authors' published weights as a seqvision safetensors file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .common import usage_error


def _model_argument(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a YAML value (``img_size=448``, ``depths=[2,2,9,2]``); else a usage error."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a Python name as KEY, got {text!r}")
    return key, yaml.safe_load(value)


def convert(args: argparse.Namespace) -> int:
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
        return usage_error("convert", err)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.output} in {time.perf_counter() - start:.1f} s: {len(state)} tensors, "
        f"{parameters / 1e6:.2f} M parameters of {args.model} ({type(model).__name__}) from {args.source}"
    )
    return 0


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert the authors' published weights (Vim, VMamba, TokenUnify, LRCN) to a seqvision file",
    )
    parser.add_argument("source", help="the authors' file (.pth / .caffemodel) or a seqvision .safetensors")
    parser.add_argument("output", help="the .safetensors file to write (atomically)")
    parser.add_argument("--model", required=True, help="the seqvision model, e.g. vim_tiny_patch16_224")
    parser.add_argument(
        "--arg",
        type=_model_argument,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model argument (YAML value), e.g. --arg img_size=448; repeatable",
    )
    parser.set_defaults(run=convert)
