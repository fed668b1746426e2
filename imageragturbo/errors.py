"""The library's errors: one base class, so a caller (the CLI) can tell a user's mistake from a bug.

Every error the library raises on purpose, for input it cannot use, subclasses
:class:`ImageRagTurboError` and says in its message what is wrong and which file, value or
setting is at fault. The ``imageragturbo`` command prints such an error as one line and exits
with status 2; anything else (a bug) keeps its traceback.

Most of them are also ``ValueError`` (or, for engines, ``RuntimeError``), as they were before
this base class existed, so callers that catch those keep working.
"""

from __future__ import annotations


class ImageRagTurboError(Exception):
    """A user-facing error: the message names what is wrong and where."""


class ConfigError(ImageRagTurboError, ValueError):
    """A bad argument, setting or config file (missing, malformed, out of range)."""


class RequestError(ImageRagTurboError, ValueError):
    """A generation request the pipeline refuses: a mode the model cannot run, an unknown
    database, a k larger than the database, ..."""
