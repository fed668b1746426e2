"""Backpressure and memory under load, against a server in its own process (tiny model)."""

import threading
from collections import Counter

import httpx
import psutil
import pytest
from serving import ServerProcess


def _hammer(url: str, n_requests: int, n_threads: int, bodies, accept_json_every: int = 0) -> list[httpx.Response]:
    """``n_requests`` POST /generate from ``n_threads`` threads (one keep-alive client each)."""
    responses: list[httpx.Response] = []
    lock = threading.Lock()
    issued = 0

    def client_loop():
        nonlocal issued
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                with lock:
                    if issued >= n_requests:
                        return
                    i = issued
                    issued += 1
                json_answer = accept_json_every and i % accept_json_every == 0
                headers = {"Accept": "application/json"} if json_answer else {}
                response = client.post("/generate", json=bodies[i % len(bodies)] | {"seed": i}, headers=headers)
                with lock:
                    responses.append(response)

    threads = [threading.Thread(target=client_loop) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return responses


@pytest.mark.slow
def test_overload_answers_200_or_429_503_with_retry_after_then_serves_normally(tiny_model_dir):
    env = {"IRT_MAX_QUEUE": "1", "IRT_MAX_BATCH": "4", "IRT_BATCH_WAIT_MS": "2"}
    with ServerProcess(model_dir=tiny_model_dir, env=env) as server:
        responses = _hammer(server.url, 256, 64, [{"prompt": "a red circle"}, {"prompt": "two blue squares", "mode": "off"}])
        statuses = Counter(r.status_code for r in responses)
        assert sum(statuses.values()) == 256
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses[200] >= 1 and statuses[429] >= 1, statuses  # the queue of 1 did overflow
        for response in responses:
            if response.status_code != 200:
                assert int(response.headers["retry-after"]) >= 1
            if response.status_code == 429:
                assert "queue is full (1 requests waiting)" in response.json()["detail"]
        # Afterwards: normal service.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(5):
                assert client.post("/generate", json={"prompt": "a green triangle", "seed": i}).status_code == 200
            assert client.get("/readyz").status_code == 200
            metrics = client.get("/metrics").text
        assert f'irt_requests_total{{status="429"}} {float(statuses[429])}' in metrics
        assert "irt_queue_depth 0.0" in metrics
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_rss_after_2000_requests_is_within_10_percent_of_after_100(tiny_model_dir):
    env = {"IRT_MAX_QUEUE": "256", "IRT_MAX_BATCH": "32", "IRT_BATCH_WAIT_MS": "5"}
    # Two batch keys (adapter, inject), so batches stay full; long and short prompts, per-item
    # inject weights, PNG and JSON answers.
    bodies = [
        {"prompt": "a red circle"},
        {"prompt": "a yellow triangle above a red square", "mode": "inject", "inject_w": 0.5},
        {"prompt": "three purple circles " * 20},
        {"prompt": "two blue squares", "mode": "inject", "inject_w": 0.9},
    ]
    with ServerProcess(model_dir=tiny_model_dir, env=env) as server:
        process = psutil.Process(server.process.pid)
        first = _hammer(server.url, 100, 32, bodies, accept_json_every=3)
        rss_100 = process.memory_info().rss
        rest = _hammer(server.url, 1900, 32, bodies, accept_json_every=3)
        rss_2000 = process.memory_info().rss
    assert Counter(r.status_code for r in first + rest) == {200: 2000}
    growth = (rss_2000 - rss_100) / rss_100
    assert abs(growth) <= 0.10, f"RSS {rss_100 / 2**20:.1f} MiB after 100, {rss_2000 / 2**20:.1f} MiB after 2000"
