"""vLLM's metrics test, for our server: start the real server (uvicorn on loopback) on a tiny
model, send N requests, and check every series and its counts; then promtool on the live text."""

import math
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import ServerThread

from imageragturbo.service import ServiceSettings, create_app
from imageragturbo.service.metrics import STAGE_BUCKETS_S

N_ADAPTER, N_OFF, N_BAD = 6, 4, 3
N_OK = N_ADAPTER + N_OFF
PIPELINE_STAGES = ("text_encode", "retrieve", "denoise", "vae_decode", "postprocess")


@pytest.fixture(scope="module")
def metrics_text(tiny_pipe):
    settings = ServiceSettings(max_batch=4, batch_wait_ms=0)
    with ServerThread(create_app(tiny_pipe, settings, model_name="tiny-sd", engine="torch")) as server:
        with httpx.Client(base_url=server.url) as client:
            for i in range(N_ADAPTER):
                assert client.post("/generate", json={"prompt": "a red circle", "seed": i}).status_code == 200
            for i in range(N_OFF):
                assert client.post("/generate", json={"prompt": "a", "seed": i, "mode": "off"}).status_code == 200
            for _ in range(N_BAD):
                assert client.post("/generate", json={"prompt": ""}).status_code == 422
            yield client.get("/metrics").text


def _families(text):
    return {family.name: family for family in text_string_to_metric_families(text)}


def _sample(family, name, **labels):
    values = [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(values) == 1, (name, labels, values)
    return values[0]


def test_every_series_is_there_with_its_counts(metrics_text):
    families = _families(metrics_text)
    expected = {
        "irt_request_duration_seconds": "histogram",
        "irt_stage_duration_seconds": "histogram",
        "irt_requests": "counter",
        "irt_batch_size": "histogram",
        "irt_queue_depth": "gauge",
        "irt_build_info": "gauge",
        "irt_batch_failures": "counter",
    }
    for name, kind in expected.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind and families[name].documentation

    requests = families["irt_request_duration_seconds"]
    assert _sample(requests, "irt_request_duration_seconds_count") == N_OK + N_BAD
    assert 0 < _sample(requests, "irt_request_duration_seconds_sum") < 60

    counts = families["irt_requests"]
    assert _sample(counts, "irt_requests_total", status="200") == N_OK
    assert _sample(counts, "irt_requests_total", status="422") == N_BAD

    stages = families["irt_stage_duration_seconds"]
    assert _sample(stages, "irt_stage_duration_seconds_count", stage="queue_wait") == N_OK
    for stage in PIPELINE_STAGES:
        # Nothing is retrieved in mode off, so retrieve is observed for adapter requests only.
        expected_count = N_ADAPTER if stage == "retrieve" else N_OK
        assert _sample(stages, "irt_stage_duration_seconds_count", stage=stage) == expected_count, stage
        assert _sample(stages, "irt_stage_duration_seconds_sum", stage=stage) > 0, stage
    # Buckets run from 0.5 ms to 2 s (DESIGN.md), then +Inf.
    les = sorted(
        {float(s.labels["le"]) for s in stages.samples if s.name.endswith("_bucket") and s.labels["stage"] == "denoise"}
    )
    assert les == [*STAGE_BUCKETS_S, math.inf] and les[0] == 0.0005 and les[-2] == 2.0

    batches = families["irt_batch_size"]
    # Sequential requests: one batch each, plus nothing from the warm-up (it bypasses the queue).
    assert _sample(batches, "irt_batch_size_count") == N_OK
    assert _sample(batches, "irt_batch_size_sum") == N_OK
    assert _sample(batches, "irt_batch_size_bucket", le="1.0") == N_OK

    assert _sample(families["irt_queue_depth"], "irt_queue_depth") == 0
    assert _sample(families["irt_batch_failures"], "irt_batch_failures_total") == 0
    info = families["irt_build_info"].samples
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels == {"model": "tiny-sd", "engine": "torch", "index": "shapes:exact"}
    assert "process_resident_memory_bytes" in families


def test_promtool_accepts_the_live_exposition(metrics_text, promtool):
    done = subprocess.run([promtool, "check", "metrics"], input=metrics_text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
