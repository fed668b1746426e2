"""Pretrain the shapes world's teacher: a text-conditioned UNet2DConditionModel on VAE latents.

Usage::

    python -m imageragturbo.training.pretrain_teacher --config imageragturbo/training/configs/teacher.json \
        --out runs/teacher [--steps N] [--resume]

Inputs are a trained VAE (``vae_dir``) and CLIP run (``clip_dir`` with ``tokenizer/`` and
``text_encoder/``), both frozen. Recipe:

- v-prediction on a DDPM schedule rescaled to zero terminal SNR with trailing timestep
  spacing, so sampling starts from pure noise and one step gives ``x0 = -v``;
- conditioning: the frozen text encoder's ``last_hidden_state`` [B, 16, D]; the caption is
  replaced by the empty string with probability ``cfg_dropout`` for classifier-free guidance;
- AdamW with linear warmup and cosine decay; an EMA of the weights (exported);
- data: ``train_images`` renders of the ``train`` split (no held-out composition, tail pairs at
  1/20 of their rate, styles uniform: docs/world.md v2), encoded
  once to the VAE's posterior mean and std; a fresh latent sample is drawn every step.
  Text contexts are computed once per distinct caption (at most 403 train captions).

Every ``eval_every_s`` seconds the EMA model is scored by the verifier on ``eval_prompts``
test-seen prompts with ``eval_steps``-step DDIM and CFG ``eval_guidance`` (and one step),
and the numbers go to the log and ``<out>/eval_log.jsonl``. The run stops at ``steps`` or after
``max_train_s`` seconds of training, whichever is first, and exports ``<out>/unet/`` (EMA)
and ``<out>/scheduler/`` (DDIM).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPTextModel

from imageragturbo.model.images import images_to_tensor
from imageragturbo.training.checkpoints import (
    config_from_json,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    seed_everything,
)
from imageragturbo.training.sampling import TeacherParts, encode_text, score_prompts
from imageragturbo.world.splits import eval_prompts, world_arrays

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher pretraining run (``configs/teacher.json``); saved inside every checkpoint."""

    vae_dir: str = "runs/vae/vae"
    clip_dir: str = "runs/clip"
    seed: int = 0
    steps: int = 6000
    max_train_s: float = 4200.0
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    block_out_channels: tuple[int, ...] = (64, 128, 192)
    layers_per_block: int = 1
    attention_heads: int = 4
    train_images: int = 40000
    checkpoint_every_s: float = 180.0
    eval_every_s: float = 600.0
    eval_prompts: int = 100
    eval_steps: int = 25
    eval_guidance: float = 3.0
    num_threads: int = 2


def scheduler_config() -> dict:
    """The noise schedule shared by training (DDPM) and sampling (DDIM)."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "clip_sample": False,
    }


def build_unet(cfg: TeacherConfig, cross_attention_dim: int) -> UNet2DConditionModel:
    """Cross-attention in every block (the prototype's 4x4-and-mid-only layout confused left/right)."""
    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        # diffusers' historical naming: attention_head_dim is read as the number of heads.
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=32,
    )


def load_frozen_parts(cfg: TeacherConfig) -> tuple:
    """(tokenizer, text_encoder, vae), all in eval mode without gradients."""
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.clip_dir) / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(Path(cfg.clip_dir) / "text_encoder", local_files_only=True).eval()
    vae = AutoencoderKL.from_pretrained(cfg.vae_dir, local_files_only=True).eval()
    for module in (text_encoder, vae):
        module.requires_grad_(False)
    return tokenizer, text_encoder, vae


