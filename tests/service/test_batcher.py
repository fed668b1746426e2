import threading
import time

import numpy as np
import pytest

from imageragturbo.service.batcher import (
    BatchFailedError,
    BatchKey,
    Job,
    JobExpiredError,
    JobResult,
    MicroBatcher,
    QueueFullError,
    ShuttingDownError,
)

OFF = BatchKey("off", 1, 1, None)
ADAPTER = BatchKey("adapter", 1, 4, "shapes")


class Recorder:
    """A fake pipeline: records each batch; ``gate`` holds the worker inside a batch."""

    def __init__(self, fail_prompt: str | None = None, batch_s: float = 0.0):
        self.batch_s = batch_s
        self.batches: list[tuple[BatchKey, list[str]]] = []
        self.fail_prompt = fail_prompt
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, key, jobs):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append((key, [job.prompt for job in jobs]))
        time.sleep(self.batch_s)
        if any(job.prompt == self.fail_prompt for job in jobs):
            raise RuntimeError("boom")
        return [
            JobResult(image=np.full((2, 2, 3), i, np.uint8), neighbors=[], timings_ms={"denoise": 1.0})
            for i in range(len(jobs))
        ]


def _batcher(run, **kwargs):
    options = dict(max_batch=4, batch_wait_ms=0, max_queue=16)
    options.update(kwargs)
    batcher = MicroBatcher(run, **options)
    batcher.start()
    assert batcher.ready.wait(5)
    return batcher


def _job(prompt, key=OFF):
    return Job(prompt=prompt, seed=0, inject_w=0.8, key=key)


def test_waiting_jobs_are_grouped_by_key_up_to_max_batch():
    run = Recorder()
    run.gate.clear()
    batcher = _batcher(run)
    first = batcher.submit(_job("hold"))
    assert run.entered.wait(5)  # the worker is busy with 'hold'; the rest queue up behind it
    futures = [batcher.submit(_job(f"off{i}")) for i in range(6)]
    futures += [batcher.submit(_job(f"ad{i}", ADAPTER)) for i in range(3)]
    assert batcher.queue_depth == 9
    run.gate.set()
    for future in [first, *futures]:
        future.result(5)
    batcher.close()
    assert run.batches == [
        (OFF, ["hold"]),
        (OFF, ["off0", "off1", "off2", "off3"]),  # oldest first, at most max_batch
        (OFF, ["off4", "off5"]),
        (ADAPTER, ["ad0", "ad1", "ad2"]),
    ]
    assert futures[0].result().timings_ms["queue_wait"] > 0


def test_full_queue_refuses_and_cancelled_jobs_leave_the_queue():
    run = Recorder()
    run.gate.clear()
    batcher = _batcher(run, max_queue=2)
    batcher.submit(_job("hold"))
    assert run.entered.wait(5)
    waiting = batcher.submit(_job("a"))
    batcher.submit(_job("b"))
    with pytest.raises(QueueFullError, match="queue is full \\(2 requests waiting\\)"):
        batcher.submit(_job("c"))
    assert waiting.cancel()  # a handler that timed out
    assert batcher.queue_depth == 1
    batcher.submit(_job("d")).cancel()
    run.gate.set()
    batcher.close()
    assert [prompts for _, prompts in run.batches] == [["hold"], ["b"]]


def test_failing_batch_fails_only_its_jobs_and_the_worker_goes_on():
    run = Recorder(fail_prompt="bad")
    batcher = _batcher(run, max_batch=1)
    bad = batcher.submit(_job("bad"))
    good = batcher.submit(_job("good"))
    with pytest.raises(BatchFailedError, match="generation failed: RuntimeError: boom"):
        bad.result(5)
    assert good.result(5).image.shape == (2, 2, 3)
    assert batcher.alive
    batcher.close()


def test_lone_client_never_waits_but_concurrent_ones_are_batched():
    run = Recorder(batch_s=0.02)  # a model call takes time, so requests meet in the queue
    batcher = _batcher(run, max_batch=8, batch_wait_ms=1000)
    start = time.perf_counter()
    for i in range(5):
        batcher.submit(_job(f"alone{i}")).result(5)
    lone_s = time.perf_counter() - start
    # With nobody else in flight the worker does not hold the batch open (5 waits would be 5 s).
    assert lone_s < 2.5, f"5 sequential requests took {lone_s:.2f} s"

    # Eight clients in a closed loop: after the first round the worker waits for company.
    def client(i):
        for r in range(4):
            batcher.submit(_job(f"c{i}r{r}")).result(10)

    run.batches.clear()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    batcher.close()
    sizes = [len(prompts) for _, prompts in run.batches]
    assert sum(sizes) == 32
    assert max(sizes) == 8 and len(sizes) <= 8, sizes


