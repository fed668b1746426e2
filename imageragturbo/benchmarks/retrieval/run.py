"""The whole `imageragturbo bench retrieval` run: data, each searcher in its own process, the
feature store, and the JSON and markdown it writes."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imageragturbo.benchmarks import BenchError
from imageragturbo.benchmarks.retrieval.data import cluster_centres, clustered_embeddings, exact_topk
from imageragturbo.benchmarks.retrieval.peers import PEER_EXTRAS, PEER_MODULES, PEERS
from imageragturbo.benchmarks.retrieval.report import markdown_report
from imageragturbo.benchmarks.retrieval.store import gather_timing, quantisation_effect, store_sizes
from imageragturbo.benchmarks.retrieval.worker import spawn_worker
from imageragturbo.machine import load_average, niceness, retrieval_fields
from imageragturbo.paths import bundled_model_if_present

logger = logging.getLogger(__name__)


@dataclass
class RetrievalBenchOptions:
    """What `imageragturbo bench retrieval` runs (its flags, by the same names)."""

    n: int
    dim: int
    queries: int
    k: int
    target_recall: float
    peers: str
    """Comma-separated names from PEERS ('' for none); those not installed are listed as skipped."""
    scann_leaves: int | None
    scann_reorder_dtype: str
    scann_ah_dims: int
    scann_generic_tree: bool
    hnsw_ef_construction: int
    milvus_queries: int | None
    """Time only the first N queries on the milvus peer (None: all of them)."""
    milvus_ef: str
    milvus_uri: str | None
    """A Milvus server for the milvus-server peer (None: that peer is skipped, naming why)."""
    """Comma-separated ef values the milvus peer sweeps ('' : the HNSW sweep of the other peers)."""
    h_rows: int
    model: Path | None
    """Model for the quantisation effect (None: the bundled one, if it is there)."""
    effect_pairs: int
    effect_prompts: int
    work_dir: Path | None
    json: Path
    markdown: Path | None
    variant: list[Path]
    parts: str
    """'searchers' (the index comparison) and/or 'store'; 'store' alone updates an existing ``json``."""
    render_only: bool


def run_bench(options: RetrievalBenchOptions, on_progress=None) -> dict:
    """The whole benchmark; ``on_progress(partial_result)`` is called after each searcher
    (``complete`` False) so a long run leaves its results so far on disk."""
    if options.n < 100 or options.dim < 2 or options.queries < 1 or options.k < 1:
        raise BenchError(f"need n >= 100, dim >= 2, queries >= 1, k >= 1; got n={options.n}, dim={options.dim}, queries={options.queries}, k={options.k}")
    if options.milvus_queries is not None and options.milvus_queries < 1:
        raise BenchError(f"--milvus-queries must be >= 1, got {options.milvus_queries}")
    try:
        milvus_ef = [int(x) for x in options.milvus_ef.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--milvus-ef must be comma-separated integers, got {options.milvus_ef!r}") from None
    if any(ef < 1 for ef in milvus_ef):
        raise BenchError(f"--milvus-ef values must be >= 1, got {options.milvus_ef!r}")
    peers = [p.strip() for p in options.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise BenchError(f"unknown peers {unknown}; choose from {list(PEERS)}")
    info = retrieval_fields()
    work = Path(options.work_dir) if options.work_dir else Path(tempfile.mkdtemp(prefix="irt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    clusters = max(8, options.n // 500)
    spread = 0.75
    data_file, query_file, truth_file = work / "data.npy", work / "queries.npy", work / "truth.npy"

    # 1. data and exact ground truth (reused from --work-dir when made with the same settings);
    #    queries share the data's centres, with their own noise
    start = time.perf_counter()
    stamp_file = work / "data.json"
    stamp = {"n": options.n, "dim": options.dim, "queries": options.queries, "k": options.k, "clusters": clusters, "spread": spread, "seed": 0}
    reuse = stamp_file.is_file() and json.loads(stamp_file.read_text()).get("stamp") == stamp
    if not reuse:
        stamp_file.unlink(missing_ok=True)
        centres = cluster_centres(clusters, options.dim, seed=0)
        clustered_embeddings(options.n, centres, spread, seed=0, out=data_file).flush()
        queries = clustered_embeddings(options.queries, centres, spread, seed=1)
        np.save(query_file, queries)
    queries = np.load(query_file, allow_pickle=False)
    data = np.load(data_file, mmap_mode="r", allow_pickle=False)
    if reuse:
        truth = np.load(truth_file, allow_pickle=False)
        exact_ms = json.loads(stamp_file.read_text())["exact_ms"]
    else:
        truth = exact_topk(data, queries, options.k)
        np.save(truth_file, truth)
        exact_ms = []
        for i in range(min(10, options.queries)):
            t0 = time.perf_counter_ns()
            exact_topk(data, queries[i : i + 1], options.k, block=options.n)
            exact_ms.append((time.perf_counter_ns() - t0) / 1e6)
        stamp_file.write_text(json.dumps({"stamp": stamp, "exact_ms": exact_ms}))
    del data
    logger.info("data + ground truth: %.1f s%s", time.perf_counter() - start, " (reused)" if reuse else "")

    # 2. searchers, each in its own process
    job = {"data": str(data_file), "queries": str(query_file), "truth": str(truth_file), "k": options.k, "target_recall": options.target_recall}
    scann_params = {"ah_dims_per_block": options.scann_ah_dims, "reorder_dtype": options.scann_reorder_dtype, "spherical": not options.scann_generic_tree}
    if options.scann_leaves:
        scann_params["num_leaves"] = options.scann_leaves
    results, skipped = [], []
    gather = effect = None

    def summary(complete: bool) -> dict:
        fastest_peer = min((r["p50_ms"] for r in results if r["meets_target_recall"]), default=None)
        info["loadavg_end"] = load_average()
        # Read now, not at start: the workplace may renice running jobs.
        info["nice"] = niceness()
        return {
            "complete": complete,
            "n": options.n,
            "dim": options.dim,
            "queries": options.queries,
            "k": options.k,
            "target_recall": options.target_recall,
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
            # Searchers whose result an earlier invocation with the same job left in --work-dir.
            "reused": {r["searcher"]: r["reused"] for r in [ours, *results] if r.get("reused")},
            "exact_numpy_p50_ms": float(np.median(exact_ms)) if exact_ms else None,
            "data": {"kind": "clustered gaussian, L2-normalised", "clusters": clusters, "spread": spread, "seed": 0},
            "gather": gather,
            "store_size": store_sizes(),
            "quantisation_effect": effect,
            "machine": info,
            "command": "imageragturbo " + " ".join(sys.argv[1:]) if sys.argv and "imageragturbo" in sys.argv[0] else None,
        }

    ours = spawn_worker({**job, "searcher": "scann", "params": scann_params, "index_dir": str(work / "idx-scann")}, work)
    if on_progress:
        on_progress(summary(False))
    for peer in peers:
        try:
            __import__(PEER_MODULES[peer])
        except ImportError:
            skipped.append({"searcher": peer, "reason": f"{PEER_MODULES[peer]} is not installed (pip install '.[{PEER_EXTRAS[peer]}]')"})
            continue
        if peer == "milvus-server" and not options.milvus_uri:
            skipped.append({"searcher": peer, "reason": "no Milvus server given (--milvus-uri http://HOST:19530)"})
            continue
        params = {"ef_construction": options.hnsw_ef_construction} if peer != "faiss-ivf" else {}
        peer_job = {**job, "searcher": peer, "params": params, "index_dir": str(work / f"idx-{peer}")}
        if peer.startswith("milvus"):
            params["ef_search"] = milvus_ef
            peer_job["max_queries"] = options.milvus_queries
        if peer == "milvus-server":
            params["uri"] = options.milvus_uri
        results.append(spawn_worker(peer_job, work))
        if on_progress:
            on_progress(summary(False))

    # 3. the feature store
    if "store" in options.parts:
        gather, effect = store_measurements(options, work)
    return summary(True)



def store_measurements(options: RetrievalBenchOptions, work: Path) -> tuple[dict, dict | None]:
    """The feature-store side: gather timing, and the shrink effect on a model's output."""
    gather = gather_timing(work, options.h_rows, k=4)
    effect = None
    model_dir = options.model if options.model is not None else bundled_model_if_present()
    if model_dir is not None and options.effect_pairs > 0:
        effect = quantisation_effect(Path(model_dir), options.effect_pairs, options.effect_prompts)
    return gather, effect



