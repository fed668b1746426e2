"""`imageragturbo bench latency | retrieval | service | soak`: what imageragturbo.benchmarks measures."""

from __future__ import annotations

import sys
from pathlib import Path

from imageragturbo.cli import options


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    _register_latency(bench)
    _register_retrieval(bench)
    _register_service(bench)
    _register_soak(bench)
    _register_gpu_check(bench)


def _register_latency(bench) -> None:
    p = bench.add_parser("latency", help="the paper's latency protocol: per-stage ms/image over the same prompts, per engine and mode")
    p.add_argument("--engines", type=options.csv, default="torch,onnxruntime",
                   help=f"comma-separated: {', '.join(options.engine_kinds())}")
    p.add_argument("--modes", type=options.csv, default="off,adapter", help="comma-separated: off, adapter, inject")
    p.add_argument("--n", type=int, default=100, help="prompts (the shapes world's fixed test-seen list)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per engine and mode first")
    p.add_argument("-k", "--k", type=int, default=4, help="neighbours to retrieve")
    options.add_model(p)
    p.add_argument("--engine-dir", type=Path, default=None,
                   help="export folder for onnxruntime/tensorrt (exported there first if empty; default: a temporary export)")
    options.add_databases(p, many=False,
                          help="retrieval database (default: the model's own, else a temporary one of --db-size world pairs)")
    p.add_argument("--db-size", type=int, default=2000, help="world pairs in the temporary database")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime alike")
    p.add_argument("--ort-optimization", choices=("disable", "basic", "extended", "all"), default="all")
    p.add_argument("--no-io-binding", action="store_true", help="onnxruntime: session.run instead of IO binding")
    p.add_argument("--ort-dynamic-shapes", action="store_true",
                   help="onnxruntime: keep batch and k dynamic (default: pinned to 1 and -k, as the protocol is batch 1)")
    options.add_device(p)
    p.add_argument("--trt-precision", choices=("fp16", "fp32"), default="fp16", help="tensorrt: builder precision")
    p.add_argument("--trt-cuda-graph", action="store_true", help="tensorrt: capture and replay a CUDA graph per input shape")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N calls per engine (ORT per-op JSON, torch profiler) and report the top ops")
    p.add_argument("--json", type=Path, required=True, help="results JSON")
    p.add_argument("--report", type=Path, default=None, help="markdown report to (re)write the results table into, e.g. results/latency.md")
    p.add_argument("--png", type=Path, default=None, help="stacked-bar figure (default: next to --report, latency.png)")
    p.add_argument("--note", action="append", default=[], help="a line to add to the report (repeatable)")
    p.set_defaults(handler=latency)


def latency(args) -> int:
    from imageragturbo.benchmarks import latency as bench

    result = bench.run(bench.LatencyBenchOptions(
        model_dir=options.model_dir(args), engines=args.engines, modes=args.modes, n=args.n, warmup=args.warmup,
        k=args.k, engine_dir=args.engine_dir, database=args.databases[0] if args.databases else None,
        db_size=args.db_size, threads=args.threads, ort_optimization=args.ort_optimization,
        io_binding=not args.no_io_binding, ort_static_shapes=not args.ort_dynamic_shapes, device=args.device,
        trt_precision=args.trt_precision, trt_cuda_graph=args.trt_cuda_graph, profile=args.profile, json=args.json,
        report=args.report, png=args.png, notes=args.note,
    ))
    for run in result.runs:
        stages = " ".join(f"{s}={v['p50_ms']:.3f}" for s, v in run.stages.items())
        print(f"{run.engine:12s} {run.mode:8s} p50 ms: {stages}", file=sys.stderr)
    print(f"wrote {args.json}" + (f" and {args.report}" if args.report else ""), file=sys.stderr)
    return 0


