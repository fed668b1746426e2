"""Compiled engines for the request path: ONNX export, ONNX Runtime, TensorRT, and the torch reference.

The TensorRT engine is imported lazily (``imageragturbo.engines.tensorrt_engine``): it needs
tensorrt and a CUDA GPU, which most machines running this package do not have.
"""

from imageragturbo.engines.export import ExportManifest, check_source, export_model, read_manifest, source_identity
from imageragturbo.engines.graphs import DENOISE_GRAPHS, GRAPH_NAMES, GraphSpec, TensorSpec, TorchGraph, build_graphs
from imageragturbo.engines.onnxruntime_engine import OrtEngine
from imageragturbo.engines.pipeline_engines import PipelineEngines, load_pipeline_engines
from imageragturbo.engines.protocol import ENGINE_KINDS, Engine, EngineLoadError, StaleExportError
from imageragturbo.engines.torch_engine import TorchEngine

__all__ = [
    "DENOISE_GRAPHS",
    "ENGINE_KINDS",
    "GRAPH_NAMES",
    "Engine",
    "EngineLoadError",
    "ExportManifest",
    "GraphSpec",
    "OrtEngine",
    "PipelineEngines",
    "StaleExportError",
    "TensorSpec",
    "TorchEngine",
    "TorchGraph",
    "build_graphs",
    "check_source",
    "export_model",
    "load_pipeline_engines",
    "read_manifest",
    "source_identity",
]
