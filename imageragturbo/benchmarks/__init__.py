"""Benchmarks: what `imageragturbo bench latency | retrieval | service | soak` measure and report.

- :mod:`~imageragturbo.benchmarks.latency`: the paper's per-stage latency protocol, per engine and mode;
- :mod:`~imageragturbo.benchmarks.retrieval`: our searcher against FAISS and hnswlib, and the H-feature store;
- :mod:`~imageragturbo.benchmarks.service`: closed-loop HTTP load against `imageragturbo serve`
  (its client threads in :mod:`~imageragturbo.benchmarks.load`, its page in
  :mod:`~imageragturbo.benchmarks.service_report`);
- :mod:`~imageragturbo.benchmarks.soak`: a bounded load with faults and a SIGTERM at the end
  (its faulty clients in :mod:`~imageragturbo.benchmarks.soak_clients`, its page in
  :mod:`~imageragturbo.benchmarks.soak_report`);
- shared by the HTTP benches: :mod:`~imageragturbo.benchmarks.server` (`imageragturbo serve` in
  its own process on loopback) and :mod:`~imageragturbo.benchmarks.conditions` (what else held
  the machine);
- :mod:`~imageragturbo.benchmarks.report`: the markdown pieces they share.

Each writes a JSON of its numbers and updates a results page; the machine they ran on comes
from :mod:`imageragturbo.machine`.
"""

from imageragturbo.errors import ImageRagTurboError


class BenchError(ImageRagTurboError, ValueError):
    """A benchmark cannot run as asked; the message says why."""
