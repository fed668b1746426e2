"""The same service as a Ray Serve application: N replicas behind Ray's HTTP proxy.

One replica is what ``imageragturbo serve`` runs in one process: one pipeline, its databases
(read-only files, memory-mapped; checksums verified at start unless turned off) and its
micro-batcher, behind the same FastAPI app (:func:`imageragturbo.service.app.create_app`), so the
endpoints, status codes and error bodies are the same. On top of that, per replica:

* every answer carries ``X-IRT-Replica: <Ray's replica id>`` (errors and /metrics included);
* its Prometheus registry, every series labelled ``replica="<id>"``: at ``GET /metrics`` through
  the proxy (whichever replica answers), and on a port of its own, ``IRT_RAY_METRICS_PORT`` plus
  the replica's rank on its node (``0`` turns that listener off), which is what Prometheus scrapes;
* the replica is routable only once warm: the app's start-up waits for the worker's warm-up, so
  Ray marks it RUNNING when ``/readyz`` would say ready; Ray's health check asks whether the worker
  thread still runs (``/healthz``) and replaces the replica when it does not.

Ray places replicas (``ray_actor_options``: CPUs and GPUs per replica) and autoscales them on
ongoing requests per replica (``target_ongoing_requests``). Those knobs are :class:`RaySettings`
(``IRT_RAY_*``); the service's own are :class:`~imageragturbo.service.settings.ServiceSettings`
(``IRT_*``), read in each replica. ``deploy/ray/serve_config.yaml`` runs :func:`build_app` with
``serve run`` / KubeRay; ``imageragturbo serve --ray --replicas N`` runs :func:`run_local`.

Ray is an extra (``pip install ".[ray]"``): nothing here imports it at module level, so this
module (settings, options, the header and metrics helpers) loads without it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from imageragturbo.errors import ConfigError
from imageragturbo.service.replica import (  # noqa: F401 (part of this module's API)
    REPLICA_HEADER,
    ReplicaHeaderMiddleware,
    labelled_registry,
    start_metrics_listener,
)

logger = logging.getLogger(__name__)

APP_NAME = "imageragturbo"
DEPLOYMENT_NAME = "ImageRagTurbo"
INSTALL_HINT = "Ray Serve is not installed: pip install 'imageragturbo[ray]' (or pip install \"ray[serve]==2.60.0\")"


class RaySettings(BaseSettings):
    """How Ray runs the replicas: ``IRT_RAY_*`` variables, else these defaults. A Serve config
    file's ``deployments:`` entry overrides the deployment options it names."""

    model_config = SettingsConfigDict(env_prefix="IRT_RAY_", extra="ignore", frozen=True)

    address: str | None = Field(
        None,
        description="the Ray cluster `imageragturbo serve --ray` joins (RAY_ADDRESS works too); unset: a new "
        "local Ray instance of its own",
    )
    num_replicas: int | None = Field(
        None, ge=1, description="a fixed replica count (`--replicas N`); unset: autoscale between min and max"
    )
    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest replicas (0 scales to zero when idle)")
    max_replicas: int = Field(4, ge=1, description="autoscaling: most replicas")
    initial_replicas: int | None = Field(None, ge=0, description="autoscaling: replicas at start (unset: min)")
    target_ongoing_requests: float = Field(
        8.0,
        gt=0,
        description="autoscaling signal: the ongoing requests (queued in the replica's batcher or running) Ray keeps "
        "per replica; about IRT_MAX_BATCH, so that a replica runs full batches without a queue behind them",
    )
    max_ongoing_requests: int = Field(
        32,
        ge=1,
        description="most requests Ray sends one replica at once; more wait in Ray's router (keep it at or above "
        "IRT_MAX_BATCH, or the batcher never sees a full batch, and at or below IRT_MAX_QUEUE + IRT_MAX_BATCH)",
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="requests Ray's router holds beyond max_ongoing_requests before 503 (-1: no limit)"
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="autoscaling: load above target this long adds replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="autoscaling: load below target this long removes them")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica (also its intra-op threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica (1 on a GPU host: one GPU each)")
    graceful_shutdown_timeout_s: float = Field(
        30.0, ge=0, description="a stopping replica drains its batcher this long before Ray kills it"
    )
    health_check_period_s: float = Field(10.0, gt=0, description="how often Ray asks a replica whether its worker runs")
    health_check_timeout_s: float = Field(30.0, gt=0, description="a health check without answer this long fails")
    ready_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="longest a replica's start-up waits for its warm-up before it fails (the database checksum pass "
        "runs before that)",
    )
    metrics_port: int = Field(
        9400,
        ge=0,
        le=65535,
        description="each replica serves its Prometheus registry on this port plus its rank on its node (0: no "
        "listener; GET /metrics through the proxy still answers)",
    )
    metrics_host: str = Field("127.0.0.1", description="the per-replica metrics listener's address (0.0.0.0 in pods)")
    app_name: str = Field(APP_NAME, min_length=1, description="the Serve application's name")
    route_prefix: str = Field("/", pattern=r"^/", description="where the application answers on the proxy")

    @model_validator(mode="after")
    def _replica_bounds(self) -> RaySettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) is outside [{self.min_replicas}, {self.max_replicas}]"
            )
        if self.max_ongoing_requests < self.target_ongoing_requests:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below target_ongoing_requests "
                f"({self.target_ongoing_requests}): the target could never be reached"
            )
        return self


