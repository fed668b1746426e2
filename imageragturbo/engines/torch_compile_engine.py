"""The ``torch-compile`` engine: a graph's torch module through ``torch.compile``, static shapes
per batch bucket (the approach of stable-fast and OneDiff), nothing beyond PyTorch.

- Shapes: a batch is padded up to the next bucket of :data:`BATCH_BUCKETS` (rows repeated, then
  dropped from the output), so the compiler specialises on a handful of static shapes instead
  of one per batch size; batches over the largest bucket run in chunks of it.
- On CUDA: ``mode="reduce-overhead"`` (CUDA graphs: one replay per call), channels-last
  latents, and the precision of the pipeline's modules (``--dtype float16``).
- On the CPU: inductor's C++ kernels (``mode="default"``; needs a C++ compiler).

Compiled kernels are cached by PyTorch under ``TORCHINDUCTOR_CACHE_DIR`` (keyed by the graph,
the shapes and the versions), so a restarted server compiles only what it has not seen; the
first call at each bucket and neighbour count compiles (seconds to minutes at SD scale), which
the server's warm-up takes before it turns ready for the shapes it warms.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from imageragturbo.engines.graphs import TorchGraph
from imageragturbo.engines.protocol import EngineLoadError, check_input_names

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
RECOMPILE_LIMIT = 64
"""Shapes one graph may be compiled for (buckets x neighbour counts), above dynamo's default 8."""


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across PyTorch releases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


class TorchCompileEngine:
    """Runs a :class:`TorchGraph` compiled by ``torch.compile``; numpy in, numpy out."""

    kind = "torch-compile"

    def __init__(self, graph: TorchGraph, *, mode: str | None = None, backend: str = "inductor",
                 buckets: tuple[int, ...] = BATCH_BUCKETS):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise EngineLoadError(f"batch buckets must be increasing positive sizes, got {buckets}")
        self.graph = graph
        self.name = graph.spec.name
        self.input_names = graph.spec.input_names
        self.output_names = graph.spec.output_names
        parameter = next(graph.module.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.buckets = tuple(buckets)
        self.mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        self._batched = {spec.name for spec in graph.spec.inputs if spec.shape and spec.shape[0] == "batch"}
        _raise_recompile_limit()
        try:
            self.compiled = torch.compile(graph.module, mode=self.mode, backend=backend, dynamic=False)
        except Exception as exc:  # a backend that is missing or refuses this module
            raise EngineLoadError(f"torch.compile({self.name}, backend={backend!r}) failed: {exc}") from exc

    def bucket(self, batch: int) -> int:
        """The padded size a batch of ``batch`` runs at (at most the largest bucket)."""
        return self.buckets[min(bisect.bisect_left(self.buckets, batch), len(self.buckets) - 1)]

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_input_names(self.name, self.input_names, inputs)
        batch = int(inputs[next(iter(self._batched))].shape[0]) if self._batched else 1
        step = self.buckets[-1]
        chunks = [self._run_padded(inputs, start, min(start + step, batch)) for start in range(0, batch, step)]
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in self.output_names}

    def _run_padded(self, inputs: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        size, padded = stop - start, self.bucket(stop - start)
        args = []
        for name in self.input_names:
            value = inputs[name]
            if name in self._batched:
                value = value[start:stop]
                if padded > size:
                    value = np.concatenate([value, np.repeat(value[-1:], padded - size, axis=0)])
            tensor = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
            if tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
                if tensor.dim() == 4 and self.device.type == "cuda":
                    tensor = tensor.contiguous(memory_format=torch.channels_last)
            args.append(tensor)
        outputs = self.compiled(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        # CUDA graphs reuse their output buffers: copy out before the next replay.
        return {name: out[:size].float().cpu().numpy().copy() for name, out in zip(self.output_names, outputs)}
