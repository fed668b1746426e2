"""`imageragturbo serve` in a process of its own on loopback, for the benches that load it
(`bench service`, `bench soak`): start it on a free port, wait until it is ready, read its
memory, stop it with SIGTERM.

The server never shares an interpreter (nor its lock) with the bench's client threads, so what
the client measures is the server's, as an operator runs it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from imageragturbo.benchmarks import BenchError


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


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` (``VmRSS`` in /proc; None where it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
