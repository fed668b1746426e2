"""A searcher on an existing vector database: Milvus, through ``pymilvus`` (the ``[milvus]`` extra).

The keys (the text embeddings) live in a Milvus collection of ``(id INT64 primary, vector
FLOAT_VECTOR[D])`` with the row id of our store as the primary key, searched by inner product;
the payload (H-features, latents, captions) stays in our store and is gathered by those ids. The
database manifest chooses it::

    "searcher": {"kind": "milvus", "params": {"uri": "searcher/milvus.db", "collection": "keys",
                 "index_type": "HNSW", "metric_type": "IP", "index_params": {...}, "search_params": {...}}}

``uri`` is either a Milvus Lite data path inside the database folder (relative to it, ending in
``.db``; its files are checksummed with the rest of the folder) or a server URI
(``http://host:19530``, ``https://...``); a server's token, if it needs one, is read from
``IRT_MILVUS_TOKEN`` and never written to the manifest.

What Milvus Lite is and is not (measured, results/retrieval.md): an in-process Python server over
FAISS segment indexes, one process per data folder (it holds a file lock), which writes a lock
file and an empty WAL into its folder while open, so the database folder must be writable. Its
search cost grows with N (milvus_lite/search/executor_indexed.py walks every row's primary key
in Python for each query, to drop duplicates and deleted rows, before it asks the FAISS index:
123 ms a query at 100 k keys), so its latency says nothing about a Milvus server's; it is here so that the same code and the same manifest run the suite, and a
server URI is what a database beyond one host's memory uses.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INDEX_TYPES = ("HNSW", "IVF_FLAT", "FLAT")
TOKEN_ENV = "IRT_MILVUS_TOKEN"
LITE_URI = "searcher/milvus.db"
"""Where a build puts its Milvus Lite data, relative to the database folder."""
LITE_COLLECTION = "keys"
SPOT_CHECK_ROWS = 16
"""Rows whose stored vectors are compared with the store's keys when a database is opened."""
INSERT_BATCH = 2000
INDEX_WAIT_S = 4 * 3600.0
"""How long a build waits for a Milvus server to finish indexing what it inserted."""
INDEX_POLL_S = 5.0


def milvus_available() -> bool:
    """True when pymilvus (and, for a local file, milvus-lite) can be imported."""
    try:
        import pymilvus  # noqa: F401
    except ImportError:
        return False
    return True


def _pymilvus():
    try:
        import pymilvus
    except ImportError as exc:  # the [milvus] extra
        raise ValueError("the milvus searcher needs pymilvus and milvus-lite: pip install '.[milvus]'") from exc
    return pymilvus


def is_server_uri(uri: str) -> bool:
    return "://" in uri


