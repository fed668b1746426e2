"""Beyond the paper: the neighbours' tokens as extra keys/values of the UNet decoder's cross-attention.

The paper's adapter (``adapter.py``, eq. 4-5) may only edit the H-space. Where the decoder
does not read the H-space for what the database carries (in a small UNet the decoder leans
on the skip features and its own text cross-attention), this path lets the retrieved
H-features reach every decoder cross-attention layer directly, IP-Adapter style:

    out_l = Attn_l(q, K_text, V_text) + lambda * tanh(10 alpha_l) * to_out_l(Attn(q, to_k_l(r), to_v_l(r)))

with ``r = proj(norm(tokens(h_retr)))`` [B, k*h*w, D] in the text context's width D, the
layer's own (LoRA-tuned) projections, and one gate ``alpha_l`` per layer initialised at 0, so
an untrained path changes nothing. lambda is the paper's text-similarity gate (the
no-retrieval control fixes it at 0, which silences this path too). The parameters live in
:class:`RetrievalCrossAttention`, which the H-space adapter owns when its config asks for it;
the UNet's attention layers get a processor that reads the current request's tokens from it.
Runs on the torch engine (the compiled engines are exported from the paper's adapter only).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

GATE_SCALE = 10.0
"""The gate is tanh(GATE_SCALE * alpha): Adam moves alpha by about the learning rate per step
whatever the gradient, and a gate has to travel to ~1 while the projections move by ~1e-2."""
DECODER_CROSS_ATTENTION = re.compile(r"up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn2$")


def decoder_cross_attentions(unet) -> list[tuple[str, torch.nn.Module]]:
    """The decoder's cross-attention modules (``up_blocks.*.attn2``), in module order."""
    return [(name, m) for name, m in unet.named_modules() if DECODER_CROSS_ATTENTION.search(name)]


class RetrievalCrossAttention(torch.nn.Module):
    """Token projection and per-layer gates; ``bind(h_retr, lam)`` sets one request's tokens."""

    def __init__(self, channels: int, ctx_dim: int, num_layers: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(channels)
        self.proj = torch.nn.Linear(channels, ctx_dim)
        self.gates = torch.nn.Parameter(torch.zeros(num_layers))
        self._bound: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, h_retr: torch.Tensor | None, lam: torch.Tensor | None) -> None:
        """h_retr float [B, k, C, h, w], lam float [B]; None unbinds (the path is then silent)."""
        if h_retr is None:
            self._bound = None
            return
        b, k, c, h, w = h_retr.shape
        tokens = h_retr.reshape(b, k, c, h * w).transpose(2, 3).reshape(b, k * h * w, c)
        self._bound = (self.proj(self.norm(tokens)), lam)

    def extra(self, layer: int, attn, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The gated retrieval term of decoder cross-attention layer ``layer`` ([B, N, C_l]), or None."""
        if self._bound is None:
            return None
        tokens, lam = self._bound
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(tokens.to(hidden_states.dtype)), attn.to_v(tokens.to(hidden_states.dtype))
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.reshape(b, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * head_dim)
        out = attn.to_out[0](o)
        bias = getattr(attn.to_out[0], "bias", None)
        if bias is not None:
            out = out - bias  # the base branch already added it once
        scale = torch.tanh(GATE_SCALE * self.gates[layer]) * lam.to(out.dtype).view(-1, 1, 1)
        return scale * out / attn.rescale_output_factor


class _Processor:
    """Wraps a decoder cross-attention layer's processor; adds the retrieval term when bound.

    A plain object, not a Module: its parameters belong to the adapter, not to the UNet."""

    def __init__(self, base, owner: RetrievalCrossAttention, layer: int):
        self.base, self.owner, self.layer = base, owner, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        extra = self.owner.extra(self.layer, attn, hidden_states)
        return out if extra is None else out + extra


def attach(unet, owner: RetrievalCrossAttention) -> None:
    """Install the processors on ``unet``'s decoder cross-attention (idempotent)."""
    layers = decoder_cross_attentions(unet)
    if len(layers) != owner.gates.numel():
        raise ValueError(f"the adapter's retrieval cross-attention has {owner.gates.numel()} gates, "
                         f"but the UNet decoder has {len(layers)} cross-attention layers")
    for i, (_, module) in enumerate(layers):
        base = module.processor.base if isinstance(module.processor, _Processor) else module.processor
        module.processor = _Processor(base, owner, i)
