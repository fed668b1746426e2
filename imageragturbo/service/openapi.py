"""The OpenAPI document, true to the server that serves it.

FastAPI's document is the start; three things are changed:

* every error status a generation route can answer is documented, each with the body it has
  (:data:`ERROR_STATUSES`; a 422 on /generate also lists its ``errors``; /v1 has OpenAI's shape);
* the request bodies are pydantic's own schemas (FastAPI's document model holds numeric bounds as
  floats, which turns the seed's 2**63 - 1 into 2**63);
* the bounds that depend on the served model are this server's: the modes it can run, k at most
  the databases' rows (per database when their sizes differ), the one image size it makes, and
  ``response_format`` without ``url`` (refused: no image storage);
* the rules across fields are JSON Schema conditions (``allOf`` of ``if``/``then``): seed + n - 1
  at most 2**63 - 1, and k per database.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from imageragturbo.service.schemas import MAX_K, MAX_N, MAX_SEED, GenerateRequest, ImagesGenerationRequest

ERROR_STATUSES = {
    400: "the request is not valid HTTP, or its Host is not in IRT_ALLOWED_HOSTS",
    401: "missing or wrong bearer token",
    404: "unknown database name",
    406: "the Accept header allows none of the media types of the answer",
    408: "the request did not fully arrive within IRT_READ_TIMEOUT_S",
    413: "request body over IRT_MAX_BODY_BYTES",
    422: "invalid request: the message names the field (mode, k, size, ... as this server serves them)",
    429: "queue full; retry after Retry-After seconds",
    431: "request line and header fields over IRT_MAX_HEADER_BYTES",
    500: "internal error; the server log has it under the request id",
    503: "shutting down, or too many open connections; retry after Retry-After seconds",
    504: "not answered within IRT_TIMEOUT_S",
}
"""What the generation routes' error statuses mean (their OpenAPI ``responses``)."""


def error_responses(model, *, auth: bool, validation_model=None, overrides: dict[int, str] | None = None) -> dict:
    """OpenAPI ``responses`` for the error statuses, bodies of ``model`` (422: ``validation_model``);
    401 only where a key is required."""
    texts = {**ERROR_STATUSES, **(overrides or {})}
    if not auth:
        texts.pop(401)
    return {
        status: {"model": validation_model if status == 422 and validation_model else model, "description": text}
        for status, text in sorted(texts.items())
    }


def install(app: FastAPI, service) -> None:
    """Serve :func:`document` as /openapi.json (built on first use, then kept)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, service)
        return app.openapi_schema

    app.openapi = openapi


def document(app: FastAPI, service) -> dict:
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes, openapi_version=app.openapi_version
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (GenerateRequest, ImagesGenerationRequest):
        body = copy.deepcopy(model.model_json_schema(ref_template="#/components/schemas/{model}"))
        body["allOf"] = [*_seeds_fit(), *_served_bounds(body, service)]
        components[model.__name__] = body
    if "size" in components[ImagesGenerationRequest.__name__]["properties"]:
        properties = components[ImagesGenerationRequest.__name__]["properties"]
        properties["size"]["anyOf"] = [{"type": "string", "enum": [service.size, "auto"]}, {"type": "null"}]
        properties["response_format"]["anyOf"] = [{"type": "string", "enum": ["b64_json"]}, {"type": "null"}]
    return schema


def _seeds_fit() -> list[dict]:
    """Image i gets seed + i, so with n images the seed is at most MAX_SEED - n + 1."""
    return [
        {
            "if": {"properties": {"n": {"minimum": n}}, "required": ["n"]},
            "then": {"properties": {"seed": {"anyOf": [{"type": "integer", "maximum": MAX_SEED - n + 1}, {"type": "null"}]}}},
        }
        for n in range(2, MAX_N + 1)
    ]


def _served_bounds(body: dict, service) -> list[dict]:
    """Sets this server's modes and k bound in ``body``; returns the k rules per database."""
    properties = body["properties"]
    properties["mode"]["anyOf"] = [{"type": "string", "enum": list(service.available_modes)}, {"type": "null"}]
    sizes = {name: len(db.store) for name, db in service.pipe.databases.items()}
    if not sizes:
        # start_t starts from a database's neighbour: with none, only its default is valid.
        properties["start_t"] = {"type": "null", "description": "no database is configured: start from noise only"}
        return []
    top = min(MAX_K, max(sizes.values()))
    properties["k"]["maximum"] = top
    # k is checked against the database the request names, or the default one.
    rules = [
        {"if": {"properties": {"database": {"const": name}}, "required": ["database"]}, "then": _k_at_most(size)}
        for name, size in sizes.items()
        if size < top
    ]
    default_size = sizes[service.default_database]
    if default_size < top:
        unnamed = {"anyOf": [{"not": {"required": ["database"]}}, {"properties": {"database": {"type": "null"}}}]}
        rules.append({"if": unnamed, "then": _k_at_most(default_size)})
    return rules


def _k_at_most(size: int) -> dict:
    return {"properties": {"k": {"maximum": size}}}
