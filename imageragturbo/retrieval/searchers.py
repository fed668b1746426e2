"""Searchers over L2-normalised text embeddings (exact, ScaNN) and over captions (BM25).

All implement ``Searcher.search(q float32 [B, D], k, texts=None) -> (ids int64 [B, k],
scores float32 [B, k])`` (see protocols.py). Which one a database uses, and with what
parameters, is recorded in its manifest; :func:`build_searcher` and :func:`load_searcher`
are the two ends of that record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imageragturbo.retrieval.protocols import Searcher

SMALL_K = 16
"""Up to this k, top-k is k argmax passes over the scores rather than argpartition + lexsort,
whose fixed cost is many passes' worth at a small index's size (results/design-notes.md)."""
DISTINCT_KEYS_MAX_SHARE = 0.75
"""The exact searcher scores distinct keys only when there are at most this many per row;
with fewer repeats the saving does not pay for expanding the best keys into their rows."""
UNIT_NORM_TOLERANCE = 1e-5
"""How far from 1 a key's L2 norm may be for its dot products to count as cosines: above
float32 rounding of a normalised vector (~1e-7), below a float16 round trip (~1e-4)."""


def _check_query(q: np.ndarray, dim: int, k: int, n: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query must be float32 [B, {dim}], got shape {q.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a database of {n} entries, got {k}")
    return q


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest of each row: scores float [B, N] -> (ids int64 [B, k], scores float32 [B, k]),
    best first, ties broken by the smaller id (deterministic across BLAS builds and batch sizes)."""
    b, n = scores.shape
    if k <= SMALL_K and k < n:
        # argmax returns the first maximum, i.e. the smaller id among ties. Row by row with
        # scalar indexing: the batches here are a handful of requests.
        work = np.array(scores, dtype=np.float32)
        ids = np.empty((b, k), dtype=np.int64)
        top = np.empty((b, k), dtype=np.float32)
        for row in range(b):
            line = work[row]
            for j in range(k):
                best = int(line.argmax())
                ids[row, j] = best
                top[row, j] = line[best]
                line[best] = -np.inf
        return ids, top
    # Every entry scoring at least the k-th best is a candidate (argpartition alone would drop
    # an arbitrary one of several tied at the k-th place); then score, then id, decides.
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1] if k < n else scores.min(axis=1)
    ids = np.empty((b, k), dtype=np.int64)
    top = np.empty((b, k), dtype=np.float32)
    for row in range(b):
        candidates = np.flatnonzero(scores[row] >= kth[row])
        order = np.lexsort((candidates, -scores[row, candidates]))[:k]
        ids[row] = candidates[order]
        top[row] = scores[row, ids[row]]
    return ids, top