def _register_retrieval(bench) -> None:
    p = bench.add_parser("retrieval", help="ScaNN vs FAISS/hnswlib on synthetic clustered embeddings; H-feature gather and store size")
    p.add_argument("--n", type=int, default=630_000, help="database entries")
    p.add_argument("--dim", type=int, default=1024, help="embedding dimension")
    p.add_argument("--queries", type=int, default=1000, help="single queries timed (and scored for recall)")
    p.add_argument("--searcher", default="scann", choices=("scann",), help="our searcher")
    p.add_argument("--peers", default="faiss-hnsw,faiss-ivf,hnswlib", help="comma-separated peers; '' for none (skipped if not installed)")
    p.add_argument("--scann-leaves", type=int, default=None, help="tree leaves (default: sqrt(n))")
    p.add_argument("--scann-reorder-dtype", default="float32", choices=("float32", "int8", "bfloat16"))
    p.add_argument("--scann-ah-dims", type=int, default=2, help="dimensions per AH block")
    p.add_argument("--scann-generic-tree", action="store_true", help="k-means tree without spherical=True")
    p.add_argument("--hnsw-ef-construction", type=int, default=200)
    p.add_argument("--milvus-queries", type=int, default=None,
                   help="time only the first N queries on the milvus peers (Milvus Lite costs ~1.3 us per stored row a query)")
    p.add_argument("--milvus-ef", default="", help="comma-separated ef values for the milvus peers (default: the HNSW sweep)")
    p.add_argument("--milvus-uri", default=None,
                   help="a Milvus server for the milvus-server peer (http://host:19530; token from IRT_MILVUS_TOKEN)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--h-rows", type=int, default=4096, help="rows of the SD-sized H-feature store for the gather timing")
    options.add_model(p, help="model for the quantisation effect (default: the bundled one, if present)")
    p.add_argument("--effect-pairs", type=int, default=256, help="database pairs for the quantisation effect (0: skip it)")
    p.add_argument("--effect-prompts", type=int, default=32, help="test-held prompts for the quantisation effect")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder for data and indexes (default: a temporary one)")
    p.add_argument("--json", type=Path, required=True, help="results JSON")
    p.add_argument("--markdown", type=Path, default=None, help="also write the results as a markdown report")
    p.add_argument("--variant", type=Path, action="append", default=[], help="results JSON of another ScaNN build to list in the report (repeatable)")
    p.add_argument("--parts", default="searchers,store",
                   help="searchers (the index comparison), store (gather timing, store size, shrink effect); "
                        "'store' alone updates an existing --json in place")
    p.add_argument("--render-only", action="store_true", help="run nothing: render --markdown from an existing --json (and --variant files)")
    p.set_defaults(handler=retrieval)


def retrieval(args) -> int:
    from dataclasses import fields

    from imageragturbo.benchmarks.retrieval.run import RetrievalBenchOptions, run

    result = run(RetrievalBenchOptions(**{f.name: getattr(args, f.name) for f in fields(RetrievalBenchOptions)}))
    print(
        f"{result['searcher']}: p50 {result['p50_ms']:.3f} ms, recall@10 {result['recall_at_10']:.4f}; "
        + "; ".join(f"{p['searcher']}: p50 {p['p50_ms']:.3f} ms, recall@10 {p['recall_at_10']:.4f}" for p in result["peers"])
        + f"; wrote {args.markdown if args.render_only else args.json}",
        file=sys.stderr,
    )
    return 0


