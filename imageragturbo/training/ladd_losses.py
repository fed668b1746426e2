"""The discriminator of latent adversarial distillation and the latent perceptual loss (paper eq. 6-9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from imageragturbo.model.unet_split import SplitUNet


class DiscriminatorHead(torch.nn.Module):
    """Spectrally normalised conv head on one encoder stage; a projection term conditions the
    per-location logits on the prompt embedding and the noise level."""

    def __init__(self, in_channels: int, cond_dim: int, channels: int):
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        self.conv = sn(torch.nn.Conv2d(in_channels, channels, 3, padding=1))
        self.act = torch.nn.LeakyReLU(0.2)
        self.out = sn(torch.nn.Conv2d(channels, 1, 1))
        self.cond = sn(torch.nn.Linear(cond_dim, channels))
        self.scale = channels**-0.5

    def forward(self, feature: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """feature [B, C_k, h, w], cond [B, cond_dim] -> logits [B, h*w]."""
        x = self.act(self.conv(feature))
        projection = (x * self.cond(cond)[:, :, None, None]).sum(1, keepdim=True) * self.scale
        return (self.out(x) + projection).flatten(1)


class DiscriminatorHeads(torch.nn.Module):
    """The trainable part of the discriminator: one head per encoder stage."""

    T_DIM = 64

    def __init__(self, stage_channels: list[int], text_dim: int, channels: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(DiscriminatorHead(c, text_dim + self.T_DIM, channels) for c in stage_channels)

    def forward(self, stages: tuple[torch.Tensor, ...], q: torch.Tensor, s: torch.Tensor) -> list[torch.Tensor]:
        t_emb = get_timestep_embedding(s.float(), self.T_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        cond = torch.cat([q, t_emb.to(q.dtype)], dim=1)
        return [head(feature, cond) for head, feature in zip(self.heads, stages)]


class LatentDiscriminator:
    """D(z_s, s, text) = trainable heads over the frozen teacher encoder's stages (down blocks + mid).

    Not a Module on purpose: the heads are prepared by accelerate (and may be wrapped for
    multi-GPU), the teacher is frozen and shared with the perceptual loss."""

    def __init__(self, teacher_split: SplitUNet, heads: torch.nn.Module):
        self.teacher = teacher_split  # frozen; gradients still flow through it to the student
        self.heads = heads

    @staticmethod
    def stage_channels(unet) -> list[int]:
        return list(unet.config.block_out_channels) + [unet.config.block_out_channels[-1]]

    def __call__(self, z_s: torch.Tensor, s: torch.Tensor, ctx: torch.Tensor, q: torch.Tensor) -> list[torch.Tensor]:
        """-> one logits tensor [B, h_k*w_k] per stage."""
        return self.heads(self.teacher.encode(z_s, s, ctx).stages, q, s)


def augment_pair(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip, translation and cutout applied to both latents [B, c, h, w]."""
    bsz, _, h, w = a.shape
    flip = torch.rand(bsz, generator=gen) < 0.5
    a = torch.where(flip[:, None, None, None], a.flip(-1), a)
    b = torch.where(flip[:, None, None, None], b.flip(-1), b)
    shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
    a, b = a.roll(shift, dims=(-2, -1)), b.roll(shift, dims=(-2, -1))
    size = max(1, h // 4)
    y, x = torch.randint(0, h - size + 1, (1,), generator=gen).item(), torch.randint(0, w - size + 1, (1,), generator=gen).item()
    mask = torch.ones(1, 1, h, w, dtype=a.dtype, device=a.device)
    mask[..., y : y + size, x : x + size] = 0
    return a * mask, b * mask


def latent_perceptual_loss(teacher_split: SplitUNet, ctx_uncond: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 9 with F = the frozen teacher encoder's stages at t = 0, unit-normalised per position."""
    t0 = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    ctx = ctx_uncond.expand(x.shape[0], -1, -1)
    fx = teacher_split.encode(x, t0, ctx).stages
    with torch.no_grad():
        fy = teacher_split.encode(y, t0, ctx).stages
    loss = x.new_zeros(())
    for a, b in zip(fx, fy):
        loss = loss + (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean()
    return loss
