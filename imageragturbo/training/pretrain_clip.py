"""Pretrain the shapes world's tiny CLIP: a word-level tokenizer, a text tower and an image tower.

Usage::

    python -m imageragturbo.training.pretrain_clip --config imageragturbo/training/configs/clip.json \
        --out runs/clip [--steps N] [--resume]

Why contrastive: the text encoder is frozen for everything after it (teacher, student,
adapter) and its pooled output is the retrieval query. A text encoder trained only through
the denoising loss barely separates shapes in its pooled vector (docs/facts.md); one trained to
pick its image among many others has to encode every word that changes the picture.

Data: every caption of the grammar (525; docs/world.md v2: the text encoder / CLIP is a universal
component and sees every composition) with ``images_per_caption`` renders each, on uniformly
drawn styles, drawn once at start. A batch holds ``batch_size``
*distinct* captions, one random render each, so the InfoNCE targets are exact (no duplicate
caption is a false negative) and captions that differ only in a position word are negatives
of each other.

Model: ``transformers.CLIPModel``. The loss is InfoNCE in both directions with a learnable
temperature. The text side uses the text tower's ``pooler_output`` directly (the text
projection is a frozen identity), because that vector, L2-normalised, is the retrieval query
the serving code reads from ``CLIPTextModel``; the image side goes through a learned
projection into the same space.

Exports: ``<out>/tokenizer/``, ``<out>/text_encoder/`` (``CLIPTextModel``) and ``<out>/clip/``
(the whole ``CLIPModel``: image tower and both projections, for a CLIP-score analogue;
images enter as float [B, 3, 32, 32] in [-1, 1]). Retrieval quality is measured at the end
and written to ``<out>/metrics.json`` (see :func:`retrieval_metrics`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, PreTrainedTokenizerFast

from imageragturbo.model.images import images_to_tensor
from imageragturbo.training.checkpoints import (
    config_from_json,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    seed_everything,
)
from imageragturbo.world.render import render
from imageragturbo.world.spec import SceneSpec, all_specs, caption, parse_caption
from imageragturbo.world.splits import eval_prompts, item_rng, item_style, world_arrays, world_pairs
from imageragturbo.world.tokenizer import MODEL_MAX_LENGTH, build_world_tokenizer

logger = logging.getLogger(__name__)

# The per-caption render pool uses its own stream of the train split (see splits.item_rng).
_POOL_STREAM = 3


@dataclass(frozen=True)
class ClipConfig:
    """One CLIP pretraining run (``configs/clip.json``); saved inside every checkpoint."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 256
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1
    images_per_caption: int = 96
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    patch_size: int = 4
    init_temperature: float = 0.07
    checkpoint_every_s: float = 180.0
    eval_database: int = 2000
    eval_queries: int = 200
    num_threads: int = 2
    # Start from an exported CLIPModel (``<run>/clip``) instead of a random init.
    init_from: str | None = None
    # Weight of a supervised-contrastive text-text term whose positives are captions naming the
    # same set of (colour, shape) entities: image-text InfoNCE alone makes position words
    # dominate the pooled vector, which is useless for retrieving the right objects
    # (results/design-notes.md).
    entity_weight: float = 0.0
    entity_temperature: float = 0.1


def build_clip(cfg: ClipConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPModel:
    """A CLIPModel whose text config carries the tokenizer's bos/eos/pad ids.

    ``eos_token_id`` decides where ``pooler_output`` is read: at the first end-of-text token.
    """
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        projection_dim=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        projection_dim=cfg.text_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=32,
        patch_size=cfg.patch_size,
        num_channels=3,
    )
    config = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=cfg.text_hidden,
        logit_scale_init_value=math.log(1.0 / cfg.init_temperature),
    )
    model = CLIPModel(config)
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(cfg.text_hidden))
    model.text_projection.weight.requires_grad_(False)
    return model


