"""`imageragturbo train vae|clip|teacher|world|student|adapter`."""

from __future__ import annotations

import importlib
from pathlib import Path

from imageragturbo.training.ladd import CONFIG_DIR

# run name -> (module with main(config_path, out_dir, steps=None, resume=False), default config, help)
RUNS = {
    "vae": ("imageragturbo.training.pretrain_vae", "vae.json", "shapes-world AutoencoderKL (32x32x3 <-> 8x8x4)"),
    "clip": ("imageragturbo.training.pretrain_clip", "clip.json", "tiny contrastive CLIP: text encoder + image tower"),
    "teacher": ("imageragturbo.training.pretrain_teacher", "teacher.json", "the multi-step teacher UNet"),
    "student": ("imageragturbo.training.ladd", "ladd_student_shapes.json", "distil the teacher into a one-step student (LADD)"),
    "adapter": ("imageragturbo.training.ladd", "ladd_adapter_shapes.json", "train the H-space adapter + decoder LoRA (LADD)"),
}


def register(sub, group) -> None:
    train = group("train", "train a model (pretraining of the shapes world, LADD student or adapter)")
    for name, (_, config_name, help_text) in RUNS.items():
        p = train.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=CONFIG_DIR / config_name, help=f"default: configs/{config_name}")
        p.add_argument("--steps", type=int, default=None, help="override the config's step count")
        p.add_argument("--out", type=Path, default=Path("runs") / name, help="run folder (checkpoints, logs, export)")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        if name in ("student", "adapter"):
            p.add_argument("--model", type=Path, default=None, help="override the config's model_dir")
            p.add_argument("--install", action="store_true",
                           help="put the trained parts into the model directory (student: unet/ + teacher/; adapter: adapter/ + unet_lora/)")
        p.set_defaults(handler=_train, run_name=name)
    p = train.add_parser("world", help="reproduce models/shapes-v1 from nothing: vae, clip, teacher, student, adapter")
    p.add_argument("--out", type=Path, default=Path("models/shapes-v1"))
    p.add_argument("--work", type=Path, default=Path("runs/world"), help="run folders of the stages")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--configs", type=Path, default=CONFIG_DIR,
                   help="folder with every stage's config file (default: the package's configs/)")
    p.add_argument("--index-pairs", type=int, default=WORLD_INDEX_PAIRS,
                   help=f"database-split pairs in the bundled index (default {WORLD_INDEX_PAIRS})")
    p.add_argument("--eval-prompts", type=int, default=200, help="prompts per split in the teacher's evaluation")
    p.set_defaults(handler=_world)


def _train(args) -> int:
    from imageragturbo.cli import CliError

    if not args.config.is_file():
        raise CliError(f"config file not found: {args.config}")
    module = importlib.import_module(RUNS[args.run_name][0])
    kwargs = {}
    if args.run_name in ("student", "adapter"):
        from imageragturbo.training.ladd import load_config

        model_dir = args.model or Path(load_config(args.config).model_dir)
        kwargs = {"model_dir": str(model_dir) if args.model else None, "install_into": model_dir if args.install else None}
    try:
        module.main(args.config, args.out, steps=args.steps, resume=args.resume, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"{args.config}: {exc}") from exc
    return 0


WORLD_INDEX_PAIRS = 4096


def _world(args) -> int:
    """Pretraining recipe (VAE, CLIP, teacher, export), then the student, the index built with
    the student's encoder, and the adapter, each installed into ``--out``."""
    from imageragturbo.cli import CliError
    from imageragturbo.index.build import build_index
    from imageragturbo.index.pairs import WorldPairs
    from imageragturbo.model.pipeline import RagTurboPipeline
    from imageragturbo.training import ladd, world_recipe

    missing = [name for name in (*world_recipe.STAGE_CONFIGS, RUNS["student"][1], RUNS["adapter"][1])
               if not (args.configs / name).is_file()]
    if missing:
        raise CliError(f"{args.configs}: missing config file(s) {', '.join(missing)}")
    world_recipe.run(args.work, args.out, resume=args.resume, configs=args.configs, eval_prompts=args.eval_prompts)
    ladd.main(args.configs / RUNS["student"][1], args.work / "student", resume=args.resume,
              model_dir=str(args.out), install_into=args.out)
    pipe = RagTurboPipeline.from_pretrained(args.out)
    build_index(pipe, WorldPairs(args.index_pairs), args.out / "index", overwrite=True)
    ladd.main(args.configs / RUNS["adapter"][1], args.work / "adapter", resume=args.resume,
              model_dir=str(args.out), install_into=args.out, eval_index=str(args.out / "index"))
    return 0
