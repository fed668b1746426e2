"""A bounded load with faults against a real server: `imageragturbo bench soak`.

1. Start `imageragturbo serve` in its own process on loopback (:mod:`~imageragturbo.benchmarks.server`,
   as `bench service` does) and wait for /readyz.
2. The load: ``concurrency`` client threads, one request in flight each, send ``requests``
   requests in all, request i of kind ``SCHEDULE[i % 20]`` (:mod:`~imageragturbo.benchmarks.soak_clients`):
   12 normal requests in 20, and each fault once (malformed JSON, wrong types, a prompt over the
   limit, a body over the cap, an unknown database, a hang-up in the middle of the body, a
   hang-up while the request waits, headers sent a line at a time). The server's RSS is read from
   /proc when a quarter of the requests have been answered and when all have.
3. The SIGTERM: ``2 × concurrency`` more normal requests, each on a fresh connection; once every
   one of them is written, SIGTERM. A request written but never answered is *lost*; the server
   should answer each (uvicorn stops accepting and waits for what it has), then exit.

:func:`run` does all three and writes the JSON and the model's section of the results page.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from imageragturbo.benchmarks import BenchError
from imageragturbo.benchmarks.conditions import cpu_snapshot, run_conditions
from imageragturbo.benchmarks.load import PROMPTS
from imageragturbo.benchmarks.server import rss_bytes, start_server, stop_server, wait_ready
from imageragturbo.benchmarks.soak_clients import (
    KINDS,
    REQUEST_TIMEOUT_S,
    SENDERS,
    SoakClient,
    failure_outcome,
    kind_of,
)
from imageragturbo.machine import service_fields

SIGTERM_DELAY_S = 0.01
"""From the last in-flight request written to the signal."""
RSS_TARGET_PCT = 2.0


@dataclass
class SoakOptions:
    """What `imageragturbo bench soak` runs (its flags, by the same names)."""

    model: Path | None
    """Model for the server (None: as `serve`, IRT_MODEL or the bundled one)."""
    requests: int = 4000
    concurrency: int = 8
    out: Path | None = None
    """Results page to put the model's section in (None: print only)."""
    json: Path | None = None


@dataclass
class SigtermResult:
    in_flight: int
    """Requests written whole before the signal."""
    outcomes: dict[str, int]
    answered_after_signal: int
    """Of the answered ones, those whose answer came after the signal (the ones it tested)."""
    lost: int
    """Written whole, never answered."""
    refused_new_after_s: float | None
    """From the signal to the first refused new connection (the server stopped accepting)."""
    exit_code: int | None
    exit_s: float | None
    """From the signal to the server's exit."""


@dataclass
class SoakResult:
    model: str
    requests: int
    concurrency: int
    machine: dict
    server: dict
    settings: dict
    wall_s: float = 0.0
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per kind of request: outcome -> count (the load, without the SIGTERM's requests)."""
    normal_ok: int = 0
    normal_p50_ms: float | None = None
    normal_p99_ms: float | None = None
    rss: list[dict] = field(default_factory=list)
    """[{"requests": answered so far, "rss_bytes": the server's RSS}], every requests/40."""
    rss_checkpoints: list[dict] = field(default_factory=list)
    """The two the table shows: at requests/4 (1,000 of 4,000) and at the end."""
    rss_growth_pct: float | None = None
    server_counts: dict[str, float] = field(default_factory=dict)
    """irt_requests_total by status over the load, as the server counted it."""
    sigterm: SigtermResult | None = None
    targets: dict[str, bool] = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)
    server_log: str = ""
    date: str = ""
    code: str | None = None
    """``git describe --always --dirty`` of the checkout the server ran from (None outside one)."""

    def by_class(self) -> dict[str, dict[str, int]]:
        """outcome -> {"normal", "on purpose", "unexpected"} -> count, over every kind."""
        table: dict[str, dict[str, int]] = {}
        for kind, counts in self.outcomes.items():
            for outcome, count in counts.items():
                row = table.setdefault(outcome, {"normal": 0, "on purpose": 0, "unexpected": 0})
                row[KINDS[kind].classify(outcome)] += count
        return dict(sorted(table.items()))

    def unexpected(self) -> dict[str, int]:
        """Unexpected outcomes, the load's and the SIGTERM's (where only 200 is normal)."""
        found = Counter({outcome: row["unexpected"] for outcome, row in self.by_class().items() if row["unexpected"]})
        if self.sigterm is not None:
            found.update({o: n for o, n in self.sigterm.outcomes.items() if o != "200"})
        return dict(found)


