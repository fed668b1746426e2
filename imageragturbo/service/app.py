"""The HTTP layer: a thin FastAPI router over :class:`GenerationService` over the micro-batcher.

``create_app(pipe, settings)`` takes an already-built pipeline, so tests serve tiny models and
``imageragturbo serve`` serves a model directory; nothing here loads files.

Status codes of POST /generate: 200 image; 401 missing/wrong bearer token; 404 unknown
database; 413 body over IRT_MAX_BODY_BYTES; 422 invalid request (the message names the field)
or a mode this model cannot run; 429 queue full and 503 shutting down (both with Retry-After);
504 not answered within IRT_TIMEOUT_S; 500 only when the pipeline itself raised.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources

import anyio
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST

from imageragturbo.model.pipeline import RagTurboPipeline
from imageragturbo.service.batcher import (
    BatchFailedError,
    BatchKey,
    Job,
    JobResult,
    MicroBatcher,
    QueueFullError,
    ShuttingDownError,
    pipeline_runner,
)
from imageragturbo.service.metrics import SERVER_STAGES, ServiceMetrics
from imageragturbo.service.schemas import MAX_SEED, ErrorResponse, GenerateRequest, GenerateResponse
from imageragturbo.service.settings import ServiceSettings

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
# PNG-encoding a 32x32 image takes ~0.1 ms, cheaper than a thread hop; a 512x512 one takes
# milliseconds and would stall the event loop, so it goes to a thread.
INLINE_PNG_MAX_PIXELS = 128 * 128
PLAYGROUND_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


class GenerationService:
    """Turns validated requests into jobs, waits for them, and keeps the metrics."""

    def __init__(self, pipe: RagTurboPipeline, settings: ServiceSettings, *, model_name: str, engine: str):
        self.pipe = pipe
        self.settings = settings
        self.engine = engine
        self.model_name = model_name
        self.database_names = list(pipe.databases)
        retrieval_ready = bool(self.database_names)
        self.available_modes = [mode for mode in pipe.denoisers if mode == "off" or retrieval_ready]
        # 'adapter' is the product's default, but a model without a trained adapter (or served
        # without a database) must still answer a request that names no mode.
        self.default_mode = "adapter" if "adapter" in self.available_modes else "off"
        index = ",".join(
            f"{name}:{getattr(db.searcher, 'kind', type(db.searcher).__name__)}" for name, db in pipe.databases.items()
        )
        self.metrics = ServiceMetrics(
            model=model_name, engine=engine, index=index or "none", queue_depth=lambda: self.batcher.queue_depth
        )
        self.worker_threads: int | None = None
        """torch's intra-op threads as the worker thread sees them (set once the worker runs)."""
        self.batcher = MicroBatcher(
            pipeline_runner(pipe),
            max_batch=settings.max_batch,
            batch_wait_ms=settings.batch_wait_ms,
            max_queue=settings.max_queue,
            warmup=self._prepare_worker,
            on_batch=self.metrics.observe_batch,
        )

    def _prepare_worker(self) -> None:
        """Runs first in the worker thread, before /readyz turns ready: the intra-op thread
        count, then the warm-up."""
        if self.settings.threads is not None:
            # Set from the thread that runs the model: OpenMP's thread count is a per-thread
            # setting (torch also records it process-wide for threads it starts later).
            torch.set_num_threads(self.settings.threads)
        self.worker_threads = torch.get_num_threads()
        logger.info("worker: %d intra-op thread(s)", self.worker_threads)
        if self.settings.warmup:
            self._warmup()

    def _warmup(self) -> None:
        """One generation per servable mode, so the first user request pays no lazy initialisation."""
        for mode in self.available_modes:
            database = self.database_names[0] if mode != "off" else None
            self.pipe(["warm-up"], [0], mode=mode, steps=1, k=1, database=database)

    # -- request -> job ---------------------------------------------------------------------

    def make_job(self, request: GenerateRequest) -> Job:
        mode = request.mode or self.default_mode
        if mode not in self.available_modes:
            if mode == "adapter" and "adapter" not in self.pipe.denoisers:
                reason = "this model has no trained H-space adapter (no adapter/ folder)"
            else:
                reason = "it retrieves, and no database is configured (start the server with --index NAME=DIR)"
            raise HTTPException(
                422, f"mode {mode!r} is not available: {reason}; available modes: {', '.join(self.available_modes)}"
            )
        if request.database is not None and request.database not in self.pipe.databases:
            configured = ", ".join(self.database_names) or "none"
            raise HTTPException(404, f"unknown database {request.database!r}; configured databases: {configured}")
        if mode == "off":
            key = BatchKey(mode="off", steps=request.steps, k=1, database=None)
        else:
            database = request.database or self.database_names[0]
            size = len(self.pipe.databases[database].store)
            k = 1 if mode == "inject" else request.k
            if k > size:
                raise HTTPException(422, f"k must be at most {size}, the size of database {database!r}; got {request.k}")
            key = BatchKey(mode=mode, steps=request.steps, k=k, database=database)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return Job(prompt=request.prompt, seed=seed, inject_w=request.inject_w, key=key)

    async def run(self, job: Job) -> JobResult:
        try:
            future = self.batcher.submit(job)
        except QueueFullError as exc:
            raise HTTPException(429, f"{exc}; retry later", headers={"Retry-After": RETRY_AFTER_S}) from exc
        except ShuttingDownError as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.settings.timeout_s)
        except TimeoutError as exc:
            raise HTTPException(504, f"not answered within {self.settings.timeout_s:g} s (IRT_TIMEOUT_S)") from exc
        except BatchFailedError as exc:
            raise HTTPException(500, str(exc)) from exc
        except ShuttingDownError as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc


