"""Closed-loop load on loopback: `imageragturbo bench service`.

``c`` client threads each keep one request in flight (send, wait for the answer, send the next)
until ``n`` requests have been answered; per concurrency we report throughput and latency
percentiles as the client sees them, the pipeline time the server reports in Server-Timing,
and the mean batch the worker formed (from /metrics). Server overhead = HTTP p50 minus
pipeline p50 at concurrency 1: everything that is not the model (HTTP parsing, validation,
the hand-off to the worker, PNG encoding, the client library).

:func:`run` is the whole `imageragturbo bench service`: start a server (or use a running one),
load it, and write the JSON and the model's section of results/service.md.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from imageragturbo.benchmarks import BenchError
from imageragturbo.benchmarks.report import update_section
from imageragturbo.machine import service_fields
from imageragturbo.model.pipeline import STAGES

logger = logging.getLogger(__name__)

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


@dataclass
class ServiceBenchResult:
    model: str
    url: str
    machine: dict
    server: dict
    request: dict
    levels: list[LevelResult] = field(default_factory=list)
    overhead_p50_ms: float | None = None
    """HTTP p50 minus pipeline p50 at concurrency 1 (the issue's measure)."""
    overhead_per_request_p50_ms: float | None = None
    """p50 of the per-request overhead at concurrency 1 (LevelResult.overhead_p50_ms)."""
    speedup_c8_over_c1: float | None = None
    conditions: dict = field(default_factory=dict)
    """What else held the machine: load average and niceness at the end of the run."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> dict:
    """Poll GET /readyz until 200; returns its JSON. Raises BenchError naming why it gave up."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchError(f"the server exited with status {process.returncode} before it was ready")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2.0)
            if response.status_code == 200:
                return response.json()
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise BenchError(f"{url}/readyz not ready after {timeout_s:.0f} s (last answer: {last})")


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


def cpu_snapshot() -> tuple[float, dict[int, tuple[int, int]]]:
    """(monotonic time, {pid: (nice, user+system clock ticks)}) of every process, from /proc
    (empty where there is no /proc)."""
    now = time.monotonic()
    processes: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # Fields after the parenthesised command name: state is [0], utime [11], stime [12], nice [16].
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            processes[int(entry.name)] = (int(fields[16]), int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue  # gone since the listing, or not a process
    return now, processes


def other_busy_processes(start: tuple[float, dict], end: tuple[float, dict], exclude: set[int]) -> list[dict]:
    """Processes other than ``exclude`` that used >= 10% of a core between two snapshots: their
    niceness and CPU share (what the server competed with)."""
    (t0, before), (t1, after) = start, end
    ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = []
    for pid, (nice, ticks) in after.items():
        if pid in exclude or pid not in before or t1 <= t0:
            continue
        share = (ticks - before[pid][1]) / ticks_per_s / (t1 - t0)
        if share >= 0.1:
            busy.append({"pid": pid, "nice": nice, "cpu_pct": round(100 * share, 1)})
    return sorted(busy, key=lambda p: -p["cpu_pct"])


def run_conditions(server_pid: int | None = None, start_snapshot: tuple[float, dict] | None = None) -> dict:
    """Load average, scheduling priorities and the other busy processes at the end of a run: on
    a shared machine other jobs (and their niceness relative to ours) decide much of a latency."""
    conditions: dict = {"load_avg_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if start_snapshot is not None:
        own = {os.getpid()} | ({server_pid} if server_pid is not None else set())
        conditions["other_busy"] = other_busy_processes(start_snapshot, cpu_snapshot(), own)
    for who, pid in (("client", 0), ("server", server_pid)):
        if pid is None:
            continue
        try:
            conditions[f"nice_{who}"] = os.getpriority(os.PRIO_PROCESS, pid)
        except OSError:  # the server already exited
            pass
    return conditions


def start_server(
    model: Path,
    databases: list[str],
    extra_env: dict[str, str],
    log_path: Path,
    serve_args: Sequence[str] = (),
) -> tuple[subprocess.Popen, str]:
    """`imageragturbo serve` on 127.0.0.1 and a free port, in its own process (so the client's
    threads and the server never share an interpreter lock). ``serve_args`` are more serve flags
    (``--engine``, ``--engine-dir``, ``--threads``)."""
    port = free_port()
    command = [sys.executable, "-m", "imageragturbo", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    for spec in databases:
        command += ["--database", spec]
    command += list(serve_args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **extra_env})
    return process, f"http://127.0.0.1:{port}"


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def run_bench(
    url: str,
    *,
    model_label: str,
    concurrencies: list[int],
    n: int,
    body: dict,
    headers: dict[str, str],
    warmup: int = 20,
    server_pid: int | None = None,
) -> ServiceBenchResult:
    info = wait_ready(url, timeout_s=10.0)
    with httpx.Client(timeout=120.0, headers=headers) as client:
        for i in range(warmup):
            client.post(f"{url}/generate", json={**body, "prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
    start_snapshot = cpu_snapshot()
    result = ServiceBenchResult(
        model=model_label,
        url=url,
        machine=service_fields(),
        server={key: info.get(key) for key in ("model", "engine", "threads", "modes", "default_mode", "databases")},
        request=body,
    )
    for concurrency in concurrencies:
        level = run_level(url, concurrency, n, body, headers)
        logger.info("concurrency %d: %s", concurrency, level)
        result.levels.append(level)
    result.conditions = run_conditions(server_pid, start_snapshot)
    by_c = {level.concurrency: level for level in result.levels}
    if 1 in by_c:
        result.overhead_p50_ms = round(by_c[1].p50_ms - by_c[1].pipeline_p50_ms, 3)
        result.overhead_per_request_p50_ms = by_c[1].overhead_p50_ms
    if 1 in by_c and 8 in by_c and by_c[1].throughput_rps > 0:
        result.speedup_c8_over_c1 = round(by_c[8].throughput_rps / by_c[1].throughput_rps, 2)
    return result


def render_markdown(result: ServiceBenchResult, settings_note: str) -> str:
    lines = [
        f"### {result.model}",
        "",
        f"Machine: {result.machine['cpu']}, {result.machine['cores']} cores (shared with other jobs; load "
        f"average at start {result.machine['load_avg_at_start']}, at end "
        f"{result.conditions.get('load_avg_at_end')}; {_niceness(result.conditions)}). Server: {settings_note}; engine "
        f"{result.server.get('engine')} with {result.server.get('threads')} intra-op thread(s); modes "
        f"{result.server.get('modes')}, default {result.server.get('default_mode')}; databases "
        f"{result.server.get('databases')}. Request body besides prompt and seed: `{json.dumps(result.request)}`.",
        "",
        "| concurrency | n | ok | errors | throughput (req/s) | p50 (ms) | p99 (ms) | pipeline p50 (ms) | queue wait p50 (ms) | mean batch |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in result.levels:
        errors = ", ".join(f"{k}: {v}" for k, v in level.errors.items()) or "0"
        lines.append(
            f"| {level.concurrency} | {level.n} | {level.ok} | {errors} | {level.throughput_rps:.1f} | {level.p50_ms:.2f} | "
            f"{level.p99_ms:.2f} | {level.pipeline_p50_ms:.2f} | {level.queue_wait_p50_ms:.2f} | {level.mean_batch_size:.2f} |"
        )
    lines.append("")
    if result.overhead_p50_ms is not None:
        lines.append(f"- Server overhead at concurrency 1 (HTTP p50 − pipeline p50): **{result.overhead_p50_ms:.2f} ms**.")
        c1 = next(level for level in result.levels if level.concurrency == 1)
        lines.append(
            f"- Per-request server overhead at concurrency 1 (p50 over requests of HTTP time − that request's "
            f"pipeline time): **{c1.overhead_p50_ms:.2f} ms** (p90 {c1.overhead_p90_ms:.2f} ms)."
        )
    if result.speedup_c8_over_c1 is not None:
        lines.append(f"- Throughput at concurrency 8 / concurrency 1: **{result.speedup_c8_over_c1:.2f}×**.")
    lines.append("")
    return "\n".join(lines)


def _niceness(conditions: dict) -> str:
    nice = [f"{who} {conditions[f'nice_{who}']}" for who in ("client", "server") if f"nice_{who}" in conditions]
    text = "nice at end: " + ", ".join(nice) if nice else "niceness not recorded"
    if "other_busy" in conditions:
        others = conditions["other_busy"]
        listed = ", ".join(f"{p['cpu_pct']:.0f}% at nice {p['nice']}" for p in others)
        text += f"; other processes over 10% of a core during the run: {listed or 'none'}"
    return text


def update_markdown(path: Path, section_id: str, section: str, preamble: str) -> None:
    """Replace (or append) one model's section in the results page, keeping the others."""
    update_section(path, f"<!-- bench:{section_id} -->", f"<!-- /bench:{section_id} -->", section, preamble)


def result_to_json(result: ServiceBenchResult) -> str:
    return json.dumps(asdict(result), indent=2)


# -- the whole bench ---------------------------------------------------------------------------

RESULTS_PREAMBLE = """# HTTP service benchmark

`imageragturbo bench service`: closed-loop load on loopback (each client thread keeps one request
in flight), against a server started by the bench in its own process. Latencies are as the
client sees them; *pipeline p50* is the sum of the pipeline stages the server reports in
`Server-Timing` (for a batched request: its batch's stage times). *Server overhead* at
concurrency 1 is given two ways: HTTP p50 minus pipeline p50, and the p50 over requests of each
request's HTTP time minus its own pipeline time (HTTP, validation, the hand-offs to and from the
worker, PNG encoding and the Python client itself). Reproduce with the command under each table.
"""


@dataclass
class ServiceBenchOptions:
    """What `imageragturbo bench service` runs (its flags, by the same names)."""

    url: str | None
    """An already running server; None: start one on a free loopback port."""
    model: Path | None
    """Model for the server the bench starts (None: as `serve`, IRT_MODEL or the bundled one)."""
    databases: list[str]
    """``NAME=DIR`` databases for the server the bench starts."""
    engine: str | None
    engine_dir: Path | None
    threads: int | None
    label: str | None
    """The model's name in the results (None: the model folder's, plus the engine unless torch)."""
    concurrencies: list[int]
    n: int
    warmup: int
    mode: str | None
    steps: int
    json: Path
    md: Path


def serve_args(options: ServiceBenchOptions) -> list[str]:
    """The `serve` flags that configure the server the bench starts (refused with ``url``: that
    server is configured already)."""
    given = {"--engine": options.engine, "--engine-dir": options.engine_dir, "--threads": options.threads}
    given = {flag: value for flag, value in given.items() if value is not None}
    if options.url is not None and given:
        raise BenchError(
            f"{', '.join(given)} configure the server the bench starts; with --url the server is already running "
            "(start it with these flags instead)"
        )
    if options.threads is not None and options.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {options.threads}")
    return [part for flag, value in given.items() for part in (flag, str(value))]


def run(options: ServiceBenchOptions) -> ServiceBenchResult:
    """The bench end to end: writes ``options.json`` and the model's section of ``options.md``."""
    from imageragturbo.paths import default_model_dir

    if not options.concurrencies or min(options.concurrencies) < 1 or options.n < 1:
        raise BenchError(f"need concurrency >= 1 and --n >= 1, got {options.concurrencies} and {options.n}")
    body: dict = {"steps": options.steps, **({"mode": options.mode} if options.mode else {})}
    headers = {"Authorization": f"Bearer {os.environ['IRT_API_KEY']}"} if os.environ.get("IRT_API_KEY") else {}
    model_dir = options.model or default_model_dir()
    extra = serve_args(options)
    label = options.label or (model_dir.name if options.url is None else options.url)
    if options.label is None and options.engine not in (None, "torch"):
        label += f" ({options.engine})"
    process = None
    if options.url is None:
        if not model_dir.is_dir():
            raise BenchError(f"model directory not found: {model_dir} (pass --model DIR or --url URL)")
        log_path = options.json.with_suffix(".server.log")
        process, url = start_server(model_dir, options.databases, {}, log_path, extra)
        try:
            wait_ready(url, timeout_s=300.0, process=process)
        except BenchError as exc:
            stop_server(process)
            raise BenchError(f"{exc}; see {log_path}") from exc
    else:
        url = options.url.rstrip("/")
    try:
        result = run_bench(url, model_label=label, concurrencies=options.concurrencies, n=options.n, body=body,
                           headers=headers, warmup=options.warmup, server_pid=process.pid if process is not None else None)
    finally:
        if process is not None:
            stop_server(process)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(result_to_json(result))
    section = render_markdown(result, _server_note(url, started=process is not None))
    update_markdown(options.md, label, section + f"\nCommand: `{_command(options, extra)}`\n\n", RESULTS_PREAMBLE)
    return result


def _server_note(url: str, started: bool) -> str:
    if not started:
        return f"{url} (already running)"
    from imageragturbo.service.settings import ServiceSettings

    settings = ServiceSettings()  # what the server the bench started read from IRT_* (no flags)
    return (
        f"`imageragturbo serve` (started by the bench) with max_batch {settings.max_batch}, batch_wait_ms "
        f"{settings.batch_wait_ms:g}, max_queue {settings.max_queue}"
    )


def _command(options: ServiceBenchOptions, extra: list[str]) -> str:
    """The command line that reproduces this run."""
    command = f"imageragturbo bench service --concurrency {','.join(map(str, options.concurrencies))} --n {options.n}"
    for flag, value in (("--url", options.url), ("--model", options.model), ("--mode", options.mode),
                        ("--label", options.label)):
        if value is not None:
            command += f" {flag} {shlex.quote(str(value))}"
    command += "".join(f" {shlex.quote(part)}" for part in extra)
    command += "".join(f" --database {shlex.quote(spec)}" for spec in options.databases)
    return command + f" --steps {options.steps} --json {options.json}"
