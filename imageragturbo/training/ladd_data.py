"""A LADD run's data: the teacher's synthetic pairs, the real pairs and the training database
(with its rows in every style for ``style_targets`` runs)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imageragturbo.retrieval.searchers import ExactSearcher
from imageragturbo.retrieval.database import RetrievalDatabase
from imageragturbo.retrieval.store import InMemoryFeatureStore
from imageragturbo.model.images import tensor_to_images
from imageragturbo.model.loading import ModelComponents
from imageragturbo.model.noise import latent_shape
from imageragturbo.model.pipeline import RagTurboPipeline, decode_latents
from imageragturbo.training.ladd_config import LaddConfig

logger = logging.getLogger(__name__)


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


def real_database(config: LaddConfig, pipe: RagTurboPipeline) -> tuple[RetrievalDatabase, StyledRows | None]:
    """The real pairs / training database, and (``style_targets``) the same rows in every style."""
    kind, _, count = config.database.partition(":")
    if kind != "world":
        if config.style_targets:
            raise ValueError(f"style_targets needs a 'world:N' database, got {config.database!r}")
        from imageragturbo.retrieval.disk import load_database

        return load_database("train", config.database, model_id=pipe.components.model_id), None
    if not count.isdigit():
        raise ValueError(f"database must be 'world:N' or an index folder, got {config.database!r}")
    from imageragturbo.world.render import DEFAULT_STYLE, STYLE_NAMES
    from imageragturbo.world.splits import world_arrays

    # The train split never holds a purple triangle or a yellow square, and holds the tail at
    # 1/20 of its rate: what a generator may train on (docs/world.md). Every style renders the same
    # scenes, so text embeddings and search results are shared.
    # Without style targets the rows keep each item's drawn style (None).
    styles = STYLE_NAMES if config.style_targets else (None,)
    rows = {}
    for style in styles:
        images, captions, _ = world_arrays("train", int(count), seed=config.seed + 2, style=style)
        if config.exclude_phrases:
            keep = _kept(config, captions)
            images, captions = images[keep], [captions[i] for i in keep]
        rows[style] = _encode_rows(pipe, images, captions)
    z0, e_all, h = rows[DEFAULT_STYLE if config.style_targets else None]
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
        steps=config.teacher_steps, cfg_scale=config.cfg_scale, latent_shape=latent_shape(parts.unet),
    )
    syn_captions, syn_noise, syn_z0 = samples.get(needed)

    if config.exclude_phrases:
        keep = _kept(config, syn_captions)
        logger.info("left out %d of %d synthetic pairs (exclude_phrases)", len(syn_captions) - len(keep), len(syn_captions))
        syn_captions, syn_noise, syn_z0 = [syn_captions[i] for i in keep], syn_noise[keep], syn_z0[keep]
    pipe = RagTurboPipeline(parts)
    real, styled = real_database(config, pipe)
    syn_z0_styled = None
    if styled is not None:
        syn_z0_styled = _restyled_targets(pipe, syn_z0, styled.styles, config.seed + 4)
        logger.info("re-styled %d synthetic targets into %s", len(syn_captions), ", ".join(styled.styles))
    return TrainingData(syn_captions, syn_noise, syn_z0, real, styled, syn_z0_styled)


def _kept(config: LaddConfig, captions: list[str]) -> list[int]:
    """Indices of the captions that name none of ``config.exclude_phrases``."""
    return [i for i, caption in enumerate(captions) if not any(phrase in caption for phrase in config.exclude_phrases)]
