"""Sampling the shapes-world teacher for evaluation during and after pretraining.

A deliberately small sampler (DDIM with classifier-free guidance, or one step) so that
pretraining can evaluate itself without the serving pipeline; the pipeline in
``imageragturbo.model`` is the product path. With the teacher's schedule (zero terminal
SNR, trailing spacing, v-prediction) the first step starts from pure noise and a single
step gives ``x0 = -v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from imageragturbo.model.images import tensor_to_images
from imageragturbo.model.noise import initial_noise, latent_shape
from imageragturbo.model.sampling import sample_multistep
from imageragturbo.world.verifier import BenchmarkResult, verify_batch


@dataclass
class TeacherParts:
    """What sampling needs: the frozen text side, the UNet, the VAE and a DDIM scheduler."""

    tokenizer: PreTrainedTokenizerFast
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler


@torch.no_grad()
def encode_text(tokenizer: PreTrainedTokenizerFast, text_encoder: CLIPTextModel, prompts: Sequence[str]) -> torch.Tensor:
    """float32 [B, L, D]: the text encoder's last hidden state, prompts padded to the full length."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(input_ids=ids).last_hidden_state


@torch.no_grad()
def generate(
    parts: TeacherParts, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 3.0, batch_size: int = 100
) -> np.ndarray:
    """uint8 [B, 32, 32, 3] images for ``prompts`` with per-prompt noise ``seeds``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    ctx_uncond = encode_text(parts.tokenizer, parts.text_encoder, [""])
    out = []
    for i in range(0, len(prompts), batch_size):
        ctx = encode_text(parts.tokenizer, parts.text_encoder, prompts[i : i + batch_size])
        z_T = initial_noise(seeds[i : i + batch_size], latent_shape(parts.unet))
        z0 = sample_multistep(parts.unet, parts.scheduler.config, ctx, ctx_uncond, z_T, steps, guidance)
        x = parts.vae.decode(z0 / parts.vae.config.scaling_factor).sample
        out.append(tensor_to_images(x))
    return np.concatenate(out)


def score_prompts(
    parts: TeacherParts, prompts: Sequence[tuple[str, int]], steps: int, guidance: float
) -> tuple[BenchmarkResult, np.ndarray]:
    """Generate one image per (caption, seed) and verify it: (benchmark, uint8 [B, 32, 32, 3])."""
    captions = [c for c, _ in prompts]
    images = generate(parts, captions, [s for _, s in prompts], steps=steps, guidance=guidance)
    return verify_batch(images, captions), images
