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
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from imageragturbo.index.searchers import ExactSearcher
from imageragturbo.index.store import InMemoryFeatureStore, RetrievalDatabase
from imageragturbo.model.adapter import HSpaceAdapter, retrieval_gate
from imageragturbo.model.denoiser import RagDenoiser
from imageragturbo.model.loading import ModelComponents, load_model, load_teacher_unet
from imageragturbo.model.pipeline import RagTurboPipeline, decode_latents
from imageragturbo.model.schedule import NoiseSchedule
from imageragturbo.model.text import PromptEncoder
from imageragturbo.model.unet_split import SplitUNet
from imageragturbo.training.pretrain_checkpoints import config_from_json, config_to_dict, tensor_to_images
from imageragturbo.world.spec import swap_attribute

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
STUDENT_TEXT_BLOCKS = ("all", "encoder", "mid")
"""Where a student run's UNet reads the prompt (see ``LaddConfig.student_text_blocks``)."""

# The decoder's attention (the paper's LoRA), and with ``lora_targets: decoder`` also its ResNet
# convolutions: in a small UNet the up-blocks' ResNets read the H-space only beside the encoder's
# skip features of the same resolution, and learn to lean on the skips (measured on shapes-v1's
# student at t = T: zeroing H moves its output by 2%, swapping the skips by 80%).
LORA_TARGETS = {
    "attention": r".*up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "decoder": r".*up_blocks\.\d+\.(attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|resnets\.\d+\.(conv1|conv2|conv_shortcut))",
}


@dataclass(frozen=True)
class LaddConfig:
    mode: str = "adapter"
    """``student`` (all UNet weights train, initialised from the teacher) or ``adapter``."""
    model_dir: str = "models/shapes-v1"
    """Tokenizer, text encoder, VAE, scheduler (and, for ``adapter``, the frozen student UNet)."""
    teacher_unet: str = "auto"
    """A UNet folder, or ``auto``: the model's ``teacher/`` if it has one, else its ``unet/``
    (a model that is still only its teacher)."""
    prompts: str = "world:train"
    """``world:train`` (shapes-world train captions) or a text file with one prompt per line."""
    database: str = "world:4096"
    """Real pairs and the retrieval database: ``world:N`` (N train-split renders, encoded here)
    or an index folder built by ``build-index`` with this model (its z0, text embeddings and
    H-features are gathered per batch from the memory-mapped store)."""
    synthetic_pairs: int = 4096
    teacher_steps: int = 25
    cfg_scale: float = 7.5
    real_fraction: float = 0.25
    steps: int = 2000
    batch_size: int = 64
    """Global batch; ``micro_batch_size`` x gradient accumulation x processes."""
    micro_batch_size: int = 64
    lr: float = 1e-4
    disc_lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    alpha: float = 2.5
    beta: float = 1.0
    k: int = 4
    student_timesteps: tuple[int, ...] = (999, 749, 499, 249)
    p_first_timestep: float = 0.5
    """Share of iterations at t = T (pure noise); the rest are spread over the other few-step levels."""
    student_text_blocks: str = "all"
    """Student runs: ``all`` keeps the teacher's architecture; ``mid`` gives the student
    cross-attention only in its mid-block (plain down and up blocks, initialised from the
    teacher's ResNets), so that the prompt reaches the image only through the H-space. In the
    teacher's architecture the decoder's cross-attention carries the content (replacing H by
    another prompt's moves a one-step output by ~2%, the decoder's text context by ~90%),
    which leaves an H-space adapter almost nothing to steer. ``encoder`` keeps cross-attention
    in the down blocks and the mid-block and drops it from the up blocks: the decoder sees the
    prompt only through the H-space and the skip connections."""
    exclude_phrases: tuple[str, ...] = ()
    """Training pairs whose caption contains one of these phrases (e.g. "green circle") are
    left out, synthetic and real alike. A student trained without some compositions of the
    train split lets an adapter trained on the whole split meet prompts that the student's
    text path cannot draw but its neighbours show: the situation retrieval is for."""
    text_drop: float = 0.0
    """Adapter runs: share of items whose cross-attention context is the empty prompt's for
    the generator, while retrieval, the discriminator and the targets keep the real prompt.
    Without it the prompt already carries all that same-caption neighbours carry, and the
    adapter learns to ignore them; with it, content must come through the H-space."""
    text_swap: float = 0.0
    """Adapter runs on shapes-world prompts: share of items whose generator caption has one
    entity's colour or shape swapped for another (never into a held-out composition), while
    retrieval, the discriminator and the targets keep the true caption. The text path then
    names the wrong thing, as it does for a composition the student never learned, and the
    right content has to come from the retrieved neighbours through the H-space."""
    copy_weight: float = 0.0
    """Adapter runs: weight of an auxiliary term that is not in the paper. A second one-step
    pass from fresh pure noise, with the same prompt context and neighbours, is pulled towards
    the first retrieved neighbour's latent (smooth L1), the optimum of which is the H that
    draws the neighbour (`imageragturbo eval probe --fit-steps`). The paper's losses never ask
    the adapter to carry a neighbour's content; this one does, on train-split neighbours only."""
    style_targets: bool = False
    """Adapter runs on a ``world:N`` database (WORLD.md v2's styles): every item's target gets a
    style drawn independently of its noise and prompt, and its neighbours come from the training
    database rendered in that style. The teacher's samples are re-styled in pixel space
    (``world.style.restyle``: the objects kept, the background moved into the band) and
    re-encoded by the universal VAE; real pairs are rendered in the drawn style. No caption
    names the style, so only the retrieved H-features can tell the generator the background:
    reading the neighbours is what the loss rewards."""
    retrieval: bool = True
    """``False`` is the control the paper never ran: the same adapter run (same data, steps,
    LoRA, trainable parameters) with the gate fixed to 0, so nothing retrieved reaches the
    image. Claims about retrieval are made against this run, not against the untouched student."""
    lora_rank: int = 8
    lora_targets: str = "attention"
    """``attention`` (the decoder's attention projections) or ``decoder`` (those and the
    up-blocks' ResNet convolutions)."""
    adapter_heads: int = 8
    adapter_layers: int = 1
    adapter_ff_mult: int = 0
    disc_channels: int = 64
    mixed_precision: str = "no"
    seed: int = 0
    num_threads: int = 2
    checkpoint_every_s: float = 180.0
    eval_every: int = 250
    eval_prompts: int = 64
    """Verifier score on this many shapes-world test-seen prompts during training (0: none)."""
    eval_index: str = ""
    """Adapter runs: an index folder built with this model (e.g. ``models/shapes-v1/index``)
    that also holds the held-out and tail compositions at their natural rate; when set, the
    periodic evaluation also scores test-tail and test-held prompts retrieving from it. Evaluation only: training never reads it."""


