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
    options.add_device(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", type=int, metavar="N", help="N pairs of the shapes world's database split")
    source.add_argument("--pairs", type=Path, metavar="PATH",
                        help="a folder of images + same-name .txt captions, a .jsonl or a .parquet of {image, caption}")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world's database stream")
    p.add_argument("--style", choices=("dim", "grey", "bright"), default=None,
                   help="render every --world pair on this background style (default: drawn per pair)")
    p.add_argument("--searcher", choices=options.searcher_kinds(), default="auto",
                   help="auto: exact under 20k pairs, else scann; milvus: the keys in a Milvus collection "
                   "(pip install '.[milvus]'), the payload in this folder")
    p.add_argument("--h-dtype", choices=options.h_dtype_choices(), default="auto",
                   help="how H-features are stored: float16, int8 (one scale per row and channel, half the "
                   "size), auto: int8 above 8 GiB of float16 H-features")
    p.add_argument("--milvus-uri", default=None,
                   help="with --searcher milvus: a Milvus server (http://host:19530; token from IRT_MILVUS_TOKEN) "
                   "instead of a Milvus Lite folder inside the database (the default)")
    p.add_argument("--milvus-index", choices=options.milvus_index_types(), default="HNSW",
                   help="with --searcher milvus: the collection's index (default: HNSW)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per model call")
    p.add_argument("--chunk-size", type=int, default=1024, help="pairs per durable chunk (the unit of --resume)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build of the same pairs with the same model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=build)

    p = sub.add_parser("check-database", aliases=["check-index"],
                       help="run every check serve runs on a database folder (manifest, checksums, values, searcher, "
                       "and with --model the model it was built with) and print its summary")
    p.add_argument("path", type=Path)
    p.add_argument("--model", type=Path, default=None,
                   help="also check that the database was built with this model directory")
    p.set_defaults(handler=check)


def build(args) -> int:
    from imageragturbo.retrieval.build import build_database
    from imageragturbo.retrieval.pairs import WorldPairs, open_pairs
    from imageragturbo.model import RagTurboPipeline

    source = WorldPairs(args.world, args.world_seed, style=args.style) if args.world is not None else open_pairs(args.pairs)
    if args.searcher != "milvus" and (args.milvus_uri is not None or args.milvus_index != "HNSW"):
        raise options.CliError("--milvus-uri and --milvus-index need --searcher milvus")
    milvus = {"index_type": args.milvus_index, **({"uri": args.milvus_uri} if args.milvus_uri else {})}
    pipe = RagTurboPipeline.from_pretrained(options.model_dir(args))
    result = build_database(pipe, source, args.out, searcher=args.searcher, batch_size=args.batch_size,
                            searcher_params=milvus if args.searcher == "milvus" else None, h_dtype=args.h_dtype,
                            chunk_size=args.chunk_size, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.no_progress)
    print(
        f"wrote {result.path}: {result.count} pairs, searcher {result.searcher['kind']}, H-features {result.h_dtype}, "
        f"model {pipe.components.model_id}, {result.seconds:.1f} s"
        + (f" (resumed after {result.resumed_chunks} chunks)" if result.resumed_chunks else ""),
        file=sys.stderr,
    )
    return 0


def check(args) -> int:
    from imageragturbo.model.loading import model_identity
    from imageragturbo.retrieval.disk import check_database

    model_id = model_identity(args.model) if args.model is not None else None
    print(json.dumps(check_database(args.path, model_id=model_id), indent=2))
    return 0
