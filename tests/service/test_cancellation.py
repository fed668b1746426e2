"""Jobs nobody waits for are never computed: a client that disconnected, or a request whose
deadline passed, before the worker took its job; counted as irt_requests_total{status="cancelled"}."""

import json
import socket
import threading
import time

import httpx
from serving import ServerThread, metric_value

from imageragturbo.service import ServiceSettings, create_app


class CountingPipe:
    """Wraps a pipeline: records every call's prompts; a prompt containing 'hold' blocks the
    worker until ``release`` is set."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.holding = threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompts, seeds, **kwargs):
        self.calls.append(list(prompts))
        if any("hold" in p for p in prompts):
            self.holding.set()
            self.release.wait(120)
        return self._pipe(prompts, seeds, **kwargs)

    def prompts_run(self) -> list[str]:
        return [p for call in self.calls for p in call]


def _wait_for(condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _raw_request(port: int, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    sock.sendall(head.encode() + payload)
    return sock


def test_32_disconnected_queued_clients_are_never_computed_and_counted_cancelled(tiny_pipe):
    pipe = CountingPipe(tiny_pipe)
    settings = ServiceSettings(max_batch=8, batch_wait_ms=0, max_queue=64, timeout_s=120)
    with ServerThread(create_app(pipe, settings, model_name="tiny")) as server:
        warmup_calls = len(pipe.calls)
        holder = {}
        hold = threading.Thread(
            target=lambda: holder.update(r=httpx.post(f"{server.url}/generate", json={"prompt": "hold", "mode": "off"}, timeout=120))
        )
        hold.start()
        assert pipe.holding.wait(60), "the worker never took the holding request"
        sockets = [_raw_request(server.port, {"prompt": f"queued {i}", "mode": "off", "seed": i, "n": 1 + i % 3})
                   for i in range(32)]
        assert _wait_for(lambda: metric_value(server.url, "irt_queue_depth") == 32), "the 32 requests did not queue"
        for sock in sockets:
            sock.close()
        assert _wait_for(lambda: metric_value(server.url, "irt_requests_total", status="cancelled") == 32)
        assert metric_value(server.url, "irt_queue_depth") == 0  # they left the queue at once
        pipe.release.set()
        hold.join(60)
        assert holder["r"].status_code == 200
        after = httpx.post(f"{server.url}/generate", json={"prompt": "after", "mode": "off"}, timeout=60)
        assert after.status_code == 200
        # None of the 32 ran: the pipeline saw the warm-up, the holder and the request after.
        assert pipe.calls[warmup_calls:] == [["hold"], ["after"]]
        assert not any(p.startswith("queued") for p in pipe.prompts_run())
        assert metric_value(server.url, "irt_requests_total", status="cancelled") == 32
        assert metric_value(server.url, "irt_requests_total", status="200") == 2


def test_requests_whose_deadline_passes_in_the_queue_are_dropped_and_counted_cancelled(tiny_pipe):
    pipe = CountingPipe(tiny_pipe)
    settings = ServiceSettings(max_batch=8, batch_wait_ms=0, timeout_s=0.5)
    with ServerThread(create_app(pipe, settings, model_name="tiny")) as server:
        warmup_calls = len(pipe.calls)
        responses = {}

        def send(name):
            responses[name] = httpx.post(f"{server.url}/generate", json={"prompt": name, "mode": "off"}, timeout=60)

        hold = threading.Thread(target=send, args=("hold",))
        hold.start()
        assert pipe.holding.wait(60)
        queued = [threading.Thread(target=send, args=(f"late {i}",)) for i in range(3)]
        for thread in queued:
            thread.start()
        for thread in queued:
            thread.join(60)
        pipe.release.set()
        hold.join(60)
        # The holder ran past its deadline: a 504 for a job that was computed.
        assert responses["hold"].status_code == 504
        for i in range(3):
            late = responses[f"late {i}"]
            assert late.status_code == 504
            assert late.json()["detail"] == "not answered within 0.5 s (IRT_TIMEOUT_S); it was still queued and was dropped"
        assert _wait_for(lambda: metric_value(server.url, "irt_batch_size_count") == 1)
        assert pipe.calls[warmup_calls:] == [["hold"]]
        assert metric_value(server.url, "irt_requests_total", status="cancelled") == 3
        assert metric_value(server.url, "irt_requests_total", status="504") == 1
