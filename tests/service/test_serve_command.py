"""`imageragturbo serve` as an operator runs it: start-up errors, and SIGTERM."""

import http.client
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import ServerProcess

from imageragturbo.cli import main


def test_missing_model_dir_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "shapes-v1"
    assert main(["serve", "--model", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"imageragturbo serve: error: model directory not found: {missing}")


def test_bundled_model_default_names_the_folder_when_absent(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IRT_MODEL", str(tmp_path / "nowhere"))
    assert main(["serve"]) == 2
    assert f"model directory not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--engine", "onnxruntime"], {}, "cannot load the onnxruntime engine: the onnxruntime engine needs --engine-dir"),
        (["--engine", "onnxruntime", "--engine-dir", "/nonexistent"], {}, "cannot load the onnxruntime engine:"),
        (["--max-batch", "0"], {}, "bad server settings (flags or IRT_* variables): max_batch: Input should be greater than or equal to 1"),
        ([], {"IRT_MAX_QUEUE": "lots"}, "max_queue: Input should be a valid integer"),
        (["--index", "db=/nonexistent/index"], {}, "cannot load database 'db' from /nonexistent/index"),
        (["--threads", "0"], {}, "threads: Input should be greater than or equal to 1"),
        ([], {"IRT_THREADS": "many"}, "threads: Input should be a valid integer"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_model_dir, monkeypatch, capsys, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", str(tiny_model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _queue_depth_and_answered(url: str) -> tuple[float, float]:
    """(irt_queue_depth, POST /generate answers so far) from /metrics."""
    depth = answered = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples:
            if sample.name == "irt_queue_depth":
                depth = sample.value
            elif sample.name == "irt_requests_total":
                answered += sample.value
    return depth, answered


def _wait_until_refused(port: int, timeout_s: float) -> None:
    """Until a TCP connect to ``port`` is refused: the server closed its listening socket."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return
        except OSError:
            pass  # e.g. a timeout while the server is starved of CPU: ask again
        time.sleep(0.02)
    pytest.fail(f"the server still accepted connections {timeout_s:.0f} s after SIGTERM")


class _Served:
    """Stands in for uvicorn: records what `serve` would run."""

    def __call__(self, app, *, host, port, settings, log_level):
        self.app, self.settings = app, settings


@pytest.mark.parametrize(
    ("argv", "env", "cpus", "threads"),
    [([], {}, 2, 1), ([], {}, 8, 7), ([], {}, 1, 1), (["--threads", "3"], {}, 2, 3), ([], {"IRT_THREADS": "2"}, 2, 2),
     ([], {"IRT_THREADS": ""}, 2, 1)],
)
def test_threads_default_leaves_a_core_for_the_event_loop(tiny_model_dir, monkeypatch, capsys, argv, env, cpus, threads):
    from imageragturbo.service import app, settings

    served = _Served()
    monkeypatch.setattr(app, "run_server", served)
    monkeypatch.setattr(settings, "usable_cpus", lambda: cpus)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", str(tiny_model_dir), *argv]) == 0
    assert served.settings.threads == threads
    assert f"engine torch, {threads} intra-op thread(s) of {cpus} usable CPUs" in capsys.readouterr().err


def test_onnxruntime_engine_gets_the_thread_count(tiny_model_dir, monkeypatch, capsys):
    import imageragturbo.engines.pipeline_engines as engines

    calls = []

    def load_pipeline_engines(kind, engine_dir, components, **options):
        calls.append((kind, engine_dir, options))
        raise engines.EngineLoadError("not exported (test)")

    monkeypatch.setattr(engines, "load_pipeline_engines", load_pipeline_engines)
    argv = ["serve", "--model", str(tiny_model_dir), "--engine", "onnxruntime", "--engine-dir", "/x", "--threads", "2"]
    assert main(argv) == 2
    # On a CPU pipeline the provider defaults to ONNX Runtime's CPU one.
    assert calls == [("onnxruntime", Path("/x"), {"threads": 2, "provider": "cpu"})]
    assert "cannot load the onnxruntime engine: not exported (test)" in capsys.readouterr().err


def test_default_index_is_served_as_default(tiny_model_dir, tmp_path, monkeypatch):
    """`serve` opens the model through open_pipeline; <model>/index is served under 'default'."""
    import imageragturbo.model.pipeline as pipeline_module
    from imageragturbo.model.loading import ModelLoadError

    opened = []

    def open_pipeline(model_dir, **kwargs):
        opened.append((model_dir, kwargs))
        raise ModelLoadError("stop here (test)")  # a library error: one line, exit status 2

    monkeypatch.setattr(pipeline_module, "open_pipeline", open_pipeline)
    model = tmp_path / "model"
    model.mkdir()
    assert main(["serve", "--model", str(model)]) == 2
    (model / "index").mkdir()
    assert main(["serve", "--model", str(model)]) == 2
    assert main(["serve", "--model", str(model), "--index", "db=/elsewhere"]) == 2
    assert [kwargs["databases"] for _, kwargs in opened] == [[], [f"default={model / 'index'}"], ["db=/elsewhere"]]


@pytest.mark.slow
def test_sigterm_stops_accepting_and_finishes_what_is_queued(tiny_model_dir):
    """Every wait is on a condition (requests sent, requests seen by the server, listener
    closed), never a fixed sleep: the test holds on a CPU starved by other jobs."""
    n = 16
    command = [
        sys.executable, "-m", "imageragturbo.cli", "serve", "--model", str(tiny_model_dir),
        "--host", "127.0.0.1", "--port", "{port}", "--max-batch", "1", "--threads", "1",
    ]
    with ServerProcess(command) as server:
        assert httpx.get(f"{server.url}/readyz", timeout=60).json()["threads"] == 1
        statuses: list[int | str | None] = [None] * n
        answered_at = [0.0] * n
        sent = threading.Semaphore(0)

        def send(i):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            body = json.dumps({"prompt": "a red circle", "seed": i, "steps": 4})
            try:
                try:
                    connection.request("POST", "/generate", body, {"Content-Type": "application/json"})
                finally:
                    sent.release()  # the whole request is in the server's socket (or failed)
                response = connection.getresponse()
                response.read()
                statuses[i] = response.status
            except (OSError, http.client.HTTPException) as exc:
                statuses[i] = f"{type(exc).__name__}: {exc}"
            finally:
                answered_at[i] = time.monotonic()
                connection.close()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        for _ in range(n):
            assert sent.acquire(timeout=120), "the requests were never sent"
        # The server accepts connections in arrival order, so once it has answered /metrics on
        # a later connection it holds all n; wait until each is queued, answered or running
        # (at most one runs: --max-batch 1).
        deadline = time.monotonic() + 120
        while (accounted := sum(_queue_depth_and_answered(server.url))) < n - 1:
            assert time.monotonic() < deadline, f"the server saw only {accounted:.0f} of {n} requests"
            time.sleep(0.02)  # poll interval
        stopped_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        _wait_until_refused(server.port, timeout_s=60)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{server.url}/generate", json={"prompt": "too late"}, timeout=5)
        for thread in threads:
            thread.join(120)
        code = server.process.wait(60)
    assert statuses == [200] * n
    # Requests were still queued when SIGTERM came (n x 4 UNet passes, one at a time), and they
    # were answered after it.
    assert max(answered_at) > stopped_at
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete, so the process ends
    # "killed by SIGTERM" (the convention for a service stopped by its supervisor), or 0.
    assert code in (0, -signal.SIGTERM), server.output()
    assert "Traceback" not in server.output()


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))  # the race is timing-bound: a few tries
def test_requests_written_just_before_sigterm_are_all_answered(tiny_model_dir, round_):
    """32 requests written whole on fresh connections, SIGTERM right after: the kernel holds
    some in the listening socket's queue and the event loop has read others only in part (the
    worker holds the CPU). Each is answered; none is reset or closed unanswered."""
    n = 32
    request = (
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Accept: application/json\r\nContent-Length: %d\r\n\r\n%s"
    )
    with ServerProcess(model_dir=tiny_model_dir, env={"IRT_MAX_BATCH": "1", "IRT_ACCESS_LOG": "0"}) as server:
        sockets = []
        for i in range(n):
            body = json.dumps({"prompt": "a red circle", "seed": i, "steps": 4}).encode()
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
            sock.sendall(request % (len(body), body))
            sockets.append(sock)
        server.process.send_signal(signal.SIGTERM)
        statuses = []
        for sock in sockets:
            with sock:
                data = b""
                try:
                    while chunk := sock.recv(65536):
                        data += chunk
                except OSError as exc:
                    data = f"{type(exc).__name__}".encode()
            statuses.append(data.split(b"\r\n", 1)[0].decode("latin-1") or "closed, no answer")
        code = server.process.wait(60)
    assert statuses == ["HTTP/1.1 200 OK"] * n, sorted(set(statuses))
    assert code in (0, -signal.SIGTERM), server.output()
