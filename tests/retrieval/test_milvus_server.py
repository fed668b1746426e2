"""The milvus searcher against a Milvus server: the same code as against Milvus Lite, with the
keys in a server collection and the payload in our store.

Runs only where a server does: set ``IRT_TEST_MILVUS_URI`` (for example
``http://127.0.0.1:19530``). One without Docker: ``pip install milvus==2.3.5`` (the embedded
standalone server; a venv of its own) and run ``milvus-server --data DIR``. Every collection a
test makes is dropped at its end.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("pymilvus")
URI = os.environ.get("IRT_TEST_MILVUS_URI")
pytestmark = pytest.mark.skipif(not URI, reason="no Milvus server (set IRT_TEST_MILVUS_URI=http://HOST:19530)")

from imageragturbo.cli import main  # noqa: E402
from imageragturbo.retrieval.disk import DatabaseLoadError, load_database, read_manifest  # noqa: E402
from imageragturbo.retrieval.milvus import connect  # noqa: E402
from imageragturbo.retrieval.searchers import ExactSearcher  # noqa: E402


@pytest.fixture()
def server_database(tiny_model_dir, tmp_path):
    out = tmp_path / "srv"
    assert main(["build-database", "--out", str(out), "--model", str(tiny_model_dir), "--world", "64",
                 "--searcher", "milvus", "--milvus-uri", URI, "--no-progress"]) == 0
    params = read_manifest(out)["searcher"]["params"]
    yield out, params
    connect(URI).drop_collection(params["collection"])


def test_a_server_database_serves_the_exact_searchers_neighbours(server_database):
    out, params = server_database
    assert params["uri"] == URI and params["collection"].startswith("irt_srv_")
    assert not [f for f in out.rglob("*") if f.is_file() and "searcher" in f.parts]  # the index lives on the server
    index = connect(URI).describe_index(params["collection"], "vector")
    assert index["indexed_rows"] == 64 and index["pending_index_rows"] == 0  # the build waited for the index
    db = load_database("srv", out, verify=True)
    try:
        keys = np.asarray(db.store.text_emb)
        rng = np.random.default_rng(0)
        q = keys[[0, 9, 40]] + 0.05 * rng.standard_normal((3, keys.shape[1])).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        found = db.retrieve(q, 8)
        exact_ids, exact_scores = ExactSearcher(keys).search(q, 8)
        np.testing.assert_allclose(found.scores, exact_scores, atol=1e-5)
        assert (found.ids[:, 0] == exact_ids[:, 0]).all()
        assert found.h.shape[:2] == (3, 8)  # the payload came from our store, by those ids
    finally:
        db.searcher.close()


def test_a_database_whose_collection_is_gone_is_refused_naming_it(server_database):
    out, params = server_database
    connect(URI).drop_collection(params["collection"])
    with pytest.raises(DatabaseLoadError, match=f"no collection '{params['collection']}'"):
        load_database("srv", out)


def test_bench_retrieval_times_the_server_beside_scann_and_drops_its_collection(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "retrieval", "--n", "1500", "--dim", "16", "--queries", "40", "--parts", "searchers",
                 "--peers", "milvus-server", "--milvus-uri", URI, "--milvus-ef", "64", "--hnsw-ef-construction", "64",
                 "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    (peer,) = json.loads(out.read_text())["peers"]
    assert peer["searcher"] == "milvus-server" and peer["params"]["server"] == f"milvus server at {URI}"
    assert peer["recall_at_10"] >= 0.95 and 0 < peer["p50_ms"] <= peer["p99_ms"]
    assert not [c for c in connect(URI).list_collections() if c.startswith("irt_bench_")]
