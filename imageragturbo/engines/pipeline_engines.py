"""The engines one pipeline runs, and how to load them from an export folder.

``RagTurboPipeline(components, databases, engines=load_pipeline_engines(kind, engine_dir, components))``
(or ``pipe.use_engines(...)``) runs text encoding, ``denoise`` and ``vae_decode`` on the chosen
backend; retrieval, noise, the schedule and postprocessing stay in the pipeline. The service and
the CLI both go through :func:`load_pipeline_engines`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from imageragturbo.engines.export import check_source, read_manifest
from imageragturbo.engines.graphs import DENOISE_GRAPHS, build_graphs
from imageragturbo.engines.protocol import ENGINE_KINDS, Engine, EngineLoadError
from imageragturbo.engines.torch_engine import TorchEngine
from imageragturbo.model import batch_invariance
from imageragturbo.model.loading import ModelComponents
from imageragturbo.model.text import EncodedPrompts, PromptEncoder

logger = logging.getLogger(__name__)

REQUIRED_GRAPHS = ("text_encoder", "denoise_off", "vae_decode")


def _np(x: torch.Tensor, dtype) -> np.ndarray:
    return x.detach().to("cpu", dtype).numpy()


class EnginePromptEncoder:
    """Drop-in for :class:`PromptEncoder`: the same tokenizer, the text_encoder graph on an engine."""

    def __init__(self, tokenizer_side: PromptEncoder, engine: Engine, device: torch.device):
        self.tokenizer = tokenizer_side.tokenizer
        self.max_length = tokenizer_side.max_length
        self._tokenize = tokenizer_side.tokenize
        self.engine = engine
        self.device = device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self._tokenize(prompts)

    def __call__(self, prompts: list[str]) -> EncodedPrompts:
        out = run_per_item(self.engine, {"input_ids": self.tokenize(prompts).numpy()})
        return EncodedPrompts(
            ctx=torch.from_numpy(out["ctx"]).to(self.device), q=torch.from_numpy(out["q"]).to(self.device)
        )


def run_per_item(engine: Engine, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``engine.run(feeds)``; inside ``batch_invariant()`` a GPU graph (TensorRT, ONNX Runtime's
    CUDA or TensorRT provider, whose kernels are chosen per batch shape) runs once per item, so
    an item's output never depends on its batch (every feed's first axis is the batch). The
    torch engine runs the pipeline's own batch-invariant layers, and ONNX Runtime's CPU kernels
    compute each item alone already (tests/engines/test_pipeline_engines.py); neither loops."""
    batch = next(iter(feeds.values())).shape[0]
    per_item_already = isinstance(engine, TorchEngine) or getattr(engine, "provider", None) == "cpu"
    if not batch_invariance.active() or batch == 1 or per_item_already:
        return engine.run(feeds)
    outs = [engine.run({name: value[i : i + 1] for name, value in feeds.items()}) for i in range(batch)]
    return {name: np.concatenate([out[name] for out in outs]) for name in outs[0]}


