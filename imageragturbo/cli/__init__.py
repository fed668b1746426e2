"""The `imageragturbo` command line: one module per command (group), registered in :mod:`.main`.

Nothing in the library imports this package; it only calls the library.
"""

from imageragturbo.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
