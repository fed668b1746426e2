"""Request ids, structured access logs and error bodies, against the real uvicorn server."""

import io
import json
import logging
import re
import time

import httpx
import pytest
from serving import ServerProcess, ServerThread
from test_app import FlakyPipe

from imageragturbo.service import ServiceSettings, create_app
from imageragturbo.service.logs import ACCESS_LOGGER, SERVICE_LOGGER, JsonFormatter


class Lines:
    """Collects the service's log lines, formatted as the server writes them."""

    def __init__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())

    def __enter__(self):
        logging.getLogger(SERVICE_LOGGER).addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger(SERVICE_LOGGER).removeHandler(self.handler)

    def records(self, *, at_least: int = 0, **match) -> list[dict]:
        """The lines with ``match``; waits (up to 10 s) for ``at_least`` of them: the server
        writes a request's access line just after its answer went out."""
        deadline = time.monotonic() + 10
        while True:
            lines = [json.loads(line) for line in self.stream.getvalue().splitlines()]
            found = [line for line in lines if all(line.get(k) == v for k, v in match.items())]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_pipe):
    with ServerThread(create_app(FlakyPipe(tiny_pipe), ServiceSettings(max_batch=1, api_key="k"), model_name="tiny")) as running:
        yield running


AUTH = {"Authorization": "Bearer k"}


def test_a_sane_request_id_is_echoed_and_any_other_is_replaced(server):
    for given in ("abc-123", "0b7e6f0c-3c1f-4d47-9a5e-1d2b3c4d5e6f", "trace:span/1+2=3@x"):
        response = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": given})
        assert response.headers["x-request-id"] == given
    generated = set()
    for given in ("", "has space", "x" * 129, "quote\"d", "semi;colon", "\u00e9"):
        headers = {"X-Request-ID": given.encode("utf-8")} if given else {}
        response = httpx.get(f"{server.url}/healthz", headers=headers)
        rid = response.headers["x-request-id"]
        assert rid != given and re.fullmatch(r"[0-9a-f]{32}", rid)
        generated.add(rid)
    assert len(generated) == 6  # a new one each time


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "key"),
    [
        ("POST", "/generate", {"json": {"prompt": ""}, "headers": AUTH}, 422, "detail"),
        ("POST", "/generate", {"json": {"prompt": "a"}}, 401, "detail"),
        ("POST", "/generate", {"json": {"prompt": "a", "database": "nope"}, "headers": AUTH}, 404, "detail"),
        ("POST", "/generate", {"content": b"x" * 20_000, "headers": AUTH}, 413, "detail"),
        ("POST", "/generate", {"json": {"prompt": "explode", "mode": "off"}, "headers": AUTH}, 500, "detail"),
        ("GET", "/generate", {}, 405, "detail"),
        ("GET", "/nope", {}, 404, "detail"),
        ("POST", "/v1/images/generations", {"json": {"prompt": "a", "size": "1x1"}, "headers": AUTH}, 422, "error"),
        ("POST", "/v1/images/generations", {"json": {"prompt": "a"}}, 401, "error"),
        ("POST", "/v1/images/generations", {"content": b"x" * 20_000, "headers": AUTH}, 413, "error"),
        ("GET", "/v1/models/other", {"headers": AUTH}, 404, "error"),
    ],
)
def test_every_error_body_carries_the_request_id(server, method, path, kwargs, status, key):
    headers = {**kwargs.pop("headers", {}), "X-Request-ID": f"err-{status}"}
    response = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["request_id"] == f"err-{status}" == response.headers["x-request-id"]
    assert key in body
    if key == "error":
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def test_one_structured_access_line_per_request_without_the_prompt(server):
    with Lines() as lines:
        ok = httpx.post(f"{server.url}/generate", json={"prompt": "secret prompt", "seed": 3, "n": 2}, headers=AUTH, timeout=60)
        bad = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a", "mode": "warp"}, headers=AUTH)
        v1 = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a red circle", "user": "alice@example.com",
                                                                    "mode": "off"}, headers=AUTH, timeout=60)
        httpx.get(f"{server.url}/metrics")
        access = lines.records(at_least=4, logger=ACCESS_LOGGER)
    assert ok.status_code == 200 and bad.status_code == 422 and v1.status_code == 200
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", "/generate", 200), ("POST", "/v1/images/generations", 422),
        ("POST", "/v1/images/generations", 200), ("GET", "/metrics", 200),
    ]
    first = access[0]
    assert first["request_id"] == ok.headers["x-request-id"]
    assert first["mode"] == "adapter" and first["database"] == "shapes" and first["n"] == 2
    assert first["event"] == "access" and first["duration_ms"] > 0 and first["level"] == "INFO"
    assert access[2]["mode"] == "off" and access[2]["database"] is None and access[2]["n"] == 1
    assert access[2]["user_hash"] and len(access[2]["user_hash"]) == 16
    text = json.dumps(access)
    assert "secret prompt" not in text and "alice" not in text and "prompt" not in first


def test_prompts_are_logged_only_with_irt_log_prompts(tiny_pipe, monkeypatch):
    monkeypatch.setenv("IRT_LOG_PROMPTS", "1")
    with ServerThread(create_app(tiny_pipe, ServiceSettings(), model_name="tiny")) as running, Lines() as lines:
        httpx.post(f"{running.url}/generate", json={"prompt": "two blue squares"}, timeout=60)
        (line,) = lines.records(at_least=1, logger=ACCESS_LOGGER, path="/generate")
    assert line["prompt"] == "two blue squares"


def test_access_log_can_be_turned_off(tiny_pipe):
    with Lines() as lines:
        with ServerThread(create_app(tiny_pipe, ServiceSettings(access_log=False), model_name="tiny")) as running:
            httpx.post(f"{running.url}/generate", json={"prompt": "two blue squares"}, timeout=60)
        # The server has stopped: every line it would write is written.
        assert lines.records(logger=ACCESS_LOGGER) == []


def test_worker_log_lines_name_the_request(server):
    with Lines() as lines:
        failed = httpx.post(f"{server.url}/generate", json={"prompt": "explode", "mode": "off"},
                            headers={**AUTH, "X-Request-ID": "boom-1"}, timeout=60)
        records = lines.records(at_least=2, request_id="boom-1")
    assert failed.status_code == 500
    assert {r["logger"] for r in records} == {"imageragturbo.service.batcher", ACCESS_LOGGER}
    failure = next(r for r in records if r["logger"] == "imageragturbo.service.batcher")
    assert failure["level"] == "ERROR" and "simulated" in failure["exception"]


@pytest.mark.slow
def test_a_server_process_writes_json_access_lines_to_stderr_by_default(tiny_model_dir):
    with ServerProcess(model_dir=tiny_model_dir) as server:
        response = httpx.post(f"{server.url}/generate", json={"prompt": "a red circle"}, headers={"X-Request-ID": "proc-1"}, timeout=60)
        assert response.status_code == 200
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    (line,) = [line for line in lines if line.get("request_id") == "proc-1"]
    assert line["path"] == "/generate" and line["status"] == 200 and line["mode"] == "adapter"