def load_config(path: str | Path | None = None, **overrides) -> LaddConfig:
    return config_from_json(LaddConfig, path, **overrides)


# -- data -------------------------------------------------------------------------------------


@dataclass
class StyledRows:
    """The training database rendered in every style: the same scenes and captions (so one
    searcher and one set of text embeddings serve all styles), each style's latents and H."""

    styles: tuple[str, ...]
    z0: np.ndarray  # float32 [S, N, c, h, w]
    h: np.ndarray  # float32 [S, N, C, h', w']


@dataclass
class TrainingData:
    """Synthetic pairs (noise -> teacher z0) and the real pairs' database (retrieval + D's reals)."""

    syn_captions: list[str]
    syn_noise: torch.Tensor  # float32 [N, c, h, w]
    syn_z0: torch.Tensor  # float32 [N, c, h, w]: the teacher's CFG sample from syn_noise
    real: RetrievalDatabase  # store rows: z0, L2-normalised text embedding, H at t = 0, caption
    styled: StyledRows | None = None  # style_targets runs: the database in every style
    syn_z0_styled: torch.Tensor | None = None  # float32 [S, N, c, h, w]: syn_z0 re-styled per style


def _train_prompts(config: LaddConfig, n: int) -> list[str]:
    if config.prompts == "world:train":
        from imageragturbo.world.splits import world_pairs

        return [caption for _, caption, _ in world_pairs("train", n, seed=config.seed + 1)]
    lines = [line.strip() for line in Path(config.prompts).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {config.prompts} holds no prompt")
    rng = np.random.default_rng(config.seed)
    return [lines[i] for i in rng.integers(0, len(lines), size=n)]


def _encode_rows(pipe: RagTurboPipeline, images: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] + captions -> (z0, e, h) float32 numpy rows, in chunks of 256."""
    z0, e, h = [], [], []
    for start in range(0, len(captions), 256):
        z0.append(pipe.encode_images(images[start : start + 256]))
        e_chunk, h_chunk = pipe.encode_database_rows(z0[-1], captions[start : start + 256])
        e.append(e_chunk)
        h.append(h_chunk)
    return torch.cat(z0).numpy(), torch.cat(e).numpy(), torch.cat(h).numpy()


def _real_database(config: LaddConfig, pipe: RagTurboPipeline) -> tuple[RetrievalDatabase, StyledRows | None]:
    """The real pairs / training database, and (``style_targets``) the same rows in every style."""
    kind, _, count = config.database.partition(":")
    if kind != "world":
        if config.style_targets:
            raise ValueError(f"style_targets needs a 'world:N' database, got {config.database!r}")
        from imageragturbo.index.disk import load_database

        return load_database("train", config.database, model_id=pipe.components.model_id), None
    if not count.isdigit():
        raise ValueError(f"database must be 'world:N' or an index folder, got {config.database!r}")
    from imageragturbo.world.render import DEFAULT_STYLE, STYLE_NAMES
    from imageragturbo.world.splits import world_arrays

    # The train split never holds a purple triangle or a yellow square, and holds the tail at
    # 1/20 of its rate: what a generator may train on (WORLD.md). Every style renders the same
    # scenes, so text embeddings and search results are shared.
    styles = STYLE_NAMES if config.style_targets else (DEFAULT_STYLE,)
    rows = {}
    for style in styles:
        images, captions, _ = world_arrays("train", int(count), seed=config.seed + 2, style=style if config.style_targets else None)
        if config.exclude_phrases:
            keep = _kept(config, captions)
            images, captions = images[keep], [captions[i] for i in keep]
        rows[style] = _encode_rows(pipe, images, captions)
    z0, e_all, h = rows[DEFAULT_STYLE]
    store = InMemoryFeatureStore(e_all, h, captions, pipe.components.model_id, z0=z0)
    database = RetrievalDatabase("train", ExactSearcher(e_all), store)
    if not config.style_targets:
        return database, None
    styled = StyledRows(styles, np.stack([rows[s][0] for s in styles]), np.stack([rows[s][2] for s in styles]))
    return database, styled


def _restyled_targets(pipe: RagTurboPipeline, z0: torch.Tensor, styles: tuple[str, ...], seed: int) -> torch.Tensor:
    """The teacher's samples float32 [N, c, h, w] re-styled into each style: float32 [S, N, c, h, w].

    Decoded, their background moved into the style's band in pixel space (objects kept), and
    re-encoded by the (universal) VAE."""
    from imageragturbo.world.style import restyle

    rng = np.random.default_rng(seed)
    out = torch.empty(len(styles), *z0.shape)
    with torch.inference_mode():
        for start in range(0, len(z0), 256):
            images = tensor_to_images(decode_latents(pipe.components.vae, z0[start : start + 256].to(pipe.device)))
            for si, style in enumerate(styles):
                moved = np.stack([restyle(im, style, rng) for im in images])
                out[si, start : start + len(images)] = pipe.encode_images(moved).cpu()
    return out


def prepare_data(config: LaddConfig, parts: ModelComponents, teacher, out_dir: Path) -> TrainingData:
    """The teacher's synthetic pairs (from the shared cache, sampling what it lacks) and the encoded real pairs."""
    from imageragturbo.training.teacher_samples import TeacherSamples

    # A run samples only the pairs its steps can draw; the shared cache keeps them for the next.
    n_syn = config.micro_batch_size - round(config.micro_batch_size * config.real_fraction)
    needed = min(config.synthetic_pairs, max(1, config.steps * n_syn))
    source = {"prompts": config.prompts}
    if not config.prompts.startswith("world:"):
        source["sha256"] = hashlib.sha256(Path(config.prompts).read_bytes()).hexdigest()
    samples = TeacherSamples(
        teacher=teacher, tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, scheduler=parts.scheduler,
        prompts=lambda n: _train_prompts(config, n), source=source, seed=config.seed + 3,
        steps=config.teacher_steps, cfg_scale=config.cfg_scale, latent_shape=_latent_shape(parts.unet),
    )
    syn_captions, syn_noise, syn_z0 = samples.get(needed)

    if config.exclude_phrases:
        keep = _kept(config, syn_captions)
        logger.info("left out %d of %d synthetic pairs (exclude_phrases)", len(syn_captions) - len(keep), len(syn_captions))
        syn_captions, syn_noise, syn_z0 = [syn_captions[i] for i in keep], syn_noise[keep], syn_z0[keep]
    pipe = RagTurboPipeline(parts)
    real, styled = _real_database(config, pipe)
    syn_z0_styled = None
    if styled is not None:
        syn_z0_styled = _restyled_targets(pipe, syn_z0, styled.styles, config.seed + 4)
        logger.info("re-styled %d synthetic targets into %s", len(syn_captions), ", ".join(styled.styles))
    return TrainingData(syn_captions, syn_noise, syn_z0, real, styled, syn_z0_styled)


def _kept(config: LaddConfig, captions: list[str]) -> list[int]:
    """Indices of the captions that name none of ``config.exclude_phrases``."""
    return [i for i, caption in enumerate(captions) if not any(phrase in caption for phrase in config.exclude_phrases)]


def _latent_shape(unet) -> tuple[int, int, int]:
    """(channels, height, width) of the UNet's latents."""
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, *hw)


