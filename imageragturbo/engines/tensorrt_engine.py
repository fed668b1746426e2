"""Native TensorRT engine: built from the exported ONNX with the tensorrt Python API, cached.

Follows TensorRT's diffusion demo: an engine is built once per (ONNX file, TensorRT version,
GPU, precision, shapes) and cached under a key naming all of them (:func:`engine_cache_key`,
testable without a GPU); IO buffers are allocated once per optimisation profile at its
largest shapes; each call copies inputs into them, runs, and copies outputs out. Optionally a
CUDA graph is captured per input shape and replayed (saves kernel-launch overhead, which is a
large part of a one-step UNet's time at batch 1).

``tensorrt`` and a CUDA build of torch (used for device buffers and streams) are needed only
here and are imported lazily: on a machine without them :class:`TrtEngine` raises
:class:`EngineLoadError` saying what is missing; nothing falls back to another backend.
Tested on GPU hosts only (tests marked ``gpu``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imageragturbo.engines.graphs import GraphSpec
from imageragturbo.engines.protocol import EngineLoadError, check_input_names

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]
"""One optimisation profile: input name -> (min, opt, max) shape."""


@dataclass(frozen=True)
class TrtBuildSpec:
    """How to build: part of the engine cache key."""

    precision: str = "fp16"
    batch_ranges: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 4, 8))
    """One optimisation profile per (min, opt, max) batch range; batch 1 gets its own, tuned
    for the latency case, larger batches share one."""
    k_range: tuple[int, int, int] = (1, 4, 8)
    """(min, opt, max) neighbours for ``denoise_adapter``'s h_retr."""
    optimization_level: int = 3
    """TensorRT builder optimisation level (0-5: more tactics, longer builds)."""
    workspace_bytes: int = 4 << 30

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for rng in self.batch_ranges + (self.k_range,):
            if len(rng) != 3 or not 1 <= rng[0] <= rng[1] <= rng[2]:
                raise ValueError(f"a shape range must be (min, opt, max) with 1 <= min <= opt <= max, got {rng}")


def optimization_profiles(spec: GraphSpec, build: TrtBuildSpec) -> list[Profile]:
    """The graph's inputs' (min, opt, max) shapes, one profile per batch range."""
    profiles = []
    for batch in build.batch_ranges:
        profile = {}
        for tensor in spec.inputs:
            shapes = tuple(
                tensor.concrete_shape({"batch": batch[i], "k": build.k_range[i]}) for i in range(3)
            )
            profile[tensor.name] = shapes
        profiles.append(profile)
    return profiles


