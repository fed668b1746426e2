"""OpenAI's images API, so the official clients work unchanged:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<IRT_API_KEY or anything>")
    client.images.generate(model="shapes-v1", prompt="a red circle on the left", n=4,
                           response_format="b64_json", extra_body={"seed": 7})

POST /v1/images/generations takes OpenAI's ``model``, ``prompt``, ``n``, ``size`` (only the
model's native one), ``response_format`` (``b64_json``; ``url`` needs storage this server does
not have) and ``user`` (logged as a hash only), plus this server's ``seed``, ``steps``,
``mode``, ``database``, ``k``, ``inject_w`` and ``neighbor_images``. The n images are made in one
pipeline call with seeds seed, seed + 1, ... (random when no seed is given; always echoed).
GET /v1/models lists the served model with its size, modes, databases and vocabulary. Errors
have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, plus ``request_id``.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from imageragturbo.service.generation import ApiError, GenerationService
from imageragturbo.service.negotiation import negotiate
from imageragturbo.service.openapi import error_responses
from imageragturbo.service.schemas import ImagesGenerationRequest, ImagesResponse, ModelList, ModelOut, OpenAIErrorResponse

JSON = ("application/json",)
OVERRIDES = {
    404: "unknown model or database",
    422: "invalid request: unknown field, a size other than the model's, response_format url, ...",
}


def add_openai_routes(app: FastAPI, service: GenerationService, guarded: list, *, auth: bool) -> None:
    """The /v1 routes; ``guarded``: the dependencies that check the API key (none without one)."""
    errors = error_responses(OpenAIErrorResponse, auth=auth, overrides=OVERRIDES)
    # GET routes read no body: only the statuses they can answer (422: FastAPI's check of the path).
    get_errors = {status: errors[status] for status in (400, 401, 404, 406, 408, 422, 431, 503) if status in errors}

    def check_openai_fields(body: ImagesGenerationRequest) -> None:
        if body.model is not None and body.model != service.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; this server serves {service.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if body.size not in (None, "auto", service.size):
            raise ApiError(
                422,
                f"size {body.size!r} is not supported: this model makes {service.size} images only "
                f"(send size {service.size!r}, 'auto', or leave it out)",
                param="size",
                code="unsupported_size",
            )
        if body.response_format == "url":
            raise ApiError(
                422,
                "response_format 'url' needs image storage, and none is configured on this server; "
                "use 'b64_json' (the default)",
                param="response_format",
                code="unsupported_response_format",
            )

    @app.post(
        "/v1/images/generations",
        dependencies=guarded,
        response_model=ImagesResponse,
        responses=errors,
        tags=["openai"],
    )
    async def images_generations(body: ImagesGenerationRequest, request: Request):
        context = request.state.irt
        context.user = body.user
        negotiate(request.headers.get("accept"), JSON)
        check_openai_fields(body)
        done = await service.generate(body, context)
        payload = {
            "created": int(time.time()),
            "data": [{"b64_json": image, "seed": seed, "neighbors": nbrs} for image, seed, nbrs in done.b64_images()],
            "model": service.model_name,
            "size": service.size,
            "output_format": "png",
            "mode": done.job.key.mode,
            "database": done.job.key.database,
            "warnings": done.warnings,
            "timings_ms": done.timings_ms,
        }
        return JSONResponse(payload, headers=done.headers)

    @app.get("/v1/models", dependencies=guarded, response_model=ModelList, responses=get_errors, tags=["openai"])
    async def list_models(request: Request):
        negotiate(request.headers.get("accept"), JSON)
        return {"object": "list", "data": [service.info()]}

    @app.get("/v1/models/{model}", dependencies=guarded, response_model=ModelOut, responses=get_errors, tags=["openai"])
    async def get_model(model: str, request: Request):
        negotiate(request.headers.get("accept"), JSON)
        if model != service.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {service.model_name!r}", param="model", code="model_not_found")
        return service.info()
