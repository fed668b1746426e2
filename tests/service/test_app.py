"""POST /generate and friends against the real uvicorn server on loopback, with a tiny model."""

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving import ServerThread

from imageragturbo.service import ServiceSettings, create_app

STAGES = ("queue_wait", "text_encode", "retrieve", "denoise", "vae_decode", "postprocess")


@pytest.fixture(scope="module")
def server(tiny_pipe):
    settings = ServiceSettings(max_batch=8, batch_wait_ms=20, max_queue=64, timeout_s=30)
    with ServerThread(create_app(tiny_pipe, settings, model_name="tiny")) as running:
        yield running


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def test_png_answer_has_seed_mode_and_server_timing(server, tiny_pipe):
    response = httpx.post(f"{server.url}/generate", json={"prompt": "a red circle", "seed": 42, "k": 3})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "42" and response.headers["x-mode"] == "adapter"
    timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    assert list(timing) == list(STAGES) and all(float(ms) >= 0 for ms in timing.values())
    assert float(timing["denoise"]) > 0 and float(timing["retrieve"]) > 0
    expected = tiny_pipe(["a red circle"], [42], mode="adapter", k=3).images[0]
    assert np.array_equal(_png(response.content), expected)


def test_json_answer_and_random_seed_is_echoed_and_reproducible(server):
    headers = {"Accept": "application/json"}
    first = httpx.post(f"{server.url}/generate", json={"prompt": "two blue squares", "k": 2}, headers=headers)
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    body = first.json()
    assert set(body) == {"image", "seed", "mode", "timings_ms", "neighbors"}
    assert body["mode"] == "adapter" and list(body["timings_ms"]) == list(STAGES)
    assert str(body["seed"]) == first.headers["x-seed"] and 0 <= body["seed"] < 2**63
    assert [n["caption"] for n in body["neighbors"]][0] == "two blue squares"
    assert all(set(n) == {"id", "caption", "score"} for n in body["neighbors"]) and len(body["neighbors"]) == 2
    again = httpx.post(f"{server.url}/generate", json={"prompt": "two blue squares", "k": 2, "seed": body["seed"]})
    assert np.array_equal(_png(base64.b64decode(body["image"])), _png(again.content))


def test_off_and_inject_modes_and_the_largest_seed(server):
    off = httpx.post(f"{server.url}/generate", json={"prompt": "a", "mode": "off", "seed": 2**63 - 1},
                     headers={"Accept": "application/json"})
    assert off.status_code == 200 and off.json()["neighbors"] == [] and off.json()["seed"] == 2**63 - 1
    inject = httpx.post(f"{server.url}/generate", json={"prompt": "a red circle", "mode": "inject", "inject_w": 1},
                        headers={"Accept": "application/json"})
    assert inject.status_code == 200 and len(inject.json()["neighbors"]) == 1  # top-1 only


def test_start_t_starts_from_the_top_neighbour_in_any_mode(server, tiny_pipe):
    for mode in ("off", "adapter"):
        body = {"prompt": "two blue squares", "seed": 9, "mode": mode, "k": 2, "start_t": 499}
        response = httpx.post(f"{server.url}/generate", json=body, headers={"Accept": "application/json"})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["mode"] == mode and answer["neighbors"][0]["caption"] == "two blue squares"
        expected = tiny_pipe(["two blue squares"], [9], mode=mode, k=2, start_t=499)
        assert np.array_equal(_png(base64.b64decode(answer["image"])), expected.images[0])
        from_noise = tiny_pipe(["two blue squares"], [9], mode=mode, k=2)
        assert not np.array_equal(expected.images[0], from_noise.images[0])


def _batch_count(url):
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "irt_batch_size":
            samples = {s.name: s.value for s in family.samples if not s.labels.get("le")}
            return samples["irt_batch_size_count"], samples["irt_batch_size_sum"]
    raise AssertionError("no irt_batch_size in /metrics")


