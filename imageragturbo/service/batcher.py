"""The micro-batcher: one worker thread owns the pipeline; HTTP handlers hand it jobs.

Requests wait in one bounded queue. A job is one request: ``n`` images of one prompt, which
always run in one pipeline call. The worker takes the oldest job, every other waiting job that
shares its :class:`BatchKey` (while the batch holds at most ``max_batch`` images; a job of more
images runs alone), and runs them as one pipeline call. Items of a batch get the same image they
would get alone (the pipeline seeds each item's noise from its own generator), so batching
changes latency, never content.

A job whose handler gave up before the worker took it (its client disconnected, or it timed
out) leaves the queue; one whose deadline passed while it waited is dropped by the worker
(:class:`JobExpiredError`). Neither is ever computed.

How long the worker holds a batch open: it waits (at most ``batch_wait_ms``) only while the
batch is smaller than the recent *demand*, the largest of the last few batches' size plus the
requests that arrived while it ran. Under a lone client that is 1, so a request never waits for
company that is not coming; under closed-loop load it is the number of requests the clients
keep in flight, so batches fill up to that (Triton's dynamic batcher, with the preferred batch
size learned from traffic).

The worker fills plain :class:`BatchStats`; the metrics module turns them into Prometheus
series (vLLM's split between engine stats and the stat logger).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from imageragturbo.errors import ImageRagTurboError
from imageragturbo.model.images import tensor_to_images
from imageragturbo.model.pipeline import STAGES, Neighbor, RagTurboPipeline

logger = logging.getLogger(__name__)

RECENT_BATCHES = 8


class QueueFullError(ImageRagTurboError):
    """The queue holds ``max_queue`` jobs already: answer 429 and let the client retry."""


class ShuttingDownError(ImageRagTurboError):
    """The server is stopping (SIGTERM) or its worker died: answer 503."""


class BatchFailedError(ImageRagTurboError, RuntimeError):
    """The pipeline raised while running the batch this job was in."""


class JobExpiredError(ImageRagTurboError):
    """The job's deadline passed before the worker took it: it was dropped, never computed."""


@dataclass(frozen=True)
class BatchKey:
    """What every job of one batch must share (the pipeline takes these once per call)."""

    mode: str
    steps: int
    k: int
    database: str | None
    start_t: int | None = None


@dataclass
class Job:
    prompt: str
    seed: int
    inject_w: float
    key: BatchKey
    seeds: list[int] | None = None
    """One per image (``n = len(seeds)``); None: the one image of ``seed``."""
    neighbor_images: bool = False
    """Decode the neighbours' stored latents into pictures too."""
    request_id: str | None = None
    deadline_s: float | None = None
    """``time.perf_counter()`` past which the worker drops the job instead of running it."""
    enqueued_s: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)

    def __post_init__(self) -> None:
        if self.seeds is None:
            self.seeds = [self.seed]

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class JobResult:
    image: np.ndarray
    """uint8 [H, W, 3]: the (first) image."""
    neighbors: list[Neighbor]
    timings_ms: dict[str, float]
    """``queue_wait`` (this job's) and the pipeline stages (its batch's, which it waited through)."""
    images: list[np.ndarray] = field(default_factory=list)
    """All ``n`` images (default: ``[image]``)."""
    neighbors_per_image: list[list[Neighbor]] = field(default_factory=list)
    """Each image's neighbours (default: ``[neighbors]``)."""
    neighbor_pictures: list[list[np.ndarray | None]] | None = None
    """With ``Job.neighbor_images``: uint8 [h, w, 3] per neighbour of each image (None where the
    database stores no latent)."""

    def __post_init__(self) -> None:
        if not self.images:
            self.images = [self.image]
        if not self.neighbors_per_image:
            self.neighbors_per_image = [self.neighbors]


@dataclass
class BatchStats:
    size: int
    """Images of the pipeline call."""
    mode: str
    ok: bool
    stage_ms: dict[str, float]
    """Pipeline stage wall times for the whole batch, ms (empty when the batch failed)."""
    queue_wait_ms: list[float]
    """One per job (request) of the batch."""
    database: str | None = None


RunBatch = Callable[[BatchKey, list[Job]], list[JobResult]]


