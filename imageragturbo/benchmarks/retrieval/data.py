"""The benchmark's data: synthetic clustered unit vectors, and the exact top-k as ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def cluster_centres(clusters: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, 0])).standard_normal((clusters, dim)).astype(np.float32)



def clustered_embeddings(n: int, centres: np.ndarray, spread: float, seed: int, out: Path | None = None, block: int = 50_000):
    """float32 [n, dim] unit vectors: each a random centre + ``spread`` * N(0, I), normalised
    (its cosine to its centre is about 1/sqrt(1 + spread^2)). Written in blocks to the ``.npy``
    file ``out`` (so n x dim never sits in memory twice) and returned memory-mapped; without
    ``out``, returned in memory."""
    dim = centres.shape[1]
    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, dim)) if out else np.empty((n, dim), np.float32)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, lo]))
        x = centres[rng.integers(0, centres.shape[0], hi - lo)]
        x += spread * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        array[lo:hi] = x
    if out:
        array.flush()
    return array



def exact_topk(data: np.ndarray, queries: np.ndarray, k: int, block: int = 50_000) -> np.ndarray:
    """Exact top-k ids int64 [Q, k] by inner product, streaming over ``data`` in blocks."""
    best_ids = np.zeros((queries.shape[0], 0), np.int64)
    best_scores = np.zeros((queries.shape[0], 0), np.float32)
    for lo in range(0, data.shape[0], block):
        scores = queries @ np.asarray(data[lo : lo + block]).T
        ids = np.broadcast_to(np.arange(lo, lo + scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, part, axis=1)
        best_ids = np.take_along_axis(ids, part, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)



def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))

