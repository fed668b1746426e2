"""Hand-written bad requests against the real server: each gets the 4xx it should, with a
message naming what was wrong, the request id, and never a 5xx; content negotiation (RFC 9110)."""

import json

import httpx
import pytest
from serving import ServerThread

from imageragturbo.service import ServiceSettings, create_app
from imageragturbo.service.negotiation import choose, parse_accept

GENERATE, OPENAI = "/generate", "/v1/images/generations"
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_pipe):
    settings = ServiceSettings(max_batch=8, batch_wait_ms=0, timeout_s=30, read_timeout_s=5)
    with ServerThread(create_app(tiny_pipe, settings, model_name="tiny")) as running:
        yield running


# (body, status, words of the message): sent to both generation routes.
BAD_BODIES = [
    ({}, 422, "prompt: Field required"),
    ({"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ({"prompt": " \t\n"}, 422, "not whitespace"),
    ({"prompt": "\x1e\x1f"}, 422, "not whitespace"),
    ({"prompt": "\x85\u3000\u2028"}, 422, "not whitespace"),
    ({"prompt": "x" * 1001}, 422, "prompt: String should have at most 1000 characters"),
    ({"prompt": "x" * 1000 + " "}, 422, "prompt: String should have at most 1000 characters"),
    ({"prompt": 7}, 422, "prompt: Input should be a valid string"),
    ({"prompt": None}, 422, "prompt: Input should be a valid string"),
    ({"prompt": ["a"]}, 422, "prompt: Input should be a valid string"),
    ({"prompt": {"text": "a"}}, 422, "prompt: Input should be a valid string"),
    ({"prompt": True}, 422, "prompt: Input should be a valid string"),
    ({"prompt": "a", "seed": -1}, 422, "seed: Input should be greater than or equal to 0"),
    ({"prompt": "a", "seed": 2**63}, 422, "seed: Input should be less than or equal to 9223372036854775807"),
    ({"prompt": "a", "seed": 2**64 + 5}, 422, "seed: Input should be less than or equal to"),
    ({"prompt": "a", "seed": 1.5}, 422, "seed: Input should be a valid integer"),
    ({"prompt": "a", "seed": "7"}, 422, "seed: Input should be a valid integer"),
    ({"prompt": "a", "seed": True}, 422, "seed: Input should be a valid integer"),
    ({"prompt": "a", "seed": [1]}, 422, "seed: Input should be a valid integer"),
    ({"prompt": "a", "seed": 1e30}, 422, "seed: Input should be less than or equal to"),
    ({"prompt": "a", "seed": 2**63 - 1, "n": 2}, 422, "seed + n - 1 must be at most 9223372036854775807"),
    ({"prompt": "a", "steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
    ({"prompt": "a", "steps": 5}, 422, "steps: Input should be less than or equal to 4"),
    ({"prompt": "a", "steps": True}, 422, "steps: Input should be a valid integer"),
    ({"prompt": "a", "steps": "1"}, 422, "steps: Input should be a valid integer"),
    ({"prompt": "a", "steps": 1.5}, 422, "steps: Input should be a valid integer"),
    ({"prompt": "a", "steps": None}, 422, "steps: Input should be a valid integer"),
    ({"prompt": "a", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"prompt": "a", "k": 17}, 422, "k: Input should be less than or equal to 16"),
    ({"prompt": "a", "k": 7}, 422, "k must be at most 6, the size of database 'shapes'"),
    ({"prompt": "a", "k": 7, "mode": "off"}, 422, "k must be at most 6"),
    ({"prompt": "a", "k": 7, "mode": "inject"}, 422, "k must be at most 6"),
    ({"prompt": "a", "k": "4"}, 422, "k: Input should be a valid integer"),
    ({"prompt": "a", "k": False}, 422, "k: Input should be a valid integer"),
    ({"prompt": "a", "k": 2.5}, 422, "k: Input should be a valid integer"),
    ({"prompt": "a", "inject_w": 0}, 422, "inject_w: Input should be greater than 0"),
    ({"prompt": "a", "inject_w": -0.1}, 422, "inject_w: Input should be greater than 0"),
    ({"prompt": "a", "inject_w": 1.0000001}, 422, "inject_w: Input should be less than or equal to 1"),
    ({"prompt": "a", "inject_w": "0.5"}, 422, "inject_w: Input should be a valid number"),
    ({"prompt": "a", "inject_w": True}, 422, "inject_w: Input should be a valid number"),
    ({"prompt": "a", "inject_w": None}, 422, "inject_w: Input should be a valid number"),
    ({"prompt": "a", "inject_w": [0.5]}, 422, "inject_w: Input should be a valid number"),
    ({"prompt": "a", "inject_w": 10**400}, 422, "inject_w: Input should be a finite number"),
    ({"prompt": "a", "mode": "fast"}, 422, "mode: Input should be 'adapter', 'inject' or 'off'"),
    ({"prompt": "a", "mode": "ADAPTER"}, 422, "mode: Input should be"),
    ({"prompt": "a", "mode": ""}, 422, "mode: Input should be"),
    ({"prompt": "a", "mode": 1}, 422, "mode: Input should be"),
    ({"prompt": "a", "database": "../../etc/passwd"}, 404, "unknown database '../../etc/passwd'"),
    ({"prompt": "a", "database": ""}, 404, "unknown database ''"),
    ({"prompt": "a", "database": "Shapes"}, 404, "configured databases: shapes"),
    ({"prompt": "a", "database": "x" * 129}, 422, "database: String should have at most 128 characters"),
    ({"prompt": "a", "database": 3}, 422, "database: Input should be a valid string"),
    ({"prompt": "a", "database": ["shapes"]}, 422, "database: Input should be a valid string"),
    ({"prompt": "a", "n": 0}, 422, "n: Input should be greater than or equal to 1"),
    ({"prompt": "a", "n": 11}, 422, "n: Input should be less than or equal to 10"),
    ({"prompt": "a", "n": "2"}, 422, "n: Input should be a valid integer"),
    ({"prompt": "a", "n": True}, 422, "n: Input should be a valid integer"),
    ({"prompt": "a", "neighbor_images": "yes"}, 422, "neighbor_images: Input should be a valid boolean"),
    ({"prompt": "a", "neighbor_images": 2}, 422, "neighbor_images: Input should be a valid boolean"),
    ({"prompt": "a", "negative_prompt": "b"}, 422, "negative_prompt: unknown field (allowed: prompt, seed"),
    ({"prompt": "a", "Prompt": "b"}, 422, "Prompt: unknown field"),
]

# (content, content type, status, words): the bytes of the body themselves are wrong.
BAD_CONTENT = [
    (b"not json", "application/json", 422, "the body is not valid JSON"),
    (b'{"prompt": "a",', "application/json", 422, "the body is not valid JSON"),
    (b'{"prompt": "a"}{"prompt": "b"}', "application/json", 422, "the body is not valid JSON"),
    (b"\xff\xfe\x00garbage", "application/json", 422, "the body is not valid JSON"),
    (b"", "application/json", 422, "body:"),
    (b'["a red circle"]', "application/json", 422, "the body must be a JSON object"),
    (b'"a red circle"', "application/json", 422, "the body must be a JSON object"),
    (b"42", "application/json", 422, "the body must be a JSON object"),
    (b"null", "application/json", 422, "the body must be a JSON object"),
    (b'{"prompt": "a"}', "text/plain", 422, "send Content-Type: application/json"),
    (b"prompt=a", "application/x-www-form-urlencoded", 422, "send Content-Type: application/json"),
    (b'{"prompt": "a", "inject_w": NaN}', "application/json", 422, "inject_w: Input should be a finite number"),
    (b'{"prompt": "a", "inject_w": Infinity}', "application/json", 422, "inject_w: Input should be a finite number"),
    (b'{"prompt": "a", "seed": 1e400}', "application/json", 422, "seed: Input should be a valid integer"),
    (b"x" * 20_000, "application/json", 413, "request body is larger than 16384 bytes (IRT_MAX_BODY_BYTES)"),
]

OPENAI_BODIES = [
    ({"prompt": "a", "size": "1024x1024"}, 422, "size '1024x1024' is not supported"),
    ({"prompt": "a", "size": "16x16x"}, 422, "is not supported"),
    ({"prompt": "a", "size": 16}, 422, "size: Input should be a valid string"),
    ({"prompt": "a", "response_format": "url"}, 422, "response_format 'url' needs image storage"),
    ({"prompt": "a", "response_format": "png"}, 422, "response_format: Input should be 'b64_json' or 'url'"),
    ({"prompt": "a", "model": "dall-e-3"}, 404, "model 'dall-e-3' is not served here"),
    ({"prompt": "a", "model": 3}, 422, "model: Input should be a valid string"),
    ({"prompt": "a", "quality": "hd"}, 422, "quality: unknown field"),
    ({"prompt": "a", "user": "u" * 257}, 422, "user: String should have at most 256 characters"),
    ({"prompt": "a", "style": "vivid"}, 422, "style: unknown field"),
]

# (method, path, headers, body, status, words): the request line or headers are wrong.
BAD_EXCHANGES = [
    ("GET", GENERATE, {}, None, 405, "Method Not Allowed"),
    ("PUT", GENERATE, JSON_TYPE, {"prompt": "a"}, 405, "Method Not Allowed"),
    ("DELETE", GENERATE, {}, None, 405, "Method Not Allowed"),
    ("PATCH", OPENAI, JSON_TYPE, {"prompt": "a"}, 405, "Method Not Allowed"),
    ("POST", "/healthz", JSON_TYPE, {"prompt": "a"}, 405, "Method Not Allowed"),
    ("GET", "/nope", {}, None, 404, "Not Found"),
    ("POST", "/generated", JSON_TYPE, {"prompt": "a"}, 404, "Not Found"),
    ("GET", "/v1/models/other", {}, None, 404, "model 'other' is not served here"),
    ("GET", "/v1/images", {}, None, 404, "Not Found"),
    ("POST", GENERATE, {"Accept": "text/html"}, {"prompt": "a"}, 406, "image/png, application/json"),
    ("POST", GENERATE, {"Accept": "application/json;q=0"}, {"prompt": "a"}, 406, "allows none"),
    ("POST", GENERATE, {"Accept": "image/png;q=0, application/json;q=0"}, {"prompt": "a"}, 406, "allows none"),
    ("POST", GENERATE, {"Accept": "*/*;q=0"}, {"prompt": "a"}, 406, "allows none"),
    ("POST", GENERATE, {"Accept": "image/png"}, {"prompt": "a", "n": 2}, 406, "application/json"),
    ("POST", GENERATE, {"Accept": "image/*"}, {"prompt": "a", "n": 3}, 406, "application/json"),
    ("POST", OPENAI, {"Accept": "image/png"}, {"prompt": "a"}, 406, "application/json"),
    ("POST", OPENAI, {"Accept": "application/json;q=0"}, {"prompt": "a"}, 406, "allows none"),
    ("GET", "/v1/models", {"Accept": "text/plain"}, None, 406, "application/json"),
    ("GET", "/info", {"Accept": "application/xml"}, None, 406, "application/json"),
]

CASES = (
    [pytest.param("POST", path, {}, body, status, words, id=f"{path}:{str(body)[:48]}")
     for path in (GENERATE, OPENAI) for body, status, words in BAD_BODIES]
    + [pytest.param("POST", path, {"Content-Type": kind}, content, status, words, id=f"{path}:{content[:30]!r}")
       for path in (GENERATE, OPENAI) for content, kind, status, words in BAD_CONTENT]
    + [pytest.param("POST", OPENAI, {}, body, status, words, id=f"openai:{str(body)[:48]}") for body, status, words in OPENAI_BODIES]
    + [pytest.param(*case, id=f"{case[0]} {case[1]} {case[2]}") for case in BAD_EXCHANGES]
)


def test_there_are_at_least_100_bad_requests():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "words"), CASES)
def test_a_bad_request_gets_its_4xx_with_a_message(server, method, path, headers, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    response = httpx.request(method, f"{server.url}{path}", headers={"X-Request-ID": "bad-1", **headers}, timeout=60, **kwargs)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    message = payload["error"]["message"] if path.startswith("/v1/") else payload["detail"]
    assert words in message, payload
    assert payload["request_id"] == "bad-1" == response.headers["x-request-id"]
    assert len(response.content) < 2000  # the bad value is not echoed back
    if status == 422 and not path.startswith("/v1/"):
        assert payload["errors"] and all(set(e) == {"field", "message", "type"} for e in payload["errors"])


@pytest.mark.parametrize(
    ("body", "expected"),
    [({"prompt": "a", "seed": 3.0}, 3), ({"prompt": "a", "seed": 3, "k": 2.0, "n": 1.0, "steps": 1.0}, 3),
     ({"prompt": "a", "seed": 5, "mode": "inject", "inject_w": 5e-324}, 5), ({"prompt": "a", "seed": 6, "inject_w": 1}, 6)],
    ids=["3.0", "integral floats", "5e-324", "int weight"],
)
def test_what_the_schema_calls_valid_is_served(server, body, expected):
    response = httpx.post(f"{server.url}{GENERATE}", json=body, headers={"Accept": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["seed"] == expected


def test_the_default_k_shrinks_to_a_small_database(tiny_model_dir):
    from serving import build_tiny_pipeline

    pipe = build_tiny_pipeline(tiny_model_dir, databases=("small",), rows={"small": 3})
    with ServerThread(create_app(pipe, ServiceSettings(), model_name="tiny")) as running:
        ok = httpx.post(f"{running.url}{GENERATE}", json={"prompt": "a"}, headers={"Accept": "application/json"}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["neighbors"]) == 3
        asked = httpx.post(f"{running.url}{GENERATE}", json={"prompt": "a", "k": 4}, timeout=60)
        assert asked.status_code == 422 and "k must be at most 3" in asked.json()["detail"]
        schema = httpx.get(f"{running.url}/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
        assert schema["properties"]["k"]["maximum"] == 3


@pytest.mark.parametrize(
    ("accept", "n", "answer"),
    [
        (None, 1, "image/png"),
        ("*/*", 1, "image/png"),
        ("", 1, "image/png"),
        ("garbage;;", 1, "image/png"),  # no parsable range: as if absent
        ("application/json", 1, "application/json"),
        ("application/json, image/png", 1, "image/png"),  # a tie: the route's order
        ("application/json, */*", 1, "application/json"),  # a tie: the more specific range
        ("image/*, application/json", 1, "application/json"),
        ("image/png;q=0.5, application/json", 1, "application/json"),
        ("application/json;q=0, */*", 1, "image/png"),
        ("*/*;q=0.1, application/json;q=0.2", 1, "application/json"),
        ("IMAGE/PNG", 1, "image/png"),
        ("application/json", 2, "application/json"),
        ("*/*", 2, "application/json"),
    ],
)
def test_the_answer_follows_the_accept_header(server, accept, n, answer):
    headers = {} if accept is None else {"Accept": accept}
    response = httpx.post(f"{server.url}{GENERATE}", json={"prompt": "a", "seed": 1, "n": n}, headers=headers, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == answer


@pytest.mark.parametrize(
    ("header", "ranges"),
    [
        ("text/html;level=1;q=0.5, */*", [("text", "html", 0.5), ("*", "*", 1.0)]),
        ("image/png;q=1.0001", []),  # a weight must be 0 to 1 with at most 3 decimals
        ("image/png;q=abc, application/json", [("application", "json", 1.0)]),
        ("*/png", []),
        ("json", []),
        (" Application/JSON ; Q=0.3", [("application", "json", 0.3)]),
    ],
)
def test_accept_parsing(header, ranges):
    assert parse_accept(header) == ranges


def test_choose_is_none_when_nothing_is_acceptable():
    assert choose("application/json;q=0", ("image/png", "application/json")) is None
    assert choose("text/*", ("application/json",)) is None
    assert choose("application/*;q=0.1", ("image/png", "application/json")) == "application/json"


def test_a_500_says_only_the_request_id(tiny_pipe):
    from test_app import FlakyPipe

    with ServerThread(create_app(FlakyPipe(tiny_pipe), ServiceSettings(max_batch=1), model_name="flaky")) as running:
        for path in (GENERATE, OPENAI):
            response = httpx.post(f"{running.url}{path}", json={"prompt": "explode", "mode": "off"},
                                  headers={"X-Request-ID": "boom-2"}, timeout=60)
            assert response.status_code == 500
            text = json.dumps(response.json())
            assert "internal error, request id boom-2" in text and "CUDA" not in text and "Error" not in text
