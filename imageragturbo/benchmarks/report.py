"""Markdown shared by the benchmark reports: tables, and a generated section inside a page.

A results page mixes hand-written text with sections a benchmark writes; each section sits
between two HTML comment markers, so a new run replaces its own section and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | Sequence[str] = "---") -> list[str]:
    """The lines of a markdown table; ``align`` is each column's separator cell (``---``,
    ``---:``), one for all or one per column."""
    aligns = [align] * len(header) if isinstance(align, str) else list(align)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def update_section(path: str | Path, begin: str, end: str, body: str, preamble: str) -> None:
    """Put ``body`` between the markers ``begin`` and ``end`` in the page at ``path``, keeping
    the rest of the page as it is; a page without them gets the section appended, and a page
    that does not exist yet starts as ``preamble``."""
    path = Path(path)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else preamble
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
