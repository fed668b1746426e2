"""Property-based fuzzing from /openapi.json (schemathesis): no generated request, valid or not,
gets a 5xx from the real server."""

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from serving import ServerThread

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