class MicroBatcher:
    """A bounded queue plus the one worker thread that drains it in batches."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int,
        batch_wait_ms: float,
        max_queue: int,
        warmup: Callable[[], None] | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or batch_wait_ms < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, batch_wait_ms >= 0; got {max_batch}, {max_queue}, {batch_wait_ms}"
            )
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1e3
        self.max_queue = max_queue
        self.warmup = warmup
        self.on_batch = on_batch
        self.ready = threading.Event()
        self.failure: str | None = None
        """Why the worker ended before close() (warm-up failed, or it crashed); None while it is fine."""
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._recent_demand: deque[int] = deque([1], maxlen=RECENT_BATCHES)
        self._expired = 0
        self._thread = threading.Thread(target=self._work, name="irt-worker", daemon=True)

    # -- the handlers' side ----------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not yet taken into a batch)."""
        return len(self._queue)

    @property
    def expired(self) -> int:
        """Jobs dropped by the worker because their deadline passed while they waited."""
        return self._expired

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets a :class:`JobResult` or an exception.

        Raises QueueFullError when ``max_queue`` jobs wait, ShuttingDownError after close().
        Cancelling the future (a handler that timed out) takes the job out of the queue.
        """
        with self._cond:
            if self._closing:
                raise ShuttingDownError("the server is shutting down")
            if not self._thread.is_alive():
                raise ShuttingDownError("the worker is not running (warm-up failed? see the server log)")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
            self._queue.append(job)
            self._cond.notify()
        job.future.add_done_callback(lambda fut, job=job: self._forget_if_cancelled(job, fut))
        return job.future

    def _forget_if_cancelled(self, job: Job, fut: Future) -> None:
        if fut.cancelled():
            with self._cond:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass  # already taken by the worker, which skips cancelled jobs

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new jobs, let the worker finish every queued one, then stop it."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.ready.clear()

    # -- the worker -------------------------------------------------------------------------

    def _work(self) -> None:
        if self.warmup is not None:
            start = time.perf_counter()
            try:
                self.warmup()
            except Exception as exc:
                # A model that cannot run one request must not report ready; the thread ends,
                # queued requests are refused, and the server stops on `failure` (http_server.py).
                logger.exception("warm-up failed; the server will not become ready")
                self.failure = f"warm-up failed: {type(exc).__name__}: {exc}"
                self._fail_queued(ShuttingDownError("warm-up failed; see the server log"))
                return
            logger.info("warm-up done in %.0f ms", (time.perf_counter() - start) * 1e3)
        self.ready.set()
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException as exc:
            logger.exception("the worker thread stopped")
            self.failure = f"the worker thread stopped: {type(exc).__name__}: {exc}"
            self._fail_queued(ShuttingDownError("the worker thread stopped; see the server log"))
            raise

    def _fail_queued(self, exc: Exception) -> None:
        with self._cond:
            jobs, self._queue = list(self._queue), deque()
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)

    def _take(self, key: BatchKey, room: int, batch: list[Job]) -> None:
        """Move queued jobs with ``key`` into ``batch``, oldest first, while it holds at most
        ``room`` images (the first job goes in whatever its n); drop every queued job whose
        deadline has passed (lock held)."""
        kept: deque[Job] = deque()
        images = _images(batch)
        now = time.perf_counter()
        while self._queue:
            job = self._queue.popleft()
            if job.deadline_s is not None and now > job.deadline_s:
                if job.future.set_running_or_notify_cancel():
                    self._expired += 1
                    job.future.set_exception(JobExpiredError("its deadline passed while it waited in the queue"))
                continue
            if job.key == key and (not batch or images + job.n <= room):
                # False when the handler already gave up on it (cancelled): drop it.
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
                    images += job.n
            else:
                kept.append(job)
        self._queue = kept

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                key = self._queue[0].key
                batch: list[Job] = []
                self._take(key, self.max_batch, batch)
                target = min(self.max_batch, max(self._recent_demand))
                deadline = time.perf_counter() + self.batch_wait_s
                while batch and _images(batch) < target and not self._closing:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    self._take(key, self.max_batch, batch)
                if batch:
                    return batch
                # Every job taken had been cancelled: look again.

    def _run(self, batch: list[Job]) -> None:
        demand = _images(batch)
        try:
            demand = self._run_batch(batch)
        finally:
            with self._cond:
                self._recent_demand.append(demand)

    def _demand(self, batch: list[Job]) -> int:
        """This batch plus the jobs that queued while it ran, counted before any of its answers
        goes out: a closed-loop client's next request, sent in reply to its answer, is not
        concurrent demand, and must not wait batch_wait_ms for company (results/design-notes.md)."""
        with self._cond:
            return _images(batch) + _images(self._queue)

    def _run_batch(self, batch: list[Job]) -> int:
        """Run ``batch`` and resolve its futures; returns the demand it saw (see _demand)."""
        start = time.perf_counter()
        queue_wait_ms = [(start - job.enqueued_s) * 1e3 for job in batch]
        try:
            results = self.run_batch(batch[0].key, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"the pipeline returned {len(results)} results for a batch of {len(batch)}")
        except Exception as exc:
            demand = self._demand(batch)
            # Only this batch's requests fail; the worker goes on with the next batch.
            logger.exception(
                "batch of %d request(s) failed (%s)",
                len(batch),
                batch[0].key,
                extra={"request_id": ",".join(job.request_id or "-" for job in batch)},
            )
            error = BatchFailedError(f"generation failed: {type(exc).__name__}: {exc}")
            for job in batch:
                job.future.set_exception(error)
            self._report(BatchStats(_images(batch), batch[0].key.mode, False, {}, queue_wait_ms, batch[0].key.database))
            return demand
        demand = self._demand(batch)
        stage_ms = dict(results[0].timings_ms) if results else {}
        for job, result, wait_ms in zip(batch, results, queue_wait_ms):
            result.timings_ms = {"queue_wait": wait_ms, **result.timings_ms}
            job.future.set_result(result)
        self._report(BatchStats(_images(batch), batch[0].key.mode, True, stage_ms, queue_wait_ms, batch[0].key.database))
        return demand

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(stats)
        except Exception:
            logger.exception("recording batch stats failed")


def _images(jobs) -> int:
    """Images the jobs make (a job is n images of one prompt)."""
    return sum(job.n for job in jobs)


class NeighborPictures:
    """Neighbours' pictures: their stored latents z0 decoded by the pipeline's VAE (its
    ``vae_decode`` stage, so on the engine that serves it). Worker thread only."""

    def __init__(self, pipe: RagTurboPipeline):
        self.pipe = pipe
        self._rows: dict[str, dict[str, int]] = {}

    def _row_of(self, database: str) -> dict[str, int]:
        """source id -> row of ``database`` (the pipeline names neighbours by source id)."""
        if database not in self._rows:
            store = self.pipe.databases[database].store
            source_ids = store.source_ids(np.arange(len(store))[None, :])[0]
            rows: dict[str, int] = {}
            for row, source_id in enumerate(source_ids):
                rows.setdefault(source_id, row)
            self._rows[database] = rows
        return self._rows[database]

    def __call__(self, database: str, neighbors: list[list[Neighbor]]) -> list[list[np.ndarray | None]]:
        row_of = self._row_of(database)
        wanted = sorted({row_of[n.id] for row in neighbors for n in row if n.id in row_of})
        pictures: dict[int, np.ndarray] = {}
        if wanted:
            try:
                z0 = np.asarray(self.pipe.databases[database].store.latents(np.asarray([wanted])), dtype=np.float32)[0]
            except (ValueError, KeyError, OSError) as exc:
                logger.warning("database %r has no latents to draw its neighbours from: %s", database, exc)
                z0 = None
            if z0 is not None:
                vae = self.pipe.components.vae
                with torch.inference_mode():
                    latents = torch.from_numpy(z0).to(self.pipe.device, next(vae.parameters()).dtype)
                    pictures = dict(zip(wanted, tensor_to_images(self.pipe.vae_decode(latents))))
        return [[pictures.get(row_of.get(n.id, -1)) for n in row] for row in neighbors]


def pipeline_runner(pipe: RagTurboPipeline) -> RunBatch:
    """The worker's only contact with the model: one pipeline call per batch (a job's n images
    are n items of it). Engines plug in behind the pipeline (its ``denoise`` / ``vae_decode``
    stages), not here."""
    neighbor_pictures = NeighborPictures(pipe)

    def run(key: BatchKey, jobs: list[Job]) -> list[JobResult]:
        result = pipe(
            [job.prompt for job in jobs for _ in job.seeds],
            [seed for job in jobs for seed in job.seeds],
            mode=key.mode,
            steps=key.steps,
            inject_w=[job.inject_w for job in jobs for _ in job.seeds],
            k=key.k,
            database=key.database,
            start_t=key.start_t,
        )
        stage_ms = {stage: float(result.timings_ms.get(stage, 0.0)) for stage in STAGES}
        results, start = [], 0
        for job in jobs:
            images = list(result.images[start : start + job.n])
            neighbors = result.neighbors[start : start + job.n]
            pictures = None
            if job.neighbor_images and key.database is not None:
                pictures = neighbor_pictures(key.database, neighbors)
            results.append(
                JobResult(
                    image=images[0],
                    neighbors=neighbors[0],
                    timings_ms=dict(stage_ms),
                    images=images,
                    neighbors_per_image=neighbors,
                    neighbor_pictures=pictures,
                )
            )
            start += job.n
        return results

    return run
