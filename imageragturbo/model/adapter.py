"""The H-space adapter (paper eq. 4-5) and its gate.

``g(h_tgt, h_retr) = softmax(Q K^T / sqrt(d)) V`` with queries from the target's H tokens and
keys/values from the k retrieved items' H tokens (k*h*w tokens), multi-head; the result is
added back as ``h_tgt + lambda * g``.

Choices the paper leaves open, made here:

- Tokens are layer-normed before projection and carry a 2-D sin-cos position embedding
  (queries and keys only), so attention can match *where* things are in the retrieved image,
  not only what they are; the embedding is relative to the grid (diffusers'
  ``get_2d_sincos_pos_embed`` with a fixed ``base_size``) and so works at any H-space size.
- ``num_layers`` cross-attention layers (each optionally followed by a feed-forward) update a
  residual token stream; ``g`` is a zero-initialised linear map of the total update. With one
  layer and no feed-forward this is exactly eq. 4 followed by an output projection; more layers
  give the paper's ~36M-parameter scale on SD (C = 1280). Zero init means an untrained adapter
  returns ``h_tgt`` unchanged.
- lambda (eq. 5) is one scalar per request: the mean over the k neighbours of the cosine
  similarity between the target query and each retrieved text embedding
  (:func:`imageragturbo.retrieval.gate`). A neighbour list that is mostly unrelated then contributes little.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin

from imageragturbo.model.retrieval_attention import RetrievalCrossAttention


def _tokens(h: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C]."""
    return h.flatten(2).transpose(1, 2)


class _CrossAttentionLayer(torch.nn.Module):
    def __init__(self, channels: int, num_heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(channels)
        self.attn = Attention(
            query_dim=channels,
            cross_attention_dim=channels,
            heads=num_heads,
            dim_head=head_dim,
            bias=False,
            out_bias=True,
        )
        self.ff = None
        if ff_mult > 0:
            self.ff_norm = torch.nn.LayerNorm(channels)
            self.ff = FeedForward(channels, mult=ff_mult, activation_fn="geglu")

    def forward(self, x: torch.Tensor, x_pos: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x) + x_pos, encoder_hidden_states=kv)
        if self.ff is not None:
            x = x + self.ff(self.ff_norm(x))
        return x


class HSpaceAdapter(ModelMixin, ConfigMixin):
    """Cross-attention from target H tokens to retrieved H tokens; ``save_pretrained`` writes
    ``config.json`` + ``diffusion_pytorch_model.safetensors``."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        channels: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        num_layers: int = 1,
        ff_mult: int = 0,
        pos_embed: bool = True,
        pos_base_size: int = 16,
        xattn_ctx_dim: int = 0,
        xattn_layers: int = 0,
    ):
        super().__init__()
        if channels % num_heads != 0 and head_dim is None:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}; set head_dim")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        head_dim = head_dim or channels // num_heads
        self.norm_tgt = torch.nn.LayerNorm(channels)
        self.norm_retr = torch.nn.LayerNorm(channels)
        self.layers = torch.nn.ModuleList(
            _CrossAttentionLayer(channels, num_heads, head_dim, ff_mult) for _ in range(num_layers)
        )
        self.proj_out = torch.nn.Linear(channels, channels)
        # Zero init: an untrained adapter is the identity on h_tgt (tested), so training starts
        # from the frozen one-step model's behaviour.
        torch.nn.init.zeros_(self.proj_out.weight)
        torch.nn.init.zeros_(self.proj_out.bias)
        # Beyond the paper (retrieval_attention.py): the neighbours' tokens also reach the
        # decoder's cross-attention; off (None) for the paper's adapter.
        self.xattn = RetrievalCrossAttention(channels, xattn_ctx_dim, xattn_layers) if xattn_layers > 0 else None

    def _pos(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """The [h*w, C] position embedding, built once per size, dtype and device: building it
        is ~20 small ops (~80 us per call in eager mode, twice per forward)."""
        key = (h, w, like.dtype, like.device)
        # Not a registered buffer: the cache must not enter state_dict or checkpoints.
        cache = self.__dict__.setdefault("_pos_cache", {})
        if key not in cache:
            # A plain tensor even under inference_mode, so training may use it afterwards.
            with torch.inference_mode(False), torch.no_grad():
                if not self.config.pos_embed:
                    pos = torch.zeros(h * w, self.config.channels, dtype=like.dtype, device=like.device)
                else:
                    pos = get_2d_sincos_pos_embed(
                        self.config.channels, (h, w), base_size=self.config.pos_base_size, device=like.device
                    ).to(like.dtype)
            cache[key] = pos
        return cache[key]

    def delta(self, h_tgt: torch.Tensor, h_retr: torch.Tensor) -> torch.Tensor:
        """g(h_tgt, h_retr): h_tgt float [B, C, h, w], h_retr float [B, k, C, h', w'] -> [B, C, h, w]."""
        b, c, h, w = h_tgt.shape
        if h_retr.dim() != 5 or h_retr.shape[0] != b or h_retr.shape[2] != c:
            raise ValueError(
                f"h_retr must be [B={b}, k, C={c}, h, w], got {tuple(h_retr.shape)} for h_tgt {tuple(h_tgt.shape)}"
            )
        _, k, _, hr, wr = h_retr.shape
        q_tok = self.norm_tgt(_tokens(h_tgt))
        kv = self.norm_retr(_tokens(h_retr.reshape(b * k, c, hr, wr))).reshape(b, k * hr * wr, c)
        kv = kv + self._pos(hr, wr, kv).repeat(k, 1)
        q_pos = self._pos(h, w, q_tok)
        x = q_tok
        for layer in self.layers:
            x = layer(x, q_pos, kv)
        g = self.proj_out(x - q_tok)
        return g.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, h_tgt: torch.Tensor, h_retr: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Eq. 5: h_tgt + lambda * g(h_tgt, h_retr), with lambda float [B]."""
        g = self.delta(h_tgt, h_retr.to(h_tgt.dtype))
        return h_tgt + lam.to(h_tgt.dtype).view(-1, 1, 1, 1) * g