def _requests_by_status(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30.0).text):
        for sample in family.samples:
            if sample.name == "irt_requests_total":
                counts[sample.labels.get("status", "?")] = sample.value
    return counts


def _settled_requests_by_status(url: str, timeout_s: float = 15.0) -> dict[str, float]:
    """:func:`_requests_by_status` once the server has finished what it still held: a client that
    hung up has its answer (or its drop) counted only when the server gets to it, after the
    client has moved on. Settled = the same counts twice, 0.2 s apart."""
    deadline = time.monotonic() + timeout_s
    counts = _requests_by_status(url)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = _requests_by_status(url)
        if again == counts:
            break
        counts = again
    return counts


def run_load(url: str, result: SoakResult, databases: list[str], headers: dict[str, str], server_pid: int) -> None:
    """Phase 2 into ``result``: outcomes per kind, normal latencies, the RSS series."""
    parsed = urlsplit(url)
    n = result.requests
    every = max(1, n // 40)
    checkpoints = {max(1, n // 4), n}
    lock = threading.Lock()
    issued = answered = 0
    outcomes: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    latencies_ms: list[float] = []

    def loop() -> None:
        nonlocal issued, answered
        client = SoakClient(parsed.hostname, parsed.port, PROMPTS, databases, headers)
        try:
            while True:
                with lock:
                    if issued >= n:
                        return
                    i = issued
                    issued += 1
                kind = kind_of(i)
                start = time.perf_counter()
                outcome = SENDERS[kind](client, i)
                elapsed_ms = (time.perf_counter() - start) * 1e3
                with lock:
                    outcomes[kind][outcome] += 1
                    if kind == "normal" and outcome == "200":
                        latencies_ms.append(elapsed_ms)
                    answered += 1
                    if answered % every == 0 or answered in checkpoints:
                        sample = {"requests": answered, "rss_bytes": rss_bytes(server_pid)}
                        result.rss.append(sample)
                        if answered in checkpoints:
                            result.rss_checkpoints.append(sample)
        finally:
            client.close()

    threads = [threading.Thread(target=loop, name=f"soak-client-{j}") for j in range(result.concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = round(time.perf_counter() - start, 2)
    result.outcomes = {kind: dict(counts) for kind, counts in outcomes.items() if counts}
    result.normal_ok = len(latencies_ms)
    if latencies_ms:
        result.normal_p50_ms = round(float(np.percentile(latencies_ms, 50)), 2)
        result.normal_p99_ms = round(float(np.percentile(latencies_ms, 99)), 2)
    first, last = result.rss_checkpoints[0], result.rss_checkpoints[-1]
    if len(result.rss_checkpoints) >= 2 and first["rss_bytes"] and last["rss_bytes"]:
        result.rss_growth_pct = round(100 * (last["rss_bytes"] - first["rss_bytes"]) / first["rss_bytes"], 2)


def _wait_refused(host: str, port: int, timeout_s: float) -> bool:
    """Until a new connection to the server is refused (its listening socket closed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        time.sleep(0.01)
    return False


def sigterm_with_requests_in_flight(url: str, process, count: int, first: int, databases: list[str],
                                    headers: dict[str, str]) -> SigtermResult:
    """Phase 3: ``count`` normal requests written on fresh connections, then SIGTERM."""
    parsed = urlsplit(url)
    bodies = SoakClient(parsed.hostname, parsed.port, PROMPTS, databases, headers)
    request_headers = {"Content-Type": "application/json", **headers}
    lock = threading.Lock()
    written = threading.Semaphore(0)
    signalled_at: list[float] = []
    outcomes: list[tuple[bool, str, float]] = []  # (written whole, outcome, when it came)

    def one(i: int) -> None:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=REQUEST_TIMEOUT_S)
        try:
            try:
                connection.request("POST", "/generate", bodies.body_bytes(i), request_headers)
            except Exception as exc:  # noqa: BLE001
                with lock:
                    outcomes.append((False, failure_outcome(exc), time.monotonic()))
                return
            finally:
                written.release()
            try:
                response = connection.getresponse()
                response.read()
                outcome = str(response.status)
            except Exception as exc:  # noqa: BLE001
                outcome = failure_outcome(exc)
            with lock:
                outcomes.append((True, outcome, time.monotonic()))
        finally:
            connection.close()

    threads = [threading.Thread(target=one, args=(first + j,), name=f"soak-sigterm-{j}") for j in range(count)]
    for thread in threads:
        thread.start()
    for _ in threads:
        written.acquire(timeout=REQUEST_TIMEOUT_S)
    time.sleep(SIGTERM_DELAY_S)
    signalled_at.append(time.monotonic())
    process.send_signal(signal.SIGTERM)
    refused = _wait_refused(parsed.hostname, parsed.port, timeout_s=30.0)
    refused_after = round(time.monotonic() - signalled_at[0], 3) if refused else None
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S + 10)
    try:
        exit_code = process.wait(120)
        exit_s = round(time.monotonic() - signalled_at[0], 2)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: not exiting; stop it
        exit_code, exit_s = stop_server(process), None
    sent = [(outcome, when) for whole, outcome, when in outcomes if whole]
    answered = [(outcome, when) for outcome, when in sent if outcome.isdigit()]
    return SigtermResult(
        in_flight=len(sent),
        outcomes=dict(Counter(outcome for _, outcome, _ in outcomes)),
        answered_after_signal=sum(when > signalled_at[0] for _, when in answered),
        lost=len(sent) - len(answered),
        refused_new_after_s=refused_after,
        exit_code=exit_code,
        exit_s=exit_s,
    )


def _code_version() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _settings() -> dict:
    """The server's settings: what `serve` reads from IRT_* (the bench passes no flags)."""
    from imageragturbo.service.settings import ServiceSettings

    return ServiceSettings().model_dump(mode="json", exclude={"api_key"})


def run(options: SoakOptions) -> SoakResult:
    """The soak end to end: writes ``options.json`` and the model's section of ``options.out``."""
    from imageragturbo.benchmarks.soak_report import update_page
    from imageragturbo.paths import default_model_dir

    if options.requests < 1 or options.concurrency < 1:
        raise BenchError(f"need --requests >= 1 and --concurrency >= 1, got {options.requests} and {options.concurrency}")
    model_dir = options.model or default_model_dir()
    if not model_dir.is_dir():
        raise BenchError(f"model directory not found: {model_dir} (pass --model DIR)")
    headers = {"Authorization": f"Bearer {os.environ['IRT_API_KEY']}"} if os.environ.get("IRT_API_KEY") else {}
    log_path = Path(tempfile.mkdtemp(prefix="irt-soak-")) / "server.log"  # evidence, not a result: kept, named in the JSON
    process, url = start_server(model_dir, [], {}, log_path)
    try:
        try:
            info = wait_ready(url, timeout_s=600.0, process=process)
        except BenchError as exc:
            raise BenchError(f"{exc}; see {log_path}") from exc
        databases = sorted(info.get("databases") or {})
        result = SoakResult(
            model=model_dir.name, requests=options.requests, concurrency=options.concurrency, machine=service_fields(),
            server={key: info.get(key) for key in ("model", "engine", "threads", "modes", "default_mode", "databases")},
            settings=_settings(), server_log=str(log_path), date=time.strftime("%Y-%m-%d %H:%M %z"),
            code=_code_version(),
        )
        start_snapshot = cpu_snapshot()
        before = _requests_by_status(url)
        run_load(url, result, databases, headers, process.pid)
        after = _settled_requests_by_status(url)
        result.server_counts = {s: after[s] - before.get(s, 0.0) for s in sorted(after) if after[s] - before.get(s, 0.0)}
        result.conditions = run_conditions(process.pid, start_snapshot)
        result.sigterm = sigterm_with_requests_in_flight(url, process, 2 * options.concurrency, options.requests,
                                                         databases, headers)
    finally:
        if process.poll() is None:
            stop_server(process)
    unexpected = result.unexpected()
    result.targets = {
        "no_unexpected_5xx": not any(outcome.startswith("5") for outcome in unexpected),
        "none_lost_at_sigterm": result.sigterm.lost == 0,
        "rss_growth_within_target": result.rss_growth_pct is not None and result.rss_growth_pct <= RSS_TARGET_PCT,
    }
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        record = {**asdict(result), "by_class": result.by_class(), "unexpected": result.unexpected()}
        options.json.write_text(json.dumps(record, indent=2))
    if options.out is not None:
        update_page(options.out, result, command(options))
    return result


def command(options: SoakOptions) -> str:
    """The command line that reproduces this run."""
    line = f"imageragturbo bench soak --requests {options.requests} --concurrency {options.concurrency}"
    for flag, value in (("--model", options.model), ("--out", options.out), ("--json", options.json)):
        if value is not None:
            line += f" {flag} {shlex.quote(str(value))}"
    return line
