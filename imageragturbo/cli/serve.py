"""`imageragturbo serve`."""

from __future__ import annotations

from imageragturbo.cli import options


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve POST /generate, /metrics, /healthz, /readyz and the playground over HTTP")
    options.add_model(p)
    options.add_device(p)
    options.add_databases(
        p,
        help="a retrieval database to serve under NAME (the first is the default; a bare DIR is named after its "
        "folder; default: the model's own, <model>/databases/* or <model>/index as 'default')",
    )
    options.add_engine(p)
    options.add_adapter_and_lora(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=None, help="IRT_MAX_BATCH (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="IRT_BATCH_WAIT_MS (default 5)")
    p.add_argument("--max-queue", type=int, default=None, help="IRT_MAX_QUEUE (default 64)")
    p.add_argument("--timeout-s", type=float, default=None, help="IRT_TIMEOUT_S (default 60)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="IRT_MAX_BODY_BYTES (default 16384)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="IRT_THREADS: intra-op threads of the worker's engine, torch and onnxruntime (default: usable "
        "CPUs - 1, at least 1, so one core stays free for the HTTP event loop)",
    )
    p.add_argument(
        "--no-verify-databases", dest="verify_databases", action="store_const", const=False, default=None,
        help="IRT_VERIFY_DATABASES=0: skip the checksum and value checks of every database at start (only for "
        "stores verified elsewhere, e.g. by check-database when the image was built)",
    )
    p.set_defaults(handler=run)


def run(args) -> int:
    from imageragturbo.service.serve import serve

    serve(
        options.model_dir(args), databases=args.databases or [], engine=args.engine, engine_dir=args.engine_dir,
        adapter_dir=args.adapter, lora_dir=args.lora, host=args.host, port=args.port,
        log_level="info" if args.verbose else "warning", max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, timeout_s=args.timeout_s, max_body_bytes=args.max_body_bytes, threads=args.threads,
        verify_databases=args.verify_databases,
    )
    return 0
