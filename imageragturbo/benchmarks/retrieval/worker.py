"""One searcher in its own process: build it, time single queries over its settings, report.

Run as ``python -m imageragturbo.benchmarks.retrieval.worker --worker JOB.json`` by
:func:`spawn_worker`, so that each searcher's peak RSS is its own.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from imageragturbo.benchmarks import BenchError
from imageragturbo.benchmarks.retrieval.data import recall_at_k
from imageragturbo.benchmarks.retrieval.peers import BUILDERS

logger = logging.getLogger(__name__)

WARMUP_QUERIES = 50



def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())



def _peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20



def _time_queries(search, queries: np.ndarray, truth: np.ndarray, k: int) -> dict:
    for i in range(min(WARMUP_QUERIES, len(queries))):
        search(queries[i : i + 1], k)
    times_ms = np.empty(len(queries))
    found = np.empty((len(queries), k), np.int64)
    for i in range(len(queries)):
        start = time.perf_counter_ns()
        ids = search(queries[i : i + 1], k)
        times_ms[i] = (time.perf_counter_ns() - start) / 1e6
        found[i] = np.asarray(ids).reshape(-1)[:k]
    return {
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        "mean_ms": float(times_ms.mean()),
        "recall_at_10": recall_at_k(found, truth[:, :k]),
    }



def run_worker(job: dict) -> dict:
    """Build one searcher and time it; ``job`` names the data files and the searcher."""
    name = job["searcher"]
    folder = Path(job["index_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    # np.load without mmap reads straight into private memory: the page cache is not counted
    # twice in this process's RSS.
    data = np.load(job["data"], allow_pickle=False)
    # A peer whose every query costs seconds (Milvus Lite at 630 k rows) times the first
    # ``max_queries`` only; its result says how many.
    limit = job.get("max_queries")
    queries = np.load(job["queries"], allow_pickle=False)[:limit]
    truth = np.load(job["truth"], allow_pickle=False)[:limit]
    rss_data_gb = _peak_rss_gb()
    start = time.perf_counter()
    params, settings, make_search = BUILDERS[name](data, job.get("params", {}), folder)
    build_s = time.perf_counter() - start
    del data
    sweep = []
    for setting in settings:
        try:
            stats = _time_queries(make_search(setting), queries, truth, job["k"])
        except RuntimeError as exc:
            # e.g. ScaNN finding fewer than k candidates in too few leaves of a small set
            logger.info("%s %s: unusable (%s)", name, setting, exc)
            continue
        sweep.append({**setting, **stats})
        logger.info("%s %s: %s", name, setting, stats)
    if not sweep:
        raise BenchError(f"{name}: no search setting returned k={job['k']} neighbours")
    target = job["target_recall"]
    good = [s for s in sweep if s["recall_at_10"] >= target]
    best = min(good, key=lambda s: s["p50_ms"]) if good else max(sweep, key=lambda s: (s["recall_at_10"], -s["p50_ms"]))
    return {
        "searcher": name,
        "queries": len(queries),
        "build_s": build_s,
        "p50_ms": best["p50_ms"],
        "p99_ms": best["p99_ms"],
        "recall_at_10": best["recall_at_10"],
        "peak_rss_gb": _peak_rss_gb(),
        "data_rss_gb": rss_data_gb,
        "index_bytes": _dir_bytes(folder),
        "params": params,
        "search_params": {key: best[key] for key in settings[0]},
        "meets_target_recall": bool(good),
        "sweep": sweep,
    }



def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def spawn_worker(job: dict, work: Path) -> dict:
    """Run one searcher's worker process; a result already in ``work`` for the same job is
    reused (so an interrupted run continues where it stopped)."""
    job_file = work / f"job-{job['searcher']}.json"
    out_file = work / f"result-{job['searcher']}.json"
    if out_file.is_file():
        previous = json.loads(out_file.read_text())
        if previous.get("job") == job:
            logger.info("reusing %s (same job)", out_file)
            finished = previous.get("finished_at") or _utc(out_file.stat().st_mtime)
            return {**previous, "reused": finished}
    job_file.write_text(json.dumps({**job, "out": str(out_file)}))
    # One thread for every library: BLAS, OpenMP (faiss), and ScaNN's own pool.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_file = work / f"worker-{job['searcher']}.log"
    with open(log_file, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "imageragturbo.benchmarks.retrieval.worker", "--worker", str(job_file)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text()[-3000:]
        raise BenchError(f"{job['searcher']} worker failed (exit {proc.returncode}); {log_file} ends: {tail}")
    return json.loads(out_file.read_text())


if __name__ == "__main__":
    # Worker mode: ``python -m imageragturbo.benchmarks.retrieval.worker --worker JOB.json``.
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m imageragturbo.benchmarks.retrieval.worker --worker JOB.json (use `imageragturbo bench retrieval`)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(sys.argv[2]).read_text())
    out = Path(job.pop("out"))
    result = run_worker(job)
    out.write_text(json.dumps({**result, "job": job, "finished_at": _utc(time.time())}))
