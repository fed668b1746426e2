"""`imageragturbo generate PROMPT --out IMAGE.png` (``--n N``: N seeds), or ``--prompts-file FILE --out DIR``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imageragturbo.cli import options


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt (or a file of prompts) and write them as PNG")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or give --prompts-file)")
    p.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                   help="one prompt per line, optionally PROMPT<TAB>SEED; one PNG per line into --out, a folder "
                   "(LLLL-<prompt>.png, LLLL the line number); the model is loaded once")
    p.add_argument("--seed", type=int, default=0, help="the seed (with --n: the first; default for prompts-file lines)")
    p.add_argument("--n", type=int, default=1, metavar="N",
                   help="images per prompt, seeds SEED..SEED+N-1 (OUT-0.png .. OUT-<N-1>.png), in one pipeline call")
    p.add_argument("--max-batch", type=int, default=None, metavar="B",
                   help="images per pipeline call (default: N for one prompt; for --prompts-file IRT_MAX_BATCH, else 8)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the warm-up call (one image, not written, timed apart); the first call is then reported cold")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log at INFO level and let transformers / diffusers print their progress bars and warnings")
    options.add_mode(p, extra=("auto",), default="auto",
                     help="auto: 'adapter' when the model has an adapter and a database, else 'off'")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--inject-w", type=float, default=0.8)
    p.add_argument("--start-t", type=int, default=None,
                   help="start from the top-1 neighbour's latent noised to this timestep instead of from noise "
                        "(retrieval as img2img, beyond the paper; any mode)")
    p.add_argument("-k", "--k", type=int, default=4, help="neighbours to retrieve")
    p.add_argument("--out", type=Path, required=True, help="output .png (with --prompts-file: a folder)")
    options.add_model(p)
    options.add_device(p)
    options.add_adapter_and_lora(p)
    options.add_databases(p, chooses=True, help="a retrieval database folder (default: the model's own)")
    p.add_argument("--verify-database", action="store_true", help="check every database file's checksum before use")
    options.add_renamed(p, "--verify-index", "--verify-database", flag=True)
    options.add_engine(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from imageragturbo.generate import DEFAULT_MAX_BATCH, generate_pngs, plan_items, quiet_libraries

    quiet_libraries(args.verbose)
    items = plan_items(args.out, prompt=args.prompt, prompts_file=args.prompts_file, seed=args.seed, n=args.n)
    max_batch = args.max_batch
    if max_batch is None:
        max_batch = len(items) if args.prompts_file is None else _env_max_batch(DEFAULT_MAX_BATCH)
    model = resolve_model_dir(options.model_dir(args))
    many = len(items) > 1

    def progress(done: int, total: int) -> None:
        if many and args.verbose:
            print(f"{done}/{total} images", file=sys.stderr)

    done = generate_pngs(
        model, items, max_batch=max_batch, warmup=args.warmup, mode=args.mode, steps=args.steps,
        inject_w=args.inject_w, k=args.k, databases=args.databases, database=args.retrieve_from,
        adapter_dir=args.adapter, lora_dir=args.lora, verify=args.verify_database, engine=args.engine,
        engine_dir=args.engine_dir, on_call=progress, start_t=args.start_t,
    )
    print(_summary(done, args, max_batch), file=sys.stderr)
    if not many and done.neighbors[0]:
        found = "; ".join(f"{n.caption!r} ({n.score:.3f})" for n in done.neighbors[0])
        print(f"retrieved from {done.database}: {found}", file=sys.stderr)
    return 0


def resolve_model_dir(model: Path) -> Path:
    from imageragturbo.model.loading import resolve_model_dir

    return resolve_model_dir(model)


def _env_max_batch(default: int) -> int:
    from imageragturbo.cli.options import CliError

    text = os.environ.get("IRT_MAX_BATCH", "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise CliError(f"IRT_MAX_BATCH must be an integer, got {text!r}") from None


def _stages(ms: dict[str, float]) -> str:
    return " ".join(f"{stage}={value:.1f}ms" for stage, value in ms.items())


def _summary(done, args, max_batch: int) -> str:
    """Where the PNGs went, then the timings: the warm-up call apart, the rest per image."""
    items = done.items
    if len(items) == 1:
        head = f"wrote {items[0].path} (mode={done.mode}, steps={args.steps}, seed={items[0].seed})"
    else:
        where = items[0].path.parent
        seeds = [i.seed for i in items]
        if len(set(seeds)) == 1:
            seed_text = f"seed {seeds[0]}"
        elif seeds == list(range(seeds[0], seeds[0] + len(seeds))):
            seed_text = f"seeds {seeds[0]}..{seeds[-1]}"
        else:
            seed_text = f"{len(set(seeds))} seeds"
        head = (f"wrote {len(items)} images to {where}{os.sep} (mode={done.mode}, steps={args.steps}, {seed_text}; "
                f"{len(done.calls)} pipeline call(s) of up to {max_batch})")
    lines = [head, f"  load: {done.load_s:.2f}s (model and databases, once)"]
    if done.warmup is not None:
        lines.append(f"  warm-up call (1 image, not written): {done.warmup.wall_ms:.1f}ms; {_stages(done.warmup.timings_ms)}")
    warm = done.warm_calls
    label = "warm" if done.warmup is not None or len(done.calls) > 1 else "cold (first call, --no-warmup)"
    if done.warmup is None and len(done.calls) > 1:
        first = done.calls[0]
        lines.append(f"  first call ({first.images} image(s), cold): {first.wall_ms:.1f}ms; {_stages(first.timings_ms)}")
    per = done.per_image_ms()
    total = per.pop("total")
    count = sum(c.images for c in warm)
    lines.append(f"  {label}, per image over {count} image(s): {total:.1f}ms; {_stages(per)}")
    lines.append(f"  generation wall time: {done.generate_s:.2f}s")
    return "\n".join(lines)
