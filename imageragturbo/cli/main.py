"""The `imageragturbo` command: generate | serve | build-database | check-database | train | export | bench | eval.

Each command module registers its parser with ``register(subparsers)``; handlers import the
library (torch, diffusers) only when they run, so ``imageragturbo --help`` stays fast. A library
error (:class:`~imageragturbo.errors.ImageRagTurboError`) is printed here as one line with exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from imageragturbo.cli import bench, build_database, export, generate, options, serve, synthetic, train
from imageragturbo.cli import eval as eval_commands
from imageragturbo.errors import ImageRagTurboError

COMMANDS = (generate, serve, build_database, train, export, bench, eval_commands, synthetic)


class _Version(argparse.Action):
    """``--version``: the installed package's version (read only when asked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version

        print(f"{parser.prog} {version('imageragturbo')}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imageragturbo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    renamed = {old: new for module in COMMANDS for old, new in getattr(module, "RENAMED", {}).items()}
    if args.command in renamed:
        print(f"imageragturbo: {args.command} is deprecated, use {renamed[args.command]}", file=sys.stderr)
    try:
        with options.device_environment(args):
            return args.handler(args)
    except ImageRagTurboError as exc:
        print(f"imageragturbo {args.command}: error: {exc}", file=sys.stderr)
        return 2
