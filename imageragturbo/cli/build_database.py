"""`imageragturbo build-database` and `imageragturbo check-database` (formerly build-index, check-index).

A *database* is what is built, named and served: text embeddings, latents, H-features and the
searcher (the ANN *index*) over them, in one folder with a manifest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from imageragturbo.cli import options

RENAMED = {"build-index": "build-database", "check-index": "check-database"}
"""Old command names, still accepted with one line on stderr."""


def register(sub) -> None:
    p = sub.add_parser("build-database", aliases=["build-index"],
                       help="build a retrieval database folder (text embeddings, latents, H-features, searcher)")
    p.add_argument("--out", type=Path, required=True, help="database folder to create")
    options.add_model(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", type=int, metavar="N", help="N pairs of the shapes world's database split")
    source.add_argument("--pairs", type=Path, metavar="PATH",
                        help="a folder of images + same-name .txt captions, a .jsonl or a .parquet of {image, caption}")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world's database stream")
    p.add_argument("--style", choices=("dim", "grey", "bright"), default=None,
                   help="render every --world pair on this background style (default: drawn per pair)")
    p.add_argument("--searcher", choices=options.searcher_kinds(), default="auto", help="auto: exact under 20k pairs, else scann")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per model call")
    p.add_argument("--chunk-size", type=int, default=1024, help="pairs per durable chunk (the unit of --resume)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build of the same pairs with the same model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=build)

    p = sub.add_parser("check-database", aliases=["check-index"],
                       help="verify a database folder's checksums and print its manifest summary")
    p.add_argument("path", type=Path)
    p.set_defaults(handler=check)


def build(args) -> int:
    from imageragturbo.index.build import build_index
    from imageragturbo.index.pairs import WorldPairs, open_pairs
    from imageragturbo.model import RagTurboPipeline

    source = WorldPairs(args.world, args.world_seed, style=args.style) if args.world is not None else open_pairs(args.pairs)
    pipe = RagTurboPipeline.from_pretrained(options.model_dir(args))
    result = build_index(pipe, source, args.out, searcher=args.searcher, batch_size=args.batch_size,
                         chunk_size=args.chunk_size, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.no_progress)
    print(
        f"wrote {result.path}: {result.count} pairs, searcher {result.searcher['kind']}, "
        f"model {pipe.components.model_id}, {result.seconds:.1f} s"
        + (f" (resumed after {result.resumed_chunks} chunks)" if result.resumed_chunks else ""),
        file=sys.stderr,
    )
    return 0


def check(args) -> int:
    from imageragturbo.index.disk import MemmapFeatureStore

    from imageragturbo.index.disk import verify_values

    store = MemmapFeatureStore(args.path)
    store.verify()
    verify_values(args.path, store)
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
