"""Databases built for the retrieval tests (imported by them: ``from db_helpers import ...``)."""

import shutil

from imageragturbo.retrieval.build import build_database
from imageragturbo.retrieval.pairs import WorldPairs


def build_each(encoder, root, n: int, builds: dict[str, dict]):
    """``root / name`` for each ``name: build_database keyword arguments`` (``seed``: the world's)."""
    for name, kwargs in builds.items():
        kwargs = dict(kwargs)
        build_database(encoder, WorldPairs(n, kwargs.pop("seed", 0)), root / name, progress=False, **kwargs)
    return root


def copy_of(folder, tmp_path):
    """A copy of the database ``folder`` that a test may damage."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy
