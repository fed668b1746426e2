"""Benchmarks: what `imageragturbo bench latency | retrieval | service` measure and report.

- :mod:`~imageragturbo.benchmarks.latency`: the paper's per-stage latency protocol, per engine and mode;
- :mod:`~imageragturbo.benchmarks.retrieval`: our searcher against FAISS and hnswlib, and the H-feature store;
- :mod:`~imageragturbo.benchmarks.service`: closed-loop HTTP load against `imageragturbo serve`;
- :mod:`~imageragturbo.benchmarks.report`: the markdown pieces they share.

Each writes a JSON of its numbers and updates a results page; the machine they ran on comes
from :mod:`imageragturbo.machine`.
"""

from imageragturbo.errors import ImageRagTurboError


class BenchError(ImageRagTurboError, ValueError):
    """A benchmark cannot run as asked; the message says why."""
