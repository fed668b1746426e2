"""Latent adversarial distillation (paper sec. 3.3-3.4, eq. 6-10), in one file that reads top to bottom.

Two runs share this loop:

- ``student``: distil the multi-step teacher into a one-step UNet (every UNet weight trains):
  our stand-in for SD-Turbo.
- ``adapter``: the one-step student is frozen; only the H-space adapter and a LoRA on the UNet
  decoder's attention train (the paper's method).

Per iteration:
1. a batch of (prompt, noise, target z0): synthetic pairs (the teacher's multi-step CFG samples
   from that very noise, cached once) mixed with real pairs (encoded renders / database rows);
2. (adapter) each prompt retrieves k neighbours from the *training* database, excluding the
   pair itself, so the adapter learns to use related content rather than copy its target;
   with ``style_targets`` each target gets a style drawn apart from its noise and its
   neighbours come from that style's rows (only retrieval knows the background); with
   ``retrieval: false`` (the control) the gate is fixed to 0;
3. the student predicts x0 in one pass at a timestep of its few-step schedule;
4. D step: the frozen teacher encoder's multi-stage features of noisy real and fake latents
   (z_s = a_s z0 + s_s eps, s uniform over all N timesteps, DiffusionGAN-style) go through small
   spectrally normalised heads conditioned on the prompt embedding and the noise level; hinge
   loss (eq. 6);
5. G step: L = L_adv (eq. 7) + alpha * smooth-L1 distillation to the teacher's z0 (eq. 8, synthetic
   pairs only: real pairs have no teacher target for their noise) + beta * latent perceptual
   loss (eq. 9) under random differentiable augmentations.

The paper's perceptual network F is VGG16 on pixels; there are no pixel-space weights here, so
F is the frozen teacher UNet encoder's multi-stage features of the clean latent (t = 0, empty
caption), unit-normalised per position like LPIPS. ``accelerate`` handles devices, mixed
precision and multi-GPU/multi-node, so the paper's 64-GPU run is a config change.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from tqdm import tqdm

from imageragturbo.model.adapter import HSpaceAdapter
from imageragturbo.model.denoiser import RagDenoiser
from imageragturbo.model.loading import ModelComponents, load_model, load_teacher_unet
from imageragturbo.model.retrieval_attention import decoder_cross_attentions
from imageragturbo.model.schedule import NoiseSchedule
from imageragturbo.model.text import PromptEncoder
from imageragturbo.model.unet_split import SplitUNet
from imageragturbo.training.checkpoints import config_to_dict, latest_checkpoint, load_checkpoint, save_checkpoint
from imageragturbo.training.ladd_config import LORA_TARGETS, STUDENT_TEXT_BLOCKS, LaddConfig, load_config
from imageragturbo.training.ladd_data import StyledRows, prepare_data, real_database
from imageragturbo.training.ladd_eval import evaluate, evaluate_style, one_step_images
from imageragturbo.training.ladd_losses import (
    DiscriminatorHeads,
    LatentDiscriminator,
    augment_pair,
    latent_perceptual_loss,
)
from imageragturbo.world.spec import swap_attribute

__all__ = [
    "LORA_TARGETS", "STUDENT_TEXT_BLOCKS", "LaddConfig", "build_generator", "evaluate", "evaluate_style", "export", "install", "load_config", "main", "one_step_images",
    "prepare_data", "real_database", "run",
]

logger = logging.getLogger(__name__)

def build_generator(config: LaddConfig, parts: ModelComponents, teacher: UNet2DConditionModel) -> RagDenoiser:
    """The one-step denoiser being trained: all of a teacher-initialised UNet (student mode), or
    the adapter + a decoder-attention LoRA on the frozen student (adapter mode). Its forward is
    the serving graph's, so training and serving run the same code."""
    if config.mode == "student":
        return RagDenoiser(_student_unet(config, teacher).requires_grad_(True).train(), None, "off")
    from peft import LoraConfig

    unet = parts.unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=LORA_TARGETS[config.lora_targets]))
    adapter = HSpaceAdapter(
        channels=unet.config.block_out_channels[-1],
        num_heads=config.adapter_heads,
        num_layers=config.adapter_layers,
        ff_mult=config.adapter_ff_mult,
        xattn_ctx_dim=int(unet.config.cross_attention_dim) if config.adapter_xattn else 0,
        xattn_layers=len(decoder_cross_attentions(unet)) if config.adapter_xattn else 0,
    )
    return RagDenoiser(unet, adapter, "adapter")


