"""`imageragturbo synthetic model | database`: SD-Turbo-scale inputs for the latency protocol
without downloading anything (random weights of the published architectures; random rows of a
model's real shapes)."""

from __future__ import annotations

import sys
from pathlib import Path

from imageragturbo.cli import options


def register(sub) -> None:
    synthetic = sub.add_parser("synthetic", help="random-weight SD-Turbo-layout models and synthetic databases "
                               "(latency at true scale, nothing downloaded)")
    synthetic = synthetic.add_subparsers(dest="synthetic_command", required=True)
    p = synthetic.add_parser("model", help="an SD-Turbo-layout model directory with random fp16 weights (~2.6 GB)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny-vae", action="store_true", help="TAESD's AutoencoderTiny instead of SD's AutoencoderKL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--counts-only", action="store_true", help="print the parameter counts (meta device) and stop")
    p.set_defaults(handler=model)

    p = synthetic.add_parser("database", help="a database of N random rows with a model's real shapes")
    p.add_argument("--out", type=Path, required=True)
    options.add_model(p)
    p.add_argument("--n", type=int, required=True, help="rows (the paper's database: 630000)")
    p.add_argument("--searcher", choices=options.searcher_kinds(), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=database)


def model(args) -> int:
    from imageragturbo.model.random_model import PUBLISHED, parameter_counts, write_random_model

    for name, count in parameter_counts(args.tiny_vae).items():
        published = f" (published {PUBLISHED[name] / 1e6:.1f} M)" if name in PUBLISHED and not (name == "vae" and args.tiny_vae) else ""
        print(f"{name}: {count / 1e6:.1f} M parameters{published}", file=sys.stderr)
    if not args.counts_only:
        print(f"wrote {write_random_model(args.out, tiny_vae=args.tiny_vae, seed=args.seed, overwrite=args.overwrite)}",
              file=sys.stderr)
    return 0


def database(args) -> int:
    from imageragturbo.benchmarks.synthetic import build_synthetic_database

    result = build_synthetic_database(options.model_dir(args), args.n, args.out, searcher=args.searcher,
                                      seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {result.path}: {result.count} rows, searcher {result.searcher['kind']}, {result.seconds:.1f} s",
          file=sys.stderr)
    return 0
