"""The milvus searcher (retrieval/milvus.py) against Milvus Lite: keys in a collection, the
payload in our store, chosen by the manifest."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from imageragturbo.cli import main  # noqa: E402
from imageragturbo.model import RagTurboPipeline  # noqa: E402
from imageragturbo.retrieval.disk import DatabaseLoadError, check_database, load_database, read_manifest  # noqa: E402
from imageragturbo.retrieval.milvus import MilvusSearcher, MilvusSpec, _tree  # noqa: E402
from imageragturbo.retrieval.protocols import Searcher  # noqa: E402
from imageragturbo.retrieval.searchers import ExactSearcher  # noqa: E402
from db_helpers import build_each, copy_of  # noqa: E402

N = 48


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return RagTurboPipeline.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def built(encoder, tmp_path_factory):
    flat = {"searcher": "milvus", "searcher_params": {"index_type": "FLAT"}}
    return build_each(encoder, tmp_path_factory.mktemp("milvus"), N, {"a": {**flat, "seed": 0}, "b": {**flat, "seed": 1}})


@pytest.fixture()
def folder(built, tmp_path):
    return copy_of(built / "a", tmp_path)


def _close(db):
    db.searcher.close()


def test_hnsw_finds_the_exact_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((20, 32)))
    keys = _unit(centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 32)))
    queries = _unit(centres[rng.integers(0, 20, 100)] + 0.3 * rng.standard_normal((100, 32)))
    spec = MilvusSpec.for_size(len(keys))
    assert spec.index_type == "HNSW" and spec.search_params == {"ef": 64}
    MilvusSearcher.build(keys, spec, tmp_path)
    searcher = MilvusSearcher.load(spec, tmp_path, len(keys), 32, keys=keys)
    try:
        ids, scores = searcher.search(queries, 10)
    finally:
        searcher.close()
    exact_ids, exact_scores = ExactSearcher(keys).search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert recall >= 0.95, recall
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (100, 10)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # nearest first
    found = ids == exact_ids
    np.testing.assert_allclose(scores[found], exact_scores[found], atol=1e-5)


def test_a_milvus_database_serves_the_exact_searchers_neighbours(built, encoder):
    manifest = read_manifest(built / "a")
    assert manifest["searcher"]["kind"] == "milvus"
    assert manifest["searcher"]["params"]["uri"] == "searcher/milvus.db"
    assert any(name.startswith("searcher/milvus.db/") for name in manifest["files"])
    db = load_database("a", built / "a", verify=True, model_id=encoder.components.model_id)
    try:
        assert isinstance(db.searcher, Searcher) and len(db.searcher) == N
        keys = np.asarray(db.store.text_emb)
        q = _unit(keys[[0, 5, 17]] + 0.05 * np.random.default_rng(1).standard_normal((3, keys.shape[1])))
        r = db.retrieve(q, 10)
        exact_ids, exact_scores = ExactSearcher(keys).search(q, 10)
        # FLAT is exact: the same scores at each rank (ids may differ only among tied keys)
        np.testing.assert_allclose(r.scores, exact_scores, atol=1e-5)
        np.testing.assert_allclose(np.einsum("bd,bkd->bk", q, keys[r.ids]), exact_scores, atol=1e-5)
        assert r.h.shape[:2] == (3, 10)  # the payload came from our store, by those ids
    finally:
        _close(db)


def test_the_lite_folders_checksums_are_stable_after_reopening(folder):
    before = _tree(folder / "searcher" / "milvus.db")
    for _ in range(2):
        _close(load_database("a", folder, verify=True))
    assert _tree(folder / "searcher" / "milvus.db") == before
    assert check_database(folder)["searcher"]["kind"] == "milvus"


def test_another_databases_collection_is_refused(folder, built):
    shutil.rmtree(folder / "searcher" / "milvus.db")
    shutil.copytree(built / "b" / "searcher" / "milvus.db", folder / "searcher" / "milvus.db")
    with pytest.raises(DatabaseLoadError, match="belongs to another database"):
        load_database("a", folder)


def test_missing_lite_data_is_a_load_error(folder):
    shutil.rmtree(folder / "searcher" / "milvus.db")
    with pytest.raises(DatabaseLoadError, match="missing Milvus Lite data"):
        load_database("a", folder)


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p.update(index_type="HNSW"), "is indexed FLAT/IP, the manifest says HNSW/IP"),
    (lambda p: p.update(collection="other"), "no collection 'other'"),
    (lambda p: p.update(metric_type="L2"), "metric_type must be IP"),
    (lambda p: p.update(uri="/elsewhere/milvus.db"), "must be a relative file name inside"),
    (lambda p: p.update(bogus=1), "milvus params in the manifest are not understood"),
])
def test_a_manifest_that_does_not_match_the_collection_is_refused(folder, edit, needle):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest["searcher"]["params"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatabaseLoadError, match=needle):
        load_database("a", folder)


def test_the_cli_builds_a_milvus_database(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["build-database", "--out", str(out), "--model", str(tiny_model_dir), "--world", "16",
                 "--searcher", "milvus", "--milvus-index", "IVF_FLAT", "--h-dtype", "int8", "--no-progress"]) == 0
    assert "searcher milvus, H-features int8" in capsys.readouterr().err
    params = read_manifest(out)["searcher"]["params"]
    assert params["index_type"] == "IVF_FLAT" and params["index_params"]["nlist"] >= 1
    _close(load_database("cli", out, verify=True))


def test_a_refused_collection_is_closed_and_its_folder_opens_again(folder, built):
    good = folder.parent / "good"
    shutil.copytree(folder, good)
    shutil.rmtree(folder / "searcher" / "milvus.db")
    shutil.copytree(built / "b" / "searcher" / "milvus.db", folder / "searcher" / "milvus.db")
    from milvus_lite.server_manager import server_manager_instance

    for _ in range(2):  # the same folder twice in one process: the first refusal released it
        with pytest.raises(DatabaseLoadError, match="belongs to another database"):
            load_database("a", folder)
        assert str((folder / "searcher" / "milvus.db").resolve()) not in server_manager_instance._servers
    _close(load_database("a", good, verify=True))


class _IndexingServer:
    """A stand-in for a Milvus server's describe_index while it builds segment indexes."""

    def __init__(self, progress, state="InProgress"):
        self.progress, self.state, self.calls = list(progress), state, 0

    def describe_index(self, collection, field):
        indexed = self.progress[min(self.calls, len(self.progress) - 1)]
        self.calls += 1
        return {"indexed_rows": indexed, "pending_index_rows": 100 - indexed,
                "state": "Finished" if indexed == 100 else self.state}


def test_a_server_build_waits_until_every_row_is_indexed():
    from imageragturbo.retrieval.milvus import wait_for_index

    server, slept = _IndexingServer([0, 40, 40, 100]), []
    info = wait_for_index(server, "keys", 100, poll_s=1.0, sleep=slept.append)
    assert info["indexed_rows"] == 100 and server.calls == 4 and slept == [1.0, 1.0, 1.0]


def test_a_failed_or_stalled_server_index_is_an_error_naming_the_collection():
    from imageragturbo.retrieval.milvus import wait_for_index

    with pytest.raises(RuntimeError, match="indexing 'keys' failed"):
        wait_for_index(_IndexingServer([10], state="Failed"), "keys", 100, sleep=lambda s: None)
    ticks = iter(range(0, 1000, 10))
    with pytest.raises(RuntimeError, match="'keys' indexed 40 of 100 rows after 30 s"):
        wait_for_index(_IndexingServer([40]), "keys", 100, timeout_s=30, clock=lambda: next(ticks), sleep=lambda s: None)