def test_concurrent_requests_are_batched_and_get_the_image_they_get_alone(server, tiny_pipe):
    prompts = ["a red circle", "two blue squares", "a green triangle", "three red circles"] * 2
    weights = [0.2, 0.5, 0.8, 1.0, 0.3, 0.6, 0.9, 0.4]
    count0, sum0 = _batch_count(server.url)
    barrier = threading.Barrier(8)

    def send(i):
        barrier.wait()
        body = {"prompt": prompts[i], "seed": 1000 + i, "mode": "inject", "inject_w": weights[i]}
        return httpx.post(f"{server.url}/generate", json=body, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    count1, sum1 = _batch_count(server.url)
    assert [r.status_code for r in responses] == [200] * 8
    assert sum1 - sum0 == 8 and count1 - count0 < 8, "the 8 requests were not batched"
    for i, response in enumerate(responses):
        alone = tiny_pipe([prompts[i]], [1000 + i], mode="inject", inject_w=weights[i]).images[0]
        assert np.array_equal(_png(response.content), alone)  # bit for bit, batched or not


BAD_INPUTS = [
    ({}, 422, "prompt: Field required"),
    ({"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ({"prompt": "   \n\t"}, 422, "prompt: String should have at least 1 character"),
    ({"prompt": "x" * 1001}, 422, "prompt: String should have at most 1000 characters"),
    ({"prompt": "x" * 100_000}, 413, "request body is larger than 16384 bytes"),
    ({"prompt": 123}, 422, "prompt: Input should be a valid string"),
    ({"prompt": ["a red circle"]}, 422, "prompt: Input should be a valid string"),
    ({"prompt": None}, 422, "prompt: Input should be a valid string"),
    ({"prompt": "a", "seed": -1}, 422, "seed: Input should be greater than or equal to 0"),
    ({"prompt": "a", "seed": 2**63}, 422, "seed: Input should be less than or equal to 9223372036854775807"),
    ({"prompt": "a", "seed": 1.5}, 422, "seed: Input should be a valid integer"),
    ({"prompt": "a", "seed": "7"}, 422, "seed: Input should be a valid integer"),
    ({"prompt": "a", "steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
    ({"prompt": "a", "steps": 5}, 422, "steps: Input should be less than or equal to 4"),
    ({"prompt": "a", "steps": True}, 422, "steps: Input should be a valid integer"),
    ({"prompt": "a", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"prompt": "a", "k": 17}, 422, "k: Input should be less than or equal to 16"),
    ({"prompt": "a", "k": 7}, 422, "k must be at most 6, the size of database 'shapes'"),
    ({"prompt": "a", "inject_w": 0}, 422, "inject_w: Input should be greater than 0"),
    ({"prompt": "a", "inject_w": 1.5}, 422, "inject_w: Input should be less than or equal to 1"),
    ({"prompt": "a", "inject_w": "lots"}, 422, "inject_w: Input should be a valid number"),
    ({"prompt": "a", "mode": "fast"}, 422, "mode: Input should be 'adapter', 'inject' or 'off'"),
    ({"prompt": "a", "negative_prompt": "b"}, 422, "negative_prompt: unknown field (allowed: prompt, seed"),
    ({"prompt": "a", "database": "../../etc/passwd"}, 404, "unknown database '../../etc/passwd'; configured databases: shapes"),
    ({"prompt": "a", "database": "/etc/passwd"}, 404, "unknown database '/etc/passwd'"),
    ({"prompt": "a", "database": ""}, 404, "unknown database ''"),
    ({"prompt": "a", "database": 3}, 422, "database: Input should be a valid string"),
    ({"prompt": "a", "start_t": 0}, 422, "start_t: Input should be greater than or equal to 1"),
    ({"prompt": "a", "start_t": 999}, 422, "start_t: Input should be less than or equal to 998"),
    ({"prompt": "a", "start_t": 2.5}, 422, "start_t:"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_INPUTS, ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_bad_input_gets_a_4xx_that_says_what_was_wrong(server, body, status, message):
    response = httpx.post(f"{server.url}/generate", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert len(response.content) < 2000  # the bad value is not echoed back


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b"not json", "application/json", "body: the body is not valid JSON"),
        (b'{"prompt": "a",', "application/json", "body: the body is not valid JSON"),
        (b'{"prompt": "a", "inject_w": NaN}', "application/json", "inject_w: Input should be a finite number"),
        (b'["a red circle"]', "application/json", "body: the body must be a JSON object"),
        (b'{"prompt": "a"}', "text/plain", "body: the body must be a JSON object (send Content-Type: application/json)"),
        (b"", "application/json", "body:"),
        (b"\xff\xfe\x00garbage", "application/json", "body: the body is not valid JSON"),
    ],
)
def test_non_json_bodies_get_422(server, content, content_type, message):
    response = httpx.post(f"{server.url}/generate", content=content, headers={"Content-Type": content_type})
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_odd_but_valid_prompts_are_served(server):
    for prompt in ["\u00e9\u00e8 \u2603 \U0001f600 circle", "a\u0000b", "  padded  ", "x" * 1000]:
        response = httpx.post(f"{server.url}/generate", json={"prompt": prompt, "seed": 1})
        assert response.status_code == 200, (prompt[:20], response.text)


def test_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{server.url}/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "IRT_MAX_BODY_BYTES" in response.json()["detail"]


def test_health_ready_playground_and_unknown_routes(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["default_mode"] == "adapter" and ready["databases"] == {"shapes": 6}
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<title>ImageRAGTurbo playground</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no external assets
    assert httpx.get(f"{server.url}/nope").status_code == 404
    assert httpx.get(f"{server.url}/generate").status_code == 405
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert schema["components"]["schemas"]["GenerateRequest"]["additionalProperties"] is False


def test_model_without_adapter_defaults_to_off_and_names_why_a_mode_is_refused(bare_pipe):
    with ServerThread(create_app(bare_pipe, ServiceSettings(), model_name="bare")) as running:
        ok = httpx.post(f"{running.url}/generate", json={"prompt": "a red circle", "seed": 3})
        assert ok.status_code == 200 and ok.headers["x-mode"] == "off"
        adapter = httpx.post(f"{running.url}/generate", json={"prompt": "a", "mode": "adapter"})
        assert adapter.status_code == 422
        assert adapter.json()["detail"] == (
            "mode 'adapter' is not available: this model has no trained H-space adapter (no adapter/ folder); "
            "available modes: off"
        )
        inject = httpx.post(f"{running.url}/generate", json={"prompt": "a", "mode": "inject"})
        assert inject.status_code == 422 and "no database is configured" in inject.json()["detail"]
        db = httpx.post(f"{running.url}/generate", json={"prompt": "a", "database": "shapes"})
        assert db.status_code == 404 and "configured databases: none" in db.json()["detail"]
        assert httpx.get(f"{running.url}/readyz").json()["modes"] == ["off"]


def test_api_key_guards_generate_only(bare_pipe):
    settings = ServiceSettings(api_key="s3cret-key")
    with ServerThread(create_app(bare_pipe, settings)) as running:
        body = {"prompt": "a red circle"}
        missing = httpx.post(f"{running.url}/generate", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "missing or wrong API key" in missing.json()["detail"]
        wrong = httpx.post(f"{running.url}/generate", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        basic = httpx.post(f"{running.url}/generate", json=body, headers={"Authorization": "Basic czNjcmV0LWtleQ=="})
        assert basic.status_code == 401
        # Unauthenticated bad input is still 401: nothing about the body is revealed.
        assert httpx.post(f"{running.url}/generate", json={"bad": 1}).status_code == 401
        ok = httpx.post(f"{running.url}/generate", json=body, headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            assert httpx.get(f"{running.url}{path}").status_code == 200, path


class FlakyPipe:
    """Wraps a pipeline: a prompt containing 'explode' raises, 'slow' waits for ``unblock``,
    and warm-up waits for ``release`` (to see /readyz before warm-up is done)."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.release = threading.Event()
        self.release.set()
        self.unblock = threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompts, seeds, **kwargs):
        if prompts == ["warm-up"]:
            self.release.wait(300)
        if any("explode" in p for p in prompts):
            raise RuntimeError("CUDA error: out of memory (simulated)")
        if any("slow" in p for p in prompts):
            self.unblock.wait(300)
        return self._pipe(prompts, seeds, **kwargs)


def _status_counts(url):
    return {
        s.labels["status"]: s.value
        for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        if f.name == "irt_requests"
        for s in f.samples
        if s.name == "irt_requests_total"
    }


def test_failing_batch_is_500_with_its_message_and_the_server_keeps_serving(tiny_pipe):
    with ServerThread(create_app(FlakyPipe(tiny_pipe), ServiceSettings(max_batch=1), model_name="flaky")) as running:
        failed = httpx.post(f"{running.url}/generate", json={"prompt": "explode now", "mode": "off"}, timeout=60)
        assert failed.status_code == 500
        # The exception is in the log (under the request id), never in the answer.
        assert failed.json()["detail"] == f"internal error, request id {failed.headers['x-request-id']}"
        assert "CUDA" not in failed.text and "RuntimeError" not in failed.text
        assert httpx.post(f"{running.url}/generate", json={"prompt": "fine", "mode": "off"}, timeout=60).status_code == 200
        assert httpx.get(f"{running.url}/healthz").status_code == 200
        counts = _status_counts(running.url)
        assert counts["500"] == 1 and counts["200"] == 1


def test_request_over_the_timeout_is_504_and_the_worker_goes_on(tiny_pipe):
    flaky = FlakyPipe(tiny_pipe)
    with ServerThread(create_app(flaky, ServiceSettings(timeout_s=0.3, max_batch=1), model_name="flaky")) as running:
        slow = httpx.post(f"{running.url}/generate", json={"prompt": "slow one", "mode": "off"}, timeout=60)
        assert slow.status_code == 504 and "not answered within 0.3 s" in slow.json()["detail"]
        flaky.unblock.set()
        # The worker finishes the abandoned batch (its answer goes nowhere) and stays alive.
        for _ in range(600):
            if "irt_batch_size_count 1.0" in httpx.get(f"{running.url}/metrics").text:
                break
            threading.Event().wait(0.1)
        assert "irt_batch_size_count 1.0" in httpx.get(f"{running.url}/metrics").text
        assert httpx.get(f"{running.url}/healthz").status_code == 200
        assert _status_counts(running.url)["504"] == 1


def test_readyz_is_503_until_warm_up_is_done(tiny_pipe):
    flaky = FlakyPipe(tiny_pipe)
    flaky.release.clear()
    running = ServerThread(create_app(flaky, ServiceSettings(), model_name="flaky"))
    running.thread.start()
    try:
        for _ in range(3000):
            try:
                early = httpx.get(f"{running.url}/readyz")
                break
            except httpx.ConnectError:
                threading.Event().wait(0.05)
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        assert httpx.get(f"{running.url}/healthz").status_code == 200  # alive, just not ready
        flaky.release.set()
        for _ in range(3000):
            if httpx.get(f"{running.url}/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert httpx.get(f"{running.url}/readyz").status_code == 200
    finally:
        flaky.release.set()
        running.__exit__(None, None, None)


def test_openapi_documents_the_error_statuses(server):
    operation = httpx.get(f"{server.url}/openapi.json").json()["paths"]["/generate"]["post"]
    assert {"200", "400", "404", "406", "408", "413", "422", "429", "431", "500", "503", "504"} <= set(operation["responses"])
    assert "401" not in operation["responses"]  # no IRT_API_KEY here: nothing to authenticate
    assert set(operation["responses"]["200"]["content"]) == {"application/json", "image/png"}


class ThreadCountingPipe:
    """Wraps a pipeline and records torch's intra-op thread count inside each call (the worker's)."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.seen: list[tuple[str, int]] = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompts, seeds, **kwargs):
        self.seen.append((threading.current_thread().name, torch.get_num_threads()))
        return self._pipe(prompts, seeds, **kwargs)


def test_threads_setting_reaches_the_worker_and_readyz(bare_pipe):
    counting = ThreadCountingPipe(bare_pipe)
    before = torch.get_num_threads()
    try:
        with ServerThread(create_app(counting, ServiceSettings(threads=2), model_name="bare")) as running:
            assert httpx.get(f"{running.url}/readyz").json()["threads"] == 2
            assert httpx.post(f"{running.url}/generate", json={"prompt": "a red circle"}, timeout=60).status_code == 200
        assert counting.seen and set(counting.seen) == {("irt-worker", 2)}  # warm-up and the request
    finally:
        torch.set_num_threads(before)


def test_threads_unset_leaves_the_process_setting_alone(bare_pipe):
    with ServerThread(create_app(bare_pipe, ServiceSettings(), model_name="bare")) as running:
        assert httpx.get(f"{running.url}/readyz").json()["threads"] == torch.get_num_threads()


def test_a_prompt_of_unicode_separators_only_is_a_422(server):
    response = httpx.post(f"{server.url}/generate", json={"prompt": "\x1e\x1f", "seed": 1})
    assert response.status_code == 422 and "no visible character" in response.text