def test_close_finishes_queued_jobs_then_refuses_new_ones():
    run = Recorder()
    run.gate.clear()
    batcher = _batcher(run, max_batch=2)
    futures = [batcher.submit(_job(f"q{i}")) for i in range(5)]
    assert run.entered.wait(5)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(ShuttingDownError, match="shutting down"):
        batcher.submit(_job("late"))
    run.gate.set()
    closer.join(10)
    assert all(f.result(0).image is not None for f in futures)
    assert not batcher.alive


def test_failed_warmup_means_never_ready():
    def broken_warmup():
        raise RuntimeError("cannot run")

    batcher = MicroBatcher(Recorder(), max_batch=1, batch_wait_ms=0, max_queue=4, warmup=broken_warmup)
    batcher.start()
    batcher._thread.join(5)
    assert not batcher.ready.is_set() and not batcher.alive
    with pytest.raises(ShuttingDownError, match="worker is not running"):
        batcher.submit(_job("x"))


def test_a_lone_clients_next_request_is_not_taken_for_company():
    """A closed-loop client sends its next request as soon as it has its answer, possibly before
    the worker has finished with the batch that answered it. Here each next request is submitted
    from the previous answer's callback (in the worker, while it resolves the future): the worst
    case. None of them may wait batch_wait_ms for a partner that is not coming."""
    run = Recorder()
    batcher = _batcher(run, max_batch=8, batch_wait_ms=2000)
    futures = []
    last_done = threading.Event()

    def send_next(done):
        if len(futures) == 5:
            last_done.set()
            return
        following = batcher.submit(_job(f"next{len(futures)}"))
        futures.append(following)
        following.add_done_callback(send_next)

    batcher.submit(_job("first")).add_done_callback(send_next)
    assert last_done.wait(30), "the chain of requests did not finish"
    batcher.close()
    waits_ms = [f.result(0).timings_ms["queue_wait"] for f in futures]
    assert max(waits_ms) < 1000, waits_ms
    assert [prompts for _, prompts in run.batches] == [["first"]] + [[f"next{i}"] for i in range(5)]


class ImageRecorder(Recorder):
    """Like Recorder, but answers each job with its n images, as pipeline_runner does."""

    def __call__(self, key, jobs):
        super().__call__(key, jobs)
        return [
            JobResult(
                image=np.zeros((2, 2, 3), np.uint8),
                neighbors=[],
                timings_ms={},
                images=[np.full((2, 2, 3), seed % 256, np.uint8) for seed in job.seeds],
                neighbors_per_image=[[] for _ in job.seeds],
            )
            for job in jobs
        ]


def _many(prompt, n, key=OFF):
    return Job(prompt=prompt, seed=10, inject_w=0.8, key=key, seeds=[10 + i for i in range(n)])


def test_a_jobs_n_images_stay_in_one_batch_and_count_towards_max_batch():
    run = ImageRecorder()
    run.gate.clear()
    stats = []
    batcher = _batcher(run, max_batch=4, on_batch=stats.append)
    batcher.submit(_job("hold"))
    assert run.entered.wait(5)
    futures = [batcher.submit(_many("three", 3)), batcher.submit(_many("two", 2)), batcher.submit(_job("one")),
               batcher.submit(_many("six", 6))]
    run.gate.set()
    results = [future.result(5) for future in futures]
    batcher.close()
    # 3 + 1 fit in max_batch 4 (the 2 waits for the next batch); a job of 6 runs alone, whole.
    assert [prompts for _, prompts in run.batches] == [["hold"], ["three", "one"], ["two"], ["six"]]
    assert [s.size for s in stats] == [1, 4, 2, 6]
    assert [len(s.queue_wait_ms) for s in stats] == [1, 2, 1, 1]
    assert [int(image[0, 0, 0]) for image in results[0].images] == [10, 11, 12]
    assert len(results[3].images) == 6 and futures[3].result().image is not None


def test_a_job_past_its_deadline_is_dropped_by_the_worker_never_run():
    run = Recorder()
    run.gate.clear()
    batcher = _batcher(run)
    batcher.submit(_job("hold"))
    assert run.entered.wait(5)
    expired = Job(prompt="late", seed=0, inject_w=0.8, key=OFF, deadline_s=time.perf_counter() + 0.01)
    future = batcher.submit(expired)
    fresh = batcher.submit(Job(prompt="fresh", seed=0, inject_w=0.8, key=OFF, deadline_s=time.perf_counter() + 60))
    time.sleep(0.05)
    run.gate.set()
    with pytest.raises(JobExpiredError, match="deadline passed"):
        future.result(5)
    assert fresh.result(5).image is not None
    batcher.close()
    assert [prompts for _, prompts in run.batches] == [["hold"], ["fresh"]]
    assert batcher.expired == 1
