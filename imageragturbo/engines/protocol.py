"""The Engine protocol: one compiled graph that maps named numpy arrays to named numpy arrays.

Every backend (torch reference, ONNX Runtime, TensorRT) runs the same graphs with the same
input and output names (see :mod:`imageragturbo.engines.graphs`), so the pipeline does not care
which one runs. An engine that cannot load raises :class:`EngineLoadError` with the reason;
nothing falls back to a slower backend.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from imageragturbo.errors import ImageRagTurboError

ENGINE_KINDS: tuple[str, ...] = ("torch", "torch-compile", "onnxruntime", "tensorrt")


class EngineLoadError(ImageRagTurboError, RuntimeError):
    """An engine cannot be built or loaded (missing package, provider, GPU, file). The message says why."""


class StaleExportError(EngineLoadError):
    """An export was made from other weights than the model being served. The message names both."""


@runtime_checkable
class Engine(Protocol):
    """One graph. ``input_names`` and ``output_names`` are the graph's spec names, in order."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named inputs (exactly ``input_names``) -> named outputs (``output_names``)."""
        ...


def check_input_names(name: str, expected: tuple[str, ...], inputs: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless ``inputs`` has exactly the graph's input names."""
    if set(inputs) != set(expected):
        raise ValueError(f"graph {name!r} takes inputs {list(expected)}, got {sorted(inputs)}")
