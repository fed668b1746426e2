"""`imageragturbo serve` and `imageragturbo bench service`."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

from imageragturbo.cli import CliError, default_model_dir

logger = logging.getLogger(__name__)

# The engines issue's kinds (imageragturbo.engines.ENGINE_KINDS), spelled out so that
# `imageragturbo --help` does not import onnxruntime.
ENGINES = ("torch", "onnxruntime", "tensorrt")
DEFAULT_INDEX_NAME = "default"
RESULTS_PREAMBLE = """# HTTP service benchmark

`imageragturbo bench service`: closed-loop load on loopback (each client thread keeps one request
in flight), against a server started by the bench in its own process. Latencies are as the
client sees them; *pipeline p50* is the sum of the pipeline stages the server reports in
`Server-Timing` (for a batched request: its batch's stage times). *Server overhead* at
concurrency 1 is given two ways: HTTP p50 minus pipeline p50, and the p50 over requests of each
request's HTTP time minus its own pipeline time (HTTP, validation, the hand-offs to and from the
worker, PNG encoding and the Python client itself). Reproduce with the command under each table.
"""


def register(sub, group) -> None:
    p = sub.add_parser("serve", help="serve POST /generate, /metrics, /healthz, /readyz and the playground over HTTP")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: IRT_MODEL or the bundled model)")
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a retrieval database to serve under NAME (repeatable; the first is the default; a bare DIR "
        "is named after its folder; "
        f"default: <model>/index as {DEFAULT_INDEX_NAME!r} when it exists)",
    )
    p.add_argument(
        "--engine", choices=ENGINES, default="torch", help="what runs text encoding, denoise and VAE decode (default: torch)"
    )
    p.add_argument(
        "--engine-dir", type=Path, default=None, help="an `imageragturbo export` folder (needed by onnxruntime and tensorrt)"
    )
    p.add_argument("--adapter", type=Path, default=None, help="adapter directory (default: <model>/adapter)")
    p.add_argument("--lora", type=Path, default=None, help="UNet-decoder LoRA directory (default: <model>/unet_lora)")
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
    p.set_defaults(handler=_serve)

    bench = group("bench", "benchmarks")
    b = bench.add_parser("service", help="closed-loop HTTP load on loopback: throughput and latency per concurrency")
    b.add_argument("--url", default=None, help="an already running server (default: start one on a free loopback port)")
    b.add_argument("--model", type=Path, default=None, help="model for the server the bench starts (default: as serve)")
    b.add_argument("--index", action="append", default=[], metavar="NAME=DIR", help="as for serve")
    b.add_argument(
        "--engine", choices=ENGINES, default=None, help="serve --engine for the server the bench starts (default: torch)"
    )
    b.add_argument("--engine-dir", type=Path, default=None, help="serve --engine-dir for the server the bench starts")
    b.add_argument(
        "--threads", type=int, default=None, help="serve --threads for the server the bench starts (default: serve's)"
    )
    b.add_argument(
        "--label",
        default=None,
        help="model name in the results (default: the model folder's name, plus the engine when it is not torch)",
    )
    b.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    b.add_argument("--n", type=int, default=300, help="requests per concurrency level")
    b.add_argument("--warmup", type=int, default=20, help="requests sent before measuring")
    b.add_argument("--mode", choices=("adapter", "inject", "off"), default=None, help="request mode (default: the server's)")
    b.add_argument("--steps", type=int, default=1)
    b.add_argument("--json", type=Path, required=True, help="write the results as JSON here")
    b.add_argument("--md", type=Path, default=Path("results/service.md"), help="results page to update")
    b.set_defaults(handler=_bench_service)


def _settings(args):
    from pydantic import ValidationError

    from imageragturbo.service.settings import ServiceSettings

    flags = {
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "max_queue": args.max_queue,
        "timeout_s": args.timeout_s,
        "max_body_bytes": args.max_body_bytes,
        "threads": args.threads,
    }
    try:
        return ServiceSettings(**{name: value for name, value in flags.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CliError(f"bad server settings (flags or IRT_* variables): {problems}") from exc


def _serve(args) -> int:
    settings = _settings(args)
    model_dir = args.model or default_model_dir()
    if not model_dir.is_dir():
        raise CliError(
            f"model directory not found: {model_dir} (train the bundled model with `make world`, "
            "or pass --model DIR / set IRT_MODEL)"
        )
    from imageragturbo.service.settings import default_worker_threads, usable_cpus

    if settings.threads is None:
        settings = settings.model_copy(update={"threads": default_worker_threads()})

    from imageragturbo.model import ModelLoadError
    from imageragturbo.model.pipeline import open_pipeline
    from imageragturbo.service.app import create_app, run_server

    default_index = model_dir / "index"
    indexes = args.index or ([f"{DEFAULT_INDEX_NAME}={default_index}"] if default_index.is_dir() else [])
    try:
        # Index checksums are not recomputed at every start (seconds per GB; `imageragturbo
        # check-index` does that); each index's model identity is checked against the model.
        pipe = open_pipeline(model_dir, indexes=indexes, adapter_dir=args.adapter, lora_dir=args.lora)
    except (ModelLoadError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    if args.engine != "torch":
        # The worker still calls only the pipeline; the pipeline runs its stages on the engines.
        # An engine that cannot load is an error here, never a silent fall-back to torch.
        from imageragturbo.engines import EngineLoadError, load_pipeline_engines

        options = {"threads": settings.threads} if args.engine == "onnxruntime" else {}
        try:
            pipe.use_engines(load_pipeline_engines(args.engine, args.engine_dir, pipe.components, **options))
        except (EngineLoadError, ValueError) as exc:
            raise CliError(f"cannot load the {args.engine} engine: {exc}") from exc
    app = create_app(pipe, settings, model_name=model_dir.name, engine=args.engine)
    service = app.state.service
    print(
        f"serving {model_dir} on http://{args.host}:{args.port} (engine {args.engine}, {settings.threads} "
        f"intra-op thread(s) of {usable_cpus()} usable CPUs; modes {', '.join(service.available_modes)}, default "
        f"{service.default_mode}; databases {', '.join(service.database_names) or 'none'})",
        file=sys.stderr,
    )
    run_server(app, host=args.host, port=args.port, settings=settings, log_level="info" if args.verbose else "warning")
    return 0


def _serve_args_for_bench(args) -> list[str]:
    """The serve flags that configure the server the bench starts (refused with --url: that
    server is configured already)."""
    given = {"--engine": args.engine, "--engine-dir": args.engine_dir, "--threads": args.threads}
    given = {flag: value for flag, value in given.items() if value is not None}
    if args.url is not None and given:
        raise CliError(
            f"{', '.join(given)} configure the server the bench starts; with --url the server is already running "
            "(start it with these flags instead)"
        )
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    serve_args = []
    for flag, value in given.items():
        serve_args += [flag, str(value)]
    return serve_args


def _bench_service(args) -> int:
    from imageragturbo.service import bench

    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError as exc:
        raise CliError(f"--concurrency takes comma-separated integers, got {args.concurrency!r}") from exc
    if not concurrencies or min(concurrencies) < 1 or args.n < 1:
        raise CliError(f"need concurrency >= 1 and --n >= 1, got {args.concurrency!r} and {args.n}")
    body: dict = {"steps": args.steps}
    if args.mode:
        body["mode"] = args.mode
    headers = {}
    if os.environ.get("IRT_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['IRT_API_KEY']}"

    process = None
    model_dir = args.model or default_model_dir()
    serve_args = _serve_args_for_bench(args)
    label = args.label or (model_dir.name if args.url is None else args.url)
    if args.label is None and args.engine not in (None, "torch"):
        label += f" ({args.engine})"
    if args.url is None:
        if not model_dir.is_dir():
            raise CliError(f"model directory not found: {model_dir} (pass --model DIR or --url URL)")
        log_path = args.json.with_suffix(".server.log")
        process, url = bench.start_server(model_dir, args.index, {}, log_path, serve_args)
        try:
            bench.wait_ready(url, timeout_s=300.0, process=process)
        except RuntimeError as exc:
            bench.stop_server(process)
            raise CliError(f"{exc}; see {log_path}") from exc
    else:
        url = args.url.rstrip("/")
    try:
        result = bench.run_bench(
            url,
            model_label=label,
            concurrencies=concurrencies,
            n=args.n,
            body=body,
            headers=headers,
            warmup=args.warmup,
            server_pid=process.pid if process is not None else None,
        )
    except (RuntimeError, OSError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        if process is not None:
            bench.stop_server(process)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(bench.result_to_json(result))
    from imageragturbo.service.settings import ServiceSettings

    settings = ServiceSettings()  # what the server the bench started read from IRT_* (no flags)
    note = (
        f"`imageragturbo serve` (started by the bench) with max_batch {settings.max_batch}, batch_wait_ms "
        f"{settings.batch_wait_ms:g}, max_queue {settings.max_queue}"
        if process is not None
        else f"{url} (already running)"
    )
    command = f"imageragturbo bench service --concurrency {args.concurrency} --n {args.n}"
    for flag, value in (("--url", args.url), ("--model", args.model), ("--mode", args.mode), ("--label", args.label)):
        if value is not None:
            command += f" {flag} {shlex.quote(str(value))}"
    command += "".join(f" {shlex.quote(part)}" for part in serve_args)
    command += "".join(f" --index {shlex.quote(spec)}" for spec in args.index) + f" --steps {args.steps} --json {args.json}"
    section = bench.render_markdown(result, note) + f"\nCommand: `{command}`\n\n"
    bench.update_markdown(args.md, label, section, RESULTS_PREAMBLE)
    for level in result.levels:
        print(
            f"c={level.concurrency}: {level.throughput_rps:.1f} req/s, p50 {level.p50_ms:.2f} ms, p99 "
            f"{level.p99_ms:.2f} ms, pipeline p50 {level.pipeline_p50_ms:.2f} ms, mean batch {level.mean_batch_size}, "
            f"errors {level.errors or 0}"
        )
    print(
        f"overhead p50 {result.overhead_p50_ms} ms (per request {result.overhead_per_request_p50_ms} ms); c8/c1 {result.speedup_c8_over_c1}x; wrote {args.json} and {args.md}",
        file=sys.stderr,
    )
    return 0
