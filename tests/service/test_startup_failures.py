"""A server that cannot serve ends: a failed warm-up or load gives exit status != 0 and one line
on stderr (what a supervisor needs to restart it), never a process whose /readyz is 503 for ever."""

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
import torch
from serving import REPO, free_port

from imageragturbo.service import ServiceSettings, create_app
from imageragturbo.service.http_server import ServerStoppedError, run

# Makes every warm-up call of the pipeline raise, in the served process only (PYTHONPATH).
FAILING_WARMUP = '''
import imageragturbo.model.pipeline as pipeline

_call = pipeline.RagTurboPipeline.__call__


def __call__(self, prompts, *args, **kwargs):
    if list(prompts) == ["warm-up"]:
        raise RuntimeError("simulated device failure:\\nan illegal memory access")
    return _call(self, prompts, *args, **kwargs)


pipeline.RagTurboPipeline.__call__ = __call__
'''


def _serve(model_dir, tmp_path, *argv, sitecustomize: str | None = None, env: dict | None = None):
    """`imageragturbo serve` to its end (it must end by itself): (exit status, stderr lines)."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("IRT_")}
    environment.update({"OMP_NUM_THREADS": "1", **(env or {})})
    if sitecustomize is not None:
        (tmp_path / "sitecustomize.py").write_text(sitecustomize)
        environment["PYTHONPATH"] = str(tmp_path)
    command = [sys.executable, "-m", "imageragturbo.cli", "serve", "--model", str(model_dir), "--port", str(free_port()), *argv]
    done = subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr.strip().splitlines()


@pytest.mark.slow
def test_a_failing_warm_up_ends_the_process_with_one_line(tiny_model_dir, tmp_path):
    status, lines = _serve(tiny_model_dir, tmp_path, sitecustomize=FAILING_WARMUP)
    assert status == 2, lines
    assert lines[-1] == (
        "imageragturbo serve: error: warm-up failed: RuntimeError: simulated device failure: an illegal memory "
        "access; the server stopped (the log above has the traceback)"
    )
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    failure = next(line for line in logged if line["message"].startswith("warm-up failed"))
    assert failure["level"] == "ERROR" and "simulated device failure" in failure["exception"]
    assert not any(line.startswith("Traceback") for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("manifest", "env"),
    [("{not json", {}), ('{"format": "something else"}', {"IRT_VERIFY_DATABASES": "0"})],
    ids=["malformed", "foreign-unverified"],
)
def test_a_broken_database_ends_the_process_with_one_line(tiny_model_dir, tmp_path, manifest, env):
    # Whichever check finds it (the load's, or the warm-up's), the process ends the same way.
    database = tmp_path / "db"
    database.mkdir()
    (database / "manifest.json").write_text(manifest)
    status, lines = _serve(tiny_model_dir, tmp_path, "--database", f"db={database}", env=env)
    assert status == 2, lines
    assert lines[-1].startswith("imageragturbo serve: error: ") and str(database) in lines[-1]
    assert not any(line.startswith("Traceback") for line in lines)


class NaNPipe:
    """Wraps a pipeline: every result's latents are NaN (as a database of NaN features gives)."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompts, seeds, **kwargs):
        result = self._pipe(prompts, seeds, **kwargs)
        result.latents = torch.full_like(result.latents, float("nan"))
        return result


def test_a_warm_up_that_makes_nan_stops_the_server(tiny_pipe):
    app = create_app(NaNPipe(tiny_pipe), ServiceSettings(), model_name="nan")
    port = free_port()
    failure: list[BaseException] = []

    def serve():
        try:
            run(app, host="127.0.0.1", port=port, settings=ServiceSettings(), log_level="warning")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the server kept running after its warm-up failed"
    (error,) = failure
    assert isinstance(error, ServerStoppedError)
    assert str(error).startswith("warm-up failed: ValueError: mode 'adapter' on database 'shapes' made NaN or infinite values")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/readyz")
