"""The H-space adapter as the compiled graphs run it: the same function, fewer and larger ops.

:class:`~imageragturbo.model.adapter.HSpaceAdapter` is written for training: each layer projects
the retrieved tokens with its own ``to_k`` and ``to_v``, and the position embedding and the
layer norms' scale and shift are applied as separate ops on every call. On one CPU thread the
adapter's cost in the ``denoise_adapter`` graph is per-op overhead and weight traffic, not
arithmetic (4 query tokens, 16 key tokens at batch 1, k 4), so :class:`FusedHSpaceAdapter`
rearranges what is constant once, at export:

- every layer's key and value projections of the retrieved tokens are ONE matrix product
  (``[C, 2 * num_layers * inner]``) instead of ``2 * num_layers`` products, each followed by its
  own reshape and transpose;
- the retrieved tokens' layer-norm scale and shift and their position embedding are folded
  into that product's weight and a per-position bias: ``(n(x) * g + b + pos) @ W =
  n(x) @ (g[:, None] * W) + (b + pos) @ W``, where ``n`` is the plain normalisation;
- each layer's query projection likewise absorbs its layer norm's scale and shift, the query
  position embedding and the attention scale ``1 / sqrt(head_dim)``.

The result equals the adapter's up to float32 rounding (tested to 1e-5 relative); the trained
weights are not changed, only combined (in float64, then stored as float32).

Fewer ops is what makes the adapter cheaper at batch 1 on one thread (results/design-notes.md
has the timings, and the variant that was tried and dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imageragturbo.model.adapter import HSpaceAdapter


class FusedHSpaceAdapter(torch.nn.Module):
    """``forward(h_tgt, h_retr, lam)`` = ``adapter(h_tgt, h_retr, lam)`` for H-features of one
    fixed spatial size.

    h_tgt float32 [B, C, h, w]; h_retr float32 [B, k, C, h_r, w_r]; lam float32 [B]
    -> float32 [B, C, h, w]. ``target_hw`` and ``retrieved_hw`` are the (h, w) the position
    embeddings are folded for (in the pipeline both are the UNet's H-space size).
    """

    def __init__(self, adapter: HSpaceAdapter, target_hw: tuple[int, int], retrieved_hw: tuple[int, int]):
        super().__init__()
        config = adapter.config
        first = adapter.layers[0].attn
        self.channels = int(config.channels)
        self.heads = int(first.heads)
        self.inner = int(first.inner_dim)
        self.head_dim = self.inner // self.heads
        self.num_layers = len(adapter.layers)
        self.target_hw = tuple(target_hw)
        self.retrieved_hw = tuple(retrieved_hw)
        self.eps_retr = float(adapter.norm_retr.eps)
        self.norm_tgt = adapter.norm_tgt
        self.proj_out = adapter.proj_out
        self.eps = [float(layer.norm.eps) for layer in adapter.layers]
        self.to_out = torch.nn.ModuleList(layer.attn.to_out[0] for layer in adapter.layers)
        self.ff_norm = torch.nn.ModuleList(
            layer.ff_norm if layer.ff is not None else torch.nn.Identity() for layer in adapter.layers
        )
        self.ff = torch.nn.ModuleList(layer.ff if layer.ff is not None else torch.nn.Identity() for layer in adapter.layers)
        self.has_ff = [layer.ff is not None for layer in adapter.layers]

        with torch.no_grad():
            like = adapter.proj_out.weight
            pos_tgt = adapter._pos(*self.target_hw, like).double()  # [h*w, C]
            pos_retr = adapter._pos(*self.retrieved_hw, like).double()  # [h_r*w_r, C]
            # Keys and values of every layer, side by side: [C, 2 * num_layers * inner].
            w_kv = torch.cat(
                [w for layer in adapter.layers for w in (layer.attn.to_k.weight.double().T, layer.attn.to_v.weight.double().T)],
                dim=1,
            )
            gamma, beta = adapter.norm_retr.weight.double(), adapter.norm_retr.bias.double()
            self.register_buffer("w_kv", (gamma[:, None] * w_kv).float())
            self.register_buffer("b_kv", ((beta + pos_retr) @ w_kv).float())  # [h_r*w_r, 2 * L * inner]
            scale = float(first.scale)
            w_q, b_q = [], []
            for layer in adapter.layers:
                wq = layer.attn.to_q.weight.double().T * scale  # [C, inner]
                g, b = layer.norm.weight.double(), layer.norm.bias.double()
                w_q.append((g[:, None] * wq).float())
                b_q.append(((b + pos_tgt) @ wq).float())  # [h*w, inner]
            self.register_buffer("w_q", torch.stack(w_q))  # [L, C, inner]
            self.register_buffer("b_q", torch.stack(b_q))  # [L, h*w, inner]
        for layer in adapter.layers:
            attn = layer.attn
            if attn.to_q.bias is not None or attn.to_k.bias is not None or attn.residual_connection:
                raise ValueError("FusedHSpaceAdapter folds bias-free q/k/v projections without a residual; this adapter differs")

    def forward(self, h_tgt: torch.Tensor, h_retr: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        b = h_tgt.shape[0]
        # Python ints, not traced sizes: the exported graph then carries them as constants.
        c, (h, w) = self.channels, self.target_hw
        if tuple(h_tgt.shape[1:]) != (c, h, w) or tuple(h_retr.shape[-2:]) != self.retrieved_hw:
            raise ValueError(
                f"fused adapter was built for H-features {self.target_hw} / {self.retrieved_hw}, "
                f"got h_tgt {tuple(h_tgt.shape)} and h_retr {tuple(h_retr.shape)}"
            )
        heads, d, layers = self.heads, self.head_dim, self.num_layers
        # 1. retrieved tokens -> keys and values of every layer, in one product
        r = h_retr.to(h_tgt.dtype).flatten(3).transpose(-1, -2)  # [B, k, h_r*w_r, C]
        r = F.layer_norm(r, (c,), eps=self.eps_retr)
        kv = torch.matmul(r, self.w_kv) + self.b_kv  # [B, k, h_r*w_r, 2*L*inner]
        # One transpose for all of them, then a split: [B, 2*L*heads, k*h_r*w_r, d] -> 2L x [B, heads, ., d].
        kv = kv.reshape(b, -1, 2 * layers * heads, d).transpose(1, 2).split(heads, dim=1)
        # 2. target tokens through the cross-attention (+ feed-forward) layers
        q_tok = self.norm_tgt(h_tgt.flatten(2).transpose(1, 2))  # [B, h*w, C]
        x = q_tok
        for i in range(layers):
            q = torch.matmul(F.layer_norm(x, (c,), eps=self.eps[i]), self.w_q[i]) + self.b_q[i]
            q = q.reshape(b, -1, heads, d).transpose(1, 2)  # [B, heads, h*w, d], already scaled
            attn = torch.softmax(torch.matmul(q, kv[2 * i].transpose(-1, -2)), dim=-1)
            o = torch.matmul(attn, kv[2 * i + 1]).transpose(1, 2).reshape(b, -1, self.inner)
            x = x + self.to_out[i](o)
            if self.has_ff[i]:
                x = x + self.ff[i](self.ff_norm[i](x))
        # 3. g and the gated residual (eq. 5)
        g = self.proj_out(x - q_tok).transpose(1, 2).reshape(b, c, h, w)
        return h_tgt + lam.to(h_tgt.dtype).view(-1, 1, 1, 1) * g
