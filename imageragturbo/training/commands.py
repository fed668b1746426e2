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
    p = train.add_parser("world", help="reproduce models/shapes-v2 from nothing: vae, clip, teacher, student, databases, adapter, control")
    p.add_argument("--out", type=Path, default=Path("models/shapes-v2"))
    p.add_argument("--work", type=Path, default=Path("runs/world"), help="run folders of the stages")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--configs", type=Path, default=CONFIG_DIR,
                   help="folder with every stage's config file (default: the package's configs/)")
    p.add_argument("--index-pairs", type=int, default=3072,
                   help="database-split pairs in each style database (default 3072)")
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


def _world(args) -> int:
    """The whole recipe (``training.world_recipe.build_world``) into ``--out``."""
    from imageragturbo.cli import CliError
    from imageragturbo.training import world_recipe

    try:
        world_recipe.build_world(args.out, args.work, resume=args.resume, configs=args.configs,
                                 index_pairs=args.index_pairs, eval_prompts=args.eval_prompts)
    except world_recipe.RecipeError as exc:
        raise CliError(str(exc)) from exc
    return 0
