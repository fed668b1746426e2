"""Feature stores: the precomputed rows a retrieval hands to the denoiser."""

from __future__ import annotations

import numpy as np


class InMemoryFeatureStore:
    """A FeatureStore over arrays already in memory (tests, small databases built on the fly)."""

    def __init__(
        self,
        text_emb: np.ndarray,
        h_retr: np.ndarray,
        captions: list[str],
        model_id: str,
        source_ids: list[str] | None = None,
        z0: np.ndarray | None = None,
    ):
        """text_emb float [N, Dq] (L2-normalised); h_retr float [N, C, h, w]; N captions;
        optionally the images' latents z0 float [N, c, h, w] (training reads them)."""
        n = len(captions)
        if text_emb.shape[0] != n or h_retr.shape[0] != n:
            raise ValueError(
                f"store arrays disagree on N: text_emb {text_emb.shape}, h_retr {h_retr.shape}, {n} captions"
            )
        self.text_emb = text_emb
        self.h_retr = h_retr
        self._captions = list(captions)
        self._source_ids = list(source_ids) if source_ids is not None else [str(i) for i in range(n)]
        self.model_id = model_id
        self.z0 = z0

    def __len__(self) -> int:
        return len(self._captions)

    def text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        return self.text_emb[ids]

    def h_features(self, ids: np.ndarray) -> np.ndarray:
        return self.h_retr[ids]

    def latents(self, ids: np.ndarray) -> np.ndarray:
        if self.z0 is None:
            raise ValueError("this in-memory store was built without latents (z0)")
        return self.z0[ids]

    def captions(self, ids: np.ndarray) -> list[list[str]]:
        return [[self._captions[i] for i in row] for row in np.asarray(ids)]

    def source_ids(self, ids: np.ndarray) -> list[list[str]]:
        return [[self._source_ids[i] for i in row] for row in np.asarray(ids)]
