"""The one retrieval step: search -> (exclude) -> gather H -> gate, and the database registry."""

import numpy as np
import pytest

from imageragturbo.errors import RequestError
from imageragturbo.retrieval import Databases, ExactSearcher, InMemoryFeatureStore, RetrievalDatabase, gate


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _database(name="db", n=12, d=16, seed=0):
    rng = np.random.default_rng(seed)
    e = _unit(rng.normal(size=(n, d)))
    h = rng.normal(size=(n, 4, 2, 2)).astype(np.float16)
    store = InMemoryFeatureStore(e, h, [f"caption {i}" for i in range(n)], "model-x")
    return RetrievalDatabase(name, ExactSearcher(e), store)


def test_gate_is_the_mean_cosine():
    rng = np.random.default_rng(1)
    q, e = _unit(rng.normal(size=(2, 16))), _unit(rng.normal(size=(2, 3, 16)))
    expected = np.array([np.mean([q[b] @ e[b, j] for j in range(3)]) for b in range(2)], dtype=np.float32)
    np.testing.assert_allclose(gate(q, e), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(gate(q, np.repeat(q[:, None], 4, axis=1)), np.ones(2), atol=1e-6)
    # not unit-norm on input (an fp16 store): re-normalised, so a cosine stays in [-1, 1]
    np.testing.assert_allclose(gate(3 * q, 2 * e), expected, rtol=0, atol=1e-6)


def test_retrieve_returns_the_searchers_rows_their_features_and_gate():
    db = _database()
    q = db.store.text_emb[[3, 7]]
    found = db.retrieve(q, 4)
    assert found.ids.shape == found.scores.shape == (2, 4) and found.ids[:, 0].tolist() == [3, 7]
    assert found.h.dtype == np.float32 and found.h.shape == (2, 4, 4, 2, 2)
    np.testing.assert_array_equal(found.h, db.store.h_retr[found.ids].astype(np.float32))
    np.testing.assert_allclose(found.gate, gate(q, db.store.text_emb[found.ids]), atol=1e-6)
    assert found.captions()[0][0] == "caption 3" and found.source_ids()[1][0] == "7"


def test_exclude_drops_the_querys_own_row_and_keeps_k():
    db = _database()
    q = db.store.text_emb[[3, 7, 5]]
    found = db.retrieve(q, 4, exclude=np.array([3, -1, 5]))
    assert found.ids.shape == (3, 4)
    assert 3 not in found.ids[0] and found.ids[1, 0] == 7 and 5 not in found.ids[2]
    np.testing.assert_array_equal(found.ids[0], db.retrieve(q[:1], 5).ids[0, 1:])


def test_h_rows_replace_the_stores_features_row_for_row():
    db = _database()
    other = np.arange(12 * 16, dtype=np.float32).reshape(12, 4, 2, 2)
    found = db.retrieve(db.store.text_emb[:2], 3, h_rows=other)
    np.testing.assert_array_equal(found.h, other[found.ids])


def test_the_first_database_is_the_default_and_names_are_unique():
    databases = Databases()
    with pytest.raises(RequestError, match="no database is loaded"):
        databases.resolve()
    assert databases.default is None
    databases.add(_database("grey"))
    databases.add(_database("dim", seed=1))
    assert databases.default == "grey" and databases.resolve().name == "grey"
    assert databases.resolve("dim").name == "dim"
    with pytest.raises(RequestError, match="unknown database 'bright'"):
        databases.resolve("bright")
    with pytest.raises(ValueError, match="given twice"):
        databases.add(_database("dim"))
