"""`imageragturbo eval fidelity | table | leverage | probe`: the shapes world's prompt-fidelity
benchmarks, where a UNet's output comes from, and what the database can deliver through each path."""

from __future__ import annotations

import json
from pathlib import Path


def _add_model_args(p) -> None:
    p.add_argument("--model", type=Path, default=None, help="model directory (default: IRT_MODEL or the bundled model)")
    p.add_argument("--index", action="append", default=None, metavar="NAME=DIR",
                   help="retrieval database (repeatable; default: <model>/index if it exists)")
    p.add_argument("--database", default=None, help="which --index to retrieve from (default: the first)")
    p.add_argument("-k", "--k", type=int, default=4, help="neighbours to retrieve")
    p.add_argument("--n", type=int, default=200, help="prompts per split")


def register(sub, group) -> None:
    evals = group("eval", "evaluate models (verifier scores on the shapes world)")
    p = evals.add_parser("fidelity", help="verifier scores of one configuration, per split and category")
    _add_model_args(p)
    p.add_argument("--mode", choices=("adapter", "inject", "off", "teacher"), default="off")
    p.add_argument("--steps", type=int, default=None, help="default: 1 (25 for --mode teacher)")
    p.add_argument("--inject-w", default="0.8", help="a weight in (0, 1], or 'oracle' (best of 0.1..0.9 per prompt)")
    p.add_argument("--cfg", type=float, default=7.5, help="teacher's classifier-free guidance scale")
    p.add_argument("--prompts", default="test-seen", help="test-seen | test-held | a file of 'caption[<TAB>seed]' lines")
    p.add_argument("--json", type=Path, required=True, help="where to write the scores")
    p.add_argument("--grid", type=Path, default=None, help="PNG grid of the first 32 samples (default: next to --json)")
    p.set_defaults(handler=_fidelity)
    p = evals.add_parser("table", help="the paper's rows in miniature -> <out>/fidelity.md, chart and sample grids")
    _add_model_args(p)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.set_defaults(handler=_table)
    p = evals.add_parser("leverage", help="how much of the one-step output the H-space, the skips and the decoder's text carry")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: IRT_MODEL or the bundled model)")
    p.add_argument("--n", type=int, default=64, help="test-seen prompts")
    p.add_argument("--timesteps", default="999,749,499", help="comma-separated timesteps")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.set_defaults(handler=_leverage)
    p = evals.add_parser("probe", help="verifier scores with the top-1 neighbour's image, H-feature or noised latent in the one-step pass")
    _add_model_args(p)
    p.add_argument("--prompts", action="append", default=None,
                   help="test-seen | test-held | a file of 'caption[<TAB>seed]' lines (repeatable; default: both splits)")
    p.add_argument("--fit-steps", type=int, default=0,
                   help="also fit an H to each neighbour's latent with this many Adam steps (what an H-space edit could draw; 0: skip)")
    p.add_argument("--fit-lr", type=float, default=0.3, help="the H fit's Adam learning rate (suits H-features of norm ~50)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.set_defaults(handler=_probe, n=100)


def _open(args, base_only: bool = False, with_teacher: bool = True):
    """(model directory, pipeline, the teacher UNet or None when ``with_teacher`` is False)."""
    from imageragturbo.cli import CliError, default_model_dir
    from imageragturbo.model.loading import load_teacher_unet
    from imageragturbo.model.pipeline import open_pipeline

    model_dir = args.model or default_model_dir()
    try:
        pipe = open_pipeline(model_dir, indexes=args.index, base_only=base_only)
        teacher = load_teacher_unet(model_dir) if with_teacher else None
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return model_dir, pipe, teacher


def _fidelity(args) -> int:
    from imageragturbo.cli import CliError
    from imageragturbo.eval.fidelity import RowSpec, evaluate_fidelity, load_prompts, save_grid

    model_dir, pipe, teacher = _open(args)
    steps = args.steps or (25 if args.mode == "teacher" else 1)
    inject_w = None if args.inject_w == "oracle" else float(args.inject_w)
    row = RowSpec(name=f"{args.mode} {steps}-step", mode=args.mode, steps=steps, inject_w=inject_w, cfg_scale=args.cfg)
    try:
        prompts = load_prompts(args.prompts, args.n)
        result = evaluate_fidelity(pipe, row, prompts, args.prompts, teacher_unet=teacher, k=args.k, database=args.database)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    report = {"model": str(model_dir), **result.as_dict()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    grid = args.grid or args.json.with_suffix(".png")
    save_grid(result.images[:32], result.captions[:32], grid, f"{row.name} on {args.prompts} ({model_dir})")
    cats = " ".join(f"{c}={v:.3f}" for c, v in result.benchmark.per_category.items())
    print(f"{row.name} on {args.prompts} (n={result.benchmark.n}): mean {result.benchmark.mean_score:.3f}, "
          f"strict {result.benchmark.strict:.3f}; {cats}; wrote {args.json} and {grid}")
    return 0


def _table(args) -> int:
    from imageragturbo.eval.fidelity import fidelity_table

    model_dir, pipe, teacher = _open(args)
    _, base_pipe, _ = _open(args, base_only=True, with_teacher=False)
    report = fidelity_table(pipe, teacher, args.out, n=args.n, k=args.k, database=args.database,
                            model_label=str(model_dir), base_pipe=base_pipe)
    print(f"wrote {args.out / 'fidelity.md'} ({len(report['results'])} rows x splits)")
    return 0


def _leverage(args) -> int:
    from imageragturbo.cli import CliError, default_model_dir
    from imageragturbo.eval.leverage import leverage_markdown, measure_leverage
    from imageragturbo.model.loading import load_model, load_teacher_unet
    from imageragturbo.model.text import PromptEncoder
    from imageragturbo.world.splits import eval_prompts

    model_dir = args.model or default_model_dir()
    try:
        timesteps = [int(t) for t in args.timesteps.split(",")]
        # The bare one-step UNet (no LoRA): what the method's adapter has to steer.
        parts = load_model(model_dir, base_only=True)
        unets = {"student (unet/)": parts.unet}
        if (Path(model_dir) / "teacher").is_dir():
            unets["teacher (teacher/)"] = load_teacher_unet(model_dir).float().eval()
        encoder = PromptEncoder(parts.tokenizer, parts.text_encoder)
        prompts = [p for p, _ in eval_prompts("test-seen", args.n)]
        rows = [measure_leverage(u, encoder, prompts, t, name=name) for name, u in unets.items() for t in timesteps]
    except ValueError as exc:
        raise CliError(f"{model_dir}: {exc}") from exc
    return _report(args, leverage_markdown(rows, str(model_dir)), model_dir, rows)


def _probe(args) -> int:
    from imageragturbo.cli import CliError
    from imageragturbo.eval.fidelity import load_prompts
    from imageragturbo.eval.probe import probe_markdown, probe_split

    if args.fit_steps < 0:
        raise CliError(f"--fit-steps must be >= 0, got {args.fit_steps}")
    if not args.fit_lr > 0:
        raise CliError(f"--fit-lr must be > 0, got {args.fit_lr}")
    model_dir, pipe, _ = _open(args, base_only=True, with_teacher=False)
    rows = []
    try:
        for split in args.prompts or ["test-seen", "test-held"]:
            rows += probe_split(pipe, load_prompts(split, args.n), split, database=args.database,
                                fit_steps=args.fit_steps, fit_lr=args.fit_lr)
    except ValueError as exc:
        raise CliError(f"{model_dir}: {exc}") from exc
    return _report(args, probe_markdown(rows, str(model_dir)), model_dir, rows)


def _report(args, markdown: str, model_dir, rows) -> int:
    """Print a command's table; with ``--json``, also write its rows there."""
    print(markdown, end="")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(model_dir), "rows": [r.as_dict() for r in rows]}, indent=2))
    return 0
