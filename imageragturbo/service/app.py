"""The HTTP layer: a thin FastAPI router over :class:`GenerationService` over the micro-batcher.

``create_app(pipe, settings)`` takes an already-built pipeline, so tests serve tiny models and
``imageragturbo serve`` serves a model directory; nothing here loads files.

Routes: POST /generate (this project's API), POST /v1/images/generations and GET /v1/models
(OpenAI's, in openai_api.py), GET /info (the served model: size, modes, databases, vocabulary),
/healthz, /readyz, /metrics and the playground at /.

Status codes of the generation routes: 200 image(s); 400 a Host outside IRT_ALLOWED_HOSTS (or
not HTTP); 401 missing/wrong bearer token (only with IRT_API_KEY); 404 unknown database (or
model, under /v1); 406 an Accept header that allows none of the answer's media types; 408 a
request that did not arrive within IRT_READ_TIMEOUT_S; 413 body over IRT_MAX_BODY_BYTES; 422
invalid request (the message names the field), a mode this model cannot run, a size other than
the model's, or (IRT_STRICT_VOCAB=1) words outside the vocabulary; 429 queue full and 503
shutting down (both with Retry-After); 431 headers over IRT_MAX_HEADER_BYTES; 504 not answered
within IRT_TIMEOUT_S; 500 only when the pipeline itself raised, saying only the request id (the
log has the rest). Every answer has an X-Request-ID header and every error body a request_id,
in one shape (``{"detail", "request_id"}``; OpenAI's ``{"error": {...}}`` under /v1/).
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from importlib import resources

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from imageragturbo.model.pipeline import RagTurboPipeline
from imageragturbo.service import openapi
from imageragturbo.service.generation import RETRY_AFTER_S, GenerationService
from imageragturbo.service.middleware import OPENAI_PREFIX, RequestContext, RequestMiddleware, error_body
from imageragturbo.service.negotiation import negotiate
from imageragturbo.service.schemas import (
    ErrorResponse,
    GenerateListResponse,
    GenerateRequest,
    GenerateResponse,
    ImagesGenerationRequest,
    ModelOut,
    ValidationErrorResponse,
)
from imageragturbo.service.settings import ServiceSettings

logger = logging.getLogger(__name__)

PLAYGROUND_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


def request_context(request: Request) -> RequestContext:
    return request.state.irt


def _format_validation_error(exc: RequestValidationError, fields) -> tuple[str, list[dict]]:
    """One readable sentence per problem; the offending input is never echoed back (it may be
    100k characters)."""
    errors = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        msg = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":
            loc = "body"
            msg = f"the body is not valid JSON ({(error.get('ctx') or {}).get('error', 'decode error')})"
        elif loc == "body" and error.get("type") in ("model_attributes_type", "dict_type"):
            msg = "the body must be a JSON object (send Content-Type: application/json)"
        elif error.get("type") == "extra_forbidden":
            msg = "unknown field (allowed: " + ", ".join(fields) + ")"
        errors.append({"field": loc, "message": msg, "type": error.get("type", "")})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return detail, errors


def create_app(
    pipe: RagTurboPipeline,
    settings: ServiceSettings | None = None,
    *,
    model_name: str | None = None,
    engine: str = "torch",
) -> FastAPI:
    """The ASGI app serving ``pipe``. The worker starts (and warms up) in the app's lifespan."""
    from imageragturbo.service.openai_api import add_openai_routes

    settings = settings or ServiceSettings()
    model_name = model_name or pipe.components.model_dir.name
    service = GenerationService(pipe, settings, model_name=model_name, engine=engine)
    playground = resources.files("imageragturbo.service").joinpath("static/playground.html").read_text("utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        try:
            yield
        finally:
            # Uvicorn has already stopped accepting and waited for in-flight requests; this
            # drains anything still queued and stops the worker.
            await anyio.to_thread.run_sync(service.batcher.close)

    app = FastAPI(
        title="ImageRAGTurbo",
        version="0.1.0",
        summary="One-step text-to-image with retrieval-augmented H-space adapters",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.max_body_bytes,
        metrics=service.metrics,
        access_log=settings.access_log,
        log_prompts=settings.log_prompts,
        allowed_hosts=settings.allowed_hosts,
    )

    bearer = HTTPBearer(auto_error=False, description="the server's IRT_API_KEY")

    def check_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        expected = settings.api_key.get_secret_value().encode()
        given = credentials.credentials.encode() if credentials is not None else b""
        if credentials is None or credentials.scheme.lower() != "bearer" or not secrets.compare_digest(given, expected):
            raise HTTPException(
                401, "missing or wrong API key: send 'Authorization: Bearer <IRT_API_KEY>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # Without a key nothing is guarded, and the document advertises no bearer scheme.
    auth = settings.api_key is not None
    guarded = [Depends(check_api_key)] if auth else []

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        openai = request.url.path.startswith(OPENAI_PREFIX)
        fields = (ImagesGenerationRequest if openai else GenerateRequest).model_fields
        detail, errors = _format_validation_error(exc, fields)
        param = errors[0]["field"] if errors and errors[0]["field"] != "body" else None
        body = error_body(request.url.path, 422, detail, request_context(request).request_id, param=param)
        if not openai:
            body["errors"] = errors
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        param, code = getattr(exc, "param", None), getattr(exc, "code", None)
        body = error_body(request.url.path, exc.status_code, str(exc.detail), request_context(request).request_id,
                          param=param, code=code)
        if exc.status_code == 422 and "detail" in body:  # every 422 of /generate lists its errors
            body["errors"] = [{"field": param or "body", "message": str(exc.detail), "type": code or "value_error"}]
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.post(
        "/generate",
        dependencies=guarded,
        response_model=GenerateResponse | GenerateListResponse,
        responses={
            200: {
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "description": "n = 1: PNG, or GenerateResponse (JSON) when the Accept header prefers it "
                "(headers X-Seed, X-Mode, Server-Timing, X-IRT-Warnings); n > 1: GenerateListResponse (JSON)",
            },
            **openapi.error_responses(ErrorResponse, auth=auth, validation_model=ValidationErrorResponse),
        },
    )
    async def generate(body: GenerateRequest, request: Request):
        # Before any work: an answer the client cannot take is not made.
        offers = ("image/png", "application/json") if body.n == 1 else ("application/json",)
        media_type = negotiate(request.headers.get("accept"), offers)
        done = await service.generate(body, request_context(request))
        job = done.job
        headers = {"X-Seed": ",".join(map(str, job.seeds)), "X-Mode": job.key.mode, **done.headers}
        if body.n > 1:
            payload = {
                "images": [{"image": image, "seed": seed, "neighbors": nbrs} for image, seed, nbrs in done.b64_images()],
                "mode": job.key.mode,
                "timings_ms": done.timings_ms,
            }
        elif media_type == "application/json":
            ((image, seed, neighbors),) = done.b64_images()
            payload = {"image": image, "seed": seed, "mode": job.key.mode, "timings_ms": done.timings_ms, "neighbors": neighbors}
        else:
            return Response(done.images[0]["png"], media_type="image/png", headers=headers)
        if done.warnings:
            payload["warnings"] = done.warnings
        return JSONResponse(payload, headers=headers)

    @app.get("/info", response_model=ModelOut, responses={406: {"model": ErrorResponse}})
    async def info(request: Request):
        """The served model: image size, modes, databases (and the default), tokenizer and, for a
        word-level tokenizer, its vocabulary. Open like /readyz (the playground reads it)."""
        negotiate(request.headers.get("accept"), ("application/json",))
        return service.info()

    @app.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz(request: Request):
        """Alive: the process answers and its worker thread runs."""
        if not service.batcher.alive:
            body = error_body("/healthz", 503, "the worker thread has stopped", request_context(request).request_id)
            return JSONResponse(body, status_code=503)
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request):
        """Ready: model and databases loaded and warm-up done (503 before, and while stopping)."""
        if not (service.batcher.ready.is_set() and service.batcher.alive):
            return JSONResponse(
                error_body("/readyz", 503, "not ready: warming up or shutting down", request_context(request).request_id),
                status_code=503,
                headers={"Retry-After": RETRY_AFTER_S},
            )
        return {
            "status": "ready",
            "model": model_name,
            "engine": engine,
            "modes": service.available_modes,
            "default_mode": service.default_mode,
            "databases": {name: len(db.store) for name, db in pipe.databases.items()},
            "default_database": service.default_database,
            "size": service.size,
            "threads": service.worker_threads,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def playground_page():
        return HTMLResponse(playground, headers={"Content-Security-Policy": PLAYGROUND_CSP})

    add_openai_routes(app, service, guarded, auth=auth)
    openapi.install(app, service)
    return app


def run_server(app: FastAPI, *, host: str, port: int, settings: ServiceSettings, log_level: str = "info") -> None:
    """Serve ``app`` until SIGINT/SIGTERM (http_server.run: the connection limits, and an end with
    ServerStoppedError when the worker cannot serve)."""
    from imageragturbo.service import http_server

    http_server.run(app, host=host, port=port, settings=settings, log_level=log_level)