@dataclass(frozen=True)
class MilvusSpec:
    """Where the keys live and how they are indexed and searched; stored in the manifest."""

    uri: str = LITE_URI
    collection: str = LITE_COLLECTION
    index_type: str = "HNSW"
    metric_type: str = "IP"
    index_params: dict = field(default_factory=dict)
    search_params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.metric_type != "IP":
            raise ValueError(f"the keys are unit vectors searched by dot product: metric_type must be IP, got {self.metric_type!r}")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"uri must be a non-empty string, got {self.uri!r}")
        if not is_server_uri(self.uri) and not self.uri.endswith(".db"):
            raise ValueError(f"a Milvus Lite uri is a path ending in .db, got {self.uri!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", self.collection or ""):
            raise ValueError(f"collection must be letters, digits and underscores, got {self.collection!r}")
        if not isinstance(self.index_params, dict) or not isinstance(self.search_params, dict):
            raise ValueError("index_params and search_params must be objects")

    @classmethod
    def for_size(cls, n: int, **overrides) -> MilvusSpec:
        """Defaults for ``n`` keys: HNSW (M 32, efConstruction 200, ef 64); IVF_FLAT with
        4 sqrt(n) lists and 1/64 of them probed; FLAT (exact)."""
        index_type = overrides.get("index_type", "HNSW")
        if index_type == "HNSW":
            defaults = {"index_params": {"M": 32, "efConstruction": 200}, "search_params": {"ef": 64}}
        elif index_type == "IVF_FLAT":
            nlist = max(1, min(n, round(4 * n**0.5)))
            defaults = {"index_params": {"nlist": nlist}, "search_params": {"nprobe": max(1, nlist // 64)}}
        else:
            defaults = {"index_params": {}, "search_params": {}}
        return cls(**{**defaults, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def default_collection_name(name: str) -> str:
    """A server collection name for a database called ``name`` (letters, digits, underscores),
    stamped with the build time so two builds never write into one collection."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", name)[:180]
    return f"irt_{stem}_{time.strftime('%Y%m%d%H%M%S', time.gmtime())}"


def _resolve_uri(spec: MilvusSpec, root: Path) -> str:
    """The URI to connect to: a server URI as is, a Lite path inside ``root`` (the database folder)."""
    if is_server_uri(spec.uri):
        return spec.uri
    from imageragturbo.retrieval.disk import inside

    return str(inside(root, spec.uri, f"{root}: searcher.params.uri"))


def connect(uri: str):
    """A pymilvus client: to a server URI (with the token in IRT_MILVUS_TOKEN), or a Lite path."""
    pymilvus = _pymilvus()
    token = os.environ.get(TOKEN_ENV, "") if is_server_uri(uri) else ""
    return pymilvus.MilvusClient(uri=uri, token=token)


def _release_lite(path: str) -> None:
    """Close a Milvus Lite data folder opened in this process (flushes it, drops its lock)."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(path)


def wait_for_index(client, collection: str, n: int, *, timeout_s: float = INDEX_WAIT_S,
                   poll_s: float = INDEX_POLL_S, clock=time.monotonic, sleep=time.sleep) -> dict:
    """Wait until a Milvus server has indexed all ``n`` rows of ``collection`` (it builds
    segment indexes in the background after a flush; until then a search scans the unindexed
    segments by brute force, so its recall is exact and its latency is not the index's).
    Logs progress; raises on a failed build or after ``timeout_s``. Returns the last description."""
    started = clock()
    last_logged = -1
    while True:
        info = client.describe_index(collection, "vector") or {}
        state = str(info.get("state", ""))
        indexed = int(info.get("indexed_rows", 0))
        if state == "Failed":
            raise RuntimeError(f"milvus: indexing {collection!r} failed: {info.get('index_state_fail_reason', info)}")
        if indexed >= n and int(info.get("pending_index_rows", 0)) == 0:
            logger.info("milvus: %s indexed %d / %d rows in %.1f s", collection, indexed, n, clock() - started)
            return info
        if clock() - started > timeout_s:
            raise RuntimeError(f"milvus: {collection!r} indexed {indexed} of {n} rows after {timeout_s:.0f} s (state {state or 'unknown'})")
        if indexed != last_logged:
            logger.info("milvus: %s indexing: %d / %d rows (%s)", collection, indexed, n, state or "unknown")
            last_logged = indexed
        sleep(poll_s)


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` but the lock, by its sha256."""
    from imageragturbo.retrieval.disk import sha256_file

    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "LOCK"}


class MilvusSearcher:
    """The Searcher protocol over a Milvus collection of the database's keys."""

    kind = "milvus"
    exact_cosine_scores = False
    """Scores come from Milvus (approximate for HNSW/IVF); the gate reads the store's keys."""

    def __init__(self, client, spec: MilvusSpec, n: int, dim: int, uri: str):
        """Use :meth:`build` or :meth:`load`."""
        self._client = client
        self.spec = spec
        self.n = n
        self.dim = dim
        self.uri = uri

    def __len__(self) -> int:
        return self.n

    # -- building -------------------------------------------------------------------------

    @staticmethod
    def build(embeddings: np.ndarray, spec: MilvusSpec, root: Path, *, batch: int = INSERT_BATCH,
              progress=None) -> None:
        """Create the collection, insert ``embeddings`` (float [N, D], unit rows) with their row
        numbers as ids, build the index, and close it (open it with :meth:`load`). ``root`` is
        the database folder a Lite uri is relative to. A Lite folder is closed and reopened
        until its files stop changing (Milvus Lite compacts and writes index files in the
        background), so the checksums taken next are those every later open sees; its lock
        file is removed."""
        pymilvus = _pymilvus()
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {embeddings.shape}")
        n, dim = embeddings.shape
        uri = _resolve_uri(spec, Path(root))
        if not is_server_uri(uri):
            if Path(uri).exists():
                raise ValueError(f"{uri} already exists; a build writes a fresh Milvus Lite folder")
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        client = connect(uri)
        if client.has_collection(spec.collection):
            raise ValueError(f"collection {spec.collection!r} already exists at {spec.uri}; "
                             "drop it or build with another collection name")
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=dim)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=spec.index_type, metric_type=spec.metric_type,
                        params=dict(spec.index_params))
        client.create_collection(spec.collection, schema=schema, index_params=index)
        started = time.monotonic()
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            block = np.ascontiguousarray(embeddings[lo:hi], dtype=np.float32)
            client.insert(spec.collection, [{"id": lo + i, "vector": row} for i, row in enumerate(block)])
            if progress is not None:
                progress(hi, n)
        client.flush(spec.collection)
        logger.info("milvus: inserted %d keys in %.1f s", n, time.monotonic() - started)
        if is_server_uri(uri):
            wait_for_index(client, spec.collection, n)
        client.load_collection(spec.collection)
        client.close()
        if is_server_uri(uri):
            return
        _release_lite(uri)
        folder = Path(uri)
        before = _tree(folder)
        for _ in range(5):
            reopened = connect(uri)
            reopened.load_collection(spec.collection)
            reopened.close()
            _release_lite(uri)
            after = _tree(folder)
            if after == before:
                break
            before = after
        else:
            raise RuntimeError(f"{folder}: Milvus Lite kept rewriting its files after 5 reopenings")
        (folder / "LOCK").unlink(missing_ok=True)

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: MilvusSpec, root: Path, n: int, dim: int, keys: np.ndarray | None = None) -> MilvusSearcher:
        """Connect and check the collection holds this database's keys: its dimension, row
        count, index and metric as the manifest says, and (with ``keys``, the store's
        embeddings) the stored vectors of a few rows equal to ours."""
        uri = _resolve_uri(spec, Path(root))
        if not is_server_uri(uri) and not Path(uri).is_dir():
            raise ValueError(f"missing Milvus Lite data: {uri}")
        pymilvus = _pymilvus()
        client = None
        try:
            client = connect(uri)
            return cls._open(client, spec, uri, n, dim, keys)
        except (pymilvus.MilvusException, ValueError) as exc:
            if client is not None:  # a refused collection is not left open (a Lite folder stays locked)
                cls(client, spec, n, dim, uri).close()
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"Milvus at {spec.uri}: {exc}") from exc

    @classmethod
    def _open(cls, client, spec: MilvusSpec, uri: str, n: int, dim: int, keys: np.ndarray | None) -> MilvusSearcher:
        if not client.has_collection(spec.collection):
            raise ValueError(f"no collection {spec.collection!r} at {spec.uri}")
        fields = {f["name"]: f for f in client.describe_collection(spec.collection)["fields"]}
        stored_dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
        if stored_dim != dim:
            raise ValueError(f"collection {spec.collection!r} holds vectors of dimension {stored_dim}, the store's keys are {dim}")
        client.load_collection(spec.collection)
        count = int(client.get_collection_stats(spec.collection)["row_count"])
        if count != n:
            raise ValueError(f"collection {spec.collection!r} holds {count} rows, the database has {n}")
        index = client.describe_index(spec.collection, "vector") or {}
        if index.get("index_type") != spec.index_type or index.get("metric_type") != spec.metric_type:
            raise ValueError(f"collection {spec.collection!r} is indexed {index.get('index_type')}/{index.get('metric_type')}, "
                             f"the manifest says {spec.index_type}/{spec.metric_type}")
        if is_server_uri(uri) and int(index.get("indexed_rows", n)) < n:
            logger.warning("milvus: %s has indexed %s of %d rows; until it finishes, searches scan the rest by brute force",
                           spec.collection, index.get("indexed_rows"), n)
        searcher = cls(client, spec, n, dim, uri)
        if keys is not None:
            searcher.spot_check(keys)
        return searcher

    def spot_check(self, keys: np.ndarray, rows: int = SPOT_CHECK_ROWS) -> None:
        """Compare the vectors Milvus holds for a few ids (first, last, evenly between) with
        ``keys`` (float [N, D]): a collection of another database is refused."""
        ids = sorted({int(i) for i in np.linspace(0, self.n - 1, min(rows, self.n)).round()})
        got = self._client.get(self.spec.collection, ids=ids, output_fields=["vector"])
        found = {int(r["id"]): np.asarray(r["vector"], np.float32) for r in got}
        for i in ids:
            if i not in found:
                raise ValueError(f"collection {self.spec.collection!r} has no row {i}")
            if not np.allclose(found[i], np.asarray(keys[i], np.float32), atol=1e-6):
                raise ValueError(f"collection {self.spec.collection!r} row {i} is not the database's key {i}: "
                                 "the collection belongs to another database (rebuild it)")

    def close(self) -> None:
        self._client.close()
        if not is_server_uri(self.uri):
            _release_lite(self.uri)

    # -- searching ------------------------------------------------------------------------

    def search(self, q: np.ndarray, k: int, texts: list[str] | None = None, *,
               search_params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """q float32 [B, D] -> (ids int64 [B, k], scores float32 [B, k]), nearest first, ties
        by the smaller id; ``search_params`` overrides the manifest's (benchmarks sweep them)."""
        from imageragturbo.retrieval.searchers import _check_query

        q = _check_query(q, self.dim, k, self.n)
        params = dict(self.spec.search_params if search_params is None else search_params)
        if self.spec.index_type == "HNSW":
            params["ef"] = max(int(params.get("ef", k)), k)
        hits = self._client.search(
            self.spec.collection, data=[row for row in q], limit=k, anns_field="vector",
            search_params={"metric_type": self.spec.metric_type, "params": params}, output_fields=["id"],
        )
        ids = np.empty((len(q), k), np.int64)
        scores = np.empty((len(q), k), np.float32)
        for row, found in enumerate(hits):
            if len(found) < k:
                raise RuntimeError(f"Milvus returned {len(found)} neighbours, asked for {k}: search wider "
                                   f"(search_params {params})")
            got_ids = np.fromiter((h["id"] for h in found), np.int64, len(found))[:k]
            got_scores = np.fromiter((h["distance"] for h in found), np.float32, len(found))[:k]
            order = np.lexsort((got_ids, -got_scores))
            ids[row], scores[row] = got_ids[order], got_scores[order]
        return ids, scores


# -- the manifest's two ends (retrieval/searchers.py build_searcher / load_searcher) ------------


def build_milvus_searcher(embeddings: np.ndarray, params: dict | None, root: Path, name: str) -> dict:
    """Build the collection for ``embeddings`` as ``params`` (MilvusSpec fields) ask, the Lite
    data inside the database folder ``root``; a server uri without a collection gets one named
    after ``name``. Returns the manifest's searcher entry."""
    params = dict(params or {})
    if is_server_uri(params.get("uri", "")) and "collection" not in params:
        params["collection"] = default_collection_name(name)
    spec = MilvusSpec.for_size(embeddings.shape[0], **params)
    MilvusSearcher.build(embeddings, spec, root)
    return {"kind": "milvus", "params": spec.to_dict()}


def load_milvus_searcher(params: dict, root: Path, n: int, dim: int, keys: np.ndarray) -> MilvusSearcher:
    """The searcher a manifest's ``params`` describe, checked against the store's ``keys``."""
    try:
        spec = MilvusSpec(**params)
    except TypeError as exc:
        raise ValueError(f"{root}: milvus params in the manifest are not understood: {params}") from exc
    return MilvusSearcher.load(spec, root, n, dim, keys=keys)
