"""The HTTP layer: a thin FastAPI router over :class:`GenerationService` over the micro-batcher.

``create_app(pipe, settings)`` takes an already-built pipeline, so tests serve tiny models and
``imageragturbo serve`` serves a model directory; nothing here loads files.

Routes: POST /generate (this project's API), POST /v1/images/generations and GET /v1/models
(OpenAI's, in openai_api.py), GET /info (the served model: size, modes, databases, vocabulary),
/healthz, /readyz, /metrics and the playground at /.

Status codes of the generation routes: 200 image(s); 401 missing/wrong bearer token; 404
unknown database (or model, under /v1); 413 body over IRT_MAX_BODY_BYTES; 422 invalid request
(the message names the field), a mode this model cannot run, a size other than the model's, or
(IRT_STRICT_VOCAB=1) words outside the vocabulary; 429 queue full and 503 shutting down (both
with Retry-After); 504 not answered within IRT_TIMEOUT_S; 500 only when the pipeline itself
raised. Every answer has an X-Request-ID header and every error body a request_id.
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
from imageragturbo.service.generation import RETRY_AFTER_S, GenerationService, error_responses
from imageragturbo.service.middleware import OPENAI_PREFIX, RequestContext, RequestMiddleware, error_body
from imageragturbo.service.schemas import (
    ErrorResponse,
    GenerateListResponse,
    GenerateRequest,
    GenerateResponse,
    ImagesGenerationRequest,
    ModelOut,
)
from imageragturbo.service.settings import ServiceSettings

logger = logging.getLogger(__name__)

PLAYGROUND_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/png" not in accept


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


ERROR_RESPONSES = error_responses(ErrorResponse)


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
    )

    bearer = HTTPBearer(auto_error=False, description="IRT_API_KEY, when the server sets one")

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
        body = error_body(
            request.url.path,
            exc.status_code,
            str(exc.detail),
            request_context(request).request_id,
            param=getattr(exc, "param", None),
            code=getattr(exc, "code", None),
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.post(
        "/generate",
        dependencies=[Depends(check_api_key)],
        response_model=GenerateResponse | GenerateListResponse,
        responses={
            200: {
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "description": "n = 1: PNG by default (headers X-Seed, X-Mode, Server-Timing, X-IRT-Warnings), "
                "GenerateResponse with 'Accept: application/json'; n > 1: GenerateListResponse (JSON) always",
            },
            **ERROR_RESPONSES,
        },
    )
    async def generate(body: GenerateRequest, request: Request):
        done = await service.generate(body, request_context(request))
        job = done.job
        headers = {"X-Seed": ",".join(map(str, job.seeds)), "X-Mode": job.key.mode, **done.headers}
        if body.n > 1:
            payload = {
                "images": [{"image": image, "seed": seed, "neighbors": nbrs} for image, seed, nbrs in done.b64_images()],
                "mode": job.key.mode,
                "timings_ms": done.timings_ms,
            }
        elif _wants_json(request):
            ((image, seed, neighbors),) = done.b64_images()
            payload = {"image": image, "seed": seed, "mode": job.key.mode, "timings_ms": done.timings_ms, "neighbors": neighbors}
        else:
            return Response(done.images[0]["png"], media_type="image/png", headers=headers)
        if done.warnings:
            payload["warnings"] = done.warnings
        return JSONResponse(payload, headers=headers)

    @app.get("/info", response_model=ModelOut)
    async def info():
        """The served model: image size, modes, databases (and the default), tokenizer and, for a
        word-level tokenizer, its vocabulary. Open like /readyz (the playground reads it)."""
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

    add_openai_routes(app, service, check_api_key)
    return app


def run_server(app: FastAPI, *, host: str, port: int, settings: ServiceSettings, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM, then shut down gracefully: stop
    accepting, answer every request already received (each is bounded by IRT_TIMEOUT_S), drain
    the queue, stop the worker."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # The app writes its own structured access line (IRT_ACCESS_LOG); uvicorn's would be a second.
        access_log=False,
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
    )
    uvicorn.Server(config).run()