def ray_settings(**overrides) -> RaySettings:
    """:class:`RaySettings` with the given values (None: not given) over ``IRT_RAY_*``; bad values
    raise one ConfigError naming each."""
    try:
        return RaySettings(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"bad Ray settings (flags or IRT_RAY_* variables): {problems}") from exc


def deployment_options(settings: RaySettings) -> dict[str, Any]:
    """The Serve deployment's options (``serve.deployment(**options)``, or a config file's
    ``deployments:`` entry): a fixed replica count, else autoscaling on ongoing requests."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": settings.health_check_timeout_s,
    }
    if settings.num_replicas is not None:
        options["num_replicas"] = settings.num_replicas
    else:
        autoscaling = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
        }
        if settings.initial_replicas is not None:
            autoscaling["initial_replicas"] = settings.initial_replicas
        options["autoscaling_config"] = autoscaling
    return options


class ReplicaArgs(BaseModel):
    """What each replica opens: the arguments of ``imageragturbo serve`` (a Serve config file's
    ``args:``). ``settings`` are ServiceSettings fields over the replica's ``IRT_*`` variables;
    ``ray`` are RaySettings fields over its ``IRT_RAY_*`` (read where the app is built)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None, min_length=1, description="the model directory as every replica sees it (None: IRT_MODEL, else the "
        "bundled model of the checkout the package runs from)"
    )
    databases: list[str] = Field(default_factory=list, description="NAME=DIR specs, the first the default")
    engine: str = "torch"
    engine_dir: str | None = None
    adapter: str | None = None
    lora: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    ray: dict[str, Any] = Field(default_factory=dict)


