"""Retrieval: searchers over text embeddings and stores of precomputed H-features."""

from imageragturbo.index.protocols import FeatureStore, Searcher
from imageragturbo.index.searchers import ExactSearcher
from imageragturbo.index.store import InMemoryFeatureStore, RetrievalDatabase

__all__ = ["ExactSearcher", "FeatureStore", "InMemoryFeatureStore", "RetrievalDatabase", "Searcher"]
