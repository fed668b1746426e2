"""Scoring a LADD generator during training: one-step images, the verifier, the style match."""

from __future__ import annotations

import numpy as np
import torch

from imageragturbo.retrieval.database import RetrievalDatabase
from imageragturbo.model.denoiser import RagDenoiser
from imageragturbo.model.images import tensor_to_images
from imageragturbo.model.noise import initial_noise, latent_shape
from imageragturbo.model.pipeline import decode_latents
from imageragturbo.training.ladd_data import StyledRows
from imageragturbo.world.spec import swap_attribute


@torch.no_grad()
def one_step_images(
    config,
    parts,
    generator: RagDenoiser,
    schedule,
    encoder,
    database: RetrievalDatabase,
    prompts: list[tuple[str, int]],
    swapped: bool = False,
    h_rows: np.ndarray | None = None,
    start_t: int = 0,
) -> np.ndarray:
    """uint8 [P, H, W, 3]: one-step images of (caption, seed) ``prompts``, retrieving from ``database``.

    ``h_rows`` (float [N, C, h, w]) replaces the store's H-features (the same rows in another
    style); ``swapped``: the generator's prompt has one colour or shape swapped (as
    ``text_swap`` trains), while retrieval keeps the true caption; ``start_t`` (> 0, adapter
    runs): the step starts from the top neighbour's stored latent noised to it, as the
    pipeline's ``start_t``.
    """
    captions = [p for p, _ in prompts]
    device = next(generator.parameters()).device
    noise = initial_noise([s for _, s in prompts], latent_shape(parts.unet)).to(device)
    encoded = encoder(captions)
    t = torch.full((len(captions),), start_t or config.student_timesteps[0], device=device)
    h_retr = lam = None
    if generator.mode == "adapter":
        found = database.retrieve(encoded.q.cpu().numpy(), config.k, h_rows=h_rows)
        h_retr = torch.from_numpy(found.h).to(device)
        lam = torch.from_numpy(found.gate).to(device)
        if not config.retrieval:
            lam = torch.zeros_like(lam)
        if start_t:
            noise = schedule.add_noise(torch.from_numpy(found.top_latents()).to(device), noise, t)
    elif start_t:
        raise ValueError("start_t needs an adapter run (it starts from a retrieved neighbour)")
    ctx = encoded.ctx
    if swapped:
        rng = np.random.default_rng(0)
        ctx = encoder([swap_attribute(c, rng) for c in captions]).ctx
    was_training = generator.training
    generator.eval()
    x0 = schedule.predict_x0(generator(noise, t, ctx, h_retr, lam), noise, t)
    generator.train(was_training)
    return tensor_to_images(decode_latents(parts.vae, x0))


def evaluate(
    config, parts, generator, schedule, encoder, database, split: str = "test-seen", swapped: bool = False, start_t: int = 0
) -> float:
    """One-step verifier score on ``config.eval_prompts`` shapes-world prompts of ``split``,
    retrieving from ``database`` (``swapped``, ``start_t``: see :func:`one_step_images`)."""
    from imageragturbo.world.splits import eval_prompts
    from imageragturbo.world.verifier import verify_batch

    prompts = eval_prompts(split, config.eval_prompts)
    images = one_step_images(config, parts, generator, schedule, encoder, database, prompts, swapped, start_t=start_t)
    return verify_batch(list(images), [p for p, _ in prompts]).mean_score


def evaluate_style(config, parts, generator, schedule, encoder, database, styled: StyledRows) -> float:
    """Mean over styles of the fraction of one-step test-seen images whose background band is
    the style their neighbours were retrieved in (the style table's number, during training)."""
    from imageragturbo.world.splits import eval_prompts
    from imageragturbo.world.style import read_style

    prompts = eval_prompts("test-seen", config.eval_prompts)
    hits = []
    for si, style in enumerate(styled.styles):
        images = one_step_images(config, parts, generator, schedule, encoder, database, prompts, h_rows=styled.h[si])
        hits.append(np.mean([read_style(im) == style for im in images]))
    return float(np.mean(hits))
