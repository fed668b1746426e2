"""Searchers: exact inner-product search over L2-normalised text embeddings."""

from __future__ import annotations

import numpy as np


def _check_query(q: np.ndarray, dim: int, k: int, n: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query must be float32 [B, {dim}], got shape {q.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a database of {n} entries, got {k}")
    return q


class ExactSearcher:
    """Brute-force dot product (one BLAS matmul) plus a partial sort: exact, and fast enough
    below ~20k entries; the ScaNN searcher takes over above that."""

    kind = "exact"

    def __init__(self, embeddings: np.ndarray):
        """embeddings: float [N, D], L2-normalised."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {embeddings.shape}")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def search(self, q: np.ndarray, k: int, texts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = _check_query(q, self.embeddings.shape[1], k, len(self))
        scores = q @ self.embeddings.T
        if k < scores.shape[1]:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
        part_scores = np.take_along_axis(scores, part, axis=1)
        # Ties broken by id so results are deterministic across BLAS builds and batch sizes.
        order = np.lexsort((part, -part_scores), axis=1)
        ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
        return ids, np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
