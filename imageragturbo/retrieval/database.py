"""A retrieval database and its one retrieval step: search -> gather H -> gate.

The pipeline, the trainer, its evaluation and the probes all retrieve through
:meth:`RetrievalDatabase.retrieve`, so what "the neighbours of a query" means is written once:
the searcher's top k (without the query's own row when the caller names it), the neighbours'
stored H-features, and the gate lambda (paper eq. 5: the mean cosine between the query and the
neighbours' text embeddings). :class:`Databases` is the named set a pipeline serves; it owns
which one is the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from imageragturbo.errors import RequestError
from imageragturbo.retrieval.protocols import FeatureStore, Searcher


def gate(q: np.ndarray, e_retr: np.ndarray) -> np.ndarray:
    """lambda, float32 [B]: the mean over k of cos(q, e_retr[:, j]).

    q float [B, Dq] and e_retr float [B, k, Dq], L2-normalised by contract and re-normalised
    here, so a store in fp16 cannot push a cosine outside [-1, 1].
    """
    q = np.asarray(q, dtype=np.float32)
    e = np.asarray(e_retr, dtype=np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), np.float32(1e-12))
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), np.float32(1e-12))
    return np.einsum("bd,bkd->bk", q, e).mean(axis=1, dtype=np.float32)


@dataclass(frozen=True)
class Retrieval:
    """What one retrieval returns for a batch of B queries."""

    ids: np.ndarray
    """int64 [B, k]: store rows, nearest first."""
    scores: np.ndarray
    """float32 [B, k]: the searcher's scores (higher is nearer)."""
    h: np.ndarray
    """float32 [B, k, C, h, w]: the neighbours' stored H-features."""
    gate: np.ndarray
    """float32 [B]: lambda, the mean cosine between each query and its neighbours' keys."""
    store: FeatureStore = field(repr=False)

    def captions(self) -> list[list[str]]:
        return self.store.captions(self.ids)

    def source_ids(self) -> list[list[str]]:
        return self.store.source_ids(self.ids)

    def top_latents(self) -> np.ndarray:
        """float32 [B, c, h, w]: each query's nearest neighbour's stored latent z0."""
        return np.asarray(self.store.latents(self.ids[:, :1]), dtype=np.float32)[:, 0]


@dataclass
class RetrievalDatabase:
    """A named database: what to search and where its rows live."""

    name: str
    searcher: Searcher
    store: FeatureStore

    def retrieve(
        self,
        q: np.ndarray,
        k: int,
        texts: list[str] | None = None,
        *,
        exclude: np.ndarray | None = None,
        h_rows: np.ndarray | None = None,
    ) -> Retrieval:
        """The k neighbours of each query q (float32 [B, Dq], L2-normalised; ``texts`` for a
        lexical searcher).

        ``exclude`` (int64 [B], -1 for none) is a row each query must not retrieve: a training
        pair's own row. ``h_rows`` (float [N, C, h, w]) replaces the store's H-features, row for
        row (the same database rendered in another style).
        """
        q = np.asarray(q, dtype=np.float32)
        if exclude is None:
            ids, scores = self.searcher.search(q, k, texts=texts)
        else:
            ids, scores = self.searcher.search(q, k + 1, texts=texts)
            keep = np.stack([np.flatnonzero(row != own)[:k] for row, own in zip(ids, np.asarray(exclude))])
            ids, scores = np.take_along_axis(ids, keep, 1), np.take_along_axis(scores, keep, 1)
        if getattr(self.searcher, "exact_cosine_scores", False):
            # Exact search over unit keys: the scores already are the cosines the gate averages.
            lam = scores.mean(axis=1, dtype=np.float32)
        else:
            lam = gate(q, self.store.text_embeddings(ids))
        h = h_rows[ids] if h_rows is not None else self.store.h_features(ids)
        # float16 -> float32 in numpy: one pass over k rows, cheaper than a torch cast.
        return Retrieval(ids, np.asarray(scores, dtype=np.float32), np.asarray(h, dtype=np.float32), lam, self.store)


class Databases(dict[str, RetrievalDatabase]):
    """The databases a pipeline serves, by name, in the order added; the first is the default."""

    def add(self, database: RetrievalDatabase) -> None:
        if database.name in self:
            raise ValueError(f"database name {database.name!r} is given twice")
        self[database.name] = database

    @property
    def default(self) -> str | None:
        """The name of the database a request without one retrieves from (None: no database)."""
        return next(iter(self), None)

    def resolve(self, name: str | None = None) -> RetrievalDatabase:
        """The database called ``name``, or the default for None."""
        if not self:
            raise RequestError("no database is loaded (give one with --database NAME=DIR)")
        if name is None:
            name = self.default
        if name not in self:
            raise RequestError(f"unknown database {name!r}; configured: {sorted(self)}")
        return self[name]
