"""The seams of retrieval: a Searcher finds neighbour ids, a FeatureStore hands over their rows,
and a RowEncoder (the model, passed in by the caller) computes the rows a database is built from.

Shapes, not code, are the contract (docs/design.md):

- ``Searcher.search(q float32 [B, D], k) -> (ids int64 [B, k], scores float32 [B, k])``, with q
  L2-normalised and scores dot products (higher is nearer). A lexical searcher ignores q and
  reads ``texts``; the others ignore ``texts``. A searcher may set ``exact_cosine_scores =
  True`` when its scores are exact cosines between q and the returned rows' text embeddings
  (exact search over unit keys); the pipeline then takes the gate lambda from the scores
  instead of gathering the embeddings. Absent means False.
- ``FeatureStore`` rows are precomputed once when the database is built: the text embedding
  ``e`` (L2-normalised, float [Dq]), the retrieved H-feature ``h_retr`` (the UNet encoder's
  mid-block output for the clean latent at t = 0 with its own caption, float [C, h, w]) and the
  caption. ``model_id`` names the model that computed them; a pipeline refuses a store from
  another model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Searcher(Protocol):
    def search(
        self, q: np.ndarray, k: int, texts: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class FeatureStore(Protocol):
    model_id: str

    def __len__(self) -> int: ...

    def text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """ids int64 [B, k] -> float [B, k, Dq]."""
        ...

    def h_features(self, ids: np.ndarray) -> np.ndarray:
        """ids int64 [B, k] -> float [B, k, C, h, w]."""
        ...

    def latents(self, ids: np.ndarray) -> np.ndarray:
        """ids int64 [B, k] -> the images' scaled VAE latents z0, float [B, k, c, h, w]."""
        ...

    def captions(self, ids: np.ndarray) -> list[list[str]]:
        """ids int64 [B, k] -> B lists of k captions."""
        ...

    def source_ids(self, ids: np.ndarray) -> list[list[str]]:
        """ids int64 [B, k] -> B lists of k source ids (the pair's name in its dataset)."""
        ...


@runtime_checkable
class RowEncoder(Protocol):
    """What building a database needs of a model (:class:`~imageragturbo.model.RagTurboPipeline`
    is one): its identity, its latent shape, and the two encoders of a row."""

    model_id: str
    model_dir: Path
    latent_shape: tuple[int, int, int]

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> scaled VAE latents z0 float32 [N, c, h, w]."""
        ...

    def encode_database_rows(self, z0: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """z0 [N, c, h, w] + N captions -> (text embedding e float32 [N, Dq], H-feature float32 [N, C, h', w'])."""
        ...
