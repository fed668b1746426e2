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
    p.add_argument(
        "--ray", action="store_true",
        help="serve as a Ray Serve application (pip install 'imageragturbo[ray]'): replicas of this server, each "
        "with its own pipeline and batcher, behind Ray's proxy on --host/--port; IRT_RAY_* settings (docs/scale.md)",
    )
    p.add_argument(
        "--replicas", type=int, default=None,
        help="with --ray: this many replicas (IRT_RAY_NUM_REPLICAS; default: autoscale on ongoing requests between "
        "IRT_RAY_MIN_REPLICAS=1 and IRT_RAY_MAX_REPLICAS=4)",
    )
    p.set_defaults(handler=run)


def run(args) -> int:
    if args.ray:
        return run_ray(args)
    if args.replicas is not None:
        from imageragturbo.errors import ConfigError

        raise ConfigError("--replicas needs --ray (one `imageragturbo serve` process is one replica)")
    from imageragturbo.service.serve import serve

    serve(
        options.model_dir(args), databases=args.databases or [], engine=args.engine, engine_dir=args.engine_dir,
        adapter_dir=args.adapter, lora_dir=args.lora, host=args.host, port=args.port,
        log_level="info" if args.verbose else "warning", max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, timeout_s=args.timeout_s, max_body_bytes=args.max_body_bytes, threads=args.threads,
        verify_databases=args.verify_databases,
    )
    return 0


def run_ray(args) -> int:
    from imageragturbo.service import ray_app
    from imageragturbo.service.settings import settings_from_flags

    flags = {
        "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "max_queue": args.max_queue,
        "timeout_s": args.timeout_s, "max_body_bytes": args.max_body_bytes, "threads": args.threads,
        "verify_databases": args.verify_databases,
    }
    flags = {name: value for name, value in flags.items() if value is not None}
    settings_from_flags(**flags)  # bad values fail here, in one line, before Ray starts
    # Ray's workers do not start in this folder: every path goes to them absolute.
    replica = ray_app.replica_args({
        "model": _absolute(options.model_dir(args)), "databases": [_absolute_spec(s) for s in args.databases or []],
        "engine": args.engine, "engine_dir": _absolute(args.engine_dir), "adapter": _absolute(args.adapter),
        "lora": _absolute(args.lora),
        "settings": flags, "ray": {"num_replicas": args.replicas} if args.replicas is not None else {},
    })
    ray_app.run_local(replica, ray_app.ray_settings(**replica.ray), host=args.host, port=args.port)
    return 0


def _absolute(path) -> str | None:
    from pathlib import Path

    return None if path is None else str(Path(path).expanduser().absolute())


def _absolute_spec(spec: str) -> str:
    """NAME=DIR (or DIR) with DIR absolute."""
    name, sep, folder = spec.partition("=")
    if not sep:
        return _absolute(spec) if spec.strip() else spec
    return f"{name}={_absolute(folder)}" if folder.strip() and name.strip() else spec