@torch.no_grad()
def build_dataset(cfg: TeacherConfig, tokenizer, text_encoder, vae, cache: Path) -> dict[str, torch.Tensor]:
    """Latent posterior moments, caption indices and the caption context table.

    Returns tensors: ``mean``/``std`` float32 [N, 4, 8, 8] (unscaled), ``cap`` int64 [N],
    ``ctx`` float32 [C + 1, 16, D] with row C the empty caption. Cached in ``cache``
    (safetensors) because encoding 40k images takes minutes on a shared CPU.
    """
    if cache.is_file():
        return load_file(str(cache))
    images, captions, _ = world_arrays("train", cfg.train_images, seed=cfg.seed)
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    means, stds = [], []
    for i in range(0, len(images), 500):
        dist = vae.encode(images_to_tensor(images[i : i + 500])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    ctx = encode_text(tokenizer, text_encoder, uniq + [""])
    data = {
        "mean": torch.cat(means).contiguous(),
        "std": torch.cat(stds).contiguous(),
        "cap": torch.tensor([index[c] for c in captions], dtype=torch.int64),
        "ctx": ctx.contiguous(),
    }
    save_file(data, str(cache))
    logger.info("encoded %d train images with %d distinct captions", len(images), len(uniq))
    return data


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def evaluate(parts: TeacherParts, n_prompts: int, steps: int, guidance: float, split: str = "test-seen") -> dict:
    """Verifier scores of ``steps``-step CFG samples and of one-step samples on a prompt subset."""
    prompts = eval_prompts(split, n_prompts)
    multi, _ = score_prompts(parts, prompts, steps=steps, guidance=guidance)
    one, _ = score_prompts(parts, prompts, steps=1, guidance=1.0)
    return {
        f"{split}_{steps}step": multi.mean_score,
        f"{split}_{steps}step_strict": multi.strict,
        f"{split}_{steps}step_per_category": multi.per_category,
        f"{split}_1step": one.mean_score,
    }


def main(config_path: str | Path | None, out_dir: str | Path, steps: int | None = None, resume: bool = False, **overrides) -> dict:
    """Train (or resume) the teacher and export ``<out>/unet`` and ``<out>/scheduler``; return the last eval."""
    cfg = config_from_json(TeacherConfig, config_path, steps=steps, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)

    # 1. Frozen parts and the pre-encoded dataset.
    tokenizer, text_encoder, vae = load_frozen_parts(cfg)
    scaling = float(vae.config.scaling_factor)
    t_data = time.monotonic()
    data = build_dataset(cfg, tokenizer, text_encoder, vae, out / f"dataset_{cfg.train_images}.safetensors")
    logger.info("dataset ready in %.1f s", time.monotonic() - t_data)
    n_items, empty_idx = len(data["cap"]), len(data["ctx"]) - 1

    # 2. Model, EMA, optimizer, schedule.
    unet = build_unet(cfg, text_encoder.config.hidden_size)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    noise_sched = DDPMScheduler(**scheduler_config())
    sample_sched = DDIMScheduler(**scheduler_config())
    parts = TeacherParts(tokenizer, text_encoder, ema, vae, sample_sched)
    logger.info("UNet: %.2fM parameters", sum(p.numel() for p in unet.parameters()) / 1e6)

    step, elapsed_s = 0, 0.0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, {"unet": unet, "ema": ema}, opt)
        step, elapsed_s = state["step"], state["elapsed_s"]
        logger.info("resumed from %s at step %d (%.0f s trained)", ckpt, step, elapsed_s)

    # 3. Train.
    unet.train()
    t0 = time.monotonic() - elapsed_s
    last_ckpt = last_eval = time.monotonic()
    eval_log = out / "eval_log.jsonl"
    bar = tqdm(total=cfg.steps, initial=step, desc="teacher", mininterval=5.0)
    while step < cfg.steps and time.monotonic() - t0 < cfg.max_train_s:
        # Batch choice and noise depend only on (seed, step): a resumed run continues the same stream.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, n_items, (cfg.batch_size,), generator=gen)
        eps_post = torch.randn(cfg.batch_size, 4, 8, 8, generator=gen)
        z0 = (data["mean"][idx] + data["std"][idx] * eps_post) * scaling
        cap = data["cap"][idx]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cfg_dropout
        ctx = data["ctx"][torch.where(drop, empty_idx, cap)]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        z_t = noise_sched.add_noise(z0, noise, t)
        v_target = noise_sched.get_velocity(z0, noise, t)

        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        v_pred = unet(z_t, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(v_pred, v_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        # EMA warms up so early evaluations are not dominated by the random init.
        ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            logger.info("step %d loss %.5f lr %.2e elapsed %.0f s", step, loss.item(), opt.param_groups[0]["lr"], time.monotonic() - t0)
        if time.monotonic() - last_ckpt >= cfg.checkpoint_every_s:
            save_checkpoint(out, step, cfg, {"unet": unet, "ema": ema}, opt, {"elapsed_s": time.monotonic() - t0})
            last_ckpt = time.monotonic()
        if time.monotonic() - last_eval >= cfg.eval_every_s:
            t_eval = time.monotonic()
            result = {"step": step, "train_s": round(time.monotonic() - t0, 1), **evaluate(parts, cfg.eval_prompts, cfg.eval_steps, cfg.eval_guidance)}
            logger.info("eval %s (%.0f s)", result, time.monotonic() - t_eval)
            with eval_log.open("a") as f:
                f.write(json.dumps(result) + "\n")
            # Evaluation time is not training time.
            t0 += time.monotonic() - t_eval
            last_eval = time.monotonic()
    bar.close()
    save_checkpoint(out, step, cfg, {"unet": unet, "ema": ema}, opt, {"elapsed_s": time.monotonic() - t0})
    train_s = time.monotonic() - t0

    # 4. Export the EMA weights and the sampling schedule; evaluate once more.
    ema.save_pretrained(out / "unet", safe_serialization=True)
    sample_sched.save_pretrained(out / "scheduler")
    result = {"step": step, "train_s": round(train_s, 1), **evaluate(parts, cfg.eval_prompts, cfg.eval_steps, cfg.eval_guidance)}
    with eval_log.open("a") as f:
        f.write(json.dumps(result) + "\n")
    logger.info("teacher done: %s", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(args.config, args.out, steps=args.steps, resume=args.resume)
