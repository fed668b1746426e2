"""RagTurboPipeline: prompt -> retrieval -> one (or a few) UNet passes with an H-space edit -> image.

One entry point, ``__call__``, whose body is the request path of docs/design.md as numbered steps.
The pipeline holds no global state and no per-call state on ``self``, so one worker thread may
call it repeatedly; randomness comes only from per-item seeded generators, so an item's image is
the same alone or in any batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imageragturbo.errors import ConfigError, RequestError
from imageragturbo.model.batch_invariance import batch_invariant, make_batch_invariant
from imageragturbo.model.denoiser import MODES, RagDenoiser
from imageragturbo.model.device import resolve_device, resolve_dtype
from imageragturbo.model.images import images_to_tensor, tensor_to_images
from imageragturbo.model.loading import ModelComponents, load_model, resolve_model_dir
from imageragturbo.model.noise import draw, latent_shape, seed_generators
from imageragturbo.model.schedule import NoiseSchedule
from imageragturbo.model.text import PromptEncoder
from imageragturbo.model.unet_split import SplitUNet
from imageragturbo.retrieval.database import Databases, RetrievalDatabase

logger = logging.getLogger(__name__)

STAGES = ("text_encode", "retrieve", "denoise", "vae_decode", "postprocess")
MAX_STEPS = 4
INJECT_K = 1
"""Injection (paper Table 3's baseline) blends in the single nearest neighbour, whatever k says."""


@dataclass
class Neighbor:
    id: str
    caption: str
    score: float


@dataclass
class GenerationResult:
    images: np.ndarray
    """uint8 [B, H, W, 3]."""
    latents: torch.Tensor
    """float32 [B, c, h, w]: the final x0 estimate, before the VAE."""
    seeds: list[int]
    mode: str
    steps: int
    lam: torch.Tensor | None
    """float32 [B]: the adapter gate (mean cosine to the neighbours); None when nothing was retrieved."""
    neighbors: list[list[Neighbor]]
    start_t: int | None = None
    """Set when sampling started from the top-1 neighbour's latent noised to this timestep."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """Wall time per stage for the whole batch, in milliseconds."""


def few_step_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """The paper's schedule T_n = {1.0, 0.75, 0.5, 0.25}*T for n = 4 (trailing spacing):
    1 step -> [999]; 2 -> [999, 499]; 4 -> [999, 749, 499, 249] for T = 1000."""
    if not 1 <= steps <= MAX_STEPS:
        raise RequestError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
    return [round(num_train_timesteps * (1 - i / steps)) - 1 for i in range(steps)]


def start_timesteps(steps: int, start_t: int) -> list[int]:
    """The same trailing spacing over [0, start_t] for sampling that starts from a noised
    neighbour: 1 step -> [start_t]; 2 -> [start_t, (start_t + 1) / 2 - 1]."""
    return few_step_timesteps(steps, start_t + 1)


class _StageClock:
    def __init__(self):
        self.ms: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] += (time.perf_counter() - start) * 1e3


def decode_latents(vae: torch.nn.Module, z0: torch.Tensor) -> torch.Tensor:
    """Scaled latents float [B, c, h, w] -> pixels float [B, 3, H, W] in [-1, 1] (unclamped)."""
    latents = z0 / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    return vae.decode(latents).sample


class RagTurboPipeline:
    """Text-to-image in 1-4 UNet passes, with retrieval blended into the H-space.

    ``engines`` (an :class:`imageragturbo.engines.PipelineEngines`, or None for the torch
    modules) runs text encoding, ``denoise`` and ``vae_decode`` on compiled graphs instead;
    see :meth:`use_engines`.
    """

    def __init__(
        self,
        components: ModelComponents,
        databases: Sequence[RetrievalDatabase] = (),
        engines=None,
        *,
        batch_invariant: bool = True,
    ):
        self.components = components
        self.batch_invariant = batch_invariant
        """Compute every image exactly as it would be computed alone, in any batch (on by
        default; off trades that for the stock kernels' faster batches)."""
        make_batch_invariant(components.text_encoder, components.unet, components.adapter, components.vae)
        self.encoder = PromptEncoder(components.tokenizer, components.text_encoder)
        self._torch_encoder = self.encoder
        self.engines = None
        self.split = SplitUNet(components.unet)
        self.denoisers = {
            mode: RagDenoiser(self.split, components.adapter, mode)
            for mode in MODES
            if mode != "adapter" or components.adapter is not None
        }
        self.schedule = NoiseSchedule.from_scheduler(components.scheduler)
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.latent_shape = latent_shape(components.unet)
        self.databases = Databases()
        for database in databases:
            self.add_database(database)
        if engines is not None:
            self.use_engines(engines)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        adapter_dir: str | Path | None = None,
        lora_dir: str | Path | None = None,
        databases: Sequence[RetrievalDatabase] = (),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> RagTurboPipeline:
        """``device`` / ``dtype``: None means ``IRT_DEVICE`` / ``IRT_DTYPE``, else cpu / float32."""
        parts = load_model(model_dir, adapter_dir=adapter_dir, lora_dir=lora_dir,
                           device=resolve_device(device), dtype=resolve_dtype(dtype))
        return cls(parts, databases)

    @property
    def model_id(self) -> str:
        return self.components.model_id

    @property
    def model_dir(self) -> Path:
        return self.components.model_dir

    @property
    def dtype(self) -> torch.dtype:
        """The torch modules' precision (the UNet's)."""
        return next(self.components.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.components.unet.parameters()).device

    def use_engines(self, engines) -> None:
        """Run text encoding, denoise and VAE decode on ``engines`` (None: back to the torch modules).

        The engines must have a denoise graph for every mode this pipeline serves; the
        retrieval, noise, schedule and postprocessing stay in this class either way.
        """
        if engines is None:
            self.engines, self.encoder = None, self._torch_encoder
            return
        missing = sorted(set(self.denoisers) - set(engines.modes))
        if missing:
            raise ConfigError(f"the {engines.kind} engines have no denoise graph for mode(s) {missing}; re-export the model")
        self.engines = engines
        self.encoder = engines.prompt_encoder(self._torch_encoder)

    def add_database(self, database: RetrievalDatabase) -> None:
        """Register a database (the first is the default); refuses one whose features were
        computed by another model."""
        if database.store.model_id != self.components.model_id:
            raise RequestError(
                f"database {database.name!r} was built with model {database.store.model_id}, "
                f"but the loaded model is {self.components.model_id}; rebuild it with this model"
            )
        self.databases.add(database)

    # -- the request path ------------------------------------------------------------------

    def check_inputs(self, prompts, seeds, mode, steps, inject_w, k, database, start_t=None) -> None:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RequestError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError(f"every prompt must be a non-empty string, got {prompt!r}")
        if len(seeds) != len(prompts):
            raise RequestError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        for seed in seeds:
            if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
                raise RequestError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        if mode not in MODES:
            raise RequestError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in self.denoisers:
            raise RequestError(f"mode {mode!r} needs a trained H-space adapter; this model has no adapter/")
        few_step_timesteps(steps, self.num_train_timesteps)
        # float32: the dtype the blend runs in (1e-300 is > 0 in float64 but 0 in float32).
        weights = np.atleast_1d(np.asarray(inject_w, dtype=np.float32))
        if weights.shape[0] not in (1, len(prompts)) or bool(((weights <= 0) | (weights > 1)).any()):
            raise RequestError(f"inject_w must be in (0, 1] (one value, or one per prompt), got {inject_w!r}")
        if start_t is not None:
            self.check_start(start_t, database)
        if mode != "off":
            if not self.databases:
                raise RequestError(f"mode {mode!r} retrieves, but no database is loaded (give one with --database NAME=DIR)")
            n = len(self.databases.resolve(database).store)
            if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
                raise RequestError(f"k must be an integer in [1, {n}], got {k!r}")

    def check_start(self, start_t, database: str | None) -> None:
        """Raise RequestError unless ``start_t`` can start from ``database``'s top neighbour."""
        t_max = self.num_train_timesteps - 1
        if isinstance(start_t, bool) or not isinstance(start_t, (int, np.integer)) or not 1 <= start_t < t_max:
            raise RequestError(f"start_t must be an integer in [1, {t_max - 1}] (or unset: start from noise), got {start_t!r}")
        if not self.databases:
            raise RequestError("start_t starts from the top neighbour's latent, but no database is loaded (give one with --database NAME=DIR)")
        db = self.databases.resolve(database)
        try:
            db.store.latents(np.zeros((1, 1), dtype=np.int64))
        except (ValueError, KeyError) as exc:
            raise RequestError(f"start_t needs a database that keeps its images' latents; {db.name!r} does not ({exc})") from exc

    @torch.inference_mode()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        mode: str = "adapter",
        steps: int = 1,
        inject_w: float | Sequence[float] = 0.8,
        k: int = 4,
        database: str | None = None,
        start_t: int | None = None,
    ) -> GenerationResult:
        """``start_t`` (beyond the paper; img2img from the database, as RDM's sampling-time
        database use): start from the top-1 neighbour's stored latent noised to ``start_t``
        with the seed's noise instead of from pure noise, and take ``steps`` steps from there.
        The neighbour's layout survives in proportion to how low ``start_t`` is
        (``results/ladd-experiments.md`` §9 measures it); works in every mode, ``off`` included."""
        # 1. check inputs
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        self.check_inputs(prompts, seeds, mode, steps, inject_w, k, database, start_t)
        clock = _StageClock()
        device = self.device
        batch = len(prompts)

        # Every image as it would be alone, in any batch (model/batch_invariance.py).
        with batch_invariant(self.batch_invariant):
            # 2. encode text: cross-attention context and the retrieval query from one pass
            with clock.stage("text_encode"):
                encoded = self.encoder(prompts)
                ctx = encoded.ctx

            # 3. retrieve: k neighbours, their stored H-features and the gate lambda
            h_retr = lam = None
            neighbors: list[list[Neighbor]] = [[] for _ in prompts]
            if mode != "off" or start_t is not None:
                with clock.stage("retrieve"):
                    db = self.databases.resolve(database)
                    found = db.retrieve(encoded.q.cpu().numpy(), INJECT_K if mode in ("inject", "off") else k, texts=prompts)
                    if mode != "off":
                        lam = torch.from_numpy(found.gate)
                        h_retr = torch.from_numpy(found.h).to(device, ctx.dtype)
                    if start_t is not None:
                        z0_start = torch.from_numpy(found.top_latents())
                    neighbors = [
                        [Neighbor(id=s, caption=c, score=float(x)) for s, c, x in zip(srow, crow, xrow)]
                        for srow, crow, xrow in zip(found.source_ids(), found.captions(), found.scores)
                    ]

            # 4. noise from the seeds: one generator per item, so batching never changes an image
            generators = seed_generators(seeds)
            z_t = draw(generators, self.latent_shape).to(device, ctx.dtype)
            if start_t is not None:
                z_t = self.schedule.add_noise(z0_start.to(device, ctx.dtype), z_t, start_t)
                timesteps = start_timesteps(steps, start_t)
            else:
                timesteps = few_step_timesteps(steps, self.num_train_timesteps)

            # 5.-7. UNet encoder -> adapter | injection | nothing -> UNet decoder, x0 from the output
            w = torch.as_tensor(inject_w, dtype=torch.float32).reshape(-1).expand(batch).to(device)
            lam_dev = lam.to(device) if lam is not None else None
            denoiser = self.denoisers[mode]
            with clock.stage("denoise"):
                for i, t in enumerate(timesteps):
                    t_batch = torch.full((batch,), t, dtype=torch.int64, device=device)
                    model_output = self.denoise(denoiser, z_t, t_batch, ctx, h_retr, lam_dev, w)
                    z0 = self.schedule.predict_x0(model_output, z_t, t)
                    if i + 1 < len(timesteps):
                        # Few-step sampling re-noises x0 to the next level with fresh noise from
                        # each item's own generator (as ADD/LCM sample).
                        noise = draw(generators, self.latent_shape)
                        z_t = self.schedule.add_noise(z0, noise.to(device, z0.dtype), timesteps[i + 1])

            # 8. VAE decode
            with clock.stage("vae_decode"):
                pixels = self.vae_decode(z0)

            # 9. uint8 images
            with clock.stage("postprocess"):
                images = tensor_to_images(pixels)

        return GenerationResult(
            images=images,
            latents=z0.float().cpu(),
            seeds=seeds,
            mode=mode,
            steps=steps,
            lam=lam,
            neighbors=neighbors,
            start_t=start_t,
            timings_ms=clock.ms,
        )

    # -- the stages that engines can replace -------------------------------------------------

    def denoise(self, denoiser, z_t, t, ctx, h_retr, lam, inject_w) -> torch.Tensor:
        """One UNet pass (encoder, H-space edit, decoder) -> model output [B, c, h, w]."""
        if self.engines is not None:
            return self.engines.denoise(denoiser.mode, z_t, t, ctx, h_retr, lam, inject_w)
        return denoiser(z_t, t, ctx, h_retr, lam, inject_w)

    def vae_decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Latents float [B, c, h, w] -> pixels float [B, 3, H, W] in [-1, 1]."""
        if self.engines is not None:
            return self.engines.vae_decode(z0)
        return decode_latents(self.components.vae, z0)

    # -- encoding database rows (used by retrieval.build) -------------------------------------

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> scaled VAE latents z0 float32 [N, c, h, w] (the mean, no sampling)."""
        vae = self.components.vae
        x = images_to_tensor(images).to(self.device, next(vae.parameters()).dtype)
        encoded = vae.encode(x)
        latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).float()

    @torch.inference_mode()
    def encode_database_rows(self, z0: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean latents float [N, c, h, w] + captions -> (e float32 [N, Dq], h_retr float32 [N, C, h, w]).

        ``h_retr`` is the UNet encoder's mid-block output at t = 0 with the item's own caption
        (paper sec. 3.2): prompt-independent, so computed once here and stored.
        """
        encoded = self.encoder(captions)
        t0 = torch.zeros(len(captions), dtype=torch.int64, device=self.device)
        h = self.split.encode(z0.to(self.device, encoded.ctx.dtype), t0, encoded.ctx).h
        return encoded.q.float(), h.float()


def open_pipeline(
    model_dir: str | Path,
    *,
    databases: Sequence[str] | None = None,
    adapter_dir: str | Path | None = None,
    lora_dir: str | Path | None = None,
    verify: bool = False,
    base_only: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    warm: bool = False,
) -> RagTurboPipeline:
    """A model directory and its retrieval databases, as the CLI and the server open them.

    ``databases`` are ``NAME=DIR`` (or ``DIR``) specs, the first being the default; None means
    the model directory's own (``retrieval.disk.model_databases``). ``verify`` recomputes every
    database file's checksum and checks every feature value. Raises ``ModelLoadError`` or
    ``DatabaseLoadError`` (both ``ValueError``) naming the file at fault. ``base_only`` leaves
    out the adapter and the decoder LoRA: the plain one-step model. ``device`` / ``dtype``
    are where and in what precision the torch modules run (None: ``IRT_DEVICE`` /
    ``IRT_DTYPE``, else cpu / float32). ``warm`` reads each database's memory-mapped arrays
    into the page cache once, when they fit in memory (progress in the log; the bundled
    databases are read into process memory at open and have nothing mapped to warm).
    """
    from imageragturbo.retrieval.disk import DatabaseLoadError, load_database, model_databases, parse_database_spec

    model_dir = resolve_model_dir(model_dir)  # a folder, or a hub id from the local cache
    parts = load_model(model_dir, adapter_dir=adapter_dir, lora_dir=lora_dir, base_only=base_only,
                       device=resolve_device(device), dtype=resolve_dtype(dtype))
    pipe = RagTurboPipeline(parts)
    for spec in model_databases(model_dir) if databases is None else databases:
        name, path = parse_database_spec(spec)
        try:
            database = load_database(name, path, verify=verify, model_id=pipe.components.model_id, warm=warm)
        except (DatabaseLoadError, OSError) as exc:
            # Name the database too: with several --database flags the folder alone is ambiguous.
            raise DatabaseLoadError(f"cannot load database {name!r} from {path}: {exc}") from exc
        pipe.add_database(database)
    return pipe
