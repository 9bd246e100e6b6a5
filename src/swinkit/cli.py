"""The ``swinkit`` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

# Subcommands register here: name -> (help, add_arguments, run). ``run(args)`` returns an exit code.
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW with positive numbers, got {text!r}")
    return sizes[0], sizes[1]


def _add_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="preset name (see --list) or omit with --checkpoint")
    parser.add_argument("--checkpoint", help="describe the model stored in this file instead")
    parser.add_argument("--img-size", type=_parse_size, help="input size N or HxW (default: the model's)")
    parser.add_argument("--list", action="store_true", help="list the preset names")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _run_info(args: argparse.Namespace) -> int:
    from .info import describe_model
    from .variants import variant_names

    if args.list or (args.model is None and args.checkpoint is None):
        print("\n".join(variant_names()))
        return 0
    info = describe_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    print(json.dumps(info, indent=2) if args.json else info["text"])
    return 0


def _add_demo(parser: argparse.ArgumentParser) -> None:
    del parser  # no options yet


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo()
    return 0


COMMANDS: dict[str, Command] = {
    "info": ("parameters, FLOPs and per-stage shapes of a model", _add_info, _run_info),
    "demo": ("the main job on the bundled handwritten digits", _add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinkit", description="Swin Transformer V1/V2 toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``swinkit`` and ``python -m swinkit``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        if args.verbose:
            raise
        # User errors get one clear line, not a traceback (--verbose shows it).
        print(f"swinkit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