class ExactSearcher:
    """Brute-force dot products plus a partial sort: exact, and fast enough below ~20k
    entries; the ScaNN searcher takes over above that.

    The products are ``np.einsum`` rather than a BLAS matmul: BLAS wakes a worker thread for a
    product this small, which on a shared machine waits for a free core; and einsum computes
    every score with the same loop whatever the batch, so a query scores bit for bit alike
    alone or in a batch (BLAS picks other kernels for 1 and 8 queries). The timings behind
    this are in results/design-notes.md.

    Rows that share a key (the same caption rendered several times) are scored once. The scan
    then reads the distinct keys only, which between two UNet passes come from memory, and
    the top k rows are picked among the rows of the best distinct keys: the same ids and
    scores as scoring every row, ties still going to the smaller id.
    """

    kind = "exact"

    def __init__(self, embeddings: np.ndarray):
        """embeddings: float [N, D], L2-normalised."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {embeddings.shape}")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        finite = np.isfinite(self.embeddings).all(axis=1)
        if not finite.all():
            # A NaN key would compare false with every score and break the top-k selection.
            raise ValueError(f"embeddings row {int(np.flatnonzero(~finite)[0])} holds NaN or infinite values")
        norms = np.linalg.norm(self.embeddings, axis=1)
        self.exact_cosine_scores = bool(np.all(np.abs(norms - 1) <= UNIT_NORM_TOLERANCE))
        """True when the keys are unit vectors, so a scores row is the cosines between an
        L2-normalised query and its neighbours' embeddings (the pipeline's gate reads them)."""
        keys, key_of_row = np.unique(self.embeddings, axis=0, return_inverse=True)
        key_of_row = key_of_row.reshape(-1)
        self.distinct_keys = len(keys)
        self._keys = None
        if len(keys) <= DISTINCT_KEYS_MAX_SHARE * len(self.embeddings):
            self._keys = np.ascontiguousarray(keys)
            # Row ids grouped by key, ascending within a key; key j's rows are
            # _rows_by_key[_key_start[j]:_key_start[j + 1]].
            self._rows_by_key = np.argsort(key_of_row, kind="stable")
            self._key_start = np.searchsorted(key_of_row[self._rows_by_key], np.arange(len(keys) + 1))

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def search(self, q: np.ndarray, k: int, texts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = _check_query(q, self.embeddings.shape[1], k, len(self))
        if self._keys is None:
            return top_k(np.einsum("bd,nd->bn", q, self.embeddings), k)
        key_scores = np.einsum("bd,nd->bn", q, self._keys)
        ids = np.empty((len(q), k), dtype=np.int64)
        top = np.empty((len(q), k), dtype=np.float32)
        starts = self._key_start
        for row, line in enumerate(key_scores):
            best = int(line.argmax())
            first, end = starts[best], starts[best + 1]
            if end - first >= k and np.count_nonzero(line == line[best]) == 1:
                # The usual case: one key beats all others and holds k rows or more.
                ids[row] = self._rows_by_key[first:first + k]
                top[row] = line[best]
                continue
            # Every row scoring at least the k-th best row is in a key scoring at least the
            # k-th best key (each key holds one row or more); take all such keys, ties too.
            kth = np.partition(line, len(line) - k)[len(line) - k] if k < len(line) else line.min()
            keys = np.flatnonzero(line >= kth)
            rows = np.concatenate([self._rows_by_key[starts[j]:starts[j + 1]] for j in keys])
            scores = np.repeat(line[keys], starts[keys + 1] - starts[keys])
            order = np.lexsort((rows, -scores))[:k]
            ids[row] = rows[order]
            top[row] = scores[order]
        return ids, top


# -- ScaNN ------------------------------------------------------------------------------------

SCANN_BRUTE_FORCE_BELOW = 20_000
"""Under this many entries ScaNN searches by brute force (and ``auto`` picks exact search)."""


@dataclass(frozen=True)
class ScannSpec:
    """How a ScaNN searcher is built and searched; stored in the manifest.

    ``mode="brute_force"``: exact float32 dot products. ``mode="tree_ah"``: a spherical k-means
    tree (``num_leaves`` ~ sqrt(n); spherical because the keys are unit vectors, see docs/facts.md:
    a generic tree capped recall at ~0.9), anisotropic hashing with ``ah_dims_per_block``
    dimensions per 4-bit code, then exact re-scoring of the ``reorder`` best candidates.
    ``num_leaves_to_search`` and ``reorder`` are the search-time speed/recall knobs.
    """

    mode: str = "brute_force"
    num_leaves: int = 0
    num_leaves_to_search: int = 0
    training_sample_size: int = 0
    spherical: bool = True
    ah_dims_per_block: int = 2
    ah_threshold: float = 0.2
    reorder: int = 0
    reorder_dtype: str = "float32"
    training_threads: int = 0

    def __post_init__(self):
        if self.mode not in ("brute_force", "tree_ah"):
            raise ValueError(f"ScaNN mode must be 'brute_force' or 'tree_ah', got {self.mode!r}")
        if self.mode == "tree_ah":
            if not 1 <= self.num_leaves_to_search <= self.num_leaves:
                raise ValueError(
                    f"num_leaves_to_search must be in [1, num_leaves={self.num_leaves}], got {self.num_leaves_to_search}"
                )
            if self.reorder < 1 or self.training_sample_size < self.num_leaves:
                raise ValueError(
                    f"tree_ah needs reorder >= 1 and training_sample_size >= num_leaves, got {self}"
                )
            if self.reorder_dtype not in ("float32", "int8", "bfloat16"):
                raise ValueError(f"reorder_dtype must be float32, int8 or bfloat16, got {self.reorder_dtype!r}")

    @classmethod
    def for_size(cls, n: int, **overrides) -> ScannSpec:
        """The default for ``n`` entries: brute force below 20k, else a tree sized from n.

        Recall is set by how many candidates are re-scored exactly, not by the leaves searched
        (``bench retrieval``: results/retrieval.md, results/design-notes.md), so: reorder 200,
        and 1% of the leaves (at least 4) as a margin for real text embeddings, which cluster
        less cleanly than the synthetic set.
        """
        if "mode" not in overrides and n < SCANN_BRUTE_FORCE_BELOW:
            overrides["mode"] = "brute_force"
        if overrides.get("mode") == "brute_force":
            return cls(**overrides)
        num_leaves = overrides.get("num_leaves", max(2, round(n**0.5)))
        params = dict(
            mode="tree_ah",
            num_leaves=num_leaves,
            num_leaves_to_search=min(num_leaves, max(4, round(num_leaves * 0.01))),
            training_sample_size=min(n, 250_000),
            reorder=200,
        )
        params.update(overrides)
        return cls(**params)

    def to_dict(self) -> dict:
        return asdict(self)


def _scann_modules():
    # scann is imported lazily: it loads a large native library that exact-only users never need.
    import scann
    from scann.scann_ops.py import scann_ops_pybind

    return scann, scann_ops_pybind


class ScannSearcher:
    """ScaNN over L2-normalised embeddings (dot product); single-threaded search per call."""

    kind = "scann"

    def __init__(self, searcher, spec: ScannSpec, n: int, dim: int):
        """Use :meth:`build` or :meth:`load`; ``searcher`` is a ScaNN pybind searcher."""
        self._searcher = searcher
        self.spec = spec
        self.n = n
        self.dim = dim

    def __len__(self) -> int:
        return self.n

    @property
    def exact_cosine_scores(self) -> bool:
        """True when the returned scores are exact float32 dot products with the (L2-normalised,
        as the index builder writes them) keys: brute force, or a tree whose candidates are
        re-scored in float32. Hashed or int8/bfloat16 re-scored scores are approximations."""
        return self.spec.mode == "brute_force" or self.spec.reorder_dtype == "float32"

    @classmethod
    def build(cls, embeddings: np.ndarray, spec: ScannSpec | None = None) -> ScannSearcher:
        """embeddings float [N, D], L2-normalised; ``spec`` defaults to :meth:`ScannSpec.for_size`."""
        scann, _ = _scann_modules()
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {embeddings.shape}")
        n, dim = embeddings.shape
        spec = spec or ScannSpec.for_size(n)
        builder = scann.scann_ops_pybind.builder(embeddings, 10, "dot_product")
        if spec.mode == "brute_force":
            builder = builder.score_brute_force()
        else:
            if spec.num_leaves > n:
                raise ValueError(f"num_leaves={spec.num_leaves} exceeds the {n} entries")
            reorder_dtype = {
                "float32": scann.ReorderType.FLOAT32,
                "int8": scann.ReorderType.INT8,
                "bfloat16": scann.ReorderType.BFLOAT16,
            }[spec.reorder_dtype]
            builder = (
                builder.tree(
                    num_leaves=spec.num_leaves,
                    num_leaves_to_search=spec.num_leaves_to_search,
                    training_sample_size=min(spec.training_sample_size, n),
                    spherical=spec.spherical,
                )
                .score_ah(spec.ah_dims_per_block, anisotropic_quantization_threshold=spec.ah_threshold)
                .reorder(spec.reorder, quantize=reorder_dtype)
            )
        builder.set_n_training_threads(spec.training_threads)
        return cls(builder.build().searcher, spec, n, dim)

    def save(self, folder: Path) -> None:
        """Serialise into ``folder`` with relative asset paths, so the folder can be renamed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._searcher.serialize(str(folder), True)

    @classmethod
    def load(cls, folder: Path, spec: ScannSpec, n: int, dim: int) -> ScannSearcher:
        """Load serialised assets (no raw dataset needed). Uses the pybind class directly:
        scann's ``load_searcher`` would unpickle a ``scann_docids.pkl`` if one were there."""
        _, scann_ops_pybind = _scann_modules()
        folder = Path(folder)
        assets = folder / "scann_assets.pbtxt"
        if not assets.is_file():
            raise ValueError(f"missing ScaNN assets: {assets}")
        searcher = scann_ops_pybind.scann_pybind.ScannNumpy(str(folder), assets.read_text())
        return cls(searcher, spec, n, dim)

    def search(
        self,
        q: np.ndarray,
        k: int,
        texts: list[str] | None = None,
        *,
        leaves_to_search: int | None = None,
        reorder: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """q float32 [B, D] -> (ids int64 [B, k], scores float32 [B, k]); the keyword knobs
        override the spec's search-time parameters (benchmarks sweep them)."""
        q = _check_query(q, self.dim, k, self.n)
        if self.spec.mode == "tree_ah":
            leaves = leaves_to_search or self.spec.num_leaves_to_search
            pre_reorder = max(reorder or self.spec.reorder, k)
        else:
            leaves, pre_reorder = -1, -1
        if q.shape[0] == 1:
            # The single-query entry point skips the batch bookkeeping (the latency path).
            ids, scores = self._searcher.search(q[0], k, pre_reorder, leaves)
            ids, scores = ids[None], scores[None]
        else:
            ids, scores = self._searcher.search_batched(q, k, pre_reorder, leaves, False, 0)
        if ids.shape != (q.shape[0], k):
            raise RuntimeError(
                f"ScaNN returned {ids.shape[-1]} neighbours, asked for {k}: search more leaves "
                f"(num_leaves_to_search={leaves}) or a larger reorder"
            )
        return ids.astype(np.int64), scores.astype(np.float32)


# -- BM25 -------------------------------------------------------------------------------------


class Bm25Searcher:
    """Lexical BM25 over the captions (bm25s): reads ``texts``, ignores the embedding query.

    No stop words: in captions like "a square above a circle" the little words carry the
    relation. Ties are broken by id so results are deterministic.
    """

    kind = "bm25"
    exact_cosine_scores = False
    """BM25 scores are not embedding similarities."""

    def __init__(self, retriever, n: int):
        self._retriever = retriever
        self.n = n

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _tokenize(texts: list[str]):
        import bm25s

        return bm25s.tokenize(list(texts), stopwords=None, show_progress=False)

    @classmethod
    def build(cls, captions: list[str]) -> Bm25Searcher:
        import bm25s

        if not captions:
            raise ValueError("BM25 needs at least one caption")
        retriever = bm25s.BM25()
        retriever.index(cls._tokenize(captions), show_progress=False)
        return cls(retriever, len(captions))

    def save(self, folder: Path) -> None:
        """numpy arrays (allow_pickle=False) + JSON vocabulary and parameters."""
        self._retriever.save(str(folder), allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, folder: Path, n: int) -> Bm25Searcher:
        import bm25s

        params = Path(folder) / "params.index.json"
        if not params.is_file():
            raise ValueError(f"missing BM25 index: {params}")
        return cls(bm25s.BM25.load(str(folder), allow_pickle=False, show_progress=False), n)

    def search(self, q: np.ndarray | None, k: int, texts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """texts: B strings -> (ids int64 [B, k], BM25 scores float32 [B, k]); q is ignored."""
        import bm25s

        if texts is None or not len(texts):
            raise ValueError("the BM25 searcher searches prompt texts; call search(q, k, texts=[...])")
        if not 1 <= k <= self.n:
            raise ValueError(f"k must be in [1, {self.n}] for a database of {self.n} entries, got {k}")
        tokens = bm25s.tokenize(list(texts), stopwords=None, return_ids=False, show_progress=False)
        ids, scores = self._retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        order = np.lexsort((ids, -scores), axis=1)
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


# -- choosing, saving and loading by kind -----------------------------------------------------

SEARCHER_KINDS = ("auto", "exact", "scann", "bm25", "milvus")


def resolve_kind(kind: str, n: int) -> str:
    """``auto`` -> exact below 20k entries, else scann (never milvus: an external database is
    asked for by name)."""
    if kind not in SEARCHER_KINDS:
        raise ValueError(f"searcher must be one of {SEARCHER_KINDS}, got {kind!r}")
    if kind == "auto":
        return "exact" if n < SCANN_BRUTE_FORCE_BELOW else "scann"
    return kind


def build_searcher(
    kind: str, embeddings: np.ndarray, captions: list[str], folder: Path, scann_spec: ScannSpec | None = None,
    params: dict | None = None, *, name: str = "database",
) -> dict:
    """Build a searcher of ``kind`` and serialise it into ``folder`` (the database folder's
    ``searcher/``); returns the manifest entry ``{"kind": ..., "params": {...}}``. ``params``
    are a milvus searcher's (MilvusSpec fields; a server uri without a collection gets one
    named after ``name``)."""
    n = embeddings.shape[0]
    kind = resolve_kind(kind, n)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "exact":
        return {"kind": "exact", "params": {}}
    if kind == "scann":
        searcher = ScannSearcher.build(embeddings, scann_spec)
        searcher.save(folder)
        return {"kind": "scann", "params": searcher.spec.to_dict()}
    if kind == "milvus":
        from imageragturbo.retrieval.milvus import build_milvus_searcher

        return build_milvus_searcher(embeddings, params, folder.parent, name)
    searcher = Bm25Searcher.build(captions)
    searcher.save(folder)
    return {"kind": "bm25", "params": {"tokenizer": "bm25s.tokenize(stopwords=None)"}}


def load_searcher(entry: dict, folder: Path, store) -> Searcher:
    """The searcher a manifest entry describes, loaded from ``folder``; ``store`` is the
    database's :class:`MemmapFeatureStore` (exact search reads its embeddings)."""
    kind = entry.get("kind")
    n, dim = store.text_emb.shape
    if kind == "exact":
        return ExactSearcher(store.text_emb)
    if kind == "scann":
        try:
            spec = ScannSpec(**entry.get("params", {}))
        except TypeError as exc:
            raise ValueError(f"{folder}: ScaNN params in the manifest are not understood: {entry.get('params')}") from exc
        return ScannSearcher.load(folder, spec, n, dim)
    if kind == "bm25":
        return Bm25Searcher.load(folder, n)
    if kind == "milvus":
        from imageragturbo.retrieval.milvus import load_milvus_searcher

        return load_milvus_searcher(entry.get("params", {}), Path(folder).parent, n, dim, store.text_emb)
    raise ValueError(f"{folder}: unknown searcher kind {kind!r} in the manifest; expected exact, scann, bm25 or milvus")
