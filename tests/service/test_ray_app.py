"""The service as a Ray Serve application (imageragturbo/service/ray_app.py, docs/scale.md).

Without Ray: the settings and the deployment options built from them, the Serve config file
against what the code accepts, the replica header, the labelled metrics, the warm start-up, and
the CLI's errors. With Ray (the [ray] extra; marker ``ray``): ``imageragturbo serve --ray
--replicas 2`` on the tiny model and a database on disk, as an operator runs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from serving import free_port

from imageragturbo.cli import main
from imageragturbo.errors import ConfigError
from imageragturbo.service import ray_app

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve_config.yaml"
HAVE_RAY = importlib.util.find_spec("ray") is not None


# -- settings and options -------------------------------------------------------------------


def test_defaults_autoscale_on_ongoing_requests():
    options = ray_app.deployment_options(ray_app.ray_settings())
    assert options["name"] == ray_app.DEPLOYMENT_NAME
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0, "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
    }
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert options["max_ongoing_requests"] >= options["autoscaling_config"]["target_ongoing_requests"]


def test_a_fixed_count_replaces_autoscaling_and_env_sets_gpus(monkeypatch):
    monkeypatch.setenv("IRT_RAY_NUM_GPUS", "1")
    monkeypatch.setenv("IRT_RAY_MAX_REPLICAS", "16")
    monkeypatch.setenv("IRT_RAY_INITIAL_REPLICAS", "2")
    auto = ray_app.deployment_options(ray_app.ray_settings())
    assert auto["autoscaling_config"]["max_replicas"] == 16 and auto["autoscaling_config"]["initial_replicas"] == 2
    assert auto["ray_actor_options"]["num_gpus"] == 1.0
    fixed = ray_app.deployment_options(ray_app.ray_settings(num_replicas=3))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"IRT_RAY_MIN_REPLICAS": "5", "IRT_RAY_MAX_REPLICAS": "2"}, "min_replicas (5) is above max_replicas (2)"),
        ({"IRT_RAY_INITIAL_REPLICAS": "9"}, "initial_replicas (9) is outside [1, 4]"),
        ({"IRT_RAY_MAX_ONGOING_REQUESTS": "4"}, "max_ongoing_requests (4) is below target_ongoing_requests (8.0)"),
        ({"IRT_RAY_NUM_GPUS": "lots"}, "num_gpus: Input should be a valid number"),
        ({"IRT_RAY_ROUTE_PREFIX": "api"}, "route_prefix: String should match pattern"),
    ],
)
def test_bad_ray_settings_are_one_config_error(monkeypatch, env, needle):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="bad Ray settings") as caught:
        ray_app.ray_settings()
    assert needle in str(caught.value)


def test_replica_args_refuse_unknown_fields():
    assert ray_app.replica_args({}).model is None
    with pytest.raises(ConfigError, match="bad Serve application args: modle: Extra inputs are not permitted"):
        ray_app.replica_args({"modle": "/models/x"})


def test_the_startup_error_is_the_replicas_own_last_words():
    message = (
        "Deploying application imageragturbo failed: Failed to update the deployments ['ImageRagTurbo'].\n"
        "RuntimeError: Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "imageragturbo.retrieval.disk.DatabaseLoadError: cannot load database 'db' from /nope\n"
    )
    expected = "imageragturbo.retrieval.disk.DatabaseLoadError: cannot load database 'db' from /nope"
    assert ray_app.startup_error(message) == expected
    assert ray_app.startup_error("just this") == "just this"


# -- the Serve config file ------------------------------------------------------------------


def test_the_serve_config_names_this_builder_and_valid_args():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert getattr(importlib.import_module(module), name) is ray_app.build_app
    args = ray_app.replica_args(application["args"])
    from imageragturbo.service.settings import settings_from_flags

    settings_from_flags(**args.settings)  # every settings field exists and is valid
    (deployment,) = application["deployments"]
    assert deployment["name"] == ray_app.DEPLOYMENT_NAME
    code_options = ray_app.deployment_options(ray_app.ray_settings())
    assert set(deployment) - {"name"} <= set(code_options) | {"num_replicas"}
    autoscaling = deployment["autoscaling_config"]
    assert autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert deployment["max_ongoing_requests"] >= args.settings["max_batch"] <= autoscaling["target_ongoing_requests"]
    assert deployment["graceful_shutdown_timeout_s"] >= args.settings["timeout_s"]
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    for name in application["runtime_env"]["env_vars"]:
        if name.startswith("IRT_RAY_"):
            assert name.removeprefix("IRT_RAY_").lower() in ray_app.RaySettings.model_fields, name


@pytest.mark.skipif(not HAVE_RAY, reason="the [ray] extra is not installed")
def test_the_serve_config_is_valid_for_ray_and_builds_an_application():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.applications[0].deployments[0].name == ray_app.DEPLOYMENT_NAME
    application = ray_app.build_app(config["applications"][0]["args"])
    assert type(application).__name__ == "Application"


# -- what a replica adds to the app (no Ray) ---------------------------------------------------


def _tiny_asgi(request_id: bytes):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"x-request-id", request_id)]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_the_replica_header_and_one_request_id():
    from starlette.testclient import TestClient

    client = TestClient(ray_app.ReplicaHeaderMiddleware(_tiny_asgi(b"abc"), "r1", proxy_adds_request_id=True))
    echoed = client.get("/", headers={"X-Request-ID": "abc"})  # Ray's proxy will append this one
    replaced = client.get("/", headers={"X-Request-ID": "not sane!"})  # the app's own id stays
    assert echoed.headers["x-irt-replica"] == "r1" and "x-request-id" not in echoed.headers
    assert replaced.headers.get_list("x-request-id") == ["abc"]
    plain = TestClient(ray_app.ReplicaHeaderMiddleware(_tiny_asgi(b"abc"), "r2"))
    answer = plain.get("/", headers={"X-Request-ID": "abc"})
    assert answer.headers["x-irt-replica"] == "r2" and answer.headers.get_list("x-request-id") == ["abc"]


def test_metrics_are_labelled_with_the_replica_and_served_on_its_port():
    registry = CollectorRegistry()
    Counter("irt_things", "things", ["status"], registry=registry).labels(status="200").inc(3)
    labelled = ray_app.labelled_registry(registry, "abc123")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(labelled).decode()) for s in f.samples}
    assert samples[("irt_things_total", (("replica", "abc123"), ("status", "200")))] == 3.0
    assert ray_app.start_metrics_listener(labelled, "127.0.0.1", 0, 0) == (None, None)
    # Rank 1 asks base + 1; taken, it moves on to the next free port.
    base = free_port()
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", base + 1))
        except OSError:
            pytest.skip("the port after a free one is busy")
        server, port = ray_app.start_metrics_listener(labelled, "127.0.0.1", base, 1)
    try:
        assert port > base + 1
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'irt_things_total{replica="abc123",status="200"} 3.0' in text
    finally:
        server.shutdown()


def test_the_app_starts_only_once_warm(bare_pipe):
    from starlette.testclient import TestClient

    from imageragturbo.service import ServiceSettings, create_app

    app = create_app(bare_pipe, ServiceSettings(), model_name="tiny")
    ray_app.wait_until_warm(app, app.state.service.batcher, timeout_s=120)
    with TestClient(app) as client:  # the lifespan start-up returns after the warm-up
        assert app.state.service.batcher.ready.is_set()
        assert client.get("/readyz").status_code == 200


# -- the command line -----------------------------------------------------------------------


def test_replicas_without_ray_is_one_line(tiny_model_dir, capsys):
    assert main(["serve", "--model", str(tiny_model_dir), "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--replicas needs --ray (one `imageragturbo serve` process is one replica)")
    assert "Traceback" not in err


def test_ray_missing_says_how_to_install(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["serve", "--ray", "--model", str(tiny_model_dir)]) == 2
    assert "Ray Serve is not installed: pip install 'imageragturbo[ray]'" in capsys.readouterr().err


def test_bad_flags_fail_before_ray_starts(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["serve", "--ray", "--model", str(tiny_model_dir), "--max-batch", "0"]) == 2
    assert "max_batch: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["serve", "--ray", "--replicas", "0", "--model", str(tiny_model_dir)]) == 2
    assert "num_replicas: Input should be greater than or equal to 1" in capsys.readouterr().err


# -- two replicas on Ray --------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_database(tiny_model_dir, tmp_path_factory) -> Path:
    from imageragturbo.model import RagTurboPipeline
    from imageragturbo.retrieval.build import build_database
    from imageragturbo.retrieval.pairs import WorldPairs

    folder = tmp_path_factory.mktemp("ray_db") / "db"
    build_database(RagTurboPipeline.from_pretrained(tiny_model_dir), WorldPairs(24), folder, progress=False)
    return folder


class RayServe:
    """``imageragturbo serve --ray ...`` in its own session (Ray's processes are its children:
    a group to end as one if it does not stop by itself)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "imageragturbo.cli", "serve", "--ray", "--port", str(self.port), *argv]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", **env}
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process: subprocess.Popen | None = None

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def __enter__(self) -> RayServe:
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self

    def wait_serving(self, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                pytest.fail(f"serve --ray exited with {self.process.returncode}:\n{self.output()[-6000:]}")
            if "serving " in self.output():
                return time.monotonic() - started
            time.sleep(0.5)
        pytest.fail(f"serve --ray not serving after {timeout_s:.0f} s:\n{self.output()[-6000:]}")

    def stop(self, timeout_s: float = 120.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return None
        return self.process.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # Ray's processes left behind, if any
        except ProcessLookupError:
            pass


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="the [ray] extra is not installed (pip install '.[ray]')")
def test_two_replicas_answer_with_their_names_and_the_same_images(tiny_model_dir, built_database):
    metrics_base = free_port()
    env = {"IRT_RAY_NUM_CPUS": "0.5", "IRT_RAY_METRICS_PORT": str(metrics_base), "IRT_RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS", None)
    argv = ["--replicas", "2", "--model", str(tiny_model_dir), "--database", f"db={built_database}"]
    with RayServe(argv, env) as served:
        startup_s = served.wait_serving(timeout_s=600)
        body = {"prompt": "two blue squares", "seed": 7, "database": "db"}
        images: dict[str, bytes] = {}
        for _ in range(60):
            answer = httpx.post(f"{served.url}/generate", json=body, timeout=120)
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
            assert len(answer.headers.get_list("x-request-id")) == 1
            images.setdefault(answer.headers[ray_app.REPLICA_HEADER], answer.content)
            if len(images) == 2:
                break
        assert len(images) == 2, f"one replica answered everything: {list(images)}"
        first, second = images.values()
        assert first == second  # the same seed: the same PNG bytes, whichever replica ran it

        # The same error shapes as one server, each naming its replica.
        missing = httpx.post(f"{served.url}/generate", json={**body, "database": "nope"}, timeout=60)
        assert missing.status_code == 404 and missing.headers[ray_app.REPLICA_HEADER] in images
        assert set(missing.json()) == {"detail", "request_id"}
        assert missing.json()["request_id"] == missing.headers["x-request-id"]
        openai = httpx.post(f"{served.url}/v1/images/generations", json={"prompt": 3}, timeout=60)
        assert openai.status_code == 422 and openai.json()["error"]["param"] == "prompt"

        # Each replica's own registry, labelled with its name, on its own port.
        seen = {}
        for port in range(metrics_base, metrics_base + 4):
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            except httpx.HTTPError:
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "irt_requests_total" and sample.labels.get("status") == "200":
                        seen[sample.labels["replica"]] = sample.value
        assert set(seen) == set(images) and all(value >= 1 for value in seen.values()), seen
        proxied = httpx.get(f"{served.url}/metrics", timeout=30)
        assert f'replica="{proxied.headers[ray_app.REPLICA_HEADER]}"' in proxied.text

        stopped = time.monotonic()
        code = served.stop()
        stop_s = time.monotonic() - stopped
    assert code == 0, served.output()[-4000:]
    print(f"\nray: 2 replicas serving after {startup_s:.0f} s; stopped in {stop_s:.0f} s")
