"""The one seed -> noise convention, and the latent shape a UNet denoises.

One ``torch.Generator`` per seed, on the CPU: its first draw is the item's initial noise z_T
and its later draws are the item's re-noising in few-step sampling, so an image depends on its
seed alone, never on the batch it was drawn in or the device the model runs on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def latent_shape(unet) -> tuple[int, int, int]:
    """(channels, height, width) of a diffusers UNet's latents."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.config.in_channels), int(h), int(w)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def draw(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """float32 [B, *shape]: the next standard-normal draw of each item's generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """float32 [B, *shape]: each seed's z_T."""
    return draw(seed_generators(seeds), shape)