# -- discriminator and perceptual features ---------------------------------------------------


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


# -- the run -----------------------------------------------------------------------------------


def _save_checkpoint(out_dir: Path, step: int, config: LaddConfig, generator, heads, opt_g, opt_d, elapsed_s: float) -> None:
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".tmp_step_{step:08d}", root / f"step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {n: p.detach().cpu().contiguous() for n, p in generator.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "generator_trainable.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(tmp / "disc_heads.safetensors"))
    torch.save({"g": opt_g.state_dict(), "d": opt_d.state_dict()}, tmp / "optimizers.pt")
    (tmp / "config.json").write_text(json.dumps({"config": config_to_dict(config), "step": step}, indent=2))
    (tmp / "state.json").write_text(json.dumps({"step": step, "elapsed_s": elapsed_s}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)


def _load_checkpoint(path: Path, generator, heads, opt_g, opt_d) -> dict:
    trainable = load_file(str(path / "generator_trainable.safetensors"))
    missing = generator.load_state_dict(trainable, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"checkpoint {path} has parameters this run does not train: {missing.unexpected_keys[:5]}")
    heads.load_state_dict(load_file(str(path / "disc_heads.safetensors")))
    optimizers = torch.load(path / "optimizers.pt", weights_only=True)
    opt_g.load_state_dict(optimizers["g"])
    opt_d.load_state_dict(optimizers["d"])
    return json.loads((path / "state.json").read_text())


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
    store, searcher, styled = data.real.store, data.real.searcher, data.styled
    eval_sets = [("test-seen", data.real)]
    if config.eval_index and config.mode == "adapter":
        from imageragturbo.index.disk import load_database

        eval_database = load_database("eval", config.eval_index, model_id=parts.model_id)
        eval_sets += [("test-tail", eval_database), ("test-held", eval_database)]
    ctx_uncond = encoder([""]).ctx.clone().to(device)
    logger.info(
        "ladd %s: %d trainable generator parameters, %d discriminator-head parameters",
        config.mode, sum(p.numel() for p in g_params), sum(p.numel() for p in heads.parameters()),
    )

    step, elapsed_s = 0, 0.0
    checkpoints = sorted((out_dir / "checkpoints").glob("step_*"))
    if resume and checkpoints:
        state = _load_checkpoint(checkpoints[-1], accelerator.unwrap_model(generator), heads, opt_g, opt_d)
        step, elapsed_s = state["step"], state["elapsed_s"]
        logger.info("resumed from %s at step %d", checkpoints[-1], step)
    gen = torch.Generator().manual_seed(config.seed * 1000 + step)
    n_real = round(config.micro_batch_size * config.real_fraction)
    n_syn = config.micro_batch_size - n_real

    def scores() -> dict[str, float]:
        """The periodic evaluation: the verifier on each split, for ``text_swap`` runs on
        test-seen with swapped generator prompts (what the neighbours carry), and for
        ``style_targets`` runs the share of outputs in their neighbours' style."""
        model, result = accelerator.unwrap_model(generator), {}
        for split, database in eval_sets:
            result["verifier_" + split.replace("-", "_")] = evaluate(config, parts, model, schedule, encoder, database, split)
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
                ids, _ = searcher.search(q.cpu().numpy(), config.k + 1)
                own = np.full(len(captions), -1)
                own[n_syn:] = real_idx[0]
                keep = np.stack([row[row != self_id][: config.k] for row, self_id in zip(ids, own)])
                if styled is not None:
                    h_np = styled.h[style_idx[:, None], keep]  # each item's neighbours in its target's style
                else:
                    h_np = np.asarray(store.h_features(keep), dtype=np.float32)
                h_retr = torch.from_numpy(h_np).to(device)
                lam = retrieval_gate(q, torch.from_numpy(np.asarray(store.text_embeddings(keep), dtype=np.float32)).to(device))
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
                z_first = torch.from_numpy(np.asarray(store.latents(keep[:, :1]), dtype=np.float32)[:, 0]).to(device)
                z_pure = torch.randn(z0.shape, generator=gen).to(device)
                t_top = torch.full_like(t, config.student_timesteps[0])
                x0_copy = schedule.predict_x0(generator(z_pure, t_top, ctx_g, h_retr, lam), z_pure, t_top)
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
            _save_checkpoint(out_dir, step, config, accelerator.unwrap_model(generator), heads, opt_g, opt_d, time.monotonic() - start)
            last_checkpoint = time.monotonic()
    bar.close()
    return export(config, parts, teacher, accelerator.unwrap_model(generator), out_dir / "export", time.monotonic() - start)


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
) -> np.ndarray:
    """uint8 [P, H, W, 3]: one-step images of (caption, seed) ``prompts``, retrieving from ``database``.

    ``h_rows`` (float [N, C, h, w]) replaces the store's H-features (the same rows in another
    style); ``swapped``: the generator's prompt has one colour or shape swapped (as
    ``text_swap`` trains), while retrieval keeps the true caption.
    """
    captions = [p for p, _ in prompts]
    device = next(generator.parameters()).device
    latent_shape = _latent_shape(parts.unet)
    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for _, s in prompts])
    noise = noise.to(device)
    encoded = encoder(captions)
    t = torch.full((len(captions),), config.student_timesteps[0], device=device)
    h_retr = lam = None
    if generator.mode == "adapter":
        ids, _ = database.searcher.search(encoded.q.cpu().numpy(), config.k)
        h_np = h_rows[ids] if h_rows is not None else np.asarray(database.store.h_features(ids), dtype=np.float32)
        h_retr = torch.from_numpy(h_np).to(device)
        lam = retrieval_gate(encoded.q, torch.from_numpy(np.asarray(database.store.text_embeddings(ids), dtype=np.float32)).to(device))
        if not config.retrieval:
            lam = torch.zeros_like(lam)
    ctx = encoded.ctx
    if swapped:
        rng = np.random.default_rng(0)
        ctx = encoder([swap_attribute(c, rng) for c in captions]).ctx
    was_training = generator.training
    generator.eval()
    x0 = schedule.predict_x0(generator(noise, t, ctx, h_retr, lam), noise, t)
    generator.train(was_training)
    return tensor_to_images(decode_latents(parts.vae, x0))


def evaluate(config, parts, generator, schedule, encoder, database, split: str = "test-seen", swapped: bool = False) -> float:
    """One-step verifier score on ``config.eval_prompts`` shapes-world prompts of ``split``,
    retrieving from ``database`` (``swapped``: see :func:`one_step_images`)."""
    from imageragturbo.world.splits import eval_prompts
    from imageragturbo.world.verifier import verify_batch

    prompts = eval_prompts(split, config.eval_prompts)
    images = one_step_images(config, parts, generator, schedule, encoder, database, prompts, swapped)
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


def export(config: LaddConfig, parts: ModelComponents, teacher, generator, out: Path, wall_s: float) -> Path:
    """Write a complete model directory: the source model's parts plus what this run trained."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(parts.model_dir, tmp, ignore=shutil.ignore_patterns("adapter", "unet_lora", "index", "databases", "no_retrieval", "README.md"))
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


