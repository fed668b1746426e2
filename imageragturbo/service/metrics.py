"""Prometheus metrics: the stat logger that turns the worker's BatchStats into series.

Each app gets its own registry, so several apps (tests) never collide and /metrics shows only
this server's series plus the process collector (RSS, CPU, open fds).
"""

from __future__ import annotations

from collections.abc import Callable

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

# Sub-millisecond retrieval at the bottom (DESIGN.md: 0.5 ms), second-long CPU denoising at the top.
STAGE_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
REQUEST_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self, *, model: str, engine: str, index: str, queue_depth: Callable[[], int]):
        # The *_created series double every histogram's exposition and nothing here reads them
        # (vLLM turns them off the same way; the switch is process-wide in prometheus_client).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.request_duration = Histogram(
            "irt_request_duration_seconds",
            "Time from receiving a POST /generate request to its answer, seconds (every status).",
            buckets=REQUEST_BUCKETS_S,
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            "irt_stage_duration_seconds",
            "Per-request time in each stage, seconds: queue_wait is the request's own wait; the "
            "pipeline stages are those of the batch it ran in (the time it waited through).",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.requests = Counter(
            "irt_requests",
            "POST /generate answers by HTTP status code.",
            ["status"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "irt_batch_size",
            "Requests per pipeline call made by the worker.",
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
        build_info = Gauge(
            "irt_build_info",
            "Always 1; the labels name the loaded model, the denoise/VAE engine and the databases.",
            ["model", "engine", "index"],
            registry=self.registry,
        )
        build_info.labels(model=model, engine=engine, index=index).set(1)
        for stage in SERVER_STAGES:
            self.stage_duration.labels(stage=stage)  # every stage's series exists from the start
        self.requests.labels(status="200")

    def observe_request(self, status: int, duration_s: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.request_duration.observe(duration_s)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        for wait_ms in stats.queue_wait_ms:
            self.stage_duration.labels(stage="queue_wait").observe(wait_ms / 1e3)
        if not stats.ok:
            self.batch_failures.inc()
            return
        for stage in STAGES:
            if stage == "retrieve" and stats.mode == "off":
                continue  # nothing was retrieved; a zero would drag the retrieve percentiles down
            seconds = stats.stage_ms.get(stage, 0.0) / 1e3
            child = self.stage_duration.labels(stage=stage)
            for _ in range(stats.size):
                child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
