"""Each searcher the benchmark compares: how it is built (one thread) and which search-time
settings it sweeps. A builder returns (build params, settings, make_search(setting) -> search(q, k) -> ids)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PEERS = ("faiss-hnsw", "faiss-ivf", "hnswlib", "milvus", "milvus-server")

PEER_MODULES = {"faiss-hnsw": "faiss", "faiss-ivf": "faiss", "hnswlib": "hnswlib", "milvus": "milvus_lite",
                "milvus-server": "pymilvus"}
PEER_EXTRAS = {"faiss-hnsw": "bench", "faiss-ivf": "bench", "hnswlib": "bench", "milvus": "milvus", "milvus-server": "milvus"}
"""The pyproject extra that installs each peer."""
HNSW_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128)



def build_scann(data, spec_args: dict, folder: Path):
    from imageragturbo.retrieval.searchers import ScannSearcher, ScannSpec

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



def build_faiss_hnsw(data, spec_args: dict, folder: Path):
    import faiss

    faiss.omp_set_num_threads(1)
    m, ef_construction = 32, spec_args.get("ef_construction", 200)
    index = faiss.IndexHNSWFlat(data.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(data)
    faiss.write_index(index, str(folder / "faiss_hnsw.index"))
    settings = [{"efSearch": ef} for ef in HNSW_EF_SEARCH]

    def make_search(setting):
        def search(q, k):
            index.hnsw.efSearch = setting["efSearch"]
            return index.search(q, k)[1]

        return search

    return {"M": m, "efConstruction": ef_construction, "metric": "inner_product"}, settings, make_search



def build_faiss_ivf(data, spec_args: dict, folder: Path):
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



def build_hnswlib(data, spec_args: dict, folder: Path):
    import hnswlib

    m, ef_construction = 32, spec_args.get("ef_construction", 200)
    index = hnswlib.Index(space="ip", dim=data.shape[1])
    index.init_index(max_elements=data.shape[0], ef_construction=ef_construction, M=m, random_seed=0)
    index.set_num_threads(1)
    index.add_items(data, np.arange(data.shape[0]), num_threads=1)
    index.save_index(str(folder / "hnswlib.index"))
    settings = [{"ef": ef} for ef in HNSW_EF_SEARCH]

    def make_search(setting):
        def search(q, k):
            index.set_ef(max(setting["ef"], k))
            return index.knn_query(q, k=k, num_threads=1)[0]

        return search

    return {"M": m, "ef_construction": ef_construction, "space": "ip"}, settings, make_search



def build_milvus(data, spec_args: dict, folder: Path):
    """Our milvus searcher (retrieval/milvus.py) on Milvus Lite in ``folder``, or (``uri`` in
    ``spec_args``) on that Milvus server in a collection of its own, dropped when the worker
    exits: HNSW, M 32, the same efConstruction as the other HNSW peers; timed through
    MilvusSearcher.search, so the latency includes the client's gRPC round trip (to the Lite
    server in this process, or over the network)."""
    import atexit
    import time

    from imageragturbo.retrieval.milvus import MilvusSearcher, MilvusSpec, connect

    m, ef_construction = 32, spec_args.get("ef_construction", 200)
    uri = spec_args.get("uri")
    where = {"uri": uri, "collection": f"irt_bench_{time.strftime('%Y%m%d%H%M%S', time.gmtime())}"} if uri else {"uri": "milvus.db"}
    spec = MilvusSpec(**where, index_type="HNSW", index_params={"M": m, "efConstruction": ef_construction},
                      search_params={"ef": 64})
    if uri:
        atexit.register(lambda: connect(uri).drop_collection(spec.collection))
    MilvusSearcher.build(data, spec, folder)
    searcher = MilvusSearcher.load(spec, folder, data.shape[0], data.shape[1], keys=data)
    settings = [{"ef": ef} for ef in spec_args.get("ef_search") or HNSW_EF_SEARCH]

    def make_search(setting):
        return lambda q, k: searcher.search(q, k, search_params=setting)[0]

    server = f"milvus server at {uri}" if uri else "milvus-lite"
    return {"M": m, "efConstruction": ef_construction, "metric": "IP", "server": server}, settings, make_search


BUILDERS = {"scann": build_scann, "faiss-hnsw": build_faiss_hnsw, "faiss-ivf": build_faiss_ivf, "hnswlib": build_hnswlib,
            "milvus": build_milvus, "milvus-server": build_milvus}

