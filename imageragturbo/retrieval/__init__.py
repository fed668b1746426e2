"""Retrieval: searchers over text embeddings, stores of precomputed rows, and the databases
that pair them (one ``retrieve`` step: search -> gather H -> gate)."""

from imageragturbo.retrieval.database import Databases, Retrieval, RetrievalDatabase, gate
from imageragturbo.retrieval.disk import DatabaseLoadError, MemmapFeatureStore, load_database, parse_database_spec
from imageragturbo.retrieval.protocols import FeatureStore, Searcher
from imageragturbo.retrieval.searchers import Bm25Searcher, ExactSearcher, ScannSearcher, ScannSpec
from imageragturbo.retrieval.store import InMemoryFeatureStore

__all__ = [
    "Bm25Searcher",
    "DatabaseLoadError",
    "Databases",
    "ExactSearcher",
    "FeatureStore",
    "InMemoryFeatureStore",
    "MemmapFeatureStore",
    "Retrieval",
    "RetrievalDatabase",
    "ScannSearcher",
    "ScannSpec",
    "Searcher",
    "gate",
    "load_database",
    "parse_database_spec",
]
