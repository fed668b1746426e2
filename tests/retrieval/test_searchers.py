import shutil

import numpy as np
import pytest

from imageragturbo.retrieval.searchers import (
    Bm25Searcher,
    ExactSearcher,
    ScannSearcher,
    ScannSpec,
    build_searcher,
    resolve_kind,
    top_k,
)


def clustered(n, dim, seed=0, clusters=40):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    x = clustered(3000, 32)
    q = clustered(50, 32, seed=1)
    return x, q


def recall(ids, truth):
    return np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth)])


def test_scann_brute_force_matches_exact(data):
    x, q = data
    exact_ids, exact_scores = ExactSearcher(x).search(q, 10)
    searcher = ScannSearcher.build(x, ScannSpec.for_size(len(x)))
    assert searcher.spec.mode == "brute_force"
    ids, scores = searcher.search(q, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (50, 10)
    assert recall(ids, exact_ids) == 1.0
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    single_ids, _ = searcher.search(q[:1], 10)
    np.testing.assert_array_equal(single_ids, ids[:1])


def test_scann_tree_agrees_with_exact_and_survives_a_move(data, tmp_path):
    x, q = data
    spec = ScannSpec.for_size(len(x), mode="tree_ah", num_leaves_to_search=40, reorder=300)
    assert spec.num_leaves == round(len(x) ** 0.5) and spec.spherical
    searcher = ScannSearcher.build(x, spec)
    exact_ids, _ = ExactSearcher(x).search(q, 10)
    ids, scores = searcher.search(q, 10)
    assert recall(ids, exact_ids) >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Searching every leaf leaves only the quantisation + reorder error: near-exact.
    full, _ = searcher.search(q, 10, leaves_to_search=spec.num_leaves, reorder=300)
    assert recall(full, exact_ids) >= 0.99
    # Fewer leaves is the speed knob: recall drops (this small, noisy set is a hard case).
    assert recall(searcher.search(q, 10, leaves_to_search=5)[0], exact_ids) < recall(ids, exact_ids)

    searcher.save(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")  # relative asset paths: the folder can move
    loaded = ScannSearcher.load(tmp_path / "b", spec, *x.shape)
    np.testing.assert_array_equal(loaded.search(q, 10)[0], ids)


def test_scann_spec_refuses_contradictions():
    with pytest.raises(ValueError, match="num_leaves_to_search"):
        ScannSpec(mode="tree_ah", num_leaves=10, num_leaves_to_search=11, training_sample_size=100, reorder=10)
    with pytest.raises(ValueError, match="mode"):
        ScannSpec(mode="hnsw")
    default = ScannSpec.for_size(630_000)
    assert (default.num_leaves, default.num_leaves_to_search, default.reorder) == (794, 8, 200)


def test_exact_search_checks_its_inputs(data):
    x, q = data
    searcher = ExactSearcher(x)
    with pytest.raises(ValueError, match=r"float32 \[B, 32\]"):
        searcher.search(q[:, :8], 3)
    with pytest.raises(ValueError, match="k must be in"):
        searcher.search(q, 0)


def test_bm25_finds_the_exact_caption(tmp_path):
    from imageragturbo.world.splits import world_pairs

    captions = [c for _, c, _ in world_pairs("database", 300)]
    searcher = Bm25Searcher.build(captions)
    searcher.save(tmp_path / "bm25")
    loaded = Bm25Searcher.load(tmp_path / "bm25", len(captions))
    probes = [0, 17, 123, 299]
    ids, scores = loaded.search(None, 5, texts=[captions[i] for i in probes])
    assert ids.shape == (4, 5) and scores.dtype == np.float32
    # BM25 sees bags of words: captions with the same words in another order tie with the
    # exact caption, so the exact caption must be among the top-scoring ties.
    for row, row_scores, i in zip(ids, scores, probes):
        best = [captions[j] for j, s in zip(row, row_scores) if s == row_scores[0]]
        assert captions[i] in best
        assert row_scores[0] > 0
    assert not list((tmp_path / "bm25").glob("*.pkl"))
    with pytest.raises(ValueError, match="texts"):
        loaded.search(np.zeros((1, 4), np.float32), 3)


def test_auto_kind_and_build_searcher(data, tmp_path):
    x, _ = data
    assert resolve_kind("auto", 19_999) == "exact" and resolve_kind("auto", 20_000) == "scann"
    with pytest.raises(ValueError, match="searcher must be one of"):
        resolve_kind("faiss", 10)
    entry = build_searcher("scann", x, [], tmp_path / "s")
    assert entry["kind"] == "scann" and entry["params"]["mode"] == "brute_force"
    assert (tmp_path / "s" / "scann_assets.pbtxt").is_file()


def _sorted_reference(scores, k):
    """Score descending, then id ascending: the order every searcher promises."""
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((ids, -scores), axis=1)[:, :k]


@pytest.mark.parametrize("k", [1, 4, 16, 17, 40, 300])
def test_top_k_breaks_ties_by_id_on_both_paths(k):
    rng = np.random.default_rng(k)
    tied = rng.integers(0, 5, (3, 300)).astype(np.float32)  # many ties, also at the k-th place
    for scores in (tied, rng.standard_normal((3, 300)).astype(np.float32)):
        ids, top = top_k(scores, k)
        expected = _sorted_reference(scores, k)
        np.testing.assert_array_equal(ids, expected)
        np.testing.assert_array_equal(top, np.take_along_axis(scores, expected, axis=1))
        assert ids.dtype == np.int64 and top.dtype == np.float32


def test_exact_search_is_exact_and_the_same_alone_or_batched(data):
    x, q = data
    searcher = ExactSearcher(x)
    ids, scores = searcher.search(q, 10)
    np.testing.assert_array_equal(ids, _sorted_reference(q @ x.T, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ids, axis=1), atol=1e-6)
    for i in (0, 17, 49):
        single_ids, single_scores = searcher.search(q[i : i + 1], 10)
        np.testing.assert_array_equal(single_ids[0], ids[i])
        np.testing.assert_array_equal(single_scores[0], scores[i])  # bit for bit


def test_exact_cosine_scores_only_where_the_scores_are_exact_cosines(data, tmp_path):
    x, q = data
    exact = ExactSearcher(x)
    assert exact.exact_cosine_scores
    ids, scores = exact.search(q, 4)
    # The mean of a row is the gate lambda: the mean cosine between q and its neighbours.
    cosines = np.einsum("bd,bkd->bk", q, x[ids]) / np.linalg.norm(x[ids], axis=-1)
    np.testing.assert_allclose(scores, cosines, atol=1e-6)
    assert not ExactSearcher(x * 2).exact_cosine_scores  # dot products, not cosines
    assert not ExactSearcher(x.astype(np.float16)).exact_cosine_scores  # norms off by ~1e-4

    brute = ScannSearcher.build(x, ScannSpec.for_size(len(x)))
    tree = ScannSearcher.build(x, ScannSpec.for_size(len(x), mode="tree_ah", num_leaves_to_search=10, reorder=50))
    assert brute.exact_cosine_scores and tree.exact_cosine_scores
    for searcher in (brute, tree):
        ids, scores = searcher.search(q, 4)
        np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", q, x[ids]), atol=1e-5)
    int8 = ScannSpec.for_size(len(x), mode="tree_ah", num_leaves_to_search=10, reorder=50, reorder_dtype="int8")
    assert not ScannSearcher.build(x, int8).exact_cosine_scores
    assert not Bm25Searcher.exact_cosine_scores


@pytest.mark.parametrize("k", [1, 4, 10, 40])
def test_exact_search_over_repeated_keys_scores_each_once_and_agrees_with_every_row(data, k):
    # Captions rendered several times share a key: 3,000 rows over 300 distinct keys (in a
    # shuffled order); the last query sits halfway between two distinct keys (a near-tie).
    x, q = data
    rng = np.random.default_rng(2)
    rows = np.concatenate([np.arange(300), rng.integers(0, 300, 2700)])
    rng.shuffle(rows)
    repeated = x[:300][rows]
    searcher = ExactSearcher(repeated)
    assert searcher.distinct_keys == 300
    mid = repeated[0] + repeated[np.flatnonzero(rows != rows[0])[0]]
    queries = np.concatenate([q, (mid / np.linalg.norm(mid))[None]]).astype(np.float32)
    ids, scores = searcher.search(queries, k)
    full = np.einsum("bd,nd->bn", queries, repeated)
    expected = _sorted_reference(full, k)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(full, expected, axis=1))  # bit for bit
    for i in (0, 17, len(queries) - 1):
        np.testing.assert_array_equal(searcher.search(queries[i : i + 1], k)[0][0], ids[i])
    # All keys distinct: the plain scan, same answers.
    plain = ExactSearcher(x)
    assert plain.distinct_keys == len(x)
    np.testing.assert_array_equal(plain.search(q, k)[0], _sorted_reference(q @ x.T, k))


def test_exact_searcher_refuses_non_finite_keys_naming_the_row():
    e = np.repeat(np.eye(4, 8, dtype=np.float32), 4, 0)
    e[5] = np.nan
    with pytest.raises(ValueError, match="row 5 holds NaN"):
        ExactSearcher(e)