def replica_args(args: dict[str, Any] | ReplicaArgs) -> ReplicaArgs:
    if isinstance(args, ReplicaArgs):
        return args
    try:
        return ReplicaArgs.model_validate(dict(args or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"bad Serve application args: {problems}") from exc


# -- what each replica adds to the app (no Ray needed) ---------------------------------------


def wait_until_warm(app, batcher, timeout_s: float) -> None:
    """Make ``app``'s start-up (its ASGI lifespan) end only when ``batcher`` is warm, so the
    replica takes requests only once /readyz would say ready; a worker that dies during its
    warm-up, or a warm-up past ``timeout_s``, fails the start-up."""
    import anyio

    inner = app.router.lifespan_context

    def wait() -> None:
        deadline = time.monotonic() + timeout_s
        while not batcher.ready.wait(0.2):
            if not batcher.alive:
                raise RuntimeError("the worker stopped during its warm-up (see the replica's log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not warm after {timeout_s:.0f} s")

    @asynccontextmanager
    async def lifespan(app_):
        async with inner(app_) as state:
            await anyio.to_thread.run_sync(wait)
            yield state

    app.router.lifespan_context = lifespan


def build_service_app(args: ReplicaArgs, *, threads: int | None = None):
    """The FastAPI app of one replica, opened as ``imageragturbo serve`` opens it (settings,
    databases verified unless IRT_VERIFY_DATABASES=0, the engine). Returns (app, settings)."""
    from imageragturbo.paths import default_model_dir
    from imageragturbo.service import settings as service_settings
    from imageragturbo.service.serve import open_app, resolve_served_model

    settings = service_settings.settings_from_flags(**args.settings)
    if settings.threads is None and threads is not None:
        settings = settings.model_copy(update={"threads": threads})
    try:
        model_dir, model_name = resolve_served_model(args.model or default_model_dir())
    except ConfigError as exc:
        raise ConfigError(f"on this replica's node: {exc}") from exc
    app = open_app(
        model_dir, settings, databases=args.databases, engine=args.engine,
        engine_dir=Path(args.engine_dir) if args.engine_dir else None, adapter_dir=args.adapter, lora_dir=args.lora,
        model_name=model_name,
    )
    return app, settings


# -- Ray ------------------------------------------------------------------------------------


def import_serve():
    """``ray.serve``, or ConfigError saying how to install it."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return serve


_REPLICA_CLASS = None


def replica_class():
    """The Serve deployment class (made on first use, so that importing this module needs no Ray)."""
    global _REPLICA_CLASS
    if _REPLICA_CLASS is not None:
        return _REPLICA_CLASS
    serve = import_serve()

    @serve.ingress()
    class ImageRagTurbo:
        """One replica: one pipeline, its databases, its micro-batcher, behind create_app's app."""

        def __init__(self, args: dict):
            import ray

            self.args = replica_args(args)
            context = serve.get_replica_context()
            self.replica = context.replica_id.unique_id
            rank = getattr(context, "rank", None)
            self.local_rank = int(getattr(rank, "local_rank", rank if isinstance(rank, int) else 0) or 0)
            self.ray_settings = ray_settings(**self.args.ray)
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", self.ray_settings.num_cpus)
            self.threads = max(1, int(cpus or 1))
            self._irt_app = None  # not `app`: Serve's wrapper has that property
            self._irt_metrics_server = None
            self._irt_metrics_port = None

        def __serve_build_asgi_app__(self):
            app, _settings = build_service_app(self.args, threads=self.threads)
            service = app.state.service
            registry = labelled_registry(service.metrics.registry, self.replica)
            from prometheus_client import generate_latest

            # GET /metrics through the proxy: this replica's series, labelled with it.
            service.metrics.render = lambda: generate_latest(registry)
            self._irt_metrics_server, self._irt_metrics_port = start_metrics_listener(
                registry, self.ray_settings.metrics_host, self.ray_settings.metrics_port, self.local_rank
            )
            app.add_middleware(ReplicaHeaderMiddleware, replica=self.replica, proxy_adds_request_id=True)
            wait_until_warm(app, service.batcher, self.ray_settings.ready_timeout_s)
            self._irt_app = app
            where = self.ray_settings.metrics_host, self._irt_metrics_port
            logger.warning(
                "replica %s: %s on %d thread(s), metrics %s", self.replica, service.model_name, self.threads,
                f"on {where[0]}:{where[1]}" if where[1] else "only at /metrics",
            )
            return app

        def check_health(self):
            """Ray's liveness check: the worker thread must still run (as /healthz)."""
            if self._irt_app is not None and not self._irt_app.state.service.batcher.alive:
                raise RuntimeError("the worker thread has stopped")

        def __del__(self):
            server = getattr(self, "_irt_metrics_server", None)
            if server is not None:
                server.shutdown()

    _REPLICA_CLASS = ImageRagTurbo
    return _REPLICA_CLASS


def bind(args: dict[str, Any] | ReplicaArgs, settings: RaySettings | None = None):
    """The Serve application: the replica deployment with ``settings``' options, bound to ``args``."""
    serve = import_serve()
    args = replica_args(args)
    settings = settings or ray_settings(**args.ray)
    options = deployment_options(settings)
    return serve.deployment(replica_class(), **options).bind(args.model_dump(mode="json"))


def build_app(args: dict[str, Any]):
    """The application builder of ``deploy/ray/serve_config.yaml`` (``import_path:
    imageragturbo.service.ray_app:build_app``): ``args`` are :class:`ReplicaArgs`."""
    return bind(args)


def startup_error(message: str) -> str:
    """The replica's own error in Ray's deployment failure message (which wraps its traceback):
    the last ``SomeError: message`` line of our package's errors, else of any, else the last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    ours = [line for line in errors if not line.startswith(("RuntimeError: Traceback", "ray."))]
    return (ours or errors or lines or [message])[-1]


def _failure(serve, settings: RaySettings, exc: Exception) -> str:
    """What Serve says about the failed deployment (its message has the replica's traceback),
    else the exception's own text."""
    try:
        application = serve.status().applications[settings.app_name]
        return application.deployments[DEPLOYMENT_NAME].message or application.message or str(exc)
    except Exception:  # noqa: BLE001 - the status is only a better message
        return str(exc)


def forwarded_env() -> dict[str, str]:
    """The ``IRT_*`` variables of this process (including ``IRT_RAY_*``), for the replicas'
    runtime environment when they run on a cluster that did not inherit them."""
    return {name: value for name, value in os.environ.items() if name.startswith("IRT_")}


def run_local(
    args: ReplicaArgs,
    settings: RaySettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    stop: threading.Event | None = None,
) -> None:
    """``imageragturbo serve --ray``: start Ray (a local instance of its own unless
    ``IRT_RAY_ADDRESS`` / ``RAY_ADDRESS`` names a cluster), Serve's proxy on ``host:port``, the
    application, then wait for SIGINT/SIGTERM (or ``stop``) and shut it all down."""
    serve = import_serve()
    import ray

    if args.model and not Path(args.model).is_dir():
        raise ConfigError(
            f"model directory not found: {args.model} (train the bundled model with `make world`, "
            "or pass --model DIR / set IRT_MODEL)"
        )
    address = settings.address or os.environ.get("RAY_ADDRESS") or "local"
    started = time.monotonic()
    ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": forwarded_env()})
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        application = bind(args, settings)
        try:
            serve.run(application, name=settings.app_name, route_prefix=settings.route_prefix, blocking=False)
        except RuntimeError as exc:  # the replicas' constructors failed (Ray retried them): their last words
            why = startup_error(_failure(serve, settings, exc))
            raise ConfigError(f"the Ray Serve application did not start: {why}") from exc
        options = deployment_options(settings)
        count = (
            f"{options['num_replicas']} replica(s)" if "num_replicas" in options else
            f"{settings.min_replicas}-{settings.max_replicas} replicas (autoscaling on "
            f"{settings.target_ongoing_requests:g} ongoing requests each)"
        )
        print(
            f"serving {args.model} with Ray Serve on http://{host}:{port}{settings.route_prefix.rstrip('/')} "
            f"({count}, {settings.num_cpus:g} CPU / {settings.num_gpus:g} GPU each; ready after "
            f"{time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