def run(options: RetrievalBenchOptions) -> dict:
    """The benchmark as the options ask (or, with ``render_only``, only the report from an
    existing JSON); writes ``options.json`` and ``options.markdown``, returns the result."""
    variants = []
    for path in options.variant:
        try:
            variants.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"cannot read --variant {path}: {exc}") from exc
    if options.render_only:
        if not options.markdown:
            raise BenchError("--render-only needs --markdown")
        try:
            result = json.loads(options.json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"cannot read --json {options.json}: {exc}") from exc
    elif "searchers" not in options.parts:
        try:
            result = json.loads(options.json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"--parts store updates an existing --json; cannot read {options.json}: {exc}") from exc
        work = Path(options.work_dir) if options.work_dir else Path(tempfile.mkdtemp(prefix="irt-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        result["gather"], result["quantisation_effect"] = store_measurements(options, work)
        result["store_command"] = "imageragturbo " + " ".join(sys.argv[1:])
        options.json.write_text(json.dumps(result, indent=2))
    else:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        carry = {}
        if "store" not in options.parts and options.json.is_file():
            # Keep the store measurements of an earlier run (`--parts store`) in the same file.
            old = json.loads(options.json.read_text())
            carry = {k: old[k] for k in ("gather", "quantisation_effect", "store_command") if old.get(k) is not None}

        def write(partial: dict) -> None:
            options.json.write_text(json.dumps({**partial, **carry}, indent=2))

        result = {**run_bench(options, on_progress=write), **carry}
        write(result)
    if options.markdown:
        options.markdown.parent.mkdir(parents=True, exist_ok=True)
        options.markdown.write_text(markdown_report(result, variants))
    return result

