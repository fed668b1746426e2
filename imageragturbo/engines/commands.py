"""CLI: `imageragturbo export` and `imageragturbo bench latency`."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def register(sub, group) -> None:
    p = sub.add_parser("export", help="export the model's graphs to ONNX (text encoder, denoise per mode, VAE decoder) with a manifest")
    p.add_argument("--out", type=Path, required=True, help="export folder (replaced if it holds an earlier export)")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: IRT_MODEL or the bundled model)")
    p.add_argument("--adapter", type=Path, default=None, help="adapter directory (default: <model>/adapter)")
    p.add_argument("--lora", type=Path, default=None, help="UNet-decoder LoRA directory, fused before export (default: <model>/unet_lora)")
    p.add_argument("--graphs", default=None, help="comma-separated subset (default: every graph the model has)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17; 18 with --exporter dynamo)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx's TorchScript tracer (seconds) or torch.export-based exporter (minutes)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check of each graph")
    p.set_defaults(handler=_export)

    bench = group("bench", "benchmarks")
    p = bench.add_parser("latency", help="the paper's latency protocol: per-stage ms/image over the same prompts, per engine and mode")
    p.add_argument("--engines", default="torch,onnxruntime", help="comma-separated: torch, onnxruntime, tensorrt")
    p.add_argument("--modes", default="off,adapter", help="comma-separated: off, adapter, inject")
    p.add_argument("--n", type=int, default=100, help="prompts (the shapes world's fixed test-seen list)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per engine and mode first")
    p.add_argument("-k", "--k", type=int, default=4, help="neighbours to retrieve")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: IRT_MODEL or the bundled model)")
    p.add_argument("--engine-dir", type=Path, default=None,
                   help="export folder for onnxruntime/tensorrt (exported there first if empty; default: a temporary export)")
    p.add_argument("--index", default=None, metavar="NAME=DIR",
                   help="retrieval database (default: <model>/index, else a temporary index of --db-size world pairs)")
    p.add_argument("--db-size", type=int, default=2000, help="world pairs in the temporary index")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime alike")
    p.add_argument("--ort-optimization", choices=("disable", "basic", "extended", "all"), default="all")
    p.add_argument("--no-io-binding", action="store_true", help="onnxruntime: session.run instead of IO binding")
    p.add_argument("--ort-dynamic-shapes", action="store_true",
                   help="onnxruntime: keep batch and k dynamic (default: pinned to 1 and -k, as the protocol is batch 1)")
    p.add_argument("--device", default="cpu", help="where the torch modules run (cpu, cuda); engines pick their own device")
    p.add_argument("--trt-precision", choices=("fp16", "fp32"), default="fp16", help="tensorrt: builder precision")
    p.add_argument("--trt-cuda-graph", action="store_true", help="tensorrt: capture and replay a CUDA graph per input shape")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N calls per engine (ORT per-op JSON, torch profiler) and report the top ops")
    p.add_argument("--json", type=Path, required=True, help="results JSON")
    p.add_argument("--report", type=Path, default=None, help="markdown report to (re)write the results table into, e.g. results/latency.md")
    p.add_argument("--png", type=Path, default=None, help="stacked-bar figure (default: next to --report, latency.png)")
    p.add_argument("--note", action="append", default=[], help="a line to add to the report (repeatable)")
    p.set_defaults(handler=_bench_latency)


def _export(args) -> int:
    from imageragturbo.cli import CliError, default_model_dir
    from imageragturbo.engines.export import export_model
    from imageragturbo.engines.graphs import DEFAULT_OPSET
    from imageragturbo.model import ModelLoadError, load_model

    model_dir = args.model or default_model_dir()
    try:
        components = load_model(model_dir, adapter_dir=args.adapter, lora_dir=args.lora)
    except ModelLoadError as exc:
        raise CliError(str(exc)) from exc
    opset = args.opset or (18 if args.exporter == "dynamo" else DEFAULT_OPSET)
    graphs = tuple(_csv(args.graphs)) if args.graphs else None
    try:
        manifest = export_model(components, args.out, graphs=graphs, opset=opset, exporter=args.exporter,
                                verify=not args.no_verify)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    for name, graph in manifest.graphs.items():
        err = "not checked" if graph.max_rel_err is None else f"max rel err vs torch {graph.max_rel_err:.1e}"
        print(f"{name}: {args.out / graph.file} ({graph.size_bytes / 1e6:.1f} MB, {err})", file=sys.stderr)
    print(f"wrote {args.out / 'manifest.json'} (model {manifest.source['model_id']})", file=sys.stderr)
    return 0


def _database(pipe, args, work: Path):
    """The pipeline's database (``--index``, else ``<model>/index``, both opened by open_pipeline),
    or, when the model has none, a temporary index of ``--db-size`` world pairs built here."""
    from imageragturbo.cli import CliError
    from imageragturbo.index.build import build_index
    from imageragturbo.index.disk import load_database, parse_index_spec
    from imageragturbo.index.pairs import WorldPairs

    if pipe.databases:
        path = parse_index_spec(args.index)[1] if args.index else Path(pipe.components.model_dir) / "index"
        return next(iter(pipe.databases.values())), f"{path}"
    path = work / "index"
    try:
        build_index(pipe, WorldPairs(args.db_size), path, progress=False)
        return load_database("world", path), f"a temporary index of {args.db_size} shapes-world database pairs"
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _profile(pipes: dict, engines_options: dict, components, engine_dir, modes, prompts, n: int, k: int, work: Path) -> dict:
    """Untimed: per-op breakdown of the ONNX Runtime graphs and of torch's denoise."""
    import torch

    from imageragturbo.engines.pipeline_engines import load_pipeline_engines
    from imageragturbo.eval.latency_bench import summarize_ort_profile
    from imageragturbo.model import RagTurboPipeline

    out: dict = {}
    database = next(iter(pipes.values())).databases
    if "torch" in pipes:
        pipe = pipes["torch"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for mode in modes:
                for prompt, seed in prompts[:n]:
                    pipe([prompt], [seed], mode=mode, k=k)
        table = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in table) or 1
        ranked = sorted(table, key=lambda e: -e.self_cpu_time_total)[:10]
        out["torch"] = [
            {"op": e.key, "ms": round(e.self_cpu_time_total / 1e3, 3), "share": round(e.self_cpu_time_total / total, 4)}
            for e in ranked
        ]
    if "onnxruntime" in pipes:
        prefix = str(work / "ort_profile")
        engines = load_pipeline_engines("onnxruntime", engine_dir, components, profile_prefix=prefix, **engines_options)
        pipe = RagTurboPipeline(components, list(database.values()), engines=engines)
        for mode in modes:
            for prompt, seed in prompts[:n]:
                pipe([prompt], [seed], mode=mode, k=k)
        out["onnxruntime"] = {
            name: summarize_ort_profile(engine.end_profiling()) for name, engine in engines.engines.items()
        }
    return out


