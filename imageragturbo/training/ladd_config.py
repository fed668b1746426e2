"""The LADD run's config (saved inside every checkpoint and export) and where the shipped ones live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imageragturbo.training.checkpoints import config_from_json

STUDENT_TEXT_BLOCKS = ("all", "encoder", "mid")
"""Where a student run's UNet reads the prompt (see ``LaddConfig.student_text_blocks``)."""

# The decoder's attention (the paper's LoRA), and with ``lora_targets: decoder`` also its ResNet
# convolutions: in a small UNet the up-blocks' ResNets read the H-space only beside the encoder's
# skip features of the same resolution, and learn to lean on the skips, so the LoRA must reach
# them for an adapter to steer the output (results/design-notes.md).
LORA_TARGETS = {
    "attention": r".*up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "decoder": r".*up_blocks\.\d+\.(attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|resnets\.\d+\.(conv1|conv2|conv_shortcut))",
}


@dataclass(frozen=True)
class LaddConfig:
    mode: str = "adapter"
    """``student`` (all UNet weights train, initialised from the teacher) or ``adapter``."""
    model_dir: str = "models/shapes-v2"
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
    teacher's architecture the decoder's cross-attention carries the content, which leaves an
    H-space adapter almost nothing to steer (results/design-notes.md). ``encoder`` keeps cross-attention
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
    copy_text_drop: bool = False
    """With ``copy_weight``: the copy pass sees the empty prompt, so the neighbours alone tell
    it what to draw (colour, shape, count, background); the main pass keeps the caption."""
    copy_start_t: int = 0
    """With ``copy_weight`` (beyond the paper; the training side of the pipeline's ``start_t``):
    the copy pass starts from that first neighbour's latent noised to this timestep (fresh
    noise) instead of pure noise at T, so the LoRA and adapter learn to finish a neighbour
    rather than redraw the prompt from the decoder's text prior. 0: pure noise. Needs
    ``retrieval``: the control's input would otherwise carry the neighbour, so its copy pass
    stays at pure noise. Measured (results/ladd-experiments.md section 10): at t = 499 it does
    not beat the bare student's own neighbour start on the tail."""
    style_targets: bool = False
    """Adapter runs on a ``world:N`` database (docs/world.md v2's styles): every item's target gets a
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
    adapter_xattn: bool = False
    """Beyond the paper: the adapter also feeds the neighbours' H tokens to the decoder's
    cross-attention as extra keys/values (zero-gated, IP-Adapter style;
    ``model/retrieval_attention.py``), for when the H-space path cannot carry what the
    database holds. Off: the paper's adapter (eq. 4-5) alone."""
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
    """Adapter runs: an index folder built with this model (e.g. ``models/shapes-v2/databases/grey``)
    that also holds the held-out and tail compositions at their natural rate; when set, the
    periodic evaluation also scores test-tail and test-held prompts retrieving from it. Evaluation only: training never reads it."""


def load_config(path: str | Path | None = None, **overrides) -> LaddConfig:
    return config_from_json(LaddConfig, path, **overrides)
