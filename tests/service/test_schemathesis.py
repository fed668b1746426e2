"""Property-based fuzzing from /openapi.json (schemathesis): no generated request, valid or not,
gets a 5xx from the real server; and `schemathesis run --checks all` finds nothing: the
document is true to the server."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from serving import ServerThread, build_tiny_pipeline

from imageragturbo.service import ServiceSettings, create_app

# Cases per (operation, mode): /generate gets most of them; the GET routes have no inputs
# worth many cases, and hypothesis stops early once it has tried everything there.
GENERATE_CASES = {GenerationMode.POSITIVE: 220, GenerationMode.NEGATIVE: 160}
OTHER_CASES = 10
MIN_TOTAL_CASES = 300


def _fuzz(operation, mode: GenerationMode, max_examples: int, session: requests.Session, statuses: list[int]) -> None:
    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # the same cases on every run, so a failure is reproducible
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call_and_validate(session=session, checks=[not_a_server_error], timeout=30)
        statuses.append(response.status_code)

    run()


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error(tiny_pipe):
    settings = ServiceSettings(max_batch=8, batch_wait_ms=0, timeout_s=30)
    with ServerThread(create_app(tiny_pipe, settings, model_name="tiny")) as server, requests.Session() as session:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        statuses: dict[str, list[int]] = {}
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if operation.path == "/generate":
                    cases = GENERATE_CASES[mode]
                elif mode is GenerationMode.POSITIVE:
                    cases = OTHER_CASES
                else:
                    continue  # the GET routes take no parameters to break
                seen = statuses.setdefault(f"{operation.method.upper()} {operation.path} {mode.value}", [])
                _fuzz(operation, mode, cases, session, seen)

    total = sum(len(seen) for seen in statuses.values())
    assert total >= MIN_TOTAL_CASES, {key: len(seen) for key, seen in statuses.items()}
    assert all(status < 500 for seen in statuses.values() for status in seen)
    generated = statuses["POST /generate positive"]
    # Valid-by-schema requests often succeed (others break business rules: k beyond the
    # database, an unknown database name); schemathesis' negative cases are mostly refused
    # (some of its mutations, e.g. a malformed optional Authorization header, are harmless here).
    assert generated.count(200) >= len(generated) // 4, sorted(set(generated))
    negative = statuses["POST /generate negative"]
    assert sum(400 <= status < 500 for status in negative) >= len(negative) // 2, sorted(set(negative))


def _schemathesis_run(url: str, workdir, *extra: str, max_examples: int) -> dict:
    """`schemathesis run --checks all` against ``url``, as an operator would run it; its JSON report."""
    report = workdir / "report.json"
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json", "--checks", "all",
        "-n", str(max_examples), "--workers", "1", "--generation-deterministic", "--no-color",
        "--request-timeout", "30", "--report", "json", "--report-json-path", str(report), *extra,
    ]
    # Its working folder gets schemathesis' own cache (.schemathesis/): a temporary one, not the checkout.
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert done.returncode == 0 and result["failures"] == [] and result["errors"] == [], done.stdout[-6000:]
    return result


@pytest.mark.slow
def test_schemathesis_run_with_every_check_finds_nothing(tiny_model_dir, tmp_path):
    """Every check (status codes, content types, response schemas, positive data accepted,
    negative data refused, auth not ignored, ...) on a server with an API key and two databases
    of different sizes, the smaller the default (the per-database k rules of the document)."""
    pipe = build_tiny_pipeline(tiny_model_dir, databases=("small", "shapes"), rows={"small": 3})
    settings = ServiceSettings(api_key="k", batch_wait_ms=0, timeout_s=30)
    with ServerThread(create_app(pipe, settings, model_name="tiny")) as server:
        document = httpx.get(f"{server.url}/openapi.json").json()
        result = _schemathesis_run(server.url, tmp_path, "-H", "Authorization: Bearer k", max_examples=60)
    assert result["test_cases"]["generated"] >= 500, result["test_cases"]
    assert result["operations"]["tested"] == result["operations"]["total"]
    assert document["paths"]["/generate"]["post"]["security"] == [{"HTTPBearer": []}]


@pytest.mark.slow
def test_schemathesis_run_on_a_model_without_adapter_or_key(bare_pipe, tmp_path):
    with ServerThread(create_app(bare_pipe, ServiceSettings(batch_wait_ms=0), model_name="bare")) as server:
        document = httpx.get(f"{server.url}/openapi.json").json()
        result = _schemathesis_run(server.url, tmp_path, max_examples=15)
    assert result["test_cases"]["generated"] >= 100, result["test_cases"]
    # No key: nothing advertised; only the mode it can run; 422 has the body it is sent with.
    assert "securitySchemes" not in document.get("components", {}) and "401" not in document["paths"]["/generate"]["post"]["responses"]
    body = document["components"]["schemas"]["GenerateRequest"]["properties"]
    assert body["mode"]["anyOf"][0]["enum"] == ["off"] and body["seed"]["anyOf"][0]["maximum"] == 2**63 - 1
    ref = document["paths"]["/generate"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ValidationErrorResponse")
    assert document["components"]["schemas"]["ValidationErrorResponse"]["properties"]["detail"]["type"] == "string"