def tokenize(tokenizer: PreTrainedTokenizerFast, captions: list[str]) -> torch.Tensor:
    """int64 [B, 16] ids, padded to the full length as the serving code does."""
    return tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def text_features(model: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    """float32 [B, D] L2-normalised pooled text output: the retrieval query."""
    return F.normalize(model.text_model(input_ids=input_ids).pooler_output, dim=-1)


def image_features(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """float32 [B, D] L2-normalised projected image features; ``pixels`` float [B, 3, 32, 32] in [-1, 1]."""
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def entity_loss(t: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised-contrastive loss over text features.

    Args:
        t: float32 [B, D] L2-normalised caption features.
        positives: bool [B, B], True where two captions name the same (colour, shape) set
            (the diagonal is ignored).
    Returns the mean over anchors with at least one positive of ``-mean log p(positive)``.
    """
    eye = torch.eye(len(t), dtype=torch.bool)
    logits = (t @ t.T / temperature).masked_fill(eye, float("-inf"))
    log_p = logits.log_softmax(-1).masked_fill(eye, 0.0)
    pos = positives & ~eye
    n_pos = pos.sum(-1)
    has = n_pos > 0
    if not has.any():
        return t.sum() * 0.0
    per_anchor = -(log_p * pos).sum(-1)[has] / n_pos[has]
    return per_anchor.mean()


def train_specs() -> list[SceneSpec]:
    """Every spec of the grammar (525): CLIP is universal (docs/world.md v2)."""
    return list(all_specs())


def render_pool(specs: list[SceneSpec], per_spec: int, seed: int) -> np.ndarray:
    """uint8 [len(specs), per_spec, 32, 32, 3]: renders of each spec from the universal split's streams, styles uniform."""
    pool = np.empty((len(specs), per_spec, 32, 32, 3), np.uint8)
    for i, spec in enumerate(specs):
        for j in range(per_spec):
            index = i * per_spec + j
            style = item_style("universal", seed, index)
            pool[i, j] = render(spec, item_rng("universal", seed, index, stream=_POOL_STREAM), style)
    return pool


@torch.no_grad()
def retrieval_metrics(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, cfg: ClipConfig) -> dict[str, float]:
    """Retrieval and zero-shot quality of the text tower and the whole CLIP.

    - ``held_top1_entities``: test-held prompts against a ``database`` split of
      ``eval_database`` pairs; the top-1 neighbour's caption names the same set of
      (colour, shape) entities.
    - ``*_absent_top4_entities``: the same, but every database entry whose caption equals the
      prompt is removed first; a hit is a top-4 neighbour naming all the prompt's entities
      (``*_absent_top4_union``: the top-4 together name them all).
    - ``*_absent_top1_entities``: top-1 of that, entity sets equal.
    - ``zero_shot_acc``: a test-seen image's best caption among all 525 is its own.
    """
    model.eval()
    db_pairs = world_pairs("database", cfg.eval_database, seed=0)
    db_captions = [c for _, c, _ in db_pairs]
    db_specs = [s for _, _, s in db_pairs]
    db = text_features(model, tokenize(tokenizer, db_captions))  # [N, D]
    out: dict[str, float] = {}
    for split in ("test-held", "test-seen"):
        prompts = [c for c, _ in eval_prompts(split, cfg.eval_queries)]
        q = text_features(model, tokenize(tokenizer, prompts))  # [Q, D]
        sims = q @ db.T  # [Q, N]
        top1, absent1, absent4, union4 = [], [], [], []
        for qi, prompt in enumerate(prompts):
            want = parse_caption(prompt).pairs
            order = torch.argsort(sims[qi], descending=True).tolist()
            top1.append(db_specs[order[0]].pairs == want)
            rest = [j for j in order if db_captions[j] != prompt]
            absent1.append(db_specs[rest[0]].pairs == want)
            absent4.append(any(db_specs[j].pairs >= want for j in rest[:4]))
            union4.append(want <= frozenset().union(*(db_specs[j].pairs for j in rest[:4])))
        key = split.replace("test-", "")
        out[f"{key}_top1_entities"] = float(np.mean(top1))
        out[f"{key}_absent_top1_entities"] = float(np.mean(absent1))
        out[f"{key}_absent_top4_entities"] = float(np.mean(absent4))
        out[f"{key}_absent_top4_union"] = float(np.mean(union4))
    # Captions differing only in a position word must stay apart: mean and max cosine of such pairs.
    singles = [s for s in all_specs() if s.kind == "single"]
    emb = text_features(model, tokenize(tokenizer, [caption(s) for s in singles]))
    same_obj = [(i, j) for i in range(len(singles)) for j in range(i + 1, len(singles)) if singles[i].pairs == singles[j].pairs]
    cos = torch.stack([emb[i] @ emb[j] for i, j in same_obj])
    out["position_only_cos_mean"] = float(cos.mean())
    out["position_only_cos_max"] = float(cos.max())
    # Zero-shot classification of test-seen images among every caption of the grammar.
    all_caps = [caption(s) for s in all_specs()]
    t_all = F.normalize(model.text_projection(model.text_model(input_ids=tokenize(tokenizer, all_caps)).pooler_output), dim=-1)
    images, captions, _ = world_arrays("test-seen", 500, seed=11)
    v = image_features(model, images_to_tensor(images))
    pred = (v @ t_all.T).argmax(-1).tolist()
    out["zero_shot_acc"] = float(np.mean([all_caps[p] == c for p, c in zip(pred, captions)]))
    model.train()
    return out


def export(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write ``tokenizer/``, ``text_encoder/`` (CLIPTextModel) and ``clip/`` (CLIPModel) under ``out``."""
    tokenizer.save_pretrained(out / "tokenizer")
    text_encoder = CLIPTextModel(model.config.text_config)
    text_encoder.load_state_dict(model.text_model.state_dict())
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    model.save_pretrained(out / "clip", safe_serialization=True)


def main(config_path: str | Path | None, out_dir: str | Path, steps: int | None = None, resume: bool = False, **overrides) -> dict:
    """Train (or resume) a CLIP run and export it; return its retrieval metrics."""
    cfg = config_from_json(ClipConfig, config_path, steps=steps, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)

    tokenizer = build_world_tokenizer()
    model = build_clip(cfg, tokenizer)
    if cfg.init_from is not None:
        model.load_state_dict(CLIPModel.from_pretrained(cfg.init_from, local_files_only=True).state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed_s = 0, 0.0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, {"clip": model}, opt)
        step, elapsed_s = state["step"], state["elapsed_s"]
        logger.info("resumed from %s at step %d", ckpt, step)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("CLIP: %.2fM parameters (text %.2fM)", n_params / 1e6, sum(p.numel() for p in model.text_model.parameters()) / 1e6)

    specs = train_specs()
    if cfg.batch_size > len(specs):
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(specs)} distinct train captions")
    t_pool = time.monotonic()
    pool = render_pool(specs, cfg.images_per_caption, cfg.seed)
    ids_all = tokenize(tokenizer, [caption(s) for s in specs])  # [525, 16]
    entity_sets = [s.pairs for s in specs]
    same_entities = torch.tensor([[a == b for b in entity_sets] for a in entity_sets])  # bool [525, 525]
    logger.info("rendered %d pool images in %.1f s", pool.shape[0] * pool.shape[1], time.monotonic() - t_pool)

    model.train()
    t0 = time.monotonic() - elapsed_s
    last_ckpt = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=step, desc="clip", mininterval=5.0)
    while step < cfg.steps:
        # Batch choice depends only on (seed, step), so a resumed run continues the same stream.
        rng = np.random.default_rng([cfg.seed, step])
        caps = rng.choice(len(specs), size=cfg.batch_size, replace=False)
        imgs = pool[caps, rng.integers(0, cfg.images_per_caption, size=cfg.batch_size)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        t = text_features(model, ids_all[caps])
        v = image_features(model, images_to_tensor(imgs))
        scale = model.logit_scale.exp().clamp(max=100.0)
        logits = scale * v @ t.T  # [B, B]: image i vs caption j
        target = torch.arange(cfg.batch_size)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        if cfg.entity_weight > 0:
            loss = loss + cfg.entity_weight * entity_loss(t, same_entities[caps][:, caps], cfg.entity_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            acc = (logits.argmax(-1) == target).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            logger.info("step %d loss %.4f batch-acc %.3f temp %.4f", step, loss.item(), acc, 1.0 / scale.item())
        if time.monotonic() - last_ckpt >= cfg.checkpoint_every_s or step == cfg.steps:
            save_checkpoint(out, step, cfg, {"clip": model}, opt, {"elapsed_s": time.monotonic() - t0})
            last_ckpt = time.monotonic()
    bar.close()
    train_s = time.monotonic() - t0

    export(model, tokenizer, out)
    metrics = {"steps": step, "train_wall_s": round(train_s, 1), **retrieval_metrics(model, tokenizer, cfg)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("CLIP done: %s", metrics)
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