class PipelineEngines:
    """``text_encoder``, one ``denoise_<mode>`` per servable mode, and ``vae_decode``.

    Torch tensors in, torch tensors out (on ``device``); numpy at the engine boundary.
    """

    def __init__(self, kind: str, engines: dict[str, Engine], device: str | torch.device = "cpu"):
        missing = [name for name in REQUIRED_GRAPHS if name not in engines]
        if missing:
            raise EngineLoadError(f"{kind} engines lack graph(s) {missing}; an export has {list(REQUIRED_GRAPHS)} at least")
        self.kind = kind
        self.engines = engines
        self.device = torch.device(device)
        self.modes = tuple(mode for mode, graph in DENOISE_GRAPHS.items() if graph in engines)

    def prompt_encoder(self, torch_encoder: PromptEncoder) -> EnginePromptEncoder:
        return EnginePromptEncoder(torch_encoder, self.engines["text_encoder"], self.device)

    def denoise(self, mode, z_t, t, ctx, h_retr, lam, inject_w) -> torch.Tensor:
        """Same arguments as :class:`RagDenoiser` (torch tensors) -> model output float [B, c, H, W]."""
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} has no {self.kind} graph; available: {list(self.modes)}")
        feeds = {"z_t": _np(z_t, torch.float32), "t": _np(t, torch.int64), "ctx": _np(ctx, torch.float32)}
        if mode == "adapter":
            feeds.update(h_retr=_np(h_retr, torch.float32), lam=_np(lam, torch.float32))
        elif mode == "inject":
            w = _np(inject_w, torch.float32).reshape(-1)
            # The check slerp_inject makes in torch; the graph cannot hold a data-dependent raise.
            if bool(((w <= 0) | (w > 1)).any()):
                raise ValueError(f"inject w must be in (0, 1], got {w.tolist()}")
            feeds.update(h_retr=_np(h_retr[:, :1], torch.float32), inject_w=np.broadcast_to(w, (z_t.shape[0],)))
        out = run_per_item(self.engines[DENOISE_GRAPHS[mode]], feeds)["model_output"]
        return torch.from_numpy(out).to(z_t.device)

    def vae_decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Scaled latents float [B, c, h, w] -> pixels float [B, 3, H, W]."""
        out = run_per_item(self.engines["vae_decode"], {"z0": _np(z0, torch.float32)})["pixels"]
        return torch.from_numpy(out).to(z0.device)


def load_pipeline_engines(
    kind: str,
    engine_dir: str | Path | None,
    components: ModelComponents,
    *,
    graphs: tuple[str, ...] | None = None,
    **options,
) -> PipelineEngines:
    """Load the ``kind`` engines for ``components`` from the export in ``engine_dir``.

    - ``torch``: the reference modules (no export needed; ``engine_dir`` is ignored).
    - ``torch-compile``: the same modules through ``torch.compile`` (no export needed; options
      go to :class:`TorchCompileEngine`: ``mode``, ``backend``, ``buckets``).
    - ``onnxruntime``: options go to :class:`OrtEngine` (``provider``, ``threads``, ``optimization``,
      ``io_binding``, ``static_sizes``, ``profile_prefix``).
    - ``tensorrt``: options go to :class:`TrtEngine` (``build``: a TrtBuildSpec, ``cuda_graph``);
      built engines are cached in ``<engine_dir>/tensorrt`` (or ``cache_dir``).

    A stale export (made from other weights) raises StaleExportError naming both identities.
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine must be one of {ENGINE_KINDS}, got {kind!r}")
    device = next(components.unet.parameters()).device
    if kind in ("torch", "torch-compile"):
        available = build_graphs(components)
        names = graphs or tuple(available)
        if kind == "torch":
            return PipelineEngines(kind, {name: TorchEngine(available[name]) for name in names}, device)
        from imageragturbo.engines.torch_compile_engine import TorchCompileEngine

        return PipelineEngines(kind, {name: TorchCompileEngine(available[name], **options) for name in names}, device)
    if engine_dir is None:
        raise EngineLoadError(
            f"the {kind} engine needs --engine-dir (IRT_ENGINE_DIR): a folder written by "
            f"`imageragturbo export --model {components.model_dir} --out DIR`"
        )
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    check_source(manifest, components, engine_dir)
    names = graphs or tuple(manifest.graphs)
    unknown = [name for name in names if name not in manifest.graphs]
    if unknown:
        raise EngineLoadError(f"export {engine_dir} has no graph(s) {unknown}; it has {list(manifest.graphs)}")
    engines: dict[str, Engine] = {}
    for name in names:
        entry = manifest.graphs[name]
        path = engine_dir / entry.file
        if kind == "onnxruntime":
            from imageragturbo.engines.onnxruntime_engine import OrtEngine

            engines[name] = OrtEngine(path, entry.spec, **options)
        else:
            from imageragturbo.engines.tensorrt_engine import TrtEngine

            trt_options = dict(options)
            cache_dir = trt_options.pop("cache_dir", engine_dir / "tensorrt")
            engines[name] = TrtEngine(path, entry.spec, entry.sha256, cache_dir, **trt_options)
    logger.info("loaded %s engines %s from %s", kind, list(engines), engine_dir)
    return PipelineEngines(kind, engines, device)


def default_ort_provider(device: torch.device) -> str:
    """ONNX Runtime's provider for a pipeline on ``device``: on CUDA its TensorRT provider
    when onnxruntime-gpu has it and TensorRT is installed, else its CUDA provider; else CPU."""
    if device.type != "cuda":
        return "cpu"
    import importlib.util

    import onnxruntime

    has_trt = "TensorrtExecutionProvider" in onnxruntime.get_available_providers()
    return "tensorrt" if has_trt and importlib.util.find_spec("tensorrt") is not None else "cuda"


def use_engine(pipe, kind: str, engine_dir: str | Path | None, **options) -> None:
    """Run ``pipe``'s text encoding, denoise and VAE decode on the ``kind`` engines ('torch': the
    pipeline's own modules, nothing to load). An engine that cannot load, or an export that
    lacks a mode the pipeline serves, raises EngineLoadError: never a silent fall-back to torch."""
    if kind == "torch":
        return
    if kind == "onnxruntime" and "provider" not in options:
        options["provider"] = default_ort_provider(pipe.device)
    try:
        engines = load_pipeline_engines(kind, engine_dir, pipe.components, **options)
    except EngineLoadError as exc:
        raise EngineLoadError(f"cannot load the {kind} engine: {exc}") from exc
    try:
        pipe.use_engines(engines)
    except ValueError as exc:  # use_engines only checks the export's denoise graphs against the modes
        raise EngineLoadError(f"cannot load the {kind} engine: {exc}") from exc