def encode_png(image) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (fast compression: the images are small or noisy)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def server_timing(timings_ms: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={timings_ms.get(stage, 0.0):.3f}" for stage in SERVER_STAGES)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/png" not in accept


def _format_validation_error(exc: RequestValidationError) -> dict:
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
            msg = "unknown field (allowed: " + ", ".join(GenerateRequest.model_fields) + ")"
        errors.append({"field": loc, "message": msg, "type": error.get("type", "")})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return {"detail": detail, "errors": errors}


class _GenerateGuard:
    """Pure ASGI middleware: caps every request body at ``max_body_bytes`` (413, before the
    app parses anything) and records status and duration of POST /generate."""

    def __init__(self, app, *, max_body_bytes: int, metrics: ServiceMetrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        observed = scope["path"] == "/generate" and scope["method"] == "POST"
        status = 500

        async def send_tracking(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await self._too_large(send_tracking)
                return
            replayed = False

            async def receive_replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, receive_replay, send_tracking)
        finally:
            if observed:
                self.metrics.observe_request(status, time.perf_counter() - start)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is over the limit (checked on Content-Length first)."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body_bytes:
                        return None
                except ValueError:
                    pass  # h11 refuses a malformed Content-Length before we get here
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # client went away; the app sees an empty body and its answer goes nowhere
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, send) -> None:
        body = JSONResponse(
            {"detail": f"request body is larger than {self.max_body_bytes} bytes (IRT_MAX_BODY_BYTES)"},
            status_code=413,
        )
        await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        401: "missing or wrong bearer token (only when IRT_API_KEY is set)",
        404: "unknown database name",
        413: "request body too large",
        429: "queue full; retry after Retry-After seconds",
        500: "the pipeline failed on this request's batch",
        503: "shutting down; retry after Retry-After seconds",
        504: "not answered within IRT_TIMEOUT_S",
    }.items()
}


def create_app(
    pipe: RagTurboPipeline,
    settings: ServiceSettings | None = None,
    *,
    model_name: str | None = None,
    engine: str = "torch",
) -> FastAPI:
    """The ASGI app serving ``pipe``. The worker starts (and warms up) in the app's lifespan."""
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
    app.add_middleware(_GenerateGuard, max_body_bytes=settings.max_body_bytes, metrics=service.metrics)

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
        return JSONResponse(_format_validation_error(exc), status_code=422)

    @app.post(
        "/generate",
        dependencies=[Depends(check_api_key)],
        response_model=GenerateResponse,
        responses={
            200: {
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "description": "PNG by default (headers X-Seed, X-Mode, Server-Timing); JSON with "
                "'Accept: application/json'",
            },
            **ERROR_RESPONSES,
        },
    )
    async def generate(body: GenerateRequest, request: Request):
        job = service.make_job(body)
        result = await service.run(job)
        image = result.image
        if image.shape[0] * image.shape[1] <= INLINE_PNG_MAX_PIXELS:
            png = encode_png(image)
        else:
            png = await anyio.to_thread.run_sync(encode_png, image)
        headers = {"X-Seed": str(job.seed), "X-Mode": job.key.mode, "Server-Timing": server_timing(result.timings_ms)}
        if _wants_json(request):
            payload = {
                "image": base64.b64encode(png).decode("ascii"),
                "seed": job.seed,
                "mode": job.key.mode,
                "timings_ms": {stage: round(result.timings_ms.get(stage, 0.0), 3) for stage in SERVER_STAGES},
                "neighbors": [{"id": n.id, "caption": n.caption, "score": n.score} for n in result.neighbors],
            }
            return JSONResponse(payload, headers=headers)
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz():
        """Alive: the process answers and its worker thread runs."""
        if not service.batcher.alive:
            return JSONResponse({"detail": "the worker thread has stopped"}, status_code=503)
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        """Ready: model and databases loaded and warm-up done (503 before, and while stopping)."""
        if not (service.batcher.ready.is_set() and service.batcher.alive):
            return JSONResponse(
                {"detail": "not ready: warming up or shutting down"},
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
            "threads": service.worker_threads,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def playground_page():
        return HTMLResponse(playground, headers={"Content-Security-Policy": PLAYGROUND_CSP})

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
        access_log=False,  # one log line per request costs more than the whole HTTP layer here
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
    )
    uvicorn.Server(config).run()
