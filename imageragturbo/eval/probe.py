"""What the database can deliver for a split, and through which path it reaches the image.

For each prompt the top-1 neighbour is retrieved (as ``inject`` mode does) and the verifier
scores, with the prompt's caption and seed:

- ``off``: the bare one-step model (no retrieval), the baseline;
- ``neighbour image``: the neighbour's stored latent through the VAE decoder. A model that
  copied its neighbour perfectly would score this; it is the ceiling of any path through
  this VAE (on the shapes world's held-out compositions the VAE, never trained on them,
  loses much of it);
- ``neighbour H``: the one-step pass with the target's H-feature replaced by the neighbour's
  stored one (skips, timestep and text stay the target's): what the H-space alone carries;
- ``neighbour H at t``: the same, with the neighbour's H computed from its latent noised to t
  (noise independent of the seed, its own caption) instead of the stored clean (t = 0) one:
  the H-features at a level the one-step model was trained on;
- ``neighbour at t``: the one-step model's x0 from the neighbour's latent noised to t (the
  seed's noise), with the target's prompt: what the UNet does when the neighbour's layout
  reaches it through every path, as in img2img;
- ``neighbour + latent noise σ``: the neighbour's latent plus Gaussian noise of standard
  deviation σ (seeded, no model): how far from the neighbour's latent a decoded image may
  land and still score, the scale against which the other rows' latent MSE reads;
- ``H fitted to the neighbour`` (with ``fit_steps`` > 0): the one-step pass with an H-feature
  optimised (Adam on H alone, the UNet frozen) so that the output's x0 matches the
  neighbour's latent: an estimate of the most that any H-space edit, learned or not, can draw
  of the neighbour with this decoder (an estimate: it depends on the optimiser's
  convergence, so report the steps; ``fit_lr`` 0.3 suits H-features of norm ~50, as in the
  shapes-world UNets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imageragturbo.errors import ConfigError
from imageragturbo.model.images import tensor_to_images
from imageragturbo.model.noise import initial_noise
from imageragturbo.model.pipeline import RagTurboPipeline
from imageragturbo.world.verifier import verify

NOISED_TIMESTEPS = (249, 499, 749)
START_TIMESTEPS = (99, 249, 499, 749)
NOISE_SIGMAS = (0.1, 0.2, 0.3)


@dataclass(frozen=True)
class ProbeRow:
    name: str
    split: str
    n: int
    mean_score: float
    latent_mse: float
    """Mean squared error between the probe's latent and the neighbour's: how close to the
    neighbour the path lands (0 for the neighbour image itself)."""

    def as_dict(self) -> dict:
        return {"name": self.name, "split": self.split, "n": self.n, "mean_score": self.mean_score, "latent_mse": self.latent_mse}


@torch.no_grad()
def probe_latents(
    pipe: RagTurboPipeline,
    prompts: list[tuple[str, int]],
    *,
    database: str | None = None,
    timesteps: tuple[int, ...] = START_TIMESTEPS,
    h_timesteps: tuple[int, ...] = NOISED_TIMESTEPS,
    noise_sigmas: tuple[float, ...] = NOISE_SIGMAS,
    fit_steps: int = 0,
    fit_lr: float = 0.3,
) -> dict[str, torch.Tensor]:
    """Probe name -> clean latents float [N, c, h, w], one per (caption, seed) of ``prompts``.

    ``pipe`` should be the bare model (``open_pipeline(..., base_only=True)``) so that ``off``
    and the probes share one UNet. Raises ``ValueError`` if it has no database or the
    database's store keeps no latents.
    """
    captions = [c for c, _ in prompts]
    seeds = [s for _, s in prompts]
    if not pipe.databases:
        raise ConfigError("probing needs a retrieval database (one with latents)")
    db = pipe.databases.resolve(database)
    encoded = pipe.encoder(captions)
    ctx, device, dtype = encoded.ctx, pipe.device, encoded.ctx.dtype
    found = db.retrieve(encoded.q.cpu().numpy(), 1, texts=captions)
    z0_nb = torch.from_numpy(found.top_latents()).to(device, dtype)
    h_nb = torch.from_numpy(found.h[:, 0]).to(device, dtype)
    z_T = initial_noise(seeds, pipe.latent_shape)
    z_T = z_T.to(device, dtype)
    t_max = pipe.num_train_timesteps - 1

    def one_step(z_t: torch.Tensor, t: int) -> torch.Tensor:
        enc = pipe.split.encode(z_t, torch.full((len(captions),), t, dtype=torch.int64, device=device), ctx)
        return pipe.schedule.predict_x0(pipe.split.decode(enc.h, enc.skips, enc.temb, ctx), z_t, t)

    # One encoder pass from pure noise serves off, the neighbour's H and the fitted H.
    enc_T = pipe.split.encode(z_T, torch.full((len(captions),), t_max, dtype=torch.int64, device=device), ctx)

    def x0_with(h: torch.Tensor) -> torch.Tensor:
        return pipe.schedule.predict_x0(pipe.split.decode(h, enc_T.skips, enc_T.temb, ctx), z_T, t_max)

    latents = {"off": x0_with(enc_T.h), "neighbour image": z0_nb, "neighbour H": x0_with(h_nb)}
    ctx_nb = pipe.encoder([row[0] for row in found.captions()]).ctx
    eps_nb = torch.randn(z0_nb.shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    for t in h_timesteps:
        t_nb = torch.full((len(captions),), t, dtype=torch.int64, device=device)
        latents[f"neighbour H at t={t}"] = x0_with(pipe.split.encode(pipe.schedule.add_noise(z0_nb, eps_nb, t), t_nb, ctx_nb).h)
    for t in timesteps:
        latents[f"neighbour at t={t}"] = one_step(pipe.schedule.add_noise(z0_nb, z_T, t), t)
    eps = torch.randn(z0_nb.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    for sigma in noise_sigmas:
        latents[f"neighbour + latent noise σ={sigma}"] = z0_nb + sigma * eps
    if fit_steps > 0:
        latents[f"H fitted to the neighbour ({fit_steps} steps)"] = _fit_h(x0_with, enc_T.h, z0_nb, fit_steps, fit_lr)
    return latents


def _fit_h(x0_with, h_start: torch.Tensor, target: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """``x0_with(h)`` for the H that minimises the mean squared error to ``target`` (Adam on H
    only, from ``h_start``, the target prompt's own H)."""
    h = h_start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([h], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(x0_with(h), target)
            (grad,) = torch.autograd.grad(loss, h)
            h.grad = grad
            opt.step()
    return x0_with(h.detach())


def probe_split(
    pipe: RagTurboPipeline,
    prompts: list[tuple[str, int]],
    split: str,
    *,
    database: str | None = None,
    fit_steps: int = 0,
    fit_lr: float = 0.3,
) -> list[ProbeRow]:
    """The verifier's mean, and the latent's distance to the neighbour's, for every probe of
    :func:`probe_latents` on ``prompts``."""
    captions = [c for c, _ in prompts]
    latents = probe_latents(pipe, prompts, database=database, fit_steps=fit_steps, fit_lr=fit_lr)
    rows = []
    for name, z0 in latents.items():
        with torch.inference_mode():
            images = tensor_to_images(pipe.vae_decode(z0))
        score = float(np.mean([verify(img, cap).score for img, cap in zip(images, captions)]))
        mse = float(((z0.float() - latents["neighbour image"].float()) ** 2).mean())
        rows.append(ProbeRow(name, split, len(captions), score, mse))
    return rows


def probe_markdown(rows: list[ProbeRow], model: str) -> str:
    splits = list(dict.fromkeys(r.split for r in rows))
    names = list(dict.fromkeys(r.name for r in rows))
    row = {(r.name, r.split): r for r in rows}
    n = {r.split: r.n for r in rows}
    lines = [
        f"Verifier mean with the top-1 neighbour's content on each path, and the mean squared "
        f"error between the latent and the neighbour's (model `{model}`; "
        + ", ".join(f"{s} n={n[s]}" for s in splits) + "):",
        "",
        "| probe | " + " | ".join(splits) + " | " + " | ".join(f"latent MSE, {s}" for s in splits) + " |",
        "| --- |" + " ---: |" * (2 * len(splits)),
    ]
    for name in names:
        lines.append(
            f"| {name} | " + " | ".join(f"{row[(name, s)].mean_score:.3f}" for s in splits)
            + " | " + " | ".join(f"{row[(name, s)].latent_mse:.3f}" for s in splits) + " |"
        )
    return "\n".join(lines) + "\n"
