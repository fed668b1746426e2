"""The compiled graphs: their torch reference modules and their export specs.

Five graphs cover the request path (docs/design.md); each has named inputs and outputs that every
engine shares:

=================  ===========================================  ==================
graph              inputs                                       outputs
=================  ===========================================  ==================
text_encoder       input_ids int64 [B, L]                       ctx [B, L, D], q [B, Dq]
denoise_off        z_t [B, c, H, W], t int64 [B], ctx           model_output [B, c, H, W]
denoise_adapter    z_t, t, ctx, h_retr [B, k, C, h, w], lam [B]  model_output
denoise_inject     z_t, t, ctx, h_retr [B, 1, C, h, w],          model_output
                   inject_w [B]
vae_decode         z0 [B, c, H, W]                              pixels [B, 3, H', W']
=================  ===========================================  ==================

Floats are float32. The batch axis (and the neighbour count k) is dynamic; everything else is
fixed by the model's configs. Each ``denoise_*`` graph is ONE UNet pass (encoder, H-space edit,
decoder) with the LoRA already fused by the loader. Validation that depends on values (slerp's
w in (0, 1]) stays outside the graphs: :class:`~imageragturbo.engines.pipeline_engines.PipelineEngines`
checks before it runs one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from imageragturbo.engines.fused_adapter import FusedHSpaceAdapter
from imageragturbo.model.denoiser import RagDenoiser
from imageragturbo.model.injection import slerp_blend
from imageragturbo.model.loading import ModelComponents
from imageragturbo.model.pipeline import decode_latents
from imageragturbo.model.text import PromptEncoder
from imageragturbo.model.unet_split import SplitUNet

GRAPH_NAMES: tuple[str, ...] = ("text_encoder", "denoise_off", "denoise_adapter", "denoise_inject", "vae_decode")
DENOISE_GRAPHS: dict[str, str] = {"off": "denoise_off", "adapter": "denoise_adapter", "inject": "denoise_inject"}
DEFAULT_OPSET = 17
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output."""

    name: str
    dtype: str
    """numpy dtype name: ``float32`` or ``int64``."""
    shape: tuple[int | str, ...]
    """Fixed sizes as ints; dynamic axes by name (``batch``, ``k``)."""
    value_range: tuple[float, float] | None = None
    """Where example inputs are drawn from (uniform; integers inclusive); None: standard normal."""

    def concrete_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape with each dynamic axis replaced by ``sizes[axis]``."""
        try:
            return tuple(dim if isinstance(dim, int) else int(sizes[dim]) for dim in self.shape)
        except KeyError as exc:
            raise ValueError(f"{self.name}: no size given for dynamic axis {exc.args[0]!r} (got {sizes})") from exc


@dataclass(frozen=True)
class GraphSpec:
    """What an export of one graph depends on: names, shapes, dynamic axes, opset, exporter.

    Part of the export manifest and of the TensorRT engine cache key.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis index: axis name}}`` for inputs and outputs (torch.onnx's form)."""
        axes = {}
        for spec in self.inputs + self.outputs:
            named = {i: dim for i, dim in enumerate(spec.shape) if isinstance(dim, str)}
            if named:
                axes[spec.name] = named
        return axes

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(sorted({dim for spec in self.inputs for dim in spec.shape if isinstance(dim, str)}))

    def example_inputs(self, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs in each tensor's value range, with ``sizes`` for the dynamic axes."""
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.inputs:
            shape = spec.concrete_shape(sizes)
            if spec.dtype == "int64":
                low, high = spec.value_range or (0, 1)
                out[spec.name] = rng.integers(int(low), int(high) + 1, size=shape, dtype=np.int64)
            elif spec.value_range is not None:
                out[spec.name] = rng.uniform(*spec.value_range, size=shape).astype(spec.dtype)
            else:
                out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GraphSpec:
        def tensor(d: dict) -> TensorSpec:
            value_range = tuple(d["value_range"]) if d.get("value_range") is not None else None
            return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), value_range)

        return cls(
            name=data["name"],
            inputs=tuple(tensor(d) for d in data["inputs"]),
            outputs=tuple(tensor(d) for d in data["outputs"]),
            opset=int(data["opset"]),
            exporter=data["exporter"],
        )


# -- the torch modules, one per graph, with the graph's argument names -------------------------


class TextEncoderGraph(torch.nn.Module):
    def __init__(self, encoder: PromptEncoder):
        super().__init__()
        self.text_encoder = encoder.text_encoder
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.encoder.encode_ids(input_ids)
        return encoded.ctx, encoded.q


class DenoiseOffGraph(torch.nn.Module):
    def __init__(self, denoiser: RagDenoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.denoiser(z_t, t, ctx)


class DenoiseAdapterGraph(torch.nn.Module):
    """RagDenoiser's ``adapter`` mode with the adapter in its fused form (fused_adapter.py): the
    same function in fewer ops, hence cheaper over ``denoise_off`` (results/design-notes.md)."""

    def __init__(self, split: SplitUNet, adapter: FusedHSpaceAdapter):
        super().__init__()
        self.split = split
        self.adapter = adapter

    def forward(self, z_t, t, ctx, h_retr, lam) -> torch.Tensor:
        enc = self.split.encode(z_t, t, ctx)
        h = self.adapter(enc.h, h_retr, lam)
        return self.split.decode(h, enc.skips, enc.temb, ctx)


class DenoiseInjectGraph(torch.nn.Module):
    """RagDenoiser's ``inject`` mode without its w check (see the module docstring)."""

    def __init__(self, split: SplitUNet):
        super().__init__()
        self.split = split

    def forward(self, z_t, t, ctx, h_retr, inject_w) -> torch.Tensor:
        enc = self.split.encode(z_t, t, ctx)
        h = slerp_blend(enc.h, h_retr[:, 0].to(enc.h.dtype), inject_w.float())
        return self.split.decode(h, enc.skips, enc.temb, ctx)


class VaeDecodeGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, z0)


