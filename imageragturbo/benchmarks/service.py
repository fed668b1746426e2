"""Closed-loop load on loopback: `imageragturbo bench service`.

``c`` client threads each keep one request in flight (send, wait for the answer, send the next)
until ``n`` requests have been answered; per concurrency we report throughput and latency
percentiles as the client sees them, the pipeline time the server reports in Server-Timing,
and the mean batch the worker formed (from /metrics). Server overhead = HTTP p50 minus
pipeline p50 at concurrency 1: everything that is not the model (HTTP parsing, validation,
the hand-off to the worker, PNG encoding, the client library).

:func:`run` is the whole `imageragturbo bench service`: start a server (or use a running one),
load it, and write the JSON and the model's section of results/service.md. The pieces:
:mod:`~imageragturbo.benchmarks.server` (the server process), :mod:`~imageragturbo.benchmarks.load`
(the client threads), :mod:`~imageragturbo.benchmarks.conditions` (what else held the machine)
and :mod:`~imageragturbo.benchmarks.service_report` (the page and the JSON).
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from imageragturbo.benchmarks import BenchError
from imageragturbo.benchmarks.conditions import cpu_snapshot, run_conditions
from imageragturbo.benchmarks.load import PROMPTS, LevelResult, run_level
from imageragturbo.benchmarks.server import start_server, stop_server, wait_ready
from imageragturbo.benchmarks.service_report import RESULTS_PREAMBLE, render_markdown, result_to_json, update_markdown
from imageragturbo.machine import service_fields

logger = logging.getLogger(__name__)


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


# -- the whole bench ---------------------------------------------------------------------------


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
