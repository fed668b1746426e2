"""The teacher's synthetic pairs (prompt, noise -> multi-step CFG sample), cached across runs.

Sampling the teacher is the slow part of a LADD run's start (25 steps with CFG per pair), and the
student, adapter and control runs of one model ask for the same pairs. So the pairs live in one
cache file per *what they depend on* (the teacher's and text encoder's weights, the tokenizer,
the scheduler, the prompt source and seed, steps and guidance, the latent shape), under
``$IRT_CACHE_DIR`` (default ``~/.cache/imageragturbo``). Pair ``i`` depends on ``i`` alone
(its prompt is item ``i`` of the prompt stream, its noise comes from its own generator), so a
run that needs ``n`` pairs reads the first ``n`` and samples only those the cache lacks, a
batch at a time, saving after each batch: an interrupted sampling keeps what it finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from imageragturbo.model.sampling import sample_multistep
from imageragturbo.model.text import PromptEncoder

logger = logging.getLogger(__name__)

BATCH = 256


def cache_dir() -> Path:
    """``$IRT_CACHE_DIR``, else ``~/.cache/imageragturbo``."""
    return Path(os.environ.get("IRT_CACHE_DIR") or Path.home() / ".cache" / "imageragturbo")


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over every tensor of a module's state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def files_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def pair_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of pair ``index``: float32 ``shape`` from its own generator."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 2**32 + index))


class TeacherSamples:
    """``get(n)`` -> (captions, noise float32 [n, c, h, w], z0 float32 [n, c, h, w]).

    ``prompts(n)`` gives the first ``n`` prompts of the stream; its first ``m`` must not depend on
    ``n`` (true of the world's splits and of a seeded draw from a file).
    """

    def __init__(self, *, teacher, tokenizer, text_encoder, scheduler, prompts: Callable[[int], list[str]],
                 source: dict, seed: int, steps: int, cfg_scale: float, latent_shape: tuple[int, int, int]):
        self.teacher, self.scheduler = teacher, scheduler
        self.encoder = PromptEncoder(tokenizer, text_encoder)
        self.prompts, self.seed, self.steps, self.cfg_scale = prompts, seed, steps, cfg_scale
        self.latent_shape = tuple(latent_shape)
        key = {
            "teacher": module_digest(teacher),
            "text_encoder": module_digest(text_encoder),
            "tokenizer": files_digest(Path(tokenizer.name_or_path)) if Path(str(tokenizer.name_or_path)).is_dir() else str(tokenizer.name_or_path),
            "scheduler": dict(scheduler.config),
            "source": source,
            "seed": seed,
            "steps": steps,
            "cfg_scale": cfg_scale,
            "latent_shape": list(self.latent_shape),
        }
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = cache_dir() / "teacher_samples" / f"{self.key}.safetensors"

    def _read(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        if not self.path.is_file():
            empty = torch.empty(0, *self.latent_shape)
            return [], empty, empty.clone()
        tensors = load_file(str(self.path))
        captions = json.loads(self.path.with_suffix(".json").read_text())
        return captions, tensors["noise"], tensors["z0"]

    def _write(self, captions: list[str], noise: torch.Tensor, z0: torch.Tensor) -> None:
        # Captions first, then the tensors by rename: the tensors never name more rows than captions hold.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = self.path.with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps(captions))
        os.replace(tmp_json, self.path.with_suffix(".json"))
        tmp = self.path.with_suffix(".tmp.safetensors")
        save_file({"noise": noise.contiguous(), "z0": z0.contiguous()}, str(tmp))
        os.replace(tmp, self.path)

    @torch.inference_mode()
    def get(self, n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        captions, noise, z0 = self._read()
        have = min(len(captions), len(z0))
        if have >= n:
            logger.info("read %d of %d cached teacher pairs from %s", n, have, self.path)
            return captions[:n], noise[:n], z0[:n]
        wanted = self.prompts(n)
        if wanted[:have] != captions[:have]:
            raise ValueError(f"teacher-sample cache {self.path} does not match this prompt stream; delete it")
        captions, noise, z0 = wanted[:have], noise[:have], z0[:have]
        ctx_uncond = self.encoder([""]).ctx
        for start in tqdm(range(have, n, BATCH), desc="teacher samples", unit="batch"):
            batch = wanted[start : min(n, start + BATCH)]
            batch_noise = torch.stack([pair_noise(self.seed, i, self.latent_shape) for i in range(start, start + len(batch))])
            ctx = self.encoder(batch).ctx
            device = next(self.teacher.parameters()).device
            sample = sample_multistep(self.teacher, self.scheduler.config, ctx.to(device), ctx_uncond.to(device),
                                      batch_noise.to(device), self.steps, self.cfg_scale)
            captions, noise, z0 = captions + batch, torch.cat([noise, batch_noise]), torch.cat([z0, sample.float().cpu()])
            self._write(captions, noise, z0)
        logger.info("sampled %d teacher pairs (%d were cached) into %s", n - have, have, self.path)
        return captions, noise, z0