@dataclass
class TorchGraph:
    """A graph's spec and the torch module that computes it (weights shared with the model)."""

    spec: GraphSpec
    module: torch.nn.Module


def _vae_upscale(vae: torch.nn.Module) -> int:
    config = vae.config
    if hasattr(config, "num_decoder_blocks"):  # AutoencoderTiny: one upsampling between blocks
        return int(config.upsampling_scaling_factor) ** (len(config.num_decoder_blocks) - 1)
    return 2 ** (len(config.block_out_channels) - 1)


def hspace_shape(unet) -> tuple[int, int, int]:
    """(C, h, w) of the mid-block output: each down block but the last halves the size,
    rounding up (a stride-2, padding-1, 3x3 convolution)."""
    config = unet.config
    size = config.sample_size
    hw = [size, size] if isinstance(size, int) else list(size)
    for _ in range(len(config.down_block_types) - 1):
        hw = [(dim + 1) // 2 for dim in hw]
    return int(config.block_out_channels[-1]), int(hw[0]), int(hw[1])


def build_graphs(
    components: ModelComponents,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
) -> dict[str, TorchGraph]:
    """Every graph the model supports (``denoise_adapter`` only with an adapter), in GRAPH_NAMES order."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    encoder = PromptEncoder(components.tokenizer, components.text_encoder)
    text_config = components.text_encoder.config
    seq_len, ctx_dim = encoder.max_length, int(text_config.hidden_size)
    # CLIPTextModelWithProjection's query is the projected text_embeds; CLIPTextModel's the pooled state.
    q_dim = int(text_config.projection_dim) if hasattr(components.text_encoder, "text_projection") else ctx_dim
    unet = components.unet
    split = SplitUNet(unet)
    size = unet.config.sample_size
    lat_h, lat_w = (size, size) if isinstance(size, int) else tuple(size)
    latent = (int(unet.config.in_channels), int(lat_h), int(lat_w))
    out_latent = (int(unet.config.out_channels), int(lat_h), int(lat_w))
    h_c, h_h, h_w = hspace_shape(unet)
    num_t = int(components.scheduler.config.num_train_timesteps)
    vocab = int(text_config.vocab_size)
    up = _vae_upscale(components.vae)

    def f32(name, *shape, value_range=None):
        return TensorSpec(name, "float32", tuple(shape), value_range)

    z_t = f32("z_t", "batch", *latent)
    t = TensorSpec("t", "int64", ("batch",), (0, num_t - 1))
    ctx = f32("ctx", "batch", seq_len, ctx_dim)
    model_output = f32("model_output", "batch", *out_latent)

    def spec(name, inputs, outputs):
        return GraphSpec(name, tuple(inputs), tuple(outputs), opset, exporter)

    graphs = {
        "text_encoder": TorchGraph(
            spec(
                "text_encoder",
                [TensorSpec("input_ids", "int64", ("batch", seq_len), (0, vocab - 1))],
                [ctx, f32("q", "batch", q_dim)],
            ),
            TextEncoderGraph(encoder),
        ),
        "denoise_off": TorchGraph(
            spec("denoise_off", [z_t, t, ctx], [model_output]),
            DenoiseOffGraph(RagDenoiser(split, None, "off")),
        ),
    }
    if components.adapter is not None and components.adapter.xattn is not None:
        from imageragturbo.errors import ConfigError

        raise ConfigError("this adapter feeds the decoder's cross-attention (retrieval_attention, beyond the paper); "
                          "only the torch engine runs it: serve with --engine torch")
    if components.adapter is not None:
        graphs["denoise_adapter"] = TorchGraph(
            spec(
                "denoise_adapter",
                [z_t, t, ctx, f32("h_retr", "batch", "k", h_c, h_h, h_w), f32("lam", "batch", value_range=(-1, 1))],
                [model_output],
            ),
            DenoiseAdapterGraph(split, FusedHSpaceAdapter(components.adapter, (h_h, h_w), (h_h, h_w))),
        )
    graphs["denoise_inject"] = TorchGraph(
        spec(
            "denoise_inject",
            [z_t, t, ctx, f32("h_retr", "batch", 1, h_c, h_h, h_w), f32("inject_w", "batch", value_range=(0.05, 1))],
            [model_output],
        ),
        DenoiseInjectGraph(split),
    )
    graphs["vae_decode"] = TorchGraph(
        spec("vae_decode", [f32("z0", "batch", *latent)], [f32("pixels", "batch", 3, up * lat_h, up * lat_w)]),
        VaeDecodeGraph(components.vae),
    )
    for graph in graphs.values():
        graph.module.eval()
    return graphs