def engine_cache_key(
    *,
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    precision: str,
    profiles: list[Profile],
    optimization_level: int,
) -> str:
    """A name for a built engine that changes whenever the engine would: the ONNX file, the
    TensorRT version, the GPU (name and compute capability), the precision, the profile shapes
    and the builder optimisation level."""
    payload = json.dumps(
        {
            "onnx": onnx_sha256,
            "tensorrt": trt_version,
            "gpu": gpu_name,
            "sm": list(compute_capability),
            "precision": precision,
            "profiles": [{name: [list(s) for s in shapes] for name, shapes in sorted(p.items())} for p in profiles],
            "opt_level": optimization_level,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


TENSORRT_PIN = "tensorrt-cu12==10.13.0.35"
"""The one TensorRT this project builds with (docker/Dockerfile, README and the runbook say the
same; a test checks): TensorRT 11 removed the FP16 builder flag the fp16 build relies on."""


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineLoadError(
            f"the tensorrt engine needs the tensorrt package (pip install {TENSORRT_PIN} on a CUDA 12 host): "
            f"{exc}"
        ) from exc
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        raise EngineLoadError(f"the tensorrt engine needs torch for device buffers: {exc}") from exc
    if not torch.cuda.is_available():
        raise EngineLoadError(
            f"the tensorrt engine needs a CUDA GPU and a CUDA build of torch; torch {torch.__version__} sees none"
        )
    return trt, torch


class TrtEngine:
    """``run(inputs) -> outputs`` on a TensorRT engine built from one exported graph.

    ``onnx_sha256`` is the manifest's hash of the ONNX file (not recomputed: hashing GBs at
    every start is slow, and the manifest was checked against the model already).
    """

    kind = "tensorrt"

    def __init__(
        self,
        onnx_path: str | Path,
        spec: GraphSpec,
        onnx_sha256: str,
        cache_dir: str | Path,
        *,
        build: TrtBuildSpec = TrtBuildSpec(),
        cuda_graph: bool = False,
    ):
        trt, torch = _import_tensorrt()
        self._trt, self._torch = trt, torch
        self.name = spec.name
        self.spec = spec
        self.input_names = spec.input_names
        self.output_names = spec.output_names
        self.build = build
        self.cuda_graph = cuda_graph
        self.profiles = optimization_profiles(spec, build)
        device = torch.cuda.current_device()
        self.key = engine_cache_key(
            onnx_sha256=onnx_sha256,
            trt_version=trt.__version__,
            gpu_name=torch.cuda.get_device_name(device),
            compute_capability=torch.cuda.get_device_capability(device),
            precision=build.precision,
            profiles=self.profiles,
            optimization_level=build.optimization_level,
        )
        cache_dir = Path(cache_dir)
        plan = cache_dir / f"{spec.name}-{self.key}.plan"
        self._logger = trt.Logger(trt.Logger.WARNING)
        if not plan.is_file():
            self._build_plan(Path(onnx_path), plan)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineLoadError(f"TensorRT {trt.__version__} cannot deserialize {plan}; delete it to rebuild")
        self.stream = torch.cuda.Stream()
        self._contexts = []
        self._buffers: list[dict[str, object]] = []
        for index in range(len(self.profiles)):
            self._contexts.append(self._make_context(index))
        self._graphs: dict[tuple, object] = {}
        logger.info("tensorrt %s: %s (%s, %d profiles)", self.name, plan.name, build.precision, len(self.profiles))

    # -- build ----------------------------------------------------------------------------

    def _build_plan(self, onnx_path: Path, plan: Path) -> None:
        trt = self._trt
        start = time.perf_counter()
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineLoadError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.build.workspace_bytes)
        config.builder_optimization_level = self.build.optimization_level
        if self.build.precision == "fp16":
            if not hasattr(trt.BuilderFlag, "FP16"):
                raise EngineLoadError(
                    f"TensorRT {trt.__version__} has no FP16 builder flag (weak typing removed); "
                    f"use {TENSORRT_PIN} or precision fp32"
                )
            config.set_flag(trt.BuilderFlag.FP16)
        for shapes in self.profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineLoadError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
        plan.parent.mkdir(parents=True, exist_ok=True)
        tmp = plan.with_name(f".{plan.name}.tmp-{os.getpid()}")
        tmp.write_bytes(bytes(serialized))
        tmp.rename(plan)  # atomic: a concurrent reader sees a whole plan or none
        logger.info("built TensorRT engine %s in %.0f s", plan.name, time.perf_counter() - start)

    # -- buffers, allocated once per profile ----------------------------------------------

    def _make_context(self, index: int):
        trt, torch = self._trt, self._torch
        context = self.engine.create_execution_context()
        if context is None:
            raise EngineLoadError(f"TensorRT could not create an execution context for {self.name} (GPU memory?)")
        context.set_optimization_profile_async(index, self.stream.cuda_stream)
        buffers = {}
        for name in self.input_names:
            max_shape = self.profiles[index][name][2]
            context.set_input_shape(name, max_shape)
        for name in self.input_names + self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(int(np.prod(shape)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        self._buffers.append(buffers)
        return context

    def _profile_for(self, batch: int) -> int:
        for index, (lo, _, hi) in enumerate(self.build.batch_ranges):
            if lo <= batch <= hi:
                return index
        raise ValueError(f"batch {batch} is outside every TensorRT profile {self.build.batch_ranges}; rebuild with a wider range")

    # -- run -------------------------------------------------------------------------------

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        check_input_names(self.name, self.input_names, inputs)
        batch = int(np.shape(inputs[self.input_names[0]])[0])
        index = self._profile_for(batch)
        context, buffers = self._contexts[index], self._buffers[index]
        shapes = {}
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                host = torch.from_numpy(np.ascontiguousarray(inputs[name]))
                buffer = buffers[name]
                if host.numel() > buffer.numel() or host.dtype != buffer.dtype:
                    raise ValueError(
                        f"{self.name}.{name}: {tuple(host.shape)} {host.dtype} does not fit the profile's "
                        f"max {self.profiles[index][name][2]} {buffer.dtype}"
                    )
                buffer[: host.numel()].copy_(host.reshape(-1), non_blocking=False)
                shapes[name] = tuple(host.shape)
                context.set_input_shape(name, shapes[name])
            key = (index, tuple(shapes.items()))
            if self.cuda_graph:
                graph = self._graphs.get(key)
                if graph is None:
                    self._execute(context)  # TensorRT must run once at a shape before capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self._execute(context)
                    self._graphs[key] = graph
                graph.replay()
            else:
                self._execute(context)
            outputs = {}
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                outputs[name] = buffers[name][: int(np.prod(shape))].view(shape).cpu().numpy()
        return outputs

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.name} failed")
