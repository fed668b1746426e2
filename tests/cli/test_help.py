"""`imageragturbo --help` and every command's `--help` load neither torch nor diffusers."""

import argparse
import json
import subprocess
import sys

import pytest

from imageragturbo.cli.main import build_parser

PROBE = """
import contextlib, io, json, sys
from imageragturbo.cli.main import build_parser
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        build_parser().parse_args(sys.argv[1:] + ["--help"])
    except SystemExit as exit:
        code = exit.code
heavy = [m for m in ("torch", "diffusers", "transformers", "onnxruntime") if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy, "usage": out.getvalue().startswith("usage: imageragturbo")}))
"""


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every command path, e.g. (), ('serve',), ('bench',), ('bench', 'latency'); aliases once."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from _commands(sub, (*prefix, name))


COMMANDS = list(_commands(build_parser()))


def test_every_command_is_listed():
    assert {("generate",), ("serve",), ("build-database",), ("check-database",), ("train", "world"), ("export",),
            ("bench", "latency"), ("bench", "retrieval"), ("bench", "service"), ("eval", "probe")} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "imageragturbo")
def test_help_imports_neither_torch_nor_diffusers(command):
    proc = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer == {"code": 0, "heavy": [], "usage": True}, (command, answer)


def test_console_script_and_module_entry_points_answer_help():
    for argv in ([sys.executable, "-m", "imageragturbo", "--help"], [sys.executable, "-m", "imageragturbo.cli", "--help"]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: imageragturbo"), proc.stderr
