"""ONNX Runtime engine: one exported graph in one InferenceSession.

CPU execution provider by default; ``cuda`` and ``tensorrt`` select ONNX Runtime's CUDA and
TensorRT providers, which exist only in the ``onnxruntime-gpu`` wheel. ONNX Runtime quietly
drops a provider whose libraries fail to load and runs on the CPU instead; this engine checks
the providers the session really got and raises instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from imageragturbo.engines.graphs import GraphSpec
from imageragturbo.engines.protocol import EngineLoadError, check_input_names

logger = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def _provider_entry(provider: str, cache_dir: Path | None) -> str | tuple[str, dict]:
    name = PROVIDERS[provider]
    if provider == "tensorrt":
        options = {"trt_fp16_enable": True}
        if cache_dir is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        return name, options
    return name


class OrtEngine:
    """``run(inputs) -> outputs`` over one ``.onnx`` file.

    - ``provider``: ``cpu`` (default), ``cuda`` or ``tensorrt`` (the CPU provider is always
      registered after it, for the few nodes a GPU provider does not take).
    - ``threads``: intra-op threads (None: ONNX Runtime's default, one per physical core).
      Inter-op parallelism is off: a one-step UNet is a chain, not a set of branches.
    - ``optimization``: ONNX Runtime graph optimisation level (``all`` adds layout
      transformations and fusions on top of constant folding and redundant-node removal).
    - ``io_binding``: bind inputs and outputs instead of ``session.run`` (saves the per-call
      feed/fetch conversions; on a GPU provider outputs stay on the device until copied once).
    - ``static_sizes``: pin dynamic axes, e.g. ``{"batch": 1, "k": 4}``: ONNX Runtime then
      folds the graph's shape arithmetic into constants (a real share of a small UNet's time at
      batch 1: results/design-notes.md), and the engine accepts only those sizes.
    - ``profile_prefix``: write ONNX Runtime's per-node profile (Chrome trace JSON) to
      ``<prefix>_<date>.json``; call :meth:`end_profiling` for the file name.
    """

    kind = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        spec: GraphSpec,
        *,
        provider: str = "cpu",
        threads: int | None = None,
        optimization: str = "all",
        io_binding: bool = True,
        static_sizes: dict[str, int] | None = None,
        profile_prefix: str | None = None,
        cache_dir: str | Path | None = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # the package is a dependency; a broken install says so
            raise EngineLoadError(f"onnxruntime cannot be imported: {exc}") from exc
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            hint = " (install onnxruntime-gpu in place of onnxruntime)" if provider != "cpu" else ""
            raise EngineLoadError(
                f"ONNX Runtime provider {PROVIDERS[provider]} is not available{hint}; this install has {available}"
            )
        self.path = Path(path)
        self.spec = spec
        self.name = spec.name
        self.input_names = spec.input_names
        self.output_names = spec.output_names
        self.provider = provider
        self.io_binding = io_binding

        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        self.static_sizes = {
            axis: int(size) for axis, size in (static_sizes or {}).items() if axis in spec.axis_names
        }
        for axis, size in self.static_sizes.items():
            if size < 1:
                raise ValueError(f"static size of axis {axis!r} must be >= 1, got {size}")
            options.add_free_dimension_override_by_name(axis, size)
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        providers = [_provider_entry(provider, Path(cache_dir) if cache_dir else None)]
        if provider != "cpu":
            providers.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise EngineLoadError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        got = self.session.get_providers()
        if PROVIDERS[provider] not in got:
            raise EngineLoadError(
                f"ONNX Runtime did not enable {PROVIDERS[provider]} for {self.path} (it got {got}); "
                "check the CUDA/cuDNN/TensorRT libraries it needs"
            )
        session_inputs = tuple(i.name for i in self.session.get_inputs())
        session_outputs = tuple(o.name for o in self.session.get_outputs())
        if set(session_inputs) != set(self.input_names) or set(session_outputs) != set(self.output_names):
            raise EngineLoadError(
                f"{self.path} has inputs {list(session_inputs)} and outputs {list(session_outputs)}; "
                f"the manifest says {list(self.input_names)} -> {list(self.output_names)}"
            )
        self._dtypes = {s.name: np.dtype(s.dtype) for s in spec.inputs}
        self._device = "cpu" if provider == "cpu" else "cuda"
        logger.info("onnxruntime %s: %s on %s (%s threads)", self.name, self.path.name, got[0], threads or "default")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_input_names(self.name, self.input_names, inputs)
        feeds = {name: np.ascontiguousarray(inputs[name], dtype=self._dtypes[name]) for name in self.input_names}
        if self.static_sizes:
            self._check_static(feeds)
        if not self.io_binding:
            outputs = self.session.run(list(self.output_names), feeds)
            return dict(zip(self.output_names, outputs))
        # A binding per call (a few microseconds) keeps run() safe to call from several threads.
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding)
        outputs = binding.copy_outputs_to_cpu()
        return dict(zip(self.output_names, outputs))

    def _check_static(self, feeds: dict[str, np.ndarray]) -> None:
        for tensor in self.spec.inputs:
            for axis, dim in enumerate(tensor.shape):
                if dim in self.static_sizes and feeds[tensor.name].shape[axis] != self.static_sizes[dim]:
                    raise ValueError(
                        f"{self.name} was loaded for {dim} = {self.static_sizes[dim]} (static_sizes), "
                        f"got {tensor.name} of shape {feeds[tensor.name].shape}"
                    )

    def end_profiling(self) -> str:
        """Stop profiling; returns the profile JSON's path (empty when profiling was off)."""
        return self.session.end_profiling()
