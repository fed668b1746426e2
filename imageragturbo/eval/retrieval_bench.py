"""`imageragturbo bench retrieval`: our searcher against the libraries a user would pick instead.

One run, same data and queries for everyone:

1. data: synthetic clustered, L2-normalised embeddings (paper scale: n = 630,000, d = 1024 as
   OpenCLIP ViT-H text features), written once to ``.npy`` files in the work folder, plus the
   exact top-k of every query (blocked matmul) as ground truth;
2. each searcher in its own subprocess (so ``peak_rss_gb`` is that searcher's own peak: data
   loaded + index built + searches), one thread for build and search: build time, index size on
   disk, then for each search-time setting single-query (batch 1) latencies and recall@k; the
   reported operating point is the fastest setting with recall >= the target;
3. the feature-store side: gather time of k SD-sized H-features (1280 x 8 x 8 fp16) from a
   memory-mapped file (page cache cold and warm), the store size at 0.63M rows, and the effect of
   shrinking it (int8 per channel, fewer channels by PCA) on a model's output, when a model is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imageragturbo.eval.machine import describe_machine, load_average, niceness

logger = logging.getLogger(__name__)

PEERS = ("faiss-hnsw", "faiss-ivf", "hnswlib")
PEER_MODULES = {"faiss-hnsw": "faiss", "faiss-ivf": "faiss", "hnswlib": "hnswlib"}
SD_H_SHAPE = (1280, 8, 8)
PAPER_N = 630_000
WARMUP_QUERIES = 50


class BenchError(ValueError):
    """A benchmark cannot run as asked; the message says why."""


# -- data -------------------------------------------------------------------------------------


def cluster_centres(clusters: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, 0])).standard_normal((clusters, dim)).astype(np.float32)


def clustered_embeddings(n: int, centres: np.ndarray, spread: float, seed: int, out: Path | None = None, block: int = 50_000):
    """float32 [n, dim] unit vectors: each a random centre + ``spread`` * N(0, I), normalised
    (its cosine to its centre is about 1/sqrt(1 + spread^2)). Written in blocks to the ``.npy``
    file ``out`` (so n x dim never sits in memory twice) and returned memory-mapped; without
    ``out``, returned in memory."""
    dim = centres.shape[1]
    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, dim)) if out else np.empty((n, dim), np.float32)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, lo]))
        x = centres[rng.integers(0, centres.shape[0], hi - lo)]
        x += spread * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        array[lo:hi] = x
    if out:
        array.flush()
    return array


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int, block: int = 50_000) -> np.ndarray:
    """Exact top-k ids int64 [Q, k] by inner product, streaming over ``data`` in blocks."""
    best_ids = np.zeros((queries.shape[0], 0), np.int64)
    best_scores = np.zeros((queries.shape[0], 0), np.float32)
    for lo in range(0, data.shape[0], block):
        scores = queries @ np.asarray(data[lo : lo + block]).T
        ids = np.broadcast_to(np.arange(lo, lo + scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, part, axis=1)
        best_ids = np.take_along_axis(ids, part, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


# -- one searcher, in a worker process --------------------------------------------------------


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


def _build_scann(data, spec_args: dict, folder: Path):
    from imageragturbo.index.searchers import ScannSearcher, ScannSpec

    spec = ScannSpec.for_size(data.shape[0], mode="tree_ah", training_threads=1, **spec_args)
    searcher = ScannSearcher.build(data, spec)
    searcher.save(folder)
    settings = []
    leaves = sorted({x for x in (1, 2, 4, 6, 8, 12, 16, 24, 32, 64) if x <= spec.num_leaves})
    for reorder in (50, 100, 200, 400):
        settings += [{"leaves_to_search": L, "reorder": reorder} for L in leaves]

    def make_search(setting):
        return lambda q, k: searcher.search(q, k, **setting)[0]

    return spec.to_dict(), settings, make_search


def _build_faiss_hnsw(data, spec_args: dict, folder: Path):
    import faiss

    faiss.omp_set_num_threads(1)
    m, ef_construction = 32, spec_args.get("ef_construction", 200)
    index = faiss.IndexHNSWFlat(data.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(data)
    faiss.write_index(index, str(folder / "faiss_hnsw.index"))
    settings = [{"efSearch": ef} for ef in (16, 24, 32, 48, 64, 96, 128)]

    def make_search(setting):
        def search(q, k):
            index.hnsw.efSearch = setting["efSearch"]
            return index.search(q, k)[1]

        return search

    return {"M": m, "efConstruction": ef_construction, "metric": "inner_product"}, settings, make_search


def _build_faiss_ivf(data, spec_args: dict, folder: Path):
    import faiss

    faiss.omp_set_num_threads(1)
    n, dim = data.shape
    nlist = max(1, min(n // 39, round(4 * math.sqrt(n))))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    train = data[np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)]
    index.train(train)
    index.add(data)
    faiss.write_index(index, str(folder / "faiss_ivf.index"))
    settings = [{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64) if p <= nlist]

    def make_search(setting):
        def search(q, k):
            index.nprobe = setting["nprobe"]
            return index.search(q, k)[1]

        return search

    return {"nlist": nlist, "train_size": int(train.shape[0]), "metric": "inner_product"}, settings, make_search


def _build_hnswlib(data, spec_args: dict, folder: Path):
    import hnswlib

    m, ef_construction = 32, spec_args.get("ef_construction", 200)
    index = hnswlib.Index(space="ip", dim=data.shape[1])
    index.init_index(max_elements=data.shape[0], ef_construction=ef_construction, M=m, random_seed=0)
    index.set_num_threads(1)
    index.add_items(data, np.arange(data.shape[0]), num_threads=1)
    index.save_index(str(folder / "hnswlib.index"))
    settings = [{"ef": ef} for ef in (16, 24, 32, 48, 64, 96, 128)]

    def make_search(setting):
        def search(q, k):
            index.set_ef(max(setting["ef"], k))
            return index.knn_query(q, k=k, num_threads=1)[0]

        return search

    return {"M": m, "ef_construction": ef_construction, "space": "ip"}, settings, make_search


BUILDERS = {"scann": _build_scann, "faiss-hnsw": _build_faiss_hnsw, "faiss-ivf": _build_faiss_ivf, "hnswlib": _build_hnswlib}


def run_worker(job: dict) -> dict:
    """Build one searcher and time it; ``job`` names the data files and the searcher."""
    name = job["searcher"]
    folder = Path(job["index_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    # np.load without mmap reads straight into private memory: the page cache is not counted
    # twice in this process's RSS.
    data = np.load(job["data"], allow_pickle=False)
    queries = np.load(job["queries"], allow_pickle=False)
    truth = np.load(job["truth"], allow_pickle=False)
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


def _spawn_worker(job: dict, work: Path) -> dict:
    """Run one searcher's worker process; a result already in ``work`` for the same job is
    reused (so an interrupted run continues where it stopped)."""
    job_file = work / f"job-{job['searcher']}.json"
    out_file = work / f"result-{job['searcher']}.json"
    if out_file.is_file():
        previous = json.loads(out_file.read_text())
        if previous.get("job") == job:
            logger.info("reusing %s (same job)", out_file)
            return previous
    job_file.write_text(json.dumps({**job, "out": str(out_file)}))
    # One thread for every library: BLAS, OpenMP (faiss), and ScaNN's own pool.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_file = work / f"worker-{job['searcher']}.log"
    with open(log_file, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "imageragturbo.eval.retrieval_bench", "--worker", str(job_file)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text()[-3000:]
        raise BenchError(f"{job['searcher']} worker failed (exit {proc.returncode}); {log_file} ends: {tail}")
    return json.loads(out_file.read_text())


# -- the feature-store side -------------------------------------------------------------------


def gather_timing(work: Path, rows: int, k: int, repeats: int = 200) -> dict:
    """p50 time to gather k SD-sized H-features from a memory-mapped fp16 store, with the page
    cache dropped for the file before each gather (cold: a disk read) and after reading it (warm)."""
    from imageragturbo.index.disk import gather_rows

    path = work / "h_store.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, *SD_H_SHAPE))
    rng = np.random.default_rng(0)
    for lo in range(0, rows, 256):
        hi = min(rows, lo + 256)
        array[lo:hi] = rng.standard_normal((hi - lo, *SD_H_SHAPE), dtype=np.float32).astype(np.float16)
    array.flush()
    del array
    os.sync()
    store = np.load(path, mmap_mode="r", allow_pickle=False)
    fd = os.open(path, os.O_RDONLY)
    cold, warm = [], []
    try:
        for _ in range(repeats):
            ids = rng.choice(rows, size=(1, k), replace=False)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter_ns()
            gather_rows(store, ids)
            cold.append((time.perf_counter_ns() - start) / 1e6)
            start = time.perf_counter_ns()
            out = gather_rows(store, ids)
            warm.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        os.close(fd)
    row_bytes = int(np.prod(SD_H_SHAPE)) * 2
    path.unlink()
    return {
        "k": k,
        "rows_in_file": rows,
        "row_shape": list(SD_H_SHAPE),
        "row_bytes": row_bytes,
        "gathered_bytes": int(out.nbytes),
        "cold_p50_ms": float(np.median(cold)),
        "cold_p99_ms": float(np.percentile(cold, 99)),
        "warm_p50_ms": float(np.median(warm)),
        "warm_p99_ms": float(np.percentile(warm, 99)),
    }


def store_sizes(n: int = PAPER_N, shape: tuple[int, ...] = SD_H_SHAPE) -> dict:
    """Bytes for n H-features at fp16, int8 per channel (+ an fp16 scale per item and channel),
    and with channels cut to a quarter by PCA (+ the shared C x C/4 basis)."""
    c, hw = shape[0], int(np.prod(shape[1:]))
    fp16 = n * c * hw * 2
    int8 = n * (c * hw + c * 2)
    pca = n * (c // 4) * hw * 2 + c * (c // 4) * 4
    pca_int8 = n * ((c // 4) * hw + (c // 4) * 2) + c * (c // 4) * 4
    return {
        "n": n,
        "shape": list(shape),
        "fp16_bytes": fp16,
        "int8_per_channel_bytes": int8,
        "pca_quarter_fp16_bytes": pca,
        "pca_quarter_int8_bytes": pca_int8,
    }


def quantize_int8_per_channel(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h float [N, C, h, w] -> (int8 [N, C, h, w], fp16 scale [N, C]): symmetric, one scale per
    item and channel (absmax over the spatial positions / 127)."""
    h = np.asarray(h, np.float32)
    scale = np.abs(h).max(axis=(2, 3)) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float16)
    q = np.clip(np.round(h / scale.astype(np.float32)[:, :, None, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8_per_channel(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, :, None, None]


def pca_channels(h: np.ndarray, keep: int) -> np.ndarray:
    """Project every spatial token's C channels onto the top ``keep`` principal directions
    (fitted on these tokens) and back: the reconstruction a C -> keep channel store gives."""
    n, c, hh, ww = h.shape
    tokens = np.asarray(h, np.float32).transpose(0, 2, 3, 1).reshape(-1, c)
    mean = tokens.mean(axis=0)
    _, _, vt = np.linalg.svd(tokens - mean, full_matrices=False)
    basis = vt[:keep]
    recon = (tokens - mean) @ basis.T @ basis + mean
    return recon.reshape(n, hh, ww, c).transpose(0, 3, 1, 2)


def quantisation_effect(model_dir: Path, pairs: int = 64, prompts: int = 16) -> dict:
    """Build ``pairs`` database rows from the shapes world with the model in ``model_dir``, shrink
    h_retr (int8 per channel; PCA to C/4 channels; both), and compare the outputs of
    ``inject`` (w = 0.8) and ``adapter`` (when the model has one) for ``prompts`` test-held prompts."""
    import torch

    from imageragturbo.index import ExactSearcher, InMemoryFeatureStore, RetrievalDatabase
    from imageragturbo.index.build import model_pixel_size
    from imageragturbo.index.pairs import WorldPairs
    from imageragturbo.model import RagTurboPipeline, load_model
    from imageragturbo.world.splits import eval_prompts

    components = load_model(model_dir)
    pipe = RagTurboPipeline(components)
    batch = WorldPairs(pairs).read(0, pairs, model_pixel_size(pipe))
    z0 = pipe.encode_images(batch.images)
    e, h = pipe.encode_database_rows(z0, batch.captions)
    e, h = e.numpy(), h.numpy().astype(np.float16)
    c = h.shape[1]
    variants = {
        "fp16": h,
        "int8_per_channel": dequantize_int8_per_channel(*quantize_int8_per_channel(h)),
        f"pca_{c // 4}_of_{c}": pca_channels(h, c // 4),
        f"pca_{c // 4}_of_{c}_int8": dequantize_int8_per_channel(*quantize_int8_per_channel(pca_channels(h, c // 4))),
    }
    prompt_list = eval_prompts("test-held", prompts)
    texts, seeds = [p for p, _ in prompt_list], [s for _, s in prompt_list]
    modes = ["inject"] + (["adapter"] if "adapter" in pipe.denoisers else [])
    reference, effect = {}, {}
    for name, h_variant in variants.items():
        store = InMemoryFeatureStore(e, np.asarray(h_variant, np.float32), batch.captions, components.model_id)
        run = RagTurboPipeline(components, [RetrievalDatabase("db", ExactSearcher(e), store)])
        h32 = h.astype(np.float32)
        row = {"h_rel_rms_error": float(np.sqrt(np.mean((h_variant - h32) ** 2) / np.mean(h32**2)))}
        for mode in modes:
            with torch.inference_mode():
                result = run(texts, seeds, mode=mode, k=4, inject_w=0.8)
            if name == "fp16":
                reference[mode] = result
                continue
            ref = reference[mode]
            pixel = np.abs(result.images.astype(int) - ref.images.astype(int))
            latent = (result.latents - ref.latents).abs()
            row[mode] = {
                "image_max_abs_diff": int(pixel.max()),
                "image_mean_abs_diff": float(pixel.mean()),
                "latent_max_abs_diff": float(latent.max()),
                "latent_max_abs": float(ref.latents.abs().max()),
            }
        effect[name] = row
    return {
        "model_dir": str(model_dir),
        "model_id": components.model_id,
        "adapter": "adapter" in pipe.denoisers,
        "pairs": pairs,
        "prompts": prompts,
        "h_shape": list(h.shape[1:]),
        "variants": {k: v for k, v in effect.items() if k != "fp16"},
    }


# -- the run ----------------------------------------------------------------------------------


def machine() -> dict:
    """This report's machine fields (results/retrieval.md reads them)."""
    m = describe_machine(("numpy", "scann", "faiss", "hnswlib"))
    return {
        "cpu": m.cpu,
        "cores": m.logical_cores,
        "ram_gib": m.ram_gib,
        "python": m.python,
        "platform": m.platform,
        "versions": m.versions,
        "loadavg_start": m.load_avg,
    }


def run_bench(args: argparse.Namespace, on_progress=None) -> dict:
    """The whole benchmark; ``on_progress(partial_result)`` is called after each searcher
    (``complete`` False) so a long run leaves its results so far on disk."""
    if args.n < 100 or args.dim < 2 or args.queries < 1 or args.k < 1:
        raise BenchError(f"need n >= 100, dim >= 2, queries >= 1, k >= 1; got n={args.n}, dim={args.dim}, queries={args.queries}, k={args.k}")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise BenchError(f"unknown peers {unknown}; choose from {list(PEERS)}")
    info = machine()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="irt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    clusters = max(8, args.n // 500)
    spread = 0.75
    data_file, query_file, truth_file = work / "data.npy", work / "queries.npy", work / "truth.npy"

    # 1. data and exact ground truth (reused from --work-dir when made with the same settings);
    #    queries share the data's centres, with their own noise
    start = time.perf_counter()
    stamp_file = work / "data.json"
    stamp = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "clusters": clusters, "spread": spread, "seed": 0}
    reuse = stamp_file.is_file() and json.loads(stamp_file.read_text()).get("stamp") == stamp
    if not reuse:
        stamp_file.unlink(missing_ok=True)
        centres = cluster_centres(clusters, args.dim, seed=0)
        clustered_embeddings(args.n, centres, spread, seed=0, out=data_file).flush()
        queries = clustered_embeddings(args.queries, centres, spread, seed=1)
        np.save(query_file, queries)
    queries = np.load(query_file, allow_pickle=False)
    data = np.load(data_file, mmap_mode="r", allow_pickle=False)
    if reuse:
        truth = np.load(truth_file, allow_pickle=False)
        exact_ms = json.loads(stamp_file.read_text())["exact_ms"]
    else:
        truth = exact_topk(data, queries, args.k)
        np.save(truth_file, truth)
        exact_ms = []
        for i in range(min(10, args.queries)):
            t0 = time.perf_counter_ns()
            exact_topk(data, queries[i : i + 1], args.k, block=args.n)
            exact_ms.append((time.perf_counter_ns() - t0) / 1e6)
        stamp_file.write_text(json.dumps({"stamp": stamp, "exact_ms": exact_ms}))
    del data
    logger.info("data + ground truth: %.1f s%s", time.perf_counter() - start, " (reused)" if reuse else "")

    # 2. searchers, each in its own process
    job = {"data": str(data_file), "queries": str(query_file), "truth": str(truth_file), "k": args.k, "target_recall": args.target_recall}
    scann_params = {"ah_dims_per_block": args.scann_ah_dims, "reorder_dtype": args.scann_reorder_dtype, "spherical": not args.scann_generic_tree}
    if args.scann_leaves:
        scann_params["num_leaves"] = args.scann_leaves
    results, skipped = [], []
    gather = effect = None

    def summary(complete: bool) -> dict:
        fastest_peer = min((r["p50_ms"] for r in results if r["meets_target_recall"]), default=None)
        info["loadavg_end"] = load_average()
        # Read now, not at start: the workplace may renice running jobs.
        info["nice"] = niceness()
        return {
            "complete": complete,
            "n": args.n,
            "dim": args.dim,
            "queries": args.queries,
            "k": args.k,
            "target_recall": args.target_recall,
            **{key: ours[key] for key in ("searcher", "build_s", "p50_ms", "p99_ms", "recall_at_10", "peak_rss_gb", "index_bytes")},
            "params": ours["params"],
            "search_params": ours["search_params"],
            "data_rss_gb": ours["data_rss_gb"],
            "meets_target_recall": ours["meets_target_recall"],
            "sweep": ours["sweep"],
            "fastest_peer_p50_ms": fastest_peer,
            "no_slower_than_fastest_peer": None if fastest_peer is None else bool(ours["meets_target_recall"] and ours["p50_ms"] <= fastest_peer),
            "requested_peers": peers,
            "peers": [{k: v for k, v in r.items() if k != "job"} for r in results],
            "skipped_peers": skipped,
            "exact_numpy_p50_ms": float(np.median(exact_ms)) if exact_ms else None,
            "data": {"kind": "clustered gaussian, L2-normalised", "clusters": clusters, "spread": spread, "seed": 0},
            "gather": gather,
            "store_size": store_sizes(),
            "quantisation_effect": effect,
            "machine": info,
            "command": "imageragturbo " + " ".join(sys.argv[1:]) if sys.argv and "imageragturbo" in sys.argv[0] else None,
        }

    ours = _spawn_worker({**job, "searcher": "scann", "params": scann_params, "index_dir": str(work / "idx-scann")}, work)
    if on_progress:
        on_progress(summary(False))
    for peer in peers:
        try:
            __import__(PEER_MODULES[peer])
        except ImportError:
            skipped.append({"searcher": peer, "reason": f"{PEER_MODULES[peer]} is not installed (pip install '.[bench]')"})
            continue
        params = {"ef_construction": args.hnsw_ef_construction} if peer != "faiss-ivf" else {}
        results.append(_spawn_worker({**job, "searcher": peer, "params": params, "index_dir": str(work / f"idx-{peer}")}, work))
        if on_progress:
            on_progress(summary(False))

    # 3. the feature store
    if "store" in args.parts:
        gather, effect = store_measurements(args, work)
    return summary(True)


def store_measurements(args: argparse.Namespace, work: Path) -> tuple[dict, dict | None]:
    """The feature-store side: gather timing, and the shrink effect on a model's output."""
    gather = gather_timing(work, args.h_rows, k=4)
    effect = None
    model_dir = args.model
    if model_dir is None:
        from imageragturbo.cli import BUNDLED_MODEL

        model_dir = BUNDLED_MODEL if (BUNDLED_MODEL / "model_index.json").is_file() else None
    if model_dir is not None and args.effect_pairs > 0:
        effect = quantisation_effect(Path(model_dir), args.effect_pairs, args.effect_prompts)
    return gather, effect


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def markdown_report(result: dict, variants: list[dict] = ()) -> str:
    """results/retrieval.md from a result JSON (plus other ScaNN builds on the same data)."""
    rows = [result, *result["peers"]]
    lines = [
        "# Retrieval benchmark",
        "",
        *([] if result.get("complete", True) else ["**Partial run**: the benchmark had not finished all searchers when this was written.", ""]),
        f"Produced by `{result.get('command') or 'imageragturbo bench retrieval'}` "
        "(`imageragturbo/eval/retrieval_bench.py`); numbers below are copied from its JSON.",
        "",
        f"n = {result['n']:,} synthetic clustered L2-normalised embeddings, d = {result['dim']}, "
        f"{result['queries']} single queries (batch 1), recall@{result['k']} against exact search, one thread "
        "for build and search, each searcher in its own process. Each row is the fastest search setting "
        f"with recall@10 >= {result['target_recall']} (the full sweep is in the JSON).",
        "",
        "| searcher | build params | search params | build | p50 | p99 | recall@10 | peak RSS | index on disk |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k not in ("training_threads", "mode", "num_leaves_to_search"))
        search = ", ".join(f"{k}={v}" for k, v in r["search_params"].items())
        lines.append(
            f"| {r['searcher']} | {params} | {search} | {r['build_s']:.0f} s | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms "
            f"| {r['recall_at_10']:.4f} | {r['peak_rss_gb']:.2f} GiB | {_fmt_bytes(r['index_bytes'])} |"
        )
    lines += [
        "",
        f"Exact search (numpy, 1 BLAS thread): {result['exact_numpy_p50_ms']:.1f} ms per query."
        if result["exact_numpy_p50_ms"] is not None else "Exact search: not timed in this run (data reused).",
        "Peak RSS includes the float32 data loaded for the build "
        f"({result['data_rss_gb']:.2f} GiB in the ScaNN process before building).",
    ]
    if result["skipped_peers"]:
        lines.append("Skipped: " + "; ".join(f"{s['searcher']} ({s['reason']})" for s in result["skipped_peers"]) + ".")
    verdict = result["no_slower_than_fastest_peer"]
    measured = [r["searcher"] for r in result["peers"]]
    missing = [p for p in result.get("requested_peers", []) if p not in measured and p not in {s["searcher"] for s in result["skipped_peers"]}]
    lines += [
        "",
        "## Speed at equal recall",
        "",
        "Fastest single-query p50 of each searcher's sweep that reaches the recall:",
        "",
        "| searcher | recall@10 >= 0.95 | recall@10 >= 0.99 |",
        "| --- | --- | --- |",
    ]
    for r in rows:
        cells = []
        for target in (0.95, 0.99):
            good = [s for s in r["sweep"] if s["recall_at_10"] >= target]
            best = min(good, key=lambda s: s["p50_ms"]) if good else None
            setting = ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("p50_ms", "p99_ms", "mean_ms", "recall_at_10")) if best else ""
            cells.append(f"{best['p50_ms']:.3f} ms ({setting}; recall {best['recall_at_10']:.4f})" if best else "not reached")
        lines.append(f"| {r['searcher']} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "## Verdict",
        "",
        f"- Target p50 <= 2.0 ms at recall@10 >= 0.95: ScaNN p50 {result['p50_ms']:.3f} ms at recall "
        f"{result['recall_at_10']:.4f} -> {'met' if result['p50_ms'] <= 2.0 and result['recall_at_10'] >= 0.95 else 'NOT met'}.",
        f"- No slower than the fastest peer at that recall ({result['fastest_peer_p50_ms']} ms): "
        + ("n/a (no peer ran)" if verdict is None else ("yes" if verdict else "no"))
        + (f", among the peers measured ({', '.join(measured)}); {', '.join(missing)} did not finish in this run, so this is not yet the comparison the target asks for" if missing else ""),
        "",
        "## ScaNN sweep (search-time knobs)",
        "",
        "| leaves searched | reorder | p50 | p99 | recall@10 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in result["sweep"]:
        lines.append(f"| {s['leaves_to_search']} | {s['reorder']} | {s['p50_ms']:.3f} ms | {s['p99_ms']:.3f} ms | {s['recall_at_10']:.4f} |")
    if variants:
        lines += [
            "",
            "## Other ScaNN builds on the same data (separate runs)",
            "",
            "| build params | best search params | build | p50 | p99 | recall@10 | peak RSS | index on disk | command |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v in variants:
            params = ", ".join(f"{k}={x}" for k, x in v["params"].items() if k not in ("training_threads", "mode", "num_leaves_to_search"))
            search = ", ".join(f"{k}={x}" for k, x in v["search_params"].items())
            lines.append(
                f"| {params} | {search} | {v['build_s']:.0f} s | {v['p50_ms']:.3f} ms | {v['p99_ms']:.3f} ms | {v['recall_at_10']:.4f} "
                f"| {v['peak_rss_gb']:.2f} GiB | {_fmt_bytes(v['index_bytes'])} | `{v.get('command')}` |"
            )
    g, size = result["gather"], result["store_size"]
    if g is None:
        lines += ["", "(The H-feature store measurements had not run yet when this report was written.)"]
        g = {"k": 4, "row_shape": list(SD_H_SHAPE), "row_bytes": int(np.prod(SD_H_SHAPE)) * 2}
    lines += [
        "",
        "## H-feature store",
        "",
        *([f"Measured by `{result['store_command']}`.", ""] if result.get("store_command") else []),
        "" if "cold_p50_ms" not in g else f"Gather of k = {g['k']} SD-sized H-features ({'x'.join(map(str, g['row_shape']))} fp16, {g['row_bytes'] / 1024:.0f} KiB each) "
        f"from a memory-mapped file of {g['rows_in_file']} rows: p50 {g['cold_p50_ms']:.3f} ms with the file's page cache "
        f"dropped before each gather (p99 {g['cold_p99_ms']:.3f} ms), {g['warm_p50_ms']:.3f} ms warm (p99 {g['warm_p99_ms']:.3f} ms).",
        "",
        f"Store size for {size['n']:,} SD-sized H-features:",
        "",
        "| layout | size |",
        "| --- | --- |",
        f"| fp16 (as built) | {_fmt_bytes(size['fp16_bytes'])} |",
        f"| int8, one fp16 scale per item and channel | {_fmt_bytes(size['int8_per_channel_bytes'])} |",
        f"| PCA to C/4 channels, fp16 | {_fmt_bytes(size['pca_quarter_fp16_bytes'])} |",
        f"| PCA to C/4 channels, int8 | {_fmt_bytes(size['pca_quarter_int8_bytes'])} |",
    ]
    effect = result.get("quantisation_effect")
    if effect:
        lines += [
            "",
            f"Effect on output, measured on `{effect['model_dir']}` (H-space {effect['h_shape']}, "
            f"{'trained' if effect['adapter'] else 'no'} adapter, {effect['pairs']} database pairs, {effect['prompts']} test-held prompts, "
            "same seeds; differences against the fp16 store):",
            "",
            "| store | H rel. RMS error | inject: image max / mean abs diff (0-255) | adapter: image max / mean abs diff |",
            "| --- | --- | --- | --- |",
        ]
        for name, row in effect["variants"].items():
            adapter = row.get("adapter")
            adapter_cell = f"{adapter['image_max_abs_diff']} / {adapter['image_mean_abs_diff']:.3f}" if adapter else "n/a"
            lines.append(
                f"| {name} | {row['h_rel_rms_error']:.4f} | {row['inject']['image_max_abs_diff']} / {row['inject']['image_mean_abs_diff']:.3f} "
                f"| {adapter_cell} |"
            )
    m = result["machine"]
    lines += [
        "",
        "## Machine",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}, {m['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + f". Load average at start {tuple(round(x, 2) for x in m['loadavg_start'])}, at end "
        f"{tuple(round(x, 2) for x in m['loadavg_end'])}"
        + (f"; the benchmark ran at nice {m['nice']}" if "nice" in m else "")
        + ": the cores were shared with other jobs (training runs), so latencies are upper bounds of what an "
        "idle core gives, and the p99 column mostly measures preemption by those jobs.",
        "",
    ]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    variants = []
    for path in args.variant:
        try:
            variants.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"cannot read --variant {path}: {exc}") from exc
    if args.render_only:
        if not args.markdown:
            raise BenchError("--render-only needs --markdown")
        try:
            result = json.loads(args.json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"cannot read --json {args.json}: {exc}") from exc
    elif "searchers" not in args.parts:
        try:
            result = json.loads(args.json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"--parts store updates an existing --json; cannot read {args.json}: {exc}") from exc
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="irt-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        result["gather"], result["quantisation_effect"] = store_measurements(args, work)
        result["store_command"] = "imageragturbo " + " ".join(sys.argv[1:])
        args.json.write_text(json.dumps(result, indent=2))
    else:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        carry = {}
        if "store" not in args.parts and args.json.is_file():
            # Keep the store measurements of an earlier run (`--parts store`) in the same file.
            old = json.loads(args.json.read_text())
            carry = {k: old[k] for k in ("gather", "quantisation_effect", "store_command") if old.get(k) is not None}

        def write(partial: dict) -> None:
            args.json.write_text(json.dumps({**partial, **carry}, indent=2))

        result = {**run_bench(args, on_progress=write), **carry}
        write(result)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_report(result, variants))
    print(
        f"{result['searcher']}: p50 {result['p50_ms']:.3f} ms, recall@10 {result['recall_at_10']:.4f}; "
        + "; ".join(f"{p['searcher']}: p50 {p['p50_ms']:.3f} ms, recall@10 {p['recall_at_10']:.4f}" for p in result["peers"])
        + f"; wrote {args.markdown if args.render_only else args.json}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    # Worker mode: ``python -m imageragturbo.eval.retrieval_bench --worker JOB.json``.
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m imageragturbo.eval.retrieval_bench --worker JOB.json (use `imageragturbo bench retrieval`)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(sys.argv[2]).read_text())
    out = Path(job.pop("out"))
    out.write_text(json.dumps({**run_worker(job), "job": job}))
