"""One UNet pass with the H-space edit in the middle: the `denoise` stage as a torch module.

This is the reference for the compiled engines: each mode is one graph (encoder, edit, decoder)
with named inputs, so an ONNX Runtime or TensorRT engine can stand in for it unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch

from imageragturbo.model.adapter import HSpaceAdapter
from imageragturbo.model.injection import slerp_inject
from imageragturbo.model.retrieval_attention import attach
from imageragturbo.model.unet_split import SplitUNet
from imageragturbo.modes import MODES

__all__ = ["MODES", "Mode", "RagDenoiser"]

Mode = Literal["adapter", "inject", "off"]


class RagDenoiser(torch.nn.Module):
    """``forward(z_t, t, ctx, h_retr, lam, inject_w)`` -> the UNet's model output [B, c, H, W].

    - ``off``: the plain UNet (h_retr, lam, inject_w unused).
    - ``adapter``: h = h_tgt + lam * adapter(h_tgt, h_retr); h_retr float [B, k, C, h, w], lam [B];
      an adapter with retrieval cross-attention (beyond the paper) also feeds the neighbours'
      tokens to the decoder's cross-attention for this call.
    - ``inject``: h = slerp(h_retr[:, 0], h_tgt, inject_w); inject_w float [B].
    """

    def __init__(self, unet, adapter: HSpaceAdapter | None, mode: Mode):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "adapter" and adapter is None:
            raise ValueError("mode 'adapter' needs a trained H-space adapter; the model has none (no adapter/ folder)")
        self.split = unet if isinstance(unet, SplitUNet) else SplitUNet(unet)
        self.adapter = adapter if mode == "adapter" else None
        self.mode = mode
        if self.adapter is not None and self.adapter.xattn is not None:
            attach(self.split.unet, self.adapter.xattn)

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        ctx: torch.Tensor,
        h_retr: torch.Tensor | None = None,
        lam: torch.Tensor | None = None,
        inject_w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.mode == "off":
            return self.split(z_t, t, ctx)
        enc = self.split.encode(z_t, t, ctx)
        if self.mode == "inject":
            return self.split.decode(slerp_inject(enc.h, h_retr[:, 0].to(enc.h.dtype), inject_w), enc.skips, enc.temb, ctx)
        h = self.adapter(enc.h, h_retr, lam)
        if self.adapter.xattn is None:
            return self.split.decode(h, enc.skips, enc.temb, ctx)
        self.adapter.xattn.bind(h_retr.to(enc.h.dtype), lam)
        try:
            return self.split.decode(h, enc.skips, enc.temb, ctx)
        finally:
            self.adapter.xattn.bind(None, None)
