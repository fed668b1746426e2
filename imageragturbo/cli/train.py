"""`imageragturbo train vae | clip | teacher | student | adapter | world`."""

from __future__ import annotations

from pathlib import Path

from imageragturbo.cli import options
from imageragturbo.paths import TRAINING_CONFIGS
from imageragturbo.training.runs import LADD_RUNS, RUNS


def register(sub) -> None:
    train = sub.add_parser("train", help="train a model (pretraining of the shapes world, LADD student or adapter)")
    runs = train.add_subparsers(dest="train_command", required=True)
    for name, run_spec in RUNS.items():
        p = runs.add_parser(name, help=run_spec.help)
        p.add_argument("--config", type=Path, default=TRAINING_CONFIGS / run_spec.config,
                       help=f"default: configs/{run_spec.config}")
        p.add_argument("--steps", type=int, default=None, help="override the config's step count")
        p.add_argument("--out", type=Path, default=Path("runs") / name, help="run folder (checkpoints, logs, export)")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        if name in LADD_RUNS:
            options.add_model(p, help="override the config's model_dir")
            p.add_argument("--install", action="store_true",
                           help="put the trained parts into the model directory (student: unet/ + teacher/; adapter: adapter/ + unet_lora/)")
        p.set_defaults(handler=run, run_name=name)

    p = runs.add_parser("world", help="reproduce models/shapes-v2 from nothing: vae, clip, teacher, student, databases, adapter, control")
    p.add_argument("--out", type=Path, default=Path("models/shapes-v2"))
    p.add_argument("--work", type=Path, default=Path("runs/world"), help="run folders of the stages")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--configs", type=Path, default=TRAINING_CONFIGS,
                   help="folder with every stage's config file (default: the package's configs/)")
    p.add_argument("--database-pairs", type=int, default=None, help="database-split pairs in each style database (default: the recipe's, 3072)")
    options.add_renamed(p, "--index-pairs", "--database-pairs", type=int)
    p.add_argument("--eval-prompts", type=int, default=200, help="prompts per split in the teacher's evaluation")
    p.set_defaults(handler=world)


def run(args) -> int:
    from imageragturbo.training.runs import train

    train(args.run_name, args.config, args.out, steps=args.steps, resume=args.resume,
          model_dir=getattr(args, "model", None), install=getattr(args, "install", False))
    return 0


def world(args) -> int:
    from imageragturbo.training.world_recipe import build_world

    pairs = {} if args.database_pairs is None else {"index_pairs": args.database_pairs}
    build_world(args.out, args.work, resume=args.resume, configs=args.configs, eval_prompts=args.eval_prompts, **pairs)
    return 0
