"""The UNet split at its H-space: an encoder up to and including the mid-block, and a decoder.

``decode(encode(z_t, t, ctx)) == unet(z_t, t, ctx).sample`` (tested to 1e-5). The two halves
follow ``UNet2DConditionModel.forward`` of diffusers 0.42.1 step by step; that method's
internals (``get_time_embed``, ``time_embedding``, ``down_blocks``, ``mid_block``, ``up_blocks``,
``num_upsamplers``, ...) are stable from diffusers 0.27 to 0.42, and diffusers is pinned.
Features the one-step pipeline has no use for (class labels, SDXL's added conditions, ControlNet
residuals, attention masks) are refused at construction instead of silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel


@dataclass
class UNetEncoding:
    """What the decoder needs from the encoder."""

    h: torch.Tensor
    """float [B, C, h, w]: the mid-block output (the H-space)."""
    skips: tuple[torch.Tensor, ...]
    """The down path's residual features, in the order the up blocks consume them from the end."""
    temb: torch.Tensor
    """float [B, T]: the activated time embedding shared by every block."""
    stages: tuple[torch.Tensor, ...] = ()
    """Each down block's output, then the mid-block's: the multi-stage features that the
    latent discriminator and the latent perceptual loss read."""


class SplitUNet(torch.nn.Module):
    """Wraps a diffusers ``UNet2DConditionModel`` (not a copy: the weights are shared)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        config = unet.config
        unsupported = {
            "class_embed_type": config.class_embed_type,
            "addition_embed_type": config.addition_embed_type,
            "num_class_embeds": config.num_class_embeds,
        }
        for key, value in unsupported.items():
            if value is not None:
                raise ValueError(f"UNet config {key}={value!r} is not supported by the H-space split")
        if unet.mid_block is None:
            raise ValueError("the UNet has no mid-block, so it has no H-space to split at")
        self.unet = unet

    @property
    def h_channels(self) -> int:
        return int(self.unet.config.block_out_channels[-1])

    def encode(self, z_t: torch.Tensor, t: torch.Tensor | int, ctx: torch.Tensor) -> UNetEncoding:
        """z_t float [B, c, H, W], t int64 [B] or scalar, ctx float [B, L, D] -> UNetEncoding."""
        unet = self.unet
        # 1. time
        sample = 2 * z_t - 1.0 if unet.config.center_input_sample else z_t
        t_emb = unet.get_time_embed(sample=sample, timestep=t)
        temb = unet.time_embedding(t_emb, None)
        if unet.time_embed_act is not None:
            temb = unet.time_embed_act(temb)
        ctx = unet.process_encoder_hidden_states(encoder_hidden_states=ctx, added_cond_kwargs=None)

        # 2. pre-process
        sample = unet.conv_in(sample)

        # 3. down
        skips: tuple[torch.Tensor, ...] = (sample,)
        stages: tuple[torch.Tensor, ...] = ()
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=temb, encoder_hidden_states=ctx)
            else:
                sample, res = block(hidden_states=sample, temb=temb)
            skips += res
            stages += (sample,)

        # 4. mid: its output is the H-space
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(sample, temb, encoder_hidden_states=ctx)
        else:
            h = unet.mid_block(sample, temb)
        return UNetEncoding(h=h, skips=skips, temb=temb, stages=stages + (h,))

    def decode(
        self,
        h: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        ctx: torch.Tensor,
    ) -> torch.Tensor:
        """(possibly edited) h [B, C, h, w] + the encoder's skips and temb -> model output [B, c, H, W]."""
        unet = self.unet
        ctx = unet.process_encoder_hidden_states(encoder_hidden_states=ctx, added_cond_kwargs=None)
        # The input size is conv_in's output size; when it is not a multiple of the total
        # upsampling factor the up blocks must be told each target size (as in diffusers).
        input_hw = skips[0].shape[-2:]
        forward_upsample_size = any(dim % (2**unet.num_upsamplers) != 0 for dim in input_hw)

        # 5. up
        sample = h
        remaining = skips
        for i, block in enumerate(unet.up_blocks):
            is_final_block = i == len(unet.up_blocks) - 1
            res = remaining[-len(block.resnets) :]
            remaining = remaining[: -len(block.resnets)]
            upsample_size = remaining[-1].shape[2:] if (not is_final_block and forward_upsample_size) else None
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=temb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=ctx,
                    upsample_size=upsample_size,
                )
            else:
                sample = block(
                    hidden_states=sample, temb=temb, res_hidden_states_tuple=res, upsample_size=upsample_size
                )

        # 6. post-process
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor | int, ctx: torch.Tensor) -> torch.Tensor:
        enc = self.encode(z_t, t, ctx)
        return self.decode(enc.h, enc.skips, enc.temb, ctx)
