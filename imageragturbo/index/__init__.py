"""Retrieval: searchers over text embeddings and stores of precomputed H-features."""

from imageragturbo.index.disk import IndexLoadError, MemmapFeatureStore, load_database, parse_index_spec
from imageragturbo.index.protocols import FeatureStore, Searcher
from imageragturbo.index.searchers import Bm25Searcher, ExactSearcher, ScannSearcher, ScannSpec
from imageragturbo.index.store import InMemoryFeatureStore, RetrievalDatabase

__all__ = [
    "Bm25Searcher",
    "ExactSearcher",
    "FeatureStore",
    "InMemoryFeatureStore",
    "IndexLoadError",
    "MemmapFeatureStore",
    "RetrievalDatabase",
    "ScannSearcher",
    "ScannSpec",
    "Searcher",
    "load_database",
    "parse_index_spec",
]
