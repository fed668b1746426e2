""":class:`GenerationService`: validated requests -> jobs -> answers, for every generation route.

POST /generate and POST /v1/images/generations both go through :meth:`GenerationService.make_job`
and :meth:`GenerationService.run`, so the same (prompt, seed) gives the same pixels through
either. Nothing here parses HTTP; the routes live in app.py and openai_api.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache

import anyio
import torch
from fastapi import HTTPException
from PIL import Image

from imageragturbo.model.pipeline import INJECT_K, RagTurboPipeline
from imageragturbo.model.text import PromptCheck, PromptChecker
from imageragturbo.service.batcher import (
    BatchFailedError,
    BatchKey,
    Job,
    JobExpiredError,
    JobResult,
    MicroBatcher,
    QueueFullError,
    ShuttingDownError,
    pipeline_runner,
)
from imageragturbo.service.metrics import CANCELLED, NO_LABEL, SERVER_STAGES, ServiceMetrics
from imageragturbo.service.middleware import CLIENT_CLOSED_REQUEST, RequestContext, internal_error
from imageragturbo.service.schemas import MAX_N, MAX_SEED, GenerateRequest
from imageragturbo.service.settings import ServiceSettings

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
# A small PNG is encoded on the event loop, cheaper than a thread hop; a large one would stall
# the loop, so it goes to a thread (results/design-notes.md).
INLINE_PNG_MAX_PIXELS = 128 * 128
WARNINGS_HEADER = "X-IRT-Warnings"
MAX_NAMED_WORDS = 20
MAX_WORD_CHARS = 40


class ApiError(HTTPException):
    """An HTTPException that also names the request field at fault (OpenAI's ``param``) and a code."""

    def __init__(self, status_code: int, detail: str, *, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(status_code, detail, headers=headers)
        self.param = param
        self.code = code


def native_image_size(pipe: RagTurboPipeline) -> tuple[int, int]:
    """(width, height) of the pipeline's images: its latent size times the VAE's upsampling (as
    diffusers computes it; the warm-up then measures the real thing)."""
    _, height, width = pipe.latent_shape
    factor = 2 ** (len(pipe.components.vae.config.block_out_channels) - 1)
    return width * factor, height * factor


def encode_png(image) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (fast compression: the images are small or noisy)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def server_timing(timings_ms: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={timings_ms.get(stage, 0.0):.3f}" for stage in SERVER_STAGES)


def rounded_timings(timings_ms: dict[str, float]) -> dict[str, float]:
    return {stage: round(timings_ms.get(stage, 0.0), 3) for stage in SERVER_STAGES}


def quote_words(words: list[str]) -> str:
    """Words as JSON strings (ASCII, so a header can carry them), at most MAX_NAMED_WORDS of them."""
    shown = [json.dumps(word if len(word) <= MAX_WORD_CHARS else word[:MAX_WORD_CHARS] + "...") for word in words]
    more = len(words) - MAX_NAMED_WORDS
    return ", ".join(shown[:MAX_NAMED_WORDS]) + (f" and {more} more" if more > 0 else "")


@dataclass
class Generation:
    """A finished request's parts, for the route to shape into its answer."""

    job: Job
    result: JobResult
    images: list[dict]
    """Per image: ``{"png": bytes, "neighbors": [...]}`` (see :meth:`GenerationService.encode`)."""
    warnings: list[str]
    timings_ms: dict[str, float]
    """Rounded, every server stage."""
    headers: dict[str, str]
    """Server-Timing, and X-IRT-Warnings when there are warnings."""

    def b64_images(self) -> list[tuple[str, int, list[dict]]]:
        """(base64 PNG, seed, neighbours) per image."""
        return [(b64(item["png"]), seed, item["neighbors"]) for item, seed in zip(self.images, self.job.seeds)]


class GenerationService:
    """Turns validated requests into jobs, waits for them, and keeps the metrics."""

    def __init__(self, pipe: RagTurboPipeline, settings: ServiceSettings, *, model_name: str, engine: str):
        self.pipe = pipe
        self.settings = settings
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())
        self.database_names = list(pipe.databases)
        self.default_database = pipe.databases.default
        retrieval_ready = bool(self.database_names)
        self.available_modes = [mode for mode in pipe.denoisers if mode == "off" or retrieval_ready]
        # 'adapter' is the product's default, but a model without a trained adapter (or served
        # without a database) must still answer a request that names no mode.
        self.default_mode = "adapter" if "adapter" in self.available_modes else "off"
        self.image_size = native_image_size(pipe)
        unet_parameter = next(pipe.components.unet.parameters())
        self.device = str(pipe.device)
        self.dtype = str(unet_parameter.dtype).removeprefix("torch.")
        self.checker = PromptChecker(pipe.encoder.tokenizer, pipe.encoder.max_length)
        self._check = lru_cache(maxsize=4096)(self.checker.check)
        self.vocabulary = self.checker.vocabulary()
        self.searchers = {
            name: getattr(db.searcher, "kind", type(db.searcher).__name__) for name, db in pipe.databases.items()
        }
        series = [
            (mode, NO_LABEL if mode == "off" else name)
            for mode in self.available_modes
            for name in ([NO_LABEL] if mode == "off" else self.database_names)
        ]
        self.metrics = ServiceMetrics(
            model=model_name,
            engine=engine,
            device=self.device,
            dtype=self.dtype,
            databases={name: (self.searchers[name], len(db.store)) for name, db in pipe.databases.items()},
            series=series,
            queue_depth=lambda: self.batcher.queue_depth,
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

    # -- the worker's start ------------------------------------------------------------------

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
            database = self.default_database if mode != "off" else None
            result = self.pipe(["warm-up"], [0], mode=mode, steps=1, k=1, database=database)
            latents = getattr(result, "latents", None)
            if isinstance(latents, torch.Tensor) and not bool(torch.isfinite(latents).all()):
                where = f"mode {mode!r}" + (f" on database {database!r}" if database else "")
                raise ValueError(f"{where} made NaN or infinite values: the model or the database is broken")
            images = getattr(result, "images", None)
            if images is not None and getattr(images, "ndim", 0) == 4:
                self.image_size = (int(images.shape[2]), int(images.shape[1]))

    # -- what the server serves --------------------------------------------------------------

    @property
    def size(self) -> str:
        return f"{self.image_size[0]}x{self.image_size[1]}"

    def info(self) -> dict:
        """The served model, as GET /v1/models and GET /info list it."""
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "imageragturbo",
            "size": self.size,
            "max_n": MAX_N,
            "engine": self.engine,
            "device": self.device,
            "dtype": self.dtype,
            "modes": self.available_modes,
            "default_mode": self.default_mode,
            "databases": [
                {"name": name, "size": len(db.store), "searcher": self.searchers[name], "default": name == self.default_database}
                for name, db in self.pipe.databases.items()
            ],
            "default_database": self.default_database,
            "tokenizer": self.checker.kind,
            "max_tokens": self.checker.max_tokens,
            "unk_token": self.checker.unk_token,
            "vocabulary": self.vocabulary,
        }

    # -- request -> job ---------------------------------------------------------------------

    def check_prompt(self, prompt: str, context: RequestContext) -> list[str]:
        """The answer's warnings about ``prompt``; with IRT_STRICT_VOCAB a 422 naming its unknown words."""
        check: PromptCheck = self._check(prompt)
        warnings = []
        if check.unknown_words:
            named = quote_words(check.unknown_words)
            if self.settings.strict_vocab:
                raise ApiError(
                    422,
                    f"prompt: words outside the model's vocabulary: {named} (IRT_STRICT_VOCAB=1 refuses them; "
                    "GET /info lists the vocabulary)",
                    param="prompt",
                    code="unknown_words",
                )
            warnings.append(
                f"words outside the model's vocabulary (the model reads {self.checker.unk_token} for each): {named}"
            )
        if check.truncated:
            warnings.append(
                f"the prompt is {check.tokens} tokens long; the model reads only the first {check.max_tokens}"
            )
        context.warnings = len(warnings)
        return warnings

    def make_job(self, request: GenerateRequest, context: RequestContext) -> Job:
        context.n = request.n
        context.prompt = request.prompt
        mode = request.mode or self.default_mode
        if mode not in self.available_modes:
            if mode == "adapter" and "adapter" not in self.pipe.denoisers:
                reason = "this model has no trained H-space adapter (no adapter/ folder)"
            else:
                reason = "it retrieves, and no database is configured (start the server with --index NAME=DIR)"
            raise ApiError(
                422,
                f"mode {mode!r} is not available: {reason}; available modes: {', '.join(self.available_modes)}",
                param="mode",
            )
        context.mode = mode
        if request.database is not None and request.database not in self.pipe.databases:
            configured = ", ".join(self.database_names) or "none"
            raise ApiError(
                404,
                f"unknown database {request.database!r}; configured databases: {configured}",
                param="database",
                code="database_not_found",
            )
        database = request.database or self.default_database
        k = request.k
        # Checked whatever the mode (off and inject read no k), so that one bound holds: the
        # OpenAPI document's. The default k shrinks to a database smaller than it.
        if database is not None and k > (size := len(self.pipe.databases[database].store)):
            if "k" in request.model_fields_set:
                raise ApiError(422, f"k must be at most {size}, the size of database {database!r}; got {k}", param="k")
            k = size
        start_t = request.start_t
        if start_t is not None:
            try:
                self.pipe.check_start(start_t, database)
            except ValueError as exc:
                raise ApiError(422, str(exc), param="start_t") from exc
        if mode == "off" and start_t is None:
            key = BatchKey(mode="off", steps=request.steps, k=1, database=None)
        else:
            context.database = database
            key = BatchKey(mode=mode, steps=request.steps, k=k if mode == "adapter" else INJECT_K, database=database,
                           start_t=start_t)
        if request.seed is not None:
            seeds = [request.seed + i for i in range(request.n)]
        else:
            seeds = [secrets.randbelow(MAX_SEED + 1) for _ in range(request.n)]
        return Job(
            prompt=request.prompt,
            seed=seeds[0],
            inject_w=request.inject_w,
            key=key,
            seeds=seeds,
            neighbor_images=request.neighbor_images,
            request_id=context.request_id,
            deadline_s=time.perf_counter() + self.settings.timeout_s,
        )

    async def run(self, job: Job, context: RequestContext) -> JobResult:
        """The job's result. A job whose client went away, or whose deadline passed, before the
        worker took it is dropped (never computed) and the request counted as cancelled."""
        if context.disconnected.is_set():
            context.outcome = CANCELLED
            raise _client_gone()
        try:
            future = self.batcher.submit(job)
        except QueueFullError as exc:
            raise ApiError(429, f"{exc}; retry later", headers={"Retry-After": RETRY_AFTER_S}) from exc
        except ShuttingDownError as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc
        waiter = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(context.disconnected.wait())
        try:
            done, _ = await asyncio.wait({waiter, gone}, timeout=self.settings.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiter in done:
            try:
                return waiter.result()
            except BatchFailedError as exc:
                # The batcher logged the traceback under this request id; the client gets only the id.
                raise ApiError(500, internal_error(context.request_id)) from exc
            except ShuttingDownError as exc:
                raise ApiError(503, str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc
            except JobExpiredError as exc:
                context.outcome = CANCELLED
                raise self._timed_out(dropped=True) from exc
        # The client went away or the time is up: drop the job unless the worker has it already.
        if future.cancel():
            context.outcome = CANCELLED
        waiter.cancel()
        if context.disconnected.is_set():
            raise _client_gone()
        raise self._timed_out(dropped=context.outcome == CANCELLED)

    def _timed_out(self, *, dropped: bool) -> ApiError:
        where = "; it was still queued and was dropped" if dropped else ""
        return ApiError(504, f"not answered within {self.settings.timeout_s:g} s (IRT_TIMEOUT_S){where}", code="timeout")

    async def generate(self, request: GenerateRequest, context: RequestContext) -> Generation:
        """The whole path of one generation request, up to the answer's parts."""
        warnings = self.check_prompt(request.prompt, context)
        job = self.make_job(request, context)
        result = await self.run(job, context)
        images = await self.encode(result)
        headers = {"Server-Timing": server_timing(result.timings_ms), **warning_headers(warnings)}
        return Generation(job, result, images, warnings, rounded_timings(result.timings_ms), headers)

    # -- result -> answer parts --------------------------------------------------------------

    async def encode(self, result: JobResult) -> list[dict]:
        """Per image: ``{"png": bytes, "neighbors": [{id, caption, score[, image]}]}``, PNGs
        encoded off the event loop when they are large."""
        pictures = result.neighbor_pictures
        images = list(result.images)
        flat = images + [p for row in (pictures or []) for p in row if p is not None]
        pixels = sum(image.shape[0] * image.shape[1] for image in flat)
        if pixels <= INLINE_PNG_MAX_PIXELS:
            pngs = [encode_png(image) for image in flat]
        else:
            pngs = await anyio.to_thread.run_sync(lambda: [encode_png(image) for image in flat])
        image_pngs, picture_pngs = pngs[: len(images)], iter(pngs[len(images) :])
        encoded = []
        for i, png in enumerate(image_pngs):
            neighbors = []
            for j, n in enumerate(result.neighbors_per_image[i]):
                entry = {"id": n.id, "caption": n.caption, "score": n.score}
                if pictures is not None and pictures[i][j] is not None:
                    entry["image"] = b64(next(picture_pngs))
                neighbors.append(entry)
            encoded.append({"png": png, "neighbors": neighbors})
        return encoded


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _client_gone() -> HTTPException:
    # Never reaches the client (it is gone); the status is for the access log.
    return HTTPException(CLIENT_CLOSED_REQUEST, "the client closed the connection before the answer")


def warning_headers(warnings: list[str]) -> dict[str, str]:
    return {WARNINGS_HEADER: "; ".join(warnings)} if warnings else {}
