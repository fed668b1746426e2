"""The whole shapes-world recipe (``imageragturbo train world``, ``make world``): from nothing to
the bundled ``models/shapes-v2/``.

Stages (each with its own config under ``configs/``, run folders under ``work``):

1. ``vae``: AutoencoderKL from scratch (``vae.json``), on the universal split;
2. ``vae_ft``: decoder-only fine-tune of it, same latent space (``vae_decoder_ft.json``);
3. ``clip``: contrastive CLIP from scratch (``clip.json``), on every caption;
4. ``clip_entities``: continued with the entity term (``clip_entities.json``);
5. ``teacher``: the UNet on the frozen VAE encoder and text encoder (``teacher.json``), on the
   generators' train split; then the export: fp16 safetensors in diffusers layout;
6. ``student``: the one-step student by LADD (``ladd_student_shapes.json``), installed;
7. ``databases``: one database per style (``dim``, ``grey``, ``bright``: the same scenes of
   the database split, each on its style's background) built with the student's encoder,
   ``grey`` the default;
8. ``paper_adapter``: the paper's H-space adapter (eq. 4-5) + decoder LoRA with style targets
   (``ladd_adapter_shapes.json``) and its control, the same run with the gate fixed to 0
   (``ladd_adapter_no_retrieval_shapes.json``), as ``<out>/paper_adapter/`` and
   ``<out>/paper_adapter/no_retrieval/``: measured, it does not carry the style (results/);
9. ``adapter``: the same adapter with retrieval cross-attention (beyond the paper:
   ``model/retrieval_attention.py``; ``ladd_adapter_xattn_shapes.json``) and the copy term
   (``copy_weight``: the output pulled toward its top neighbour's latent), installed as the
   model's ``adapter/`` + ``unet_lora/``, and its control, the same term with the gate fixed
   to 0 (``ladd_adapter_xattn_no_retrieval_shapes.json``), as ``<out>/no_retrieval/``.

``resume`` resumes an interrupted stage from its latest checkpoint and skips finished ones
(a stage is finished when its export exists).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

from imageragturbo.errors import ConfigError
from imageragturbo.paths import TRAINING_CONFIGS
from imageragturbo.training import pretrain_clip, pretrain_teacher, pretrain_vae
from imageragturbo.training.sampling import TeacherParts, score_prompts
from imageragturbo.world.splits import eval_prompts

logger = logging.getLogger(__name__)


class RecipeError(ConfigError):
    """The recipe cannot start: a stage's config file is missing."""

STAGE_CONFIGS = ("vae.json", "vae_decoder_ft.json", "clip.json", "clip_entities.json", "teacher.json")
LADD_CONFIGS = {
    "student": "ladd_student_shapes.json",
    "paper_adapter": "ladd_adapter_shapes.json",
    "paper_no_retrieval": "ladd_adapter_no_retrieval_shapes.json",
    "adapter": "ladd_adapter_xattn_shapes.json",
    "no_retrieval": "ladd_adapter_xattn_no_retrieval_shapes.json",
}
WORLD_DATABASE_PAIRS = 3072
"""Rows per style database: three of them (24 MB) keep the bundled model, teacher included, under 80 MB."""
NO_RETRIEVAL_DIR = "no_retrieval"
PAPER_ADAPTER_DIR = "paper_adapter"


