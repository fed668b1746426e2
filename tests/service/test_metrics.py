"""vLLM's metrics test, for our server: start the real server (uvicorn on loopback) on a tiny
model with two databases, send N requests, and check every series, its labels and its counts;
then promtool on the live text."""

import math
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import ServerThread, build_tiny_pipeline

from imageragturbo.service import ServiceSettings, create_app
from imageragturbo.service.metrics import STAGE_BUCKETS_S

N_ADAPTER, N_OFF, N_BAD = 6, 4, 3
N_DIM, N_INJECT_OPENAI = 2, 3  # adapter on database 'dim'; inject through /v1/images/generations (n=2 each)
N_OK = N_ADAPTER + N_OFF + N_DIM + N_INJECT_OPENAI
PIPELINE_STAGES = ("text_encode", "retrieve", "denoise", "vae_decode", "postprocess")
STAGES = ("queue_wait", *PIPELINE_STAGES)
# (mode, database) -> requests that ran there
RAN = {("adapter", "shapes"): N_ADAPTER, ("off", "none"): N_OFF, ("adapter", "dim"): N_DIM, ("inject", "shapes"): N_INJECT_OPENAI}


@pytest.fixture(scope="module")
def metrics_text(tiny_model_dir):
    pipe = build_tiny_pipeline(tiny_model_dir, databases=("shapes", "dim"))
    settings = ServiceSettings(max_batch=4, batch_wait_ms=0)
    with ServerThread(create_app(pipe, settings, model_name="tiny-sd", engine="torch")) as server:
        with httpx.Client(base_url=server.url) as client:
            for i in range(N_ADAPTER):
                assert client.post("/generate", json={"prompt": "a red circle", "seed": i}).status_code == 200
            for i in range(N_OFF):
                assert client.post("/generate", json={"prompt": "a", "seed": i, "mode": "off"}).status_code == 200
            for _ in range(N_BAD):
                assert client.post("/generate", json={"prompt": ""}).status_code == 422
            for i in range(N_DIM):
                assert client.post("/generate", json={"prompt": "a", "seed": i, "database": "dim"}).status_code == 200
            for i in range(N_INJECT_OPENAI):
                body = {"prompt": "two blue squares", "seed": i, "mode": "inject", "n": 2}
                assert client.post("/v1/images/generations", json=body).status_code == 200
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
        "irt_database_rows": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind and families[name].documentation

    requests = families["irt_request_duration_seconds"]
    counted = {
        (s.labels["mode"], s.labels["database"]): s.value for s in requests.samples if s.name.endswith("_count")
    }
    # Every servable (mode, database) pair has its series from the start; refused requests
    # before their mode was known are mode="none".
    assert counted == {**RAN, ("inject", "dim"): 0, ("none", "none"): N_BAD}
    assert sum(counted.values()) == N_OK + N_BAD
    assert 0 < sum(s.value for s in requests.samples if s.name.endswith("_sum")) < 60

    counts = families["irt_requests"]
    assert _sample(counts, "irt_requests_total", status="200") == N_OK
    assert _sample(counts, "irt_requests_total", status="422") == N_BAD
    assert _sample(counts, "irt_requests_total", status="cancelled") == 0

    stages = families["irt_stage_duration_seconds"]
    for (mode, database), ran in {**RAN, ("inject", "dim"): 0}.items():
        for stage in STAGES:
            labels = {"stage": stage, "mode": mode, "database": database}
            if stage == "retrieve" and mode == "off":
                # Nothing is retrieved in mode off: no retrieve series there at all.
                assert not [s for s in stages.samples if all(s.labels.get(k) == v for k, v in labels.items())]
                continue
            # Per request (an n=2 request counts once), whatever its batch size.
            assert _sample(stages, "irt_stage_duration_seconds_count", **labels) == ran, labels
            if ran and stage != "queue_wait":
                assert _sample(stages, "irt_stage_duration_seconds_sum", **labels) > 0, labels
    # Buckets run from 0.5 ms to 30 s, then +Inf, for both latency histograms.
    for family, labels in ((stages, {"stage": "denoise", "mode": "adapter", "database": "shapes"}),
                           (requests, {"mode": "adapter", "database": "shapes"})):
        les = sorted(
            float(s.labels["le"]) for s in family.samples
            if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in labels.items())
        )
        assert les == [*STAGE_BUCKETS_S, math.inf] and les[0] == 0.0005 and les[-2] == 30.0

    batches = families["irt_batch_size"]
    # Sequential requests: one batch each, plus nothing from the warm-up (it bypasses the queue);
    # the batch size counts images, so an n=2 request is a batch of 2.
    n_single = N_ADAPTER + N_OFF + N_DIM
    assert _sample(batches, "irt_batch_size_count") == N_OK
    assert _sample(batches, "irt_batch_size_sum") == n_single + 2 * N_INJECT_OPENAI
    assert _sample(batches, "irt_batch_size_bucket", le="1.0") == n_single
    assert _sample(batches, "irt_batch_size_bucket", le="2.0") == N_OK

    assert _sample(families["irt_queue_depth"], "irt_queue_depth") == 0
    assert _sample(families["irt_batch_failures"], "irt_batch_failures_total") == 0
    info = families["irt_build_info"].samples
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels == {"model": "tiny-sd", "engine": "torch", "device": "cpu", "dtype": "float32", "database": "shapes,dim"}
    rows = {(s.labels["database"], s.labels["searcher"], s.labels["default"]): s.value for s in families["irt_database_rows"].samples}
    assert rows == {("shapes", "exact", "true"): 6, ("dim", "exact", "false"): 6}
    assert "process_resident_memory_bytes" in families


def test_promtool_accepts_the_live_exposition(metrics_text, promtool):
    done = subprocess.run([promtool, "check", "metrics"], input=metrics_text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
