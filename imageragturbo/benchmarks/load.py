"""The closed-loop load generator of `imageragturbo bench service`.

``c`` client threads each keep one request in flight (send, wait for the answer, send the next)
until ``n`` requests have been answered; :func:`run_level` reports throughput and latency
percentiles as the client sees them, the pipeline time the server reports in Server-Timing,
and the mean batch the worker formed (from /metrics).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = (
    "a red circle",
    "two blue squares",
    "a green triangle left of a yellow circle",
    "three purple circles",
    "a small orange square above a large blue triangle",
    "a yellow triangle right of a red square",
    "two green circles and a blue square",
    "a blue circle below a red triangle",
)


@dataclass
class LevelResult:
    concurrency: int
    n: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    pipeline_p50_ms: float
    queue_wait_p50_ms: float
    mean_batch_size: float
    overhead_p50_ms: float
    """p50 over requests of (HTTP latency - that request's pipeline stages): at concurrency 1 the
    server overhead, paired per request so that the pipeline's own spread cancels."""
    overhead_p90_ms: float


def parse_server_timing(header: str) -> dict[str, float]:
    """'queue_wait;dur=0.1, text_encode;dur=2.3' -> {'queue_wait': 0.1, 'text_encode': 2.3}."""
    timings = {}
    for part in header.split(","):
        match = re.match(r"\s*([\w-]+)\s*;\s*dur=([0-9.eE+-]+)", part)
        if match:
            timings[match.group(1)] = float(match.group(2))
    return timings


def _batch_totals(client: httpx.Client, url: str) -> tuple[float, float]:
    """(sum, count) of irt_batch_size from /metrics."""
    total = count = 0.0
    for family in text_string_to_metric_families(client.get(f"{url}/metrics").text):
        if family.name == "irt_batch_size":
            for sample in family.samples:
                if sample.name == "irt_batch_size_sum":
                    total = sample.value
                elif sample.name == "irt_batch_size_count":
                    count = sample.value
    return total, count


def run_level(url: str, concurrency: int, n: int, body: dict, headers: dict[str, str]) -> LevelResult:
    """Closed loop: ``concurrency`` threads, one request in flight each, ``n`` requests in all."""
    from imageragturbo.model.pipeline import STAGES

    lock = threading.Lock()
    issued = 0
    latencies_ms: list[float] = []
    pipeline_ms: list[float] = []
    queue_ms: list[float] = []
    errors: dict[str, int] = {}

    parsed = urlsplit(url)
    request_headers = {"Content-Type": "application/json", **headers}

    def client_loop() -> None:
        nonlocal issued
        # The standard library's client: one keep-alive connection per thread and ~0.5 ms less
        # per request than httpx, so the client adds as little as it can to what is measured.
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120.0)
        try:
            while True:
                with lock:
                    if issued >= n:
                        return
                    i = issued
                    issued += 1
                payload = json.dumps({**body, "prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
                start = time.perf_counter()
                try:
                    connection.request("POST", "/generate", payload, request_headers)
                    response = connection.getresponse()
                    response.read()
                    elapsed_ms = (time.perf_counter() - start) * 1e3
                    status = str(response.status)
                except (OSError, http.client.HTTPException) as exc:
                    elapsed_ms, status = (time.perf_counter() - start) * 1e3, type(exc).__name__
                    connection.close()
                with lock:
                    if status == "200":
                        timings = parse_server_timing(response.getheader("server-timing", ""))
                        latencies_ms.append(elapsed_ms)
                        pipeline_ms.append(sum(timings.get(stage, 0.0) for stage in STAGES))
                        queue_ms.append(timings.get("queue_wait", 0.0))
                    else:
                        errors[status] = errors.get(status, 0) + 1
        finally:
            connection.close()

    with httpx.Client(timeout=10.0) as probe:
        batch_sum0, batch_count0 = _batch_totals(probe, url)
        threads = [threading.Thread(target=client_loop, name=f"bench-client-{j}") for j in range(concurrency)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall_s = time.perf_counter() - start
        batch_sum1, batch_count1 = _batch_totals(probe, url)
    batches = batch_count1 - batch_count0
    lat = np.asarray(latencies_ms) if latencies_ms else np.asarray([np.nan])
    overhead = lat - np.asarray(pipeline_ms) if pipeline_ms else np.asarray([np.nan])
    return LevelResult(
        concurrency=concurrency,
        n=n,
        ok=len(latencies_ms),
        errors=errors,
        wall_s=round(wall_s, 3),
        throughput_rps=round(len(latencies_ms) / wall_s, 2),
        p50_ms=round(float(np.percentile(lat, 50)), 3),
        p99_ms=round(float(np.percentile(lat, 99)), 3),
        mean_ms=round(float(lat.mean()), 3),
        pipeline_p50_ms=round(float(np.percentile(pipeline_ms, 50)), 3) if pipeline_ms else float("nan"),
        queue_wait_p50_ms=round(float(np.percentile(queue_ms, 50)), 3) if queue_ms else float("nan"),
        mean_batch_size=round((batch_sum1 - batch_sum0) / batches, 2) if batches else float("nan"),
        overhead_p50_ms=round(float(np.percentile(overhead, 50)), 3),
        overhead_p90_ms=round(float(np.percentile(overhead, 90)), 3),
    )