def model_index() -> dict:
    """A StableDiffusionPipeline-like index of the parts (no safety checker, no feature extractor)."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }


def export_model_dir(vae_dir: Path, clip_run: Path, teacher_run: Path, model_dir: Path) -> int:
    """Write the diffusers-format model directory in fp16; return its size in bytes.

    Written to ``<model_dir>.tmp`` and renamed into place, so a crash never leaves half a model.
    """
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    AutoTokenizer.from_pretrained(clip_run / "tokenizer", local_files_only=True).save_pretrained(tmp / "tokenizer")
    parts = {
        "text_encoder": CLIPTextModel.from_pretrained(clip_run / "text_encoder", local_files_only=True),
        "clip": CLIPModel.from_pretrained(clip_run / "clip", local_files_only=True),
        "vae": AutoencoderKL.from_pretrained(vae_dir, local_files_only=True),
        "unet": UNet2DConditionModel.from_pretrained(teacher_run / "unet", local_files_only=True),
    }
    for name, module in parts.items():
        module.to(torch.float16).save_pretrained(tmp / name, safe_serialization=True)
    DDIMScheduler.from_pretrained(teacher_run / "scheduler", local_files_only=True).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    readme = model_dir / "README.md"
    if readme.is_file():
        shutil.copy(readme, tmp / "README.md")
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    return sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())


def load_teacher_parts(model_dir: Path) -> TeacherParts:
    """The exported model's parts in float32 (weights are stored in fp16)."""
    fp32 = {"local_files_only": True, "torch_dtype": torch.float32}
    return TeacherParts(
        tokenizer=AutoTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder", **fp32).eval(),
        unet=UNet2DConditionModel.from_pretrained(model_dir / "unet", **fp32).eval(),
        vae=AutoencoderKL.from_pretrained(model_dir / "vae", **fp32).eval(),
        scheduler=DDIMScheduler.from_pretrained(model_dir / "scheduler", local_files_only=True),
    )


def evaluate_model_dir(model_dir: Path, n_prompts: int = 200, steps: int = 25, guidances: tuple[float, ...] = (3.0,)) -> dict:
    """Verifier scores of the exported teacher on test-seen, test-tail and test-held (multi-step CFG and one step)."""
    parts = load_teacher_parts(model_dir)
    out: dict = {"n_prompts": n_prompts, "steps": steps}
    for split in ("test-seen", "test-tail", "test-held"):
        prompts = eval_prompts(split, n_prompts)
        for g in guidances:
            t = time.monotonic()
            bench, _ = score_prompts(parts, prompts, steps=steps, guidance=g)
            out[f"{split}/{steps}step/cfg{g:g}"] = bench.as_dict() | {"wall_s": round(time.monotonic() - t, 1)}
        bench, _ = score_prompts(parts, prompts, steps=1, guidance=1.0)
        out[f"{split}/1step"] = bench.as_dict()
    return out


def run(runs: Path, model_dir: Path, resume: bool = False, configs: Path = TRAINING_CONFIGS, eval_prompts: int = 200) -> dict:
    """Run every stage in order (see module docstring) and export; return the evaluation.

    ``configs`` is the folder holding the stages' config files (the package's by default);
    ``eval_prompts`` is the number of prompts per split in the final evaluation.
    """
    runs.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}

    def stage(name: str, module, config: str, done: Path, **overrides) -> None:
        if resume and done.exists():
            logger.info("stage %s already finished (%s exists)", name, done)
            return
        t = time.monotonic()
        module.main(configs / config, runs / name, resume=resume, **overrides)
        walls[name] = round(time.monotonic() - t, 1)

    stage("vae", pretrain_vae, "vae.json", runs / "vae" / "vae")
    stage("vae_ft", pretrain_vae, "vae_decoder_ft.json", runs / "vae_ft" / "vae", init_from=str(runs / "vae" / "vae"))
    stage("clip", pretrain_clip, "clip.json", runs / "clip" / "clip")
    stage("clip_entities", pretrain_clip, "clip_entities.json", runs / "clip_entities" / "clip", init_from=str(runs / "clip" / "clip"))
    # The teacher learns on the first VAE's latents: the fine-tune changed only the decoder.
    stage(
        "teacher", pretrain_teacher, "teacher.json", runs / "teacher" / "unet",
        vae_dir=str(runs / "vae" / "vae"), clip_dir=str(runs / "clip_entities"),
    )
    evaluation = runs / "eval.json"
    if resume and evaluation.is_file() and (model_dir / "model_index.json").is_file():
        # Exported and evaluated already; exporting again would replace what later stages installed.
        logger.info("stage export already finished (%s exists)", evaluation)
        return json.loads(evaluation.read_text())
    size = export_model_dir(runs / "vae_ft" / "vae", runs / "clip_entities", runs / "teacher", model_dir)
    logger.info("exported %s (%.1f MB)", model_dir, size / 1e6)
    result = evaluate_model_dir(model_dir, n_prompts=eval_prompts)
    result["stage_wall_s"] = walls
    evaluation.write_text(json.dumps(result, indent=2))
    return result


