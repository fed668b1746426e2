"""`imageragturbo eval fidelity | table | leverage | probe`: the shapes world's prompt-fidelity
benchmarks, where a UNet's output comes from, and what a database can deliver through each path."""

from __future__ import annotations

from pathlib import Path

from imageragturbo.cli import options


def _add_model_and_databases(p, n: int = 200) -> None:
    options.add_model(p)
    options.add_device(p)
    options.add_databases(p, chooses=True, help="retrieval database (default: the model's own)")
    p.add_argument("-k", "--k", type=int, default=4, help="neighbours to retrieve")
    p.add_argument("--n", type=int, default=n, help="prompts per split")


def register(sub) -> None:
    evals = sub.add_parser("eval", help="evaluate models (verifier scores on the shapes world)")
    evals = evals.add_subparsers(dest="eval_command", required=True)
    p = evals.add_parser("fidelity", help="verifier scores of one configuration, per split and category")
    _add_model_and_databases(p)
    options.add_mode(p, extra=("teacher",), default="off")
    p.add_argument("--steps", type=int, default=None, help="default: 1 (25 for --mode teacher)")
    p.add_argument("--inject-w", default="0.8", help="a weight in (0, 1], or 'oracle' (best of 0.1..0.9 per prompt)")
    p.add_argument("--cfg", type=float, default=7.5, help="teacher's classifier-free guidance scale")
    p.add_argument("--prompts", default="test-seen", help="test-seen | test-held | a file of 'caption[<TAB>seed]' lines")
    p.add_argument("--json", type=Path, required=True, help="where to write the scores")
    p.add_argument("--grid", type=Path, default=None, help="PNG grid of the first 32 samples (default: next to --json)")
    p.set_defaults(handler=fidelity)

    p = evals.add_parser("table", help="every row over seed sets, the style table -> <out>/fidelity.md, its chart and grid")
    _add_model_and_databases(p, n=100)
    p.add_argument("--seed-sets", type=int, default=5, help="disjoint sets of --n prompts; cells are mean ± SE over them")
    p.add_argument("--adapter", type=Path, default=None, help="the adapter rows' adapter directory (default: <model>/adapter)")
    p.add_argument("--lora", type=Path, default=None, help="the adapter rows' decoder LoRA (default: <model>/unet_lora)")
    p.add_argument("--control", type=Path, default=None, help="the no-retrieval control (default: <model>/no_retrieval)")
    p.add_argument("--no-teacher", action="store_true", help="leave out the (slow) teacher row")
    p.add_argument("--title", default="", help="the report's heading")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.set_defaults(handler=table)

    p = evals.add_parser("leverage", help="how much of the one-step output the H-space, the skips and the decoder's text carry")
    options.add_model(p)
    p.add_argument("--n", type=int, default=64, help="test-seen prompts")
    p.add_argument("--timesteps", type=options.csv_ints, default="999,749,499", help="comma-separated timesteps")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.set_defaults(handler=leverage)

    p = evals.add_parser("probe", help="verifier scores with the top-1 neighbour's image, H-feature or noised latent in the one-step pass")
    _add_model_and_databases(p, n=100)
    p.add_argument("--prompts", action="append", default=None,
                   help="test-seen | test-held | a file of 'caption[<TAB>seed]' lines (repeatable; default: both splits)")
    p.add_argument("--fit-steps", type=int, default=0,
                   help="also fit an H to each neighbour's latent with this many Adam steps (what an H-space edit could draw; 0: skip)")
    p.add_argument("--fit-lr", type=float, default=0.3, help="the H fit's Adam learning rate (suits H-features of norm ~50)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.set_defaults(handler=probe)


def fidelity(args) -> int:
    from imageragturbo.eval import reports

    model_dir = options.model_dir(args)
    row, result, grid = reports.fidelity(
        model_dir, databases=args.databases, database=args.retrieve_from, mode=args.mode, steps=args.steps,
        inject_w=args.inject_w, cfg=args.cfg, prompts=args.prompts, n=args.n, k=args.k, json_path=args.json,
        grid=args.grid,
    )
    cats = " ".join(f"{c}={v:.3f}" for c, v in result.benchmark.per_category.items())
    print(f"{row.name} on {args.prompts} (n={result.benchmark.n}): mean {result.benchmark.mean_score:.3f}, "
          f"strict {result.benchmark.strict:.3f}; {cats}; wrote {args.json} and {grid}")
    return 0


def table(args) -> int:

    from imageragturbo.eval.table import run_table

    report = run_table(options.model_dir(args), args.out, n=args.n, seed_sets=args.seed_sets, k=args.k,
                       databases=args.databases, adapter_dir=args.adapter, lora_dir=args.lora, control_dir=args.control,
                       include_teacher=not args.no_teacher, title=args.title)
    print(f"wrote {args.out / 'fidelity.md'} ({len(report['fidelity'])} rows, {report['wall_s']:.0f} s)")
    return 0


def leverage(args) -> int:
    from imageragturbo.eval import reports

    print(reports.leverage(options.model_dir(args), n=args.n, timesteps=args.timesteps, json_path=args.json), end="")
    return 0


def probe(args) -> int:
    from imageragturbo.eval import reports

    markdown = reports.probe(options.model_dir(args), databases=args.databases, database=args.retrieve_from,
                             splits=args.prompts or ["test-seen", "test-held"], n=args.n, fit_steps=args.fit_steps,
                             fit_lr=args.fit_lr, json_path=args.json)
    print(markdown, end="")
    return 0