def _bench_latency(args) -> int:
    import torch

    from imageragturbo.cli import CliError, default_model_dir
    from imageragturbo.engines.export import MANIFEST_NAME, export_model
    from imageragturbo.engines.pipeline_engines import load_pipeline_engines
    from imageragturbo.engines.protocol import ENGINE_KINDS, EngineLoadError
    from imageragturbo.engines.tensorrt_engine import TrtBuildSpec
    from imageragturbo.eval.latency_bench import (
        bench_prompts,
        machine_info,
        plot_stacked,
        render_markdown,
        run_latency_bench,
        update_report,
    )
    from imageragturbo.model import RagTurboPipeline
    from imageragturbo.model.denoiser import MODES
    from imageragturbo.model.pipeline import open_pipeline

    engines, modes = _csv(args.engines), _csv(args.modes)
    for engine in engines:
        if engine not in ENGINE_KINDS:
            raise CliError(f"unknown engine {engine!r}; choose from {', '.join(ENGINE_KINDS)}")
    for mode in modes:
        if mode not in MODES:
            raise CliError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if args.n < 1 or args.warmup < 0 or args.threads < 1:
        raise CliError(f"--n and --threads must be >= 1 and --warmup >= 0, got {args.n}, {args.threads}, {args.warmup}")
    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model_dir()
    try:
        # ModelLoadError and IndexLoadError are ValueErrors naming the file at fault.
        torch_pipe = open_pipeline(model_dir, indexes=[args.index] if args.index else None, device=args.device)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    components = torch_pipe.components
    if "adapter" in modes and components.adapter is None:
        raise CliError(f"mode 'adapter' needs a model with an adapter/ folder; {model_dir} has none")
    machine = machine_info(args.threads)

    with tempfile.TemporaryDirectory(prefix="irt-latency-") as tmp:
        work = Path(tmp)
        database, database_desc = _database(torch_pipe, args, work)
        engine_dir = args.engine_dir or work / "onnx"
        compiled = [e for e in engines if e != "torch"]
        if compiled and not (engine_dir / MANIFEST_NAME).is_file():
            print(f"exporting the model to {engine_dir} ...", file=sys.stderr)
            export_model(components, engine_dir)
        options = {
            "onnxruntime": {
                "threads": args.threads,
                "optimization": args.ort_optimization,
                "io_binding": not args.no_io_binding,
                "static_sizes": None if args.ort_dynamic_shapes else {"batch": 1, "k": args.k},
            },
            "tensorrt": {
                "build": TrtBuildSpec(precision=args.trt_precision, batch_ranges=((1, 1, 1),), k_range=(args.k,) * 3),
                "cuda_graph": args.trt_cuda_graph,
            },
        }
        pipes = {}
        try:
            for engine in engines:
                loaded = None if engine == "torch" else load_pipeline_engines(engine, engine_dir, components, **options[engine])
                pipes[engine] = RagTurboPipeline(components, [database], engines=loaded)
        except (EngineLoadError, ValueError) as exc:
            raise CliError(str(exc)) from exc
        prompts = bench_prompts(args.n)
        result = run_latency_bench(pipes, modes, prompts, warmup=args.warmup, k=args.k, machine=machine)
        result.protocol.update(
            model_dir=str(model_dir), model_id=components.model_id, database=database_desc,
            database_size=len(database.store), prompts="shapes world test-seen eval_prompts",
            ort_optimization=args.ort_optimization, io_binding=not args.no_io_binding,
            ort_static_shapes=not args.ort_dynamic_shapes,
        )
        profile = (
            _profile(pipes, options["onnxruntime"], components, engine_dir, modes, prompts, args.profile, args.k, work)
            if args.profile
            else None
        )

    data = result.to_dict()
    if profile:
        data["profile"] = profile
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2))
    for run in result.runs:
        stages = " ".join(f"{s}={v['p50_ms']:.3f}" for s, v in run.stages.items())
        print(f"{run.engine:12s} {run.mode:8s} p50 ms: {stages}", file=sys.stderr)
    if args.report:
        png = args.png or args.report.with_name("latency.png")
        plot_stacked(result, png, title=f"{Path(model_dir).name}: ms/image, batch 1 ({args.threads} thread(s))")
        notes = [f"model: `{model_dir}` (id {components.model_id}); database: {database_desc}", *args.note]
        markdown = render_markdown(result, png_name=Path(png).name if png.parent == args.report.parent else str(png), notes=notes)
        if profile:
            markdown += "\n" + _profile_markdown(profile, args.profile, len(modes))
        update_report(args.report, markdown)
        print(f"wrote {args.report} and {png}", file=sys.stderr)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _profile_markdown(profile: dict, n: int, n_modes: int) -> str:
    calls = n * n_modes
    lines = [f"Top operators over {calls} profiled calls (ms per call; share of the graph's kernel time):", ""]
    if "torch" in profile:
        cells = ", ".join(f"{p['op']} {p['ms'] / calls:.3f} ({100 * p['share']:.0f}%)" for p in profile["torch"][:6])
        lines.append(f"- torch (whole pipeline call, self CPU time): {cells}")
    for graph, ops in profile.get("onnxruntime", {}).items():
        if not ops:  # a graph the profiled modes never ran
            continue
        per_call = calls if graph in ("text_encoder", "vae_decode") else n
        cells = ", ".join(f"{p['op_type']} {p['ms'] / per_call:.3f} ({100 * p['share']:.0f}%)" for p in ops[:6])
        lines.append(f"- onnxruntime `{graph}`: {cells}")
    return "\n".join(lines) + "\n"
