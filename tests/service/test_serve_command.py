"""`imageragturbo serve` as an operator runs it: start-up errors, and SIGTERM."""

import signal
import sys
import threading
import time

import httpx
import pytest
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
        (["--index", "db=/nonexistent/index"], {}, "cannot load index 'db' from /nonexistent/index"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_model_dir, monkeypatch, capsys, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", str(tiny_model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_sigterm_stops_accepting_and_finishes_what_is_queued(tiny_model_dir):
    command = [
        sys.executable, "-m", "imageragturbo.cli", "serve", "--model", str(tiny_model_dir),
        "--host", "127.0.0.1", "--port", "{port}", "--max-batch", "1",
    ]
    with ServerProcess(command) as server:
        results: list[httpx.Response | Exception] = []

        def send(i):
            try:
                results.append(httpx.post(f"{server.url}/generate", json={"prompt": "a red circle", "seed": i, "steps": 4}, timeout=60))
            except httpx.HTTPError as exc:
                results.append(exc)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        # Wait until requests are queued behind the worker, then stop the server.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "irt_queue_depth 0.0" not in httpx.get(f"{server.url}/metrics").text:
                break
            time.sleep(0.01)
        else:
            pytest.fail("requests never queued")
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{server.url}/generate", json={"prompt": "too late"}, timeout=5)
        for thread in threads:
            thread.join(60)
        code = server.process.wait(60)
    assert [getattr(r, "status_code", r) for r in results] == [200] * 12
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete, so the process ends
    # "killed by SIGTERM" (the convention for a service stopped by its supervisor), or 0.
    assert code in (0, -signal.SIGTERM), server.output()
    assert "Traceback" not in server.output()
