"""`imageragturbo generate PROMPT --out IMAGE.png`."""

from __future__ import annotations

import sys
from pathlib import Path

from imageragturbo.cli import options


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate one image from a prompt and write it as PNG")
    p.add_argument("prompt")
    p.add_argument("--seed", type=int, default=0)
    options.add_mode(p, extra=("auto",), default="auto",
                     help="auto: 'adapter' when the model has an adapter and a database, else 'off'")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--inject-w", type=float, default=0.8)
    p.add_argument("-k", "--k", type=int, default=4, help="neighbours to retrieve")
    p.add_argument("--out", type=Path, required=True, help="output .png")
    options.add_model(p)
    options.add_device(p)
    options.add_adapter_and_lora(p)
    options.add_databases(p, chooses=True, help="a retrieval database folder (default: the model's own)")
    p.add_argument("--verify-database", action="store_true", help="check every database file's checksum before use")
    options.add_renamed(p, "--verify-index", "--verify-database", flag=True)
    options.add_engine(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from imageragturbo.generate import generate_png

    done = generate_png(
        options.model_dir(args), args.prompt, args.out, seed=args.seed, mode=args.mode, steps=args.steps,
        inject_w=args.inject_w, k=args.k, databases=args.databases, database=args.retrieve_from,
        adapter_dir=args.adapter, lora_dir=args.lora, verify=args.verify_database, engine=args.engine,
        engine_dir=args.engine_dir,
    )
    timings = " ".join(f"{stage}={ms:.1f}ms" for stage, ms in done.result.timings_ms.items())
    print(f"wrote {done.path} (mode={done.mode}, steps={args.steps}, seed={args.seed}; {timings})", file=sys.stderr)
    if done.result.neighbors[0]:
        found = "; ".join(f"{n.caption!r} ({n.score:.3f})" for n in done.result.neighbors[0])
        print(f"retrieved from {done.database}: {found}", file=sys.stderr)
    return 0
