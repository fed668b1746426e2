"""Compiled engines for the request path: ONNX export, ONNX Runtime, TensorRT, and the torch reference.

The names below are imported on first use (so ``imageragturbo.engines.protocol``, and with it
``ENGINE_KINDS``, loads without torch or onnxruntime). The TensorRT engine is imported only from
``imageragturbo.engines.tensorrt_engine``: it needs tensorrt and a CUDA GPU, which most machines
running this package do not have.
"""

from __future__ import annotations

from imageragturbo.lazy import lazy_attributes

_WHERE = {
    "ExportManifest": "export",
    "check_source": "export",
    "export_model": "export",
    "read_manifest": "export",
    "source_identity": "export",
    "DENOISE_GRAPHS": "graphs",
    "GRAPH_NAMES": "graphs",
    "GraphSpec": "graphs",
    "TensorSpec": "graphs",
    "TorchGraph": "graphs",
    "build_graphs": "graphs",
    "OrtEngine": "onnxruntime_engine",
    "PipelineEngines": "pipeline_engines",
    "load_pipeline_engines": "pipeline_engines",
    "use_engine": "pipeline_engines",
    "ENGINE_KINDS": "protocol",
    "Engine": "protocol",
    "EngineLoadError": "protocol",
    "StaleExportError": "protocol",
    "TorchEngine": "torch_engine",
}

__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