def _register_service(bench) -> None:
    b = bench.add_parser("service", help="closed-loop HTTP load on loopback: throughput and latency per concurrency")
    b.add_argument("--url", default=None, help="an already running server (default: start one on a free loopback port)")
    options.add_model(b, help="model for the server the bench starts (default: as serve)")
    options.add_device(b)
    options.add_databases(b, help="as for serve")
    options.add_engine(b, default=None, help="serve --engine for the server the bench starts (default: torch)",
                       dir_help="serve --engine-dir for the server the bench starts")
    b.add_argument("--threads", type=int, default=None, help="serve --threads for the server the bench starts (default: serve's)")
    b.add_argument("--label", default=None,
                   help="model name in the results (default: the model folder's name, plus the engine when it is not torch)")
    b.add_argument("--concurrency", type=options.csv_ints, default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    b.add_argument("--n", type=int, default=300, help="requests per concurrency level")
    b.add_argument("--warmup", type=int, default=20, help="requests sent before measuring")
    options.add_mode(b, default=None, help="request mode (default: the server's)")
    b.add_argument("--steps", type=int, default=1)
    b.add_argument("--json", type=Path, required=True, help="write the results as JSON here")
    b.add_argument("--md", type=Path, default=Path("results/service.md"), help="results page to update")
    b.set_defaults(handler=service)


def service(args) -> int:
    from imageragturbo.benchmarks import service as bench

    result = bench.run(bench.ServiceBenchOptions(
        url=args.url, model=args.model, databases=args.databases or [], engine=args.engine, engine_dir=args.engine_dir,
        threads=args.threads, label=args.label, concurrencies=args.concurrency, n=args.n, warmup=args.warmup,
        mode=args.mode, steps=args.steps, json=args.json, md=args.md,
    ))
    for level in result.levels:
        print(
            f"c={level.concurrency}: {level.throughput_rps:.1f} req/s, p50 {level.p50_ms:.2f} ms, p99 "
            f"{level.p99_ms:.2f} ms, pipeline p50 {level.pipeline_p50_ms:.2f} ms, mean batch {level.mean_batch_size}, "
            f"errors {level.errors or 0}"
        )
    print(
        f"overhead p50 {result.overhead_p50_ms} ms (per request {result.overhead_per_request_p50_ms} ms); "
        f"c8/c1 {result.speedup_c8_over_c1}x; wrote {args.json} and {args.md}",
        file=sys.stderr,
    )
    return 0


def _register_soak(bench) -> None:
    s = bench.add_parser("soak", help="a bounded load with faults against a real server, then SIGTERM with requests in flight")
    options.add_model(s, help="model for the server the bench starts (default: IRT_MODEL or the bundled model)")
    options.add_device(s)
    s.add_argument("--requests", type=int, default=4000, help="requests in the load, normal and faulty (default 4000)")
    s.add_argument("--concurrency", type=int, default=8, help="client threads, one request in flight each (default 8)")
    s.add_argument("--out", type=Path, default=None, help="results page to put the model's section in, e.g. results/soak.md")
    s.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    s.set_defaults(handler=soak)


def soak(args) -> int:
    from imageragturbo.benchmarks.soak import SoakOptions, run
    from imageragturbo.benchmarks.soak_report import render_markdown

    result = run(SoakOptions(model=args.model, requests=args.requests, concurrency=args.concurrency, out=args.out,
                             json=args.json))
    print(render_markdown(result))
    wrote = [str(path) for path in (args.out, args.json) if path is not None]
    print(f"targets: {result.targets}" + (f"; wrote {' and '.join(wrote)}" if wrote else ""), file=sys.stderr)
    return 0


def _register_gpu_check(bench) -> None:
    g = bench.add_parser("gpu-check", help="the GPU check: gpu-marked tests + the latency protocol at SD-Turbo scale "
                         "(random weights, synthetic database) -> <out>/latency-gpu.md")
    g.add_argument("--out", type=Path, default=Path("results"))
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--toy", action="store_true", help="the same run with the model families shrunk (seconds on a CPU)")
    g.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    g.add_argument("--n", type=int, default=100, help="prompts (batch 1)")
    g.add_argument("--db-rows", type=int, default=20_000, help="rows of the synthetic database")
    g.add_argument("--engines", type=options.csv, default=None,
                   help="default: torch, torch-compile, and onnxruntime / tensorrt where installed")
    g.add_argument("--work", type=Path, default=None, help="scratch folder for the model and database (default: <out>/gpu-check-work)")
    g.set_defaults(handler=gpu_check)


def gpu_check(args) -> int:
    from imageragturbo.benchmarks.gpu_check import GpuCheckOptions, run_gpu_check

    run_gpu_check(GpuCheckOptions(out=args.out, device=args.device, toy=args.toy, tests=not args.no_tests, n=args.n,
                                  db_rows=args.db_rows, engines=tuple(args.engines) if args.engines else None,
                                  work=args.work))
    return 0
