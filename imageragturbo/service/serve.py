"""`imageragturbo serve`: open a model directory and its databases, and serve them over HTTP."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from imageragturbo.errors import ConfigError, ImageRagTurboError
from imageragturbo.service import settings as service_settings


class ServeFailedError(ImageRagTurboError, RuntimeError):
    """Loading or serving failed in a way no loader foresaw (a truncated file, an OSError, ...)."""


def serve(model_dir: Path, **options) -> None:
    """Serve until SIGINT/SIGTERM (:func:`_serve` has the options). Whatever ends it early ends it
    in one line: a load failure, a failed warm-up, anything else raised (its traceback goes to
    the log, one JSON line), so that a supervisor sees an exit status and a reason."""
    from imageragturbo.service.logs import configure_service_logging

    configure_service_logging()
    try:
        _serve(model_dir, **options)
    except ImageRagTurboError:
        raise
    except Exception as exc:
        logging.getLogger(__name__).error("serve failed", exc_info=True)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ServeFailedError(f"cannot serve {model_dir}: {reason}") from exc


def resolve_served_model(model: str | Path) -> tuple[Path, str]:
    """(folder, the name the API gives the model) for ``--model``: a model folder (named after
    it), or a Hugging Face repo id (``owner/name[@revision]``) whose snapshot is in the local
    Hugging Face cache (named ``name``); nothing is downloaded. Raises ConfigError (a missing
    folder) or ModelLoadError (an id not in the cache), each naming what to do."""
    path = Path(model)
    if path.is_dir():
        return path, path.name
    from imageragturbo.model.loading import REPO_ID_PATTERN, resolve_model_dir

    repo_id = str(model).partition("@")[0]
    if path.exists() or not REPO_ID_PATTERN.match(repo_id):
        raise ConfigError(
            f"model directory not found: {path} (train the bundled model with `make world`, "
            "or pass --model DIR / set IRT_MODEL, or a Hugging Face id whose snapshot is in the local cache)"
        )
    return resolve_model_dir(model), repo_id.split("/")[-1]


def open_app(
    model_dir: Path,
    settings: service_settings.ServiceSettings,
    *,
    databases: Sequence[str] = (),
    engine: str = "torch",
    engine_dir: Path | None = None,
    adapter_dir: Path | None = None,
    lora_dir: Path | None = None,
    model_name: str | None = None,
):
    """The service's FastAPI app over the model in ``model_dir``, opened as every server opens
    it (``imageragturbo serve`` and each Ray Serve replica): the pipeline on the settings'
    device and dtype, its databases (``NAME=DIR`` specs, the first the default; none: the
    model's own) verified unless IRT_VERIFY_DATABASES=0, batch invariance, then the engine."""
    from imageragturbo.engines.pipeline_engines import use_engine
    from imageragturbo.model import pipeline
    from imageragturbo.retrieval.disk import model_databases
    from imageragturbo.service import app as service_app

    databases = list(databases) or model_databases(model_dir)
    # A corrupt database must never be served: checksums and values are checked before the
    # first request (the same checks as `imageragturbo check-database`) unless turned off.
    pipe = pipeline.open_pipeline(
        model_dir, databases=databases, adapter_dir=adapter_dir, lora_dir=lora_dir, verify=settings.verify_databases,
        device=settings.device, dtype=settings.dtype, warm=settings.warm_databases,
    )
    pipe.batch_invariant = settings.batch_invariant
    # The worker still calls only the pipeline; the pipeline runs its stages on the engines.
    use_engine(pipe, engine, engine_dir, **({"threads": settings.threads} if engine == "onnxruntime" else {}))
    return service_app.create_app(pipe, settings, model_name=model_name or model_dir.name, engine=engine)


def _serve(
    model_dir: Path,
    *,
    databases: Sequence[str] = (),
    engine: str = "torch",
    engine_dir: Path | None = None,
    adapter_dir: Path | None = None,
    lora_dir: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    **settings_flags,
) -> None:
    """Serve until SIGINT/SIGTERM. ``databases`` are ``NAME=DIR`` specs, the first the default
    (none: the model's own, :func:`imageragturbo.retrieval.disk.model_databases`); ``settings_flags`` are
    :class:`ServiceSettings` fields given on the command line (None: from ``IRT_*``)."""
    settings = service_settings.settings_from_flags(**settings_flags)
    model_dir, model_name = resolve_served_model(model_dir)
    if settings.threads is None:
        settings = settings.model_copy(update={"threads": service_settings.default_worker_threads()})

    app = open_app(
        model_dir, settings, databases=databases, engine=engine, engine_dir=engine_dir, adapter_dir=adapter_dir,
        lora_dir=lora_dir, model_name=model_name,
    )
    service = app.state.service
    print(
        f"serving {model_dir} on http://{host}:{port} (engine {engine}, {settings.threads} intra-op thread(s) of "
        f"{service_settings.usable_cpus()} usable CPUs; modes {', '.join(service.available_modes)}, default "
        f"{service.default_mode}; databases {', '.join(service.database_names) or 'none'})",
        file=sys.stderr,
    )
    from imageragturbo.service import app as service_app

    service_app.run_server(app, host=host, port=port, settings=settings, log_level=log_level)
