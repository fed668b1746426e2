"""The micro-batcher: one worker thread owns the pipeline; HTTP handlers hand it jobs.

Requests wait in one bounded queue. The worker takes the oldest job, every other waiting job
that shares its :class:`BatchKey` (up to ``max_batch``), and runs them as one pipeline call.
Items of a batch get the same image they would get alone (the pipeline seeds each item's noise
from its own generator), so batching changes latency, never content.

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

from imageragturbo.errors import ImageRagTurboError
from imageragturbo.model.pipeline import STAGES, Neighbor, RagTurboPipeline

logger = logging.getLogger(__name__)

RECENT_BATCHES = 8


class QueueFullError(ImageRagTurboError):
    """The queue holds ``max_queue`` jobs already: answer 429 and let the client retry."""


class ShuttingDownError(ImageRagTurboError):
    """The server is stopping (SIGTERM) or its worker died: answer 503."""


class BatchFailedError(ImageRagTurboError, RuntimeError):
    """The pipeline raised while running the batch this job was in."""


@dataclass(frozen=True)
class BatchKey:
    """What every job of one batch must share (the pipeline takes these once per call)."""

    mode: str
    steps: int
    k: int
    database: str | None


@dataclass
class Job:
    prompt: str
    seed: int
    inject_w: float
    key: BatchKey
    enqueued_s: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


@dataclass
class JobResult:
    image: np.ndarray
    """uint8 [H, W, 3]."""
    neighbors: list[Neighbor]
    timings_ms: dict[str, float]
    """``queue_wait`` (this job's) and the pipeline stages (its batch's, which it waited through)."""


@dataclass
class BatchStats:
    size: int
    mode: str
    ok: bool
    stage_ms: dict[str, float]
    """Pipeline stage wall times for the whole batch, ms (empty when the batch failed)."""
    queue_wait_ms: list[float]
    """One per job of the batch."""


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
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._recent_demand: deque[int] = deque([1], maxlen=RECENT_BATCHES)
        self._thread = threading.Thread(target=self._work, name="irt-worker", daemon=True)

    # -- the handlers' side ----------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not yet taken into a batch)."""
        return len(self._queue)

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
            except Exception:
                # A model that cannot run one request must not report ready; the thread ends,
                # /healthz turns unhealthy and queued requests are refused.
                logger.exception("warm-up failed; the server will not become ready")
                self._fail_queued(ShuttingDownError("warm-up failed; see the server log"))
                return
            logger.info("warm-up done in %.0f ms", (time.perf_counter() - start) * 1e3)
        self.ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _fail_queued(self, exc: Exception) -> None:
        with self._cond:
            jobs, self._queue = list(self._queue), deque()
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)

    def _take(self, key: BatchKey, room: int, batch: list[Job]) -> None:
        """Move up to ``room`` queued jobs with ``key`` into ``batch``, oldest first (lock held)."""
        kept: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if len(batch) < room and job.key == key:
                # False when the handler already gave up on it (cancelled): drop it.
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
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
                while len(batch) < target and not self._closing:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    self._take(key, self.max_batch, batch)
                if batch:
                    return batch
                # Every job taken had been cancelled: look again.

    def _run(self, batch: list[Job]) -> None:
        demand = len(batch)
        try:
            demand = self._run_batch(batch)
        finally:
            with self._cond:
                self._recent_demand.append(demand)

    def _demand(self, batch: list[Job]) -> int:
        """This batch plus the jobs that queued while it ran, counted before any of its answers
        goes out: a closed-loop client's next request, sent in reply to its answer, is not
        concurrent demand. (Counted afterwards, a lone client whose next request beat the
        worker's bookkeeping looked like two, and its requests waited batch_wait_ms for company.)"""
        with self._cond:
            return len(batch) + len(self._queue)

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
            logger.exception("batch of %d failed (%s)", len(batch), batch[0].key)
            error = BatchFailedError(f"generation failed: {type(exc).__name__}: {exc}")
            for job in batch:
                job.future.set_exception(error)
            self._report(BatchStats(len(batch), batch[0].key.mode, False, {}, queue_wait_ms))
            return demand
        demand = self._demand(batch)
        stage_ms = dict(results[0].timings_ms) if results else {}
        for job, result, wait_ms in zip(batch, results, queue_wait_ms):
            result.timings_ms = {"queue_wait": wait_ms, **result.timings_ms}
            job.future.set_result(result)
        self._report(BatchStats(len(batch), batch[0].key.mode, True, stage_ms, queue_wait_ms))
        return demand

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(stats)
        except Exception:
            logger.exception("recording batch stats failed")


def pipeline_runner(pipe: RagTurboPipeline) -> RunBatch:
    """The worker's only contact with the model: one pipeline call per batch. Engines plug in
    behind the pipeline (its ``denoise`` / ``vae_decode`` stages), not here."""

    def run(key: BatchKey, jobs: list[Job]) -> list[JobResult]:
        result = pipe(
            [job.prompt for job in jobs],
            [job.seed for job in jobs],
            mode=key.mode,
            steps=key.steps,
            inject_w=[job.inject_w for job in jobs],
            k=key.k,
            database=key.database,
        )
        stage_ms = {stage: float(result.timings_ms.get(stage, 0.0)) for stage in STAGES}
        return [
            JobResult(image=result.images[i], neighbors=result.neighbors[i], timings_ms=dict(stage_ms))
            for i in range(len(jobs))
        ]

    return run
