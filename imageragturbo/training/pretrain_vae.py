"""Pretrain the shapes world's VAE: a small diffusers AutoencoderKL, 32x32x3 <-> 8x8x4.

Usage::

    python -m imageragturbo.training.pretrain_vae --config imageragturbo/training/configs/vae.json \
        --out runs/vae [--steps N] [--resume]

Training images are rendered on the fly from the ``universal`` split (every composition and
style, docs/world.md v2: the VAE is a universal component); item ``i`` of step ``s`` is item ``s * batch_size + i``, so a resumed run
sees exactly the images it would have seen. The loss is per-pixel MSE + L1 plus a small KL
term. ``decoder_only`` runs fine-tune the decoder of an exported VAE (``init_from``) while its
encoder, hence its latent space, stays fixed. At the end the latent scaling factor (1 / std of latents over ``scaling_images`` train
images) is measured and stored in the exported config, and the verifier's score on
reconstructions of ``eval_images`` test-seen images is logged and written to
``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from imageragturbo.model.images import images_to_tensor, tensor_to_images
from imageragturbo.training.checkpoints import (
    config_from_json,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    seed_everything,
)
from imageragturbo.world.splits import world_arrays, world_pair
from imageragturbo.world.verifier import verify_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VaeConfig:
    """One VAE pretraining run (``configs/vae.json``); saved inside every checkpoint."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    l1_weight: float = 0.5
    kl_weight: float = 1e-6  # per latent element, relative to the per-pixel reconstruction loss
    # (16, 32, 64): 0.68M parameters, 0.3 s per batch-32 step on one core; (32, 64, 64) costs 2x.
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    checkpoint_every_s: float = 180.0
    scaling_images: int = 4096
    eval_images: int = 500
    num_threads: int = 2
    # Fine-tune only the decoder of an exported VAE: the latent space (and its scaling factor)
    # stays exactly that of ``init_from``, so a teacher trained on its latents stays valid.
    init_from: str | None = None
    decoder_only: bool = False


def build_vae(cfg: VaeConfig) -> AutoencoderKL:
    """An AutoencoderKL with ``len(block_out_channels) - 1`` downsamplings (3 blocks: 32 -> 8)."""
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=32,
    )


def train_batch(cfg: VaeConfig, step: int) -> torch.Tensor:
    """float32 [B, 3, 32, 32] in [-1, 1]: universal items ``step * B ... step * B + B - 1``."""
    start = step * cfg.batch_size
    images = np.stack([world_pair("universal", cfg.seed, start + i)[0] for i in range(cfg.batch_size)])
    return images_to_tensor(images)


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, n_images: int, seed: int) -> float:
    """1 / std of latent samples over ``n_images`` universal images (a stream disjoint from training)."""
    images, _, _ = world_arrays("universal", n_images, seed=seed + 1_000_000)
    latents = [vae.encode(images_to_tensor(images[i : i + 256])).latent_dist.sample() for i in range(0, n_images, 256)]
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def reconstruction_score(vae: AutoencoderKL, n_images: int) -> dict[str, float]:
    """Verifier benchmark and MSE of VAE reconstructions (latent mode) of test-seen images."""
    images, captions, _ = world_arrays("test-seen", n_images, seed=7)
    x = images_to_tensor(images)
    recon = torch.cat([vae.decode(vae.encode(x[i : i + 256]).latent_dist.mode()).sample for i in range(0, len(x), 256)])
    bench = verify_batch(tensor_to_images(recon), captions)
    truth = verify_batch(images, captions)
    return {
        "recon_mse": float(F.mse_loss(recon.clamp(-1, 1), x)),
        "verifier_recon": bench.mean_score,
        "verifier_recon_strict": bench.strict,
        "verifier_ground_truth": truth.mean_score,
    }


def main(config_path: str | Path | None, out_dir: str | Path, steps: int | None = None, resume: bool = False, **overrides) -> dict:
    """Train (or resume) a VAE run, export ``<out>/vae/`` in diffusers format; return its metrics."""
    cfg = config_from_json(VaeConfig, config_path, steps=steps, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)

    if cfg.decoder_only and cfg.init_from is None:
        raise ValueError("decoder_only=True needs init_from (the VAE whose encoder is kept)")
    if cfg.init_from is not None:
        vae = AutoencoderKL.from_pretrained(cfg.init_from, local_files_only=True)
    else:
        vae = build_vae(cfg)
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed_s = 0, 0.0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, {"vae": vae}, opt)
        step, elapsed_s = state["step"], state["elapsed_s"]
        seed_everything(cfg.seed + step)  # fresh but repeatable noise for the KL sampling
        logger.info("resumed from %s at step %d", ckpt, step)
    logger.info("VAE: %.2fM parameters, %d steps of batch %d", sum(p.numel() for p in vae.parameters()) / 1e6, cfg.steps, cfg.batch_size)

    vae.train()
    if cfg.decoder_only:
        vae.encoder.eval()  # no dropout/statistics drift in the frozen half
    t0 = time.monotonic() - elapsed_s
    last_ckpt = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=step, desc="vae", mininterval=5.0)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        x = train_batch(cfg, step)
        with torch.set_grad_enabled(not cfg.decoder_only):
            posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x) + cfg.l1_weight * F.l1_loss(recon, x)
        # kl() sums over latent elements; dividing by their number keeps kl_weight per element.
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            # .item() syncs; only every 50 steps.
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.1f}")
            logger.info("step %d rec %.5f kl %.2f lr %.2e", step, rec.item(), kl.item(), opt.param_groups[0]["lr"])
        if time.monotonic() - last_ckpt >= cfg.checkpoint_every_s or step == cfg.steps:
            save_checkpoint(out, step, cfg, {"vae": vae}, opt, {"elapsed_s": time.monotonic() - t0})
            last_ckpt = time.monotonic()
    bar.close()
    train_s = time.monotonic() - t0

    vae.eval()
    if cfg.decoder_only:
        scaling = float(vae.config.scaling_factor)  # the encoder did not change
    else:
        scaling = measure_scaling_factor(vae, cfg.scaling_images, cfg.seed)
        vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    metrics = {"steps": step, "train_wall_s": round(train_s, 1), "scaling_factor": scaling}
    metrics.update(reconstruction_score(vae, cfg.eval_images))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("VAE done: %s", metrics)
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(args.config, args.out, steps=args.steps, resume=args.resume)
