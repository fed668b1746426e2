"""CLI: `imageragturbo build-index`, `imageragturbo check-index`, `imageragturbo bench retrieval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub, group) -> None:
    p = sub.add_parser("build-index", help="build a retrieval database folder (text embeddings, latents, H-features, searcher)")
    p.add_argument("--out", type=Path, required=True, help="database folder to create")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: IRT_MODEL or the bundled model)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", type=int, metavar="N", help="N pairs of the shapes world's database split")
    source.add_argument("--pairs", type=Path, metavar="PATH", help="a folder of images + same-name .txt captions, a .jsonl or a .parquet of {image, caption}")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world's database stream")
    p.add_argument("--searcher", choices=("auto", "exact", "scann", "bm25"), default="auto", help="auto: exact under 20k pairs, else scann")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per model call")
    p.add_argument("--chunk-size", type=int, default=1024, help="pairs per durable chunk (the unit of --resume)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build of the same pairs with the same model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_build_index)

    p = sub.add_parser("check-index", help="verify a database folder's checksums and print its manifest summary")
    p.add_argument("path", type=Path)
    p.set_defaults(handler=_check_index)

    bench = group("bench", "benchmarks")
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
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--h-rows", type=int, default=4096, help="rows of the SD-sized H-feature store for the gather timing")
    p.add_argument("--model", type=Path, default=None, help="model for the quantisation effect (default: the bundled one, if present)")
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
    p.set_defaults(handler=_bench_retrieval)


def _build_index(args) -> int:
    from imageragturbo.cli import CliError, default_model_dir
    from imageragturbo.index.build import IndexBuildError, build_index
    from imageragturbo.index.pairs import PairSourceError, WorldPairs, open_pairs
    from imageragturbo.model import ModelLoadError, RagTurboPipeline

    try:
        source = WorldPairs(args.world, args.world_seed) if args.world is not None else open_pairs(args.pairs)
    except (PairSourceError, OSError) as exc:
        raise CliError(str(exc)) from exc
    model_dir = args.model or default_model_dir()
    try:
        pipe = RagTurboPipeline.from_pretrained(model_dir)
    except ModelLoadError as exc:
        raise CliError(str(exc)) from exc
    try:
        result = build_index(
            pipe,
            source,
            args.out,
            searcher=args.searcher,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (IndexBuildError, PairSourceError) as exc:
        raise CliError(str(exc)) from exc
    print(
        f"wrote {result.path}: {result.count} pairs, searcher {result.searcher['kind']}, "
        f"model {pipe.components.model_id}, {result.seconds:.1f} s"
        + (f" (resumed after {result.resumed_chunks} chunks)" if result.resumed_chunks else ""),
        file=sys.stderr,
    )
    return 0


def _check_index(args) -> int:
    from imageragturbo.cli import CliError
    from imageragturbo.index.disk import IndexLoadError, MemmapFeatureStore

    try:
        store = MemmapFeatureStore(args.path)
        store.verify()
    except IndexLoadError as exc:
        raise CliError(str(exc)) from exc
    m = store.manifest
    summary = {
        "path": str(args.path),
        "ok": True,
        "count": m["count"],
        "model_id": m["model_id"],
        "searcher": m["searcher"],
        "arrays": {name: [spec["dtype"], spec["shape"]] for name, spec in m["arrays"].items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


def _bench_retrieval(args: argparse.Namespace) -> int:
    from imageragturbo.cli import CliError
    from imageragturbo.eval.retrieval_bench import BenchError, run_cli

    try:
        return run_cli(args)
    except BenchError as exc:
        raise CliError(str(exc)) from exc
