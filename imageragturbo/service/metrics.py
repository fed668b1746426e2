"""Prometheus metrics: the stat logger that turns the worker's BatchStats into series.

Each app gets its own registry, so several apps (tests) never collide and /metrics shows only
this server's series plus the process collector (RSS, CPU, open fds).

The latency histograms carry ``mode`` and ``database`` labels (``database="none"`` where
nothing is retrieved, and ``mode="none"`` for a request refused before its mode was known);
both label sets are bounded: modes are the model's, databases the configured ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from imageragturbo.model.pipeline import STAGES
from imageragturbo.service.batcher import BatchStats

SERVER_STAGES = ("queue_wait", *STAGES)
NO_LABEL = "none"
CANCELLED = "cancelled"
"""The status of a request whose job was dropped before it ran (client gone, or deadline passed)."""

# Sub-millisecond retrieval at the bottom, CPU denoising of a large model and requests that
# waited in a long queue at the top (results/design-notes.md).
STAGE_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
REQUEST_BUCKETS_S = STAGE_BUCKETS_S
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(
        self,
        *,
        model: str,
        engine: str,
        queue_depth: Callable[[], int],
        device: str = "cpu",
        dtype: str = "float32",
        databases: dict[str, tuple[str, int]] | None = None,
        series: Iterable[tuple[str, str]] = (("off", NO_LABEL),),
    ):
        """``databases``: name -> (searcher kind, rows), the default first; ``series``: the
        (mode, database) pairs this server can serve, whose series exist from the start."""
        # The *_created series double every histogram's exposition and nothing here reads them
        # (vLLM turns them off the same way; the switch is process-wide in prometheus_client).
        disable_created_metrics()
        databases = databases or {}
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.request_duration = Histogram(
            "irt_request_duration_seconds",
            "Time from receiving a generation request (POST /generate, POST /v1/images/generations) to its "
            "answer, seconds (every status), by mode and database.",
            ["mode", "database"],
            buckets=REQUEST_BUCKETS_S,
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            "irt_stage_duration_seconds",
            "Per-request time in each stage, seconds, by mode and database: queue_wait is the request's own "
            "wait; the pipeline stages are those of the batch it ran in (the time it waited through).",
            ["stage", "mode", "database"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.requests = Counter(
            "irt_requests",
            "Generation requests by HTTP status code; 'cancelled': dropped before it ran (the client "
            "disconnected, or its deadline passed while it waited), never computed.",
            ["status"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "irt_batch_size",
            "Images per pipeline call made by the worker.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "irt_queue_depth", "Requests waiting for the worker (not yet in a batch).", registry=self.registry
        )
        self.queue_depth.set_function(queue_depth)
        self.batch_failures = Counter(
            "irt_batch_failures", "Pipeline calls that raised (their requests got 500).", registry=self.registry
        )
        # The connection layer's (connections.py): what a slow or flooding client cost.
        self.slow_clients = Counter(
            "irt_slow_clients",
            "Connections cut because a request had not fully arrived within IRT_READ_TIMEOUT_S, by phase: idle "
            "(nothing sent), headers (the request line or header fields), body.",
            ["phase"],
            registry=self.registry,
        )
        self.connections_shed = Counter(
            "irt_connections_shed",
            "Connections closed at IRT_MAX_CONNECTIONS: evicted (the one that had waited longest for its request, "
            "to make room for a new one) or refused (a new one, while every open one had a request in flight: 503).",
            ["reason"],
            registry=self.registry,
        )
        self.oversized_headers = Counter(
            "irt_oversized_headers",
            "Requests refused with 431: request line and header fields over IRT_MAX_HEADER_BYTES.",
            registry=self.registry,
        )
        self.open_connections = Gauge(
            "irt_open_connections", "Open HTTP connections (any state).", registry=self.registry
        )
        for phase in ("idle", "headers", "body"):
            self.slow_clients.labels(phase=phase)
        for reason in ("evicted", "refused"):
            self.connections_shed.labels(reason=reason)
        build_info = Gauge(
            "irt_build_info",
            "Always 1; the labels name the loaded model, the denoise/VAE engine, the torch device and dtype "
            "the pipeline runs in, and the databases (the default first).",
            ["model", "engine", "device", "dtype", "database"],
            registry=self.registry,
        )
        build_info.labels(
            model=model, engine=engine, device=device, dtype=dtype, database=",".join(databases) or NO_LABEL
        ).set(1)
        database_rows = Gauge(
            "irt_database_rows",
            "Rows of each configured database; default='true' marks the one a request without 'database' uses.",
            ["database", "searcher", "default"],
            registry=self.registry,
        )
        for i, (name, (searcher, rows)) in enumerate(databases.items()):
            database_rows.labels(database=name, searcher=searcher, default=str(i == 0).lower()).set(rows)
        for mode, database in series:  # every servable series exists from the start
            self.request_duration.labels(mode=mode, database=database)
            for stage in SERVER_STAGES:
                if not _skipped(stage, mode):
                    self.stage_duration.labels(stage=stage, mode=mode, database=database)
        self.requests.labels(status="200")
        self.requests.labels(status=CANCELLED)

    def observe_request(
        self, status: int | str, duration_s: float, mode: str | None = None, database: str | None = None
    ) -> None:
        self.requests.labels(status=str(status)).inc()
        self.request_duration.labels(mode=mode or NO_LABEL, database=database or NO_LABEL).observe(duration_s)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        database = stats.database or NO_LABEL
        for wait_ms in stats.queue_wait_ms:
            self.stage_duration.labels(stage="queue_wait", mode=stats.mode, database=database).observe(wait_ms / 1e3)
        if not stats.ok:
            self.batch_failures.inc()
            return
        requests = len(stats.queue_wait_ms)
        for stage in STAGES:
            if _skipped(stage, stats.mode):
                continue
            seconds = stats.stage_ms.get(stage, 0.0) / 1e3
            child = self.stage_duration.labels(stage=stage, mode=stats.mode, database=database)
            for _ in range(requests):
                child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _skipped(stage: str, mode: str) -> bool:
    """Nothing is retrieved in mode off; a zero would drag the retrieve percentiles down."""
    return stage == "retrieve" and mode == "off"
