"""Multi-step sampling with classifier-free guidance: the teacher's sampler (25-50 DDIM steps).

The one-step and few-step path is RagTurboPipeline; this is what the paper's teacher rows and
the synthetic distillation pairs use.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel


@torch.no_grad()
def sample_multistep(
    unet: UNet2DConditionModel,
    scheduler_config,
    ctx: torch.Tensor,
    ctx_uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    cfg_scale: float,
) -> torch.Tensor:
    """DDIM (eta = 0, trailing timesteps) with CFG from ``noise`` float [B, c, h, w] -> z0 [B, c, h, w].

    ctx float [B, L, D] is the prompts' context, ctx_uncond [1, L, D] the empty prompt's.
    Deterministic: the same noise gives the same sample, alone or in a batch.
    """
    scheduler = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    z = noise * scheduler.init_noise_sigma
    uncond = ctx_uncond.expand(ctx.shape[0], -1, -1)
    for t in scheduler.timesteps:
        if cfg_scale == 1.0:
            guided = unet(z, t, ctx).sample
        else:
            out_uncond, out_cond = unet(torch.cat([z, z]), t, torch.cat([uncond, ctx])).sample.chunk(2)
            guided = out_uncond + cfg_scale * (out_cond - out_uncond)
        z = scheduler.step(guided, t, z).prev_sample
    return z