def _student_unet(config: LaddConfig, teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    """The student's initial UNet: a copy of the teacher, or (``student_text_blocks: mid`` or
    ``encoder``) the teacher's layout with plain up blocks (and, for ``mid``, plain down blocks)
    and every teacher weight that still has a place."""
    if config.student_text_blocks == "all":
        return copy.deepcopy(teacher)
    n = len(teacher.config.down_block_types)
    down = teacher.config.down_block_types if config.student_text_blocks == "encoder" else ("DownBlock2D",) * n
    unet = UNet2DConditionModel.from_config(
        {**teacher.config, "down_block_types": tuple(down), "up_block_types": ("UpBlock2D",) * n}
    )
    result = unet.load_state_dict(teacher.state_dict(), strict=False)
    if result.missing_keys or any(".attentions." not in key for key in result.unexpected_keys):
        raise ValueError(
            f"cannot initialise a {config.student_text_blocks} student from the teacher: missing {result.missing_keys[:5]}, "
            f"unexpected {[k for k in result.unexpected_keys if '.attentions.' not in k][:5]}"
        )
    return unet.to(teacher.device, teacher.dtype)


def run(config: LaddConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Train, checkpointing every ``checkpoint_every_s``; export the result to ``out_dir/export``."""
    from accelerate import Accelerator

    if config.mode not in ("student", "adapter"):
        raise ValueError(f"mode must be 'student' or 'adapter', got {config.mode!r}")
    if config.student_text_blocks not in STUDENT_TEXT_BLOCKS:
        raise ValueError(
            f"student_text_blocks must be one of {STUDENT_TEXT_BLOCKS}, got {config.student_text_blocks!r}"
        )
    if config.lora_targets not in LORA_TARGETS:
        raise ValueError(f"lora_targets must be one of {sorted(LORA_TARGETS)}, got {config.lora_targets!r}")
    if config.text_swap > 0 and (config.mode != "adapter" or not config.prompts.startswith("world:")
                                 or not config.database.startswith("world:")):
        raise ValueError(
            f"text_swap needs an adapter run on shapes-world prompts and database, got mode {config.mode!r}, "
            f"prompts {config.prompts!r}, database {config.database!r}"
        )
    if (config.style_targets or not config.retrieval) and config.mode != "adapter":
        raise ValueError(f"style_targets and retrieval: false need an adapter run, got mode {config.mode!r}")
    if config.copy_weight < 0 or (config.copy_weight > 0 and config.mode != "adapter"):
        raise ValueError(f"copy_weight must be >= 0 and needs an adapter run, got {config.copy_weight} in mode {config.mode!r}")
    if config.copy_text_drop and config.copy_weight <= 0:
        raise ValueError("copy_text_drop needs copy_weight > 0 (it changes the copy pass's prompt)")
    t_max = config.student_timesteps[0]
    if config.copy_start_t and (config.copy_weight <= 0 or not config.retrieval or not 0 < config.copy_start_t < t_max):
        raise ValueError(
            f"copy_start_t must be in [1, {t_max - 1}] (0: off) and needs copy_weight > 0 and retrieval "
            f"(the control's copy pass starts from noise), got {config.copy_start_t} with copy_weight "
            f"{config.copy_weight}, retrieval {config.retrieval}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=max(1, config.batch_size // (config.micro_batch_size * max(1, int(os.environ.get("WORLD_SIZE", "1"))))),
        cpu=not torch.cuda.is_available(),
    )
    device = accelerator.device

    # 1. models: frozen text encoder, VAE and teacher; the student side per mode
    parts = load_model(config.model_dir, base_only=True)
    if config.teacher_unet == "auto":
        teacher = load_teacher_unet(config.model_dir)
    else:
        teacher = UNet2DConditionModel.from_pretrained(config.teacher_unet, local_files_only=True, use_safetensors=True)
    teacher = teacher.float().to(device).eval().requires_grad_(False)
    schedule = NoiseSchedule.from_scheduler(parts.scheduler)
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder)
    data = prepare_data(config, parts, teacher, out_dir)
    generator = build_generator(config, parts, teacher).to(device)
    teacher_split = SplitUNet(teacher)
    text_dim = encoder([""]).q.shape[1]
    heads = DiscriminatorHeads(LatentDiscriminator.stage_channels(teacher), text_dim, config.disc_channels).to(device)
    g_params = [p for p in generator.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(g_params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    opt_d = torch.optim.AdamW(heads.parameters(), lr=config.disc_lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    generator, heads, opt_g, opt_d = accelerator.prepare(generator, heads, opt_g, opt_d)
    disc = LatentDiscriminator(teacher_split, heads)
    store, styled = data.real.store, data.styled
    eval_sets = [("test-seen", data.real)]
    if config.eval_index and config.mode == "adapter":
        from imageragturbo.retrieval.disk import load_database

        eval_database = load_database("eval", config.eval_index, model_id=parts.model_id)
        eval_sets += [("test-tail", eval_database), ("test-held", eval_database)]
    ctx_uncond = encoder([""]).ctx.clone().to(device)
    logger.info(
        "ladd %s: %d trainable generator parameters, %d discriminator-head parameters",
        config.mode, sum(p.numel() for p in g_params), sum(p.numel() for p in heads.parameters()),
    )

    step, elapsed_s = 0, 0.0
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        modules = {"generator_trainable": accelerator.unwrap_model(generator), "disc_heads": heads}
        state = load_checkpoint(checkpoint, modules, {"g": opt_g, "d": opt_d}, partial=frozenset({"generator_trainable"}))
        step, elapsed_s = state["step"], state["elapsed_s"]
        logger.info("resumed from %s at step %d", checkpoint, step)
    gen = torch.Generator().manual_seed(config.seed * 1000 + step)
    n_real = round(config.micro_batch_size * config.real_fraction)
    n_syn = config.micro_batch_size - n_real

    def scores() -> dict[str, float]:
        """The periodic evaluation: the verifier on each split (and, for ``copy_start_t`` runs,
        from the neighbour start too), for ``text_swap`` runs on
        test-seen with swapped generator prompts (what the neighbours carry), and for
        ``style_targets`` runs the share of outputs in their neighbours' style."""
        model, result = accelerator.unwrap_model(generator), {}
        for split, database in eval_sets:
            key = "verifier_" + split.replace("-", "_")
            result[key] = evaluate(config, parts, model, schedule, encoder, database, split)
            if config.copy_start_t:
                result[key + "_start"] = evaluate(
                    config, parts, model, schedule, encoder, database, split, start_t=config.copy_start_t
                )
        if config.text_swap > 0:
            result["verifier_test_seen_swapped"] = evaluate(
                config, parts, model, schedule, encoder, data.real, "test-seen", swapped=True
            )
        if styled is not None:
            result["style_match"] = evaluate_style(config, parts, model, schedule, encoder, data.real, styled)
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return result

    # A fresh run scores its starting point first, so every history carries its own baseline:
    # the bare student for an adapter run (zero-initialised adapter, LoRA at zero), the
    # teacher-initialised UNet for a student run.
    history = [{"step": 0, **scores()}] if config.eval_prompts and step == 0 else []
    last_checkpoint = time.monotonic()
    start = time.monotonic() - elapsed_s
    bar = tqdm(total=config.steps, initial=step, desc=f"ladd {config.mode}", unit="step")
    while step < config.steps:
        # 1. batch: synthetic (noise, teacher z0) pairs and real pairs with fresh noise
        syn_idx = torch.randint(0, len(data.syn_captions), (n_syn,), generator=gen)
        real_idx = torch.randint(0, len(store), (1, n_real), generator=gen).numpy()
        captions = [data.syn_captions[i] for i in syn_idx] + store.captions(real_idx)[0]
        style_idx = None
        if styled is not None:
            # The target's style, drawn independently of the noise and the prompt.
            style_idx = torch.randint(0, len(styled.styles), (len(captions),), generator=gen).numpy()
            real_z0 = torch.from_numpy(styled.z0[style_idx[n_syn:], real_idx[0]])
            syn_z0 = data.syn_z0_styled[torch.from_numpy(style_idx[:n_syn]), syn_idx]
        else:
            real_z0 = torch.from_numpy(np.asarray(store.latents(real_idx)[0], dtype=np.float32))
            syn_z0 = data.syn_z0[syn_idx]
        z0 = torch.cat([syn_z0, real_z0]).to(device)
        noise = torch.cat([data.syn_noise[syn_idx], torch.randn(n_real, *z0.shape[1:], generator=gen)]).to(device)
        is_syn = torch.arange(len(captions), device=device) < n_syn
        encoded = encoder(captions)
        # clone(): the encoder runs in inference mode, and autograd may not save inference tensors.
        ctx, q = encoded.ctx.clone().to(device), encoded.q.clone().to(device)

        # 2. the student's timestep: t = T from pure noise, or a lower few-step level from z0
        first = torch.rand(len(captions), generator=gen) < config.p_first_timestep
        lower = torch.tensor(config.student_timesteps[1:] or config.student_timesteps[:1])
        t = torch.where(first, config.student_timesteps[0], lower[torch.randint(0, len(lower), (len(captions),), generator=gen)])
        t = t.to(device)
        renoise = torch.randn(z0.shape, generator=gen).to(device)
        z_t = torch.where(first.to(device)[:, None, None, None], noise, schedule.add_noise(z0, renoise, t))

        # 3. retrieval from the training database, excluding the pair itself
        with accelerator.accumulate(generator):
            h_retr = lam = None
            if config.mode == "adapter":
                own = np.full(len(captions), -1)
                own[n_syn:] = real_idx[0]
                found = data.real.retrieve(q.cpu().numpy(), config.k, exclude=own)
                keep = found.ids
                # each item's neighbours in its target's style
                h_np = styled.h[style_idx[:, None], keep] if styled is not None else found.h
                h_retr = torch.from_numpy(h_np).to(device)
                lam = torch.from_numpy(found.gate).to(device)
                if not config.retrieval:
                    lam = torch.zeros_like(lam)  # the control: the gate fixed to 0
            ctx_g = ctx
            if config.text_swap > 0:
                swap = (torch.rand(len(captions), generator=gen) < config.text_swap).tolist()
                rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
                swapped = [swap_attribute(c, rng) if flag else c for c, flag in zip(captions, swap)]
                ctx_g = encoder(swapped).ctx.clone().to(device)
            if config.text_drop > 0:
                drop = (torch.rand(len(captions), generator=gen) < config.text_drop).to(device)
                ctx_g = torch.where(drop[:, None, None], ctx_uncond.expand_as(ctx), ctx_g)
            x0_hat = schedule.predict_x0(generator(z_t, t, ctx_g, h_retr, lam), z_t, t)

            # 4. discriminator step on noisy real vs fake latents, s uniform over all timesteps
            s = torch.randint(0, schedule.num_train_timesteps, (len(captions),), generator=gen).to(device)
            eps_s = torch.randn(z0.shape, generator=gen).to(device)
            real_logits = disc(schedule.add_noise(z0, eps_s, s), s, ctx, q)
            fake_logits = disc(schedule.add_noise(x0_hat.detach(), eps_s, s), s, ctx, q)
            loss_d = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits))
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(loss_d)
            opt_d.step()

            # 5. generator step: adversarial + alpha * distillation + beta * latent perceptual
            heads.requires_grad_(False)
            loss_adv = -sum(f.mean() for f in disc(schedule.add_noise(x0_hat, eps_s, s), s, ctx, q))
            heads.requires_grad_(True)
            if bool(is_syn.any()):
                loss_distill = F.smooth_l1_loss(x0_hat[is_syn], z0[is_syn], beta=1.0)
                aug_fake, aug_real = augment_pair(x0_hat[is_syn], z0[is_syn], gen)
                loss_lpips = latent_perceptual_loss(teacher_split, ctx_uncond, aug_fake, aug_real)
            else:
                loss_distill = loss_lpips = x0_hat.new_zeros(())
            loss_g = loss_adv + config.alpha * loss_distill + config.beta * loss_lpips
            loss_copy = x0_hat.new_zeros(())
            if config.copy_weight > 0:
                z_first = torch.from_numpy(copy_targets(store, styled, style_idx, keep[:, 0])).to(device)
                z_copy = torch.randn(z0.shape, generator=gen).to(device)
                t_copy = torch.full_like(t, config.copy_start_t or config.student_timesteps[0])
                if config.copy_start_t:
                    # one step from the neighbour noised to copy_start_t, as the pipeline's start_t
                    z_copy = schedule.add_noise(z_first, z_copy, t_copy)
                ctx_copy = ctx_uncond.expand_as(ctx) if config.copy_text_drop else ctx_g
                x0_copy = schedule.predict_x0(generator(z_copy, t_copy, ctx_copy, h_retr, lam), z_copy, t_copy)
                loss_copy = F.smooth_l1_loss(x0_copy, z_first, beta=1.0)
                loss_g = loss_g + config.copy_weight * loss_copy
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            opt_g.step()

        step += 1
        losses = {
            "d": loss_d.item(), "adv": loss_adv.item(), "distill": loss_distill.item(), "lpips": loss_lpips.item(),
        }
        if config.copy_weight > 0:
            losses["copy"] = loss_copy.item()
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {losses}")
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        record = {"step": step, **losses}
        if config.eval_prompts and (step % config.eval_every == 0 or step == config.steps):
            record.update(scores())
        history.append(record)
        if time.monotonic() - last_checkpoint > config.checkpoint_every_s or step == config.steps:
            with (out_dir / "history.jsonl").open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in history)
            history = []
            save_checkpoint(out_dir, step, config, {"generator_trainable": accelerator.unwrap_model(generator), "disc_heads": heads},
                            {"g": opt_g, "d": opt_d}, {"elapsed_s": time.monotonic() - start}, partial=frozenset({"generator_trainable"}))
            last_checkpoint = time.monotonic()
    bar.close()
    return export(config, parts, teacher, accelerator.unwrap_model(generator), out_dir / "export", time.monotonic() - start)


