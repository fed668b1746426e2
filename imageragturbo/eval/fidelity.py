"""Prompt fidelity on the shapes world: the verifier's scores per split and category.

``evaluate_fidelity`` scores one configuration (a mode, a step count, or the multi-step
teacher) on fixed prompts and seeds (``imageragturbo.world.splits.eval_prompts``);
``eval/table.py`` runs every row of the paper in miniature over seed sets.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imageragturbo.errors import ConfigError
from imageragturbo.model.images import tensor_to_images
from imageragturbo.model.noise import initial_noise
from imageragturbo.model.pipeline import RagTurboPipeline, decode_latents
from imageragturbo.model.sampling import sample_multistep
from imageragturbo.world.verifier import BenchmarkResult, aggregate, verify

logger = logging.getLogger(__name__)

SPLITS = ("test-seen", "test-tail", "test-held")
ORACLE_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(1, 10))


@dataclass(frozen=True)
class RowSpec:
    """One configuration to score: a pipeline mode at some step count, or the teacher."""

    name: str
    mode: str  # adapter | inject | off | teacher
    steps: int = 1
    inject_w: float | None = 0.8  # None with mode inject: the per-prompt oracle over ORACLE_WEIGHTS
    cfg_scale: float = 7.5  # teacher only
    start_t: int | None = None
    """Start from the top-1 neighbour's latent noised to this timestep (``RagTurboPipeline``'s
    ``start_t``) instead of from pure noise."""
    with_lora: bool = False
    """Run through the adapter run's decoder LoRA. ``adapter`` rows always do; ``off`` and
    ``inject`` rows are the plain one-step student unless this is set (an ablation)."""

    @property
    def nfe(self) -> int:
        """UNet evaluations per image (CFG doubles the teacher's)."""
        return self.steps * (2 if self.mode == "teacher" and self.cfg_scale != 1.0 else 1)


@dataclass
class FidelityResult:
    row: RowSpec
    split: str
    benchmark: BenchmarkResult
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]
    wall_s: float
    extra: dict = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)  # the verifier's score of each image, in prompt order

    def as_dict(self) -> dict:
        return {
            "row": self.row.name,
            "mode": self.row.mode,
            "steps": self.row.steps,
            "nfe": self.row.nfe,
            "inject_w": self.row.inject_w,
            "split": self.split,
            "wall_s": round(self.wall_s, 2),
            **self.benchmark.as_dict(),
            **self.extra,
        }


def load_prompts(prompts: str, n: int) -> list[tuple[str, int]]:
    """``test-seen`` / ``test-held`` (the fixed lists), or a file of ``caption[<TAB>seed]`` lines."""
    if prompts in SPLITS:
        from imageragturbo.world.splits import eval_prompts

        return eval_prompts(prompts, n)
    path = Path(prompts)
    if not path.is_file():
        raise ConfigError(f"prompts must be one of {SPLITS} or a file, got {prompts!r} (no such file)")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        caption, _, seed = line.partition("\t")
        try:
            out.append((caption.strip(), int(seed) if seed.strip() else lineno))
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: seed {seed!r} is not an integer") from exc
    return out[:n]


@torch.inference_mode()
def teacher_images(
    pipe: RagTurboPipeline, teacher_unet, captions: list[str], seeds: list[int], steps: int, cfg_scale: float
) -> np.ndarray:
    """The multi-step teacher from the same initial noise as the one-step pipeline."""
    ctx = pipe.encoder(captions).ctx
    ctx_uncond = pipe.encoder([""]).ctx
    z0 = sample_multistep(teacher_unet, pipe.components.scheduler.config, ctx, ctx_uncond, initial_noise(seeds, pipe.latent_shape), steps, cfg_scale)
    return tensor_to_images(decode_latents(pipe.components.vae, z0))


def evaluate_fidelity(
    pipe: RagTurboPipeline,
    row: RowSpec,
    prompts: list[tuple[str, int]],
    split: str,
    *,
    teacher_unet=None,
    k: int = 4,
    database: str | None = None,
    batch_size: int = 50,
) -> FidelityResult:
    """Generate one image per (caption, seed) with ``row``'s configuration and verify it."""
    start = time.perf_counter()
    captions = [c for c, _ in prompts]
    seeds = [s for _, s in prompts]
    extra: dict = {}

    def run(mode: str, w: float) -> np.ndarray:
        chunks = []
        for i in range(0, len(prompts), batch_size):
            if mode == "teacher":
                chunks.append(teacher_images(pipe, teacher_unet, captions[i : i + batch_size], seeds[i : i + batch_size], row.steps, row.cfg_scale))
            else:
                result = pipe(captions[i : i + batch_size], seeds[i : i + batch_size], mode=mode, steps=row.steps, inject_w=w, k=k, database=database,
                              start_t=row.start_t)
                chunks.append(result.images)
        return np.concatenate(chunks)

    if row.mode == "inject" and row.inject_w is None:
        # The paper's oracle: per prompt, the best of w in {0.1, ..., 0.9} by the verifier itself.
        best_images, best_results, best_w = None, None, []
        for w in ORACLE_WEIGHTS:
            images = run("inject", w)
            results = [verify(img, cap) for img, cap in zip(images, captions)]
            if best_results is None:
                best_images, best_results, best_w = images.copy(), results, [w] * len(results)
                continue
            for i, res in enumerate(results):
                if res.score > best_results[i].score:
                    best_images[i], best_results[i], best_w[i] = images[i], res, w
        images, results = best_images, best_results
        extra["oracle_w_histogram"] = {str(w): best_w.count(w) for w in ORACLE_WEIGHTS}
    else:
        images = run(row.mode, row.inject_w if row.inject_w is not None else 0.8)
        results = [verify(img, cap) for img, cap in zip(images, captions)]
    return FidelityResult(row, split, aggregate(results), images, captions, time.perf_counter() - start, extra,
                          scores=[r.score for r in results])


def save_grid(images: np.ndarray, captions: list[str], path: Path, title: str, columns: int = 8, scale: int = 4) -> None:
    """A PNG grid of samples, each under its caption (images scaled up with nearest-neighbour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(np.kron(image, np.ones((scale, scale, 1), dtype=np.uint8)), interpolation="nearest")
        words = caption.split()
        lines = [" ".join(words[i : i + 4]) for i in range(0, len(words), 4)]
        ax.set_title("\n".join(lines), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