def build_databases(model_dir: Path, n: int, resume: bool = False) -> list[Path]:
    """One database per style under ``<model_dir>/databases/``, built with the model's student
    encoder; ``grey`` the default. With ``resume``, a database already built for this model stays."""
    from imageragturbo.retrieval.build import build_database
    from imageragturbo.retrieval.disk import DATABASES_DIR, read_manifest, write_databases_file
    from imageragturbo.retrieval.pairs import WorldPairs
    from imageragturbo.model.pipeline import RagTurboPipeline
    from imageragturbo.world.render import DEFAULT_STYLE, STYLE_NAMES

    pipe = RagTurboPipeline.from_pretrained(model_dir)
    paths = []
    for style in STYLE_NAMES:
        path = model_dir / DATABASES_DIR / style
        if resume and (path / "manifest.json").is_file() and read_manifest(path)["model_id"] == pipe.components.model_id:
            logger.info("database %s already built for this model", path)
        else:
            build_database(pipe, WorldPairs(n, style=style), path, overwrite=True)
        paths.append(path)
    write_databases_file(model_dir, DEFAULT_STYLE)
    return paths


def build_world(out: Path, work: Path, resume: bool = False, configs: Path = TRAINING_CONFIGS,
                index_pairs: int = WORLD_DATABASE_PAIRS, eval_prompts: int = 200) -> dict:
    """Every stage of the module docstring, in order, each installed into ``out``; returns the
    wall time of each stage run here (seconds) and the teacher's evaluation."""
    from imageragturbo.training import ladd

    missing = [name for name in (*STAGE_CONFIGS, *LADD_CONFIGS.values()) if not (configs / name).is_file()]
    if missing:
        raise RecipeError(f"{configs}: missing config file(s) {', '.join(missing)}")
    walls: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t = time.monotonic()
        result = fn(*args, **kwargs)
        walls[name] = round(time.monotonic() - t, 1)
        return result

    teacher_eval = run(work, out, resume=resume, configs=configs, eval_prompts=eval_prompts)
    timed("student", ladd.main, configs / LADD_CONFIGS["student"], work / "student", resume=resume,
          model_dir=str(out), install_into=out)
    timed("databases", build_databases, out, index_pairs, resume=resume)
    eval_index = str(out / "databases" / "grey")

    def finetune(name: str, run_dir: str, dest: Path | None = None, **install) -> None:
        export = timed(name, ladd.main, configs / LADD_CONFIGS[name], work / run_dir, resume=resume,
                       model_dir=str(out), eval_index=eval_index, **install)
        if dest is not None:
            install_variant(export, dest)

    # The paper's adapter (eq. 4-5) and its control, kept beside the served one for the table.
    finetune("paper_adapter", "adapter", out / PAPER_ADAPTER_DIR)
    finetune("paper_no_retrieval", "no_retrieval", out / PAPER_ADAPTER_DIR / NO_RETRIEVAL_DIR)
    # Served: the adapter with retrieval cross-attention (beyond the paper), and its control.
    finetune("adapter", "adapter_xattn", install_into=out)
    finetune("no_retrieval", "no_retrieval_xattn", out / NO_RETRIEVAL_DIR)
    result = {"stage_wall_s": {**teacher_eval.get("stage_wall_s", {}), **walls}, "teacher": teacher_eval}
    (work / "world.json").write_text(json.dumps(result, indent=2))
    return result


def install_variant(export_dir: Path, dest: Path) -> None:
    """A finetune's decoder LoRA and adapter (``unet_lora/``, ``adapter/``, its config) as
    ``dest``, staged beside it and renamed into place: ``imageragturbo eval table`` scores it as
    its own rows (``--adapter``/``--lora``, or the control's ``--control``)."""
    staged = dest.with_name(f".{dest.name}.new")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for part in ("unet_lora", "adapter"):
        shutil.copytree(export_dir / part, staged / part)
    shutil.copy(export_dir / "ladd_adapter.json", staged / "ladd_adapter.json")
    keep = dest / NO_RETRIEVAL_DIR  # a variant's control lives inside it
    if keep.is_dir():
        keep.rename(staged / NO_RETRIEVAL_DIR)
    shutil.rmtree(dest, ignore_errors=True)
    staged.rename(dest)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/world")
    parser.add_argument("--model", default="models/shapes-v2")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(Path(args.runs), Path(args.model), resume=args.resume)