def export(config: LaddConfig, parts: ModelComponents, teacher, generator, out: Path, wall_s: float) -> Path:
    """Write a complete model directory: the source model's parts plus what this run trained."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(parts.model_dir, tmp, ignore=shutil.ignore_patterns("adapter", "unet_lora", "index", "databases", "no_retrieval", "paper_adapter", "README.md"))
    unet = generator.split.unet
    if config.mode == "student":
        shutil.rmtree(tmp / "unet", ignore_errors=True)
        copy.deepcopy(unet).half().save_pretrained(tmp / "unet", safe_serialization=True)
        shutil.rmtree(tmp / "teacher", ignore_errors=True)
        copy.deepcopy(teacher).half().save_pretrained(tmp / "teacher", safe_serialization=True)
    else:
        unet.save_lora_adapter(tmp / "unet_lora")
        copy.deepcopy(generator.adapter).half().save_pretrained(tmp / "adapter", safe_serialization=True)
    (tmp / f"ladd_{config.mode}.json").write_text(
        json.dumps({"config": config_to_dict(config), "wall_s": round(wall_s, 1)}, indent=2)
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("exported %s run to %s", config.mode, out)
    return out


INSTALLED_PARTS = {"student": ("unet", "teacher"), "adapter": ("adapter", "unet_lora")}


def copy_targets(store, styled: StyledRows | None, style_idx: np.ndarray | None, first: np.ndarray) -> np.ndarray:
    """The copy term's targets: each item's first neighbour's latent z0 as the generator was
    shown it, float32 [B, c, h, w]; in the item's target style for style_targets runs (the
    neighbour rendered on that style's background), else as stored."""
    if styled is not None:
        return np.ascontiguousarray(styled.z0[style_idx, first], dtype=np.float32)
    return np.asarray(store.latents(first[:, None]), dtype=np.float32)[:, 0]


def install(export_dir: Path, model_dir: Path, mode: str) -> None:
    """Put what a run trained into ``model_dir``: the student's ``unet/`` and ``teacher/``, or
    the ``adapter/`` and ``unet_lora/``. Each part is copied beside its target and renamed over
    it, so an interrupted install leaves every part either old or new, never half-written.
    A new student changes the UNet encoder, so an ``index/`` built with the old one is refused
    at load (by model identity) until it is rebuilt."""
    for part in INSTALLED_PARTS[mode]:
        staged = model_dir / f".{part}.new"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(export_dir / part, staged)
        old = model_dir / f".{part}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (model_dir / part).exists():
            (model_dir / part).rename(old)
        staged.rename(model_dir / part)
        shutil.rmtree(old, ignore_errors=True)
    logger.info("installed %s into %s", ", ".join(INSTALLED_PARTS[mode]), model_dir)


def main(
    config_path: str | Path | None,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    resume: bool = False,
    install_into: str | Path | None = None,
    **overrides,
) -> Path:
    config = load_config(config_path, steps=steps, **overrides)
    export_dir = run(config, out_dir, resume=resume)
    if install_into is not None:
        install(export_dir, Path(install_into), config.mode)
    return export_dir


