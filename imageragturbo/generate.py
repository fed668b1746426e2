"""`imageragturbo generate`: one prompt, one PNG, through the pipeline a model directory opens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imageragturbo.errors import RequestError


@dataclass
class Generated:
    """What :func:`generate_png` wrote, and how."""

    path: Path
    mode: str
    """The mode that ran ('auto' resolved)."""
    database: str | None
    """The database retrieved from (None in mode 'off')."""
    result: object
    """The pipeline's GenerationResult (timings, neighbours)."""


def auto_mode(pipe) -> str:
    """'adapter' when the model has an adapter and a database is loaded, else 'off'."""
    return "adapter" if ("adapter" in pipe.denoisers and pipe.databases) else "off"


def check_request(pipe, prompts, seeds, mode: str, steps: int, inject_w, k: int, database: str | None) -> None:
    """Raise RequestError when ``pipe`` refuses these inputs (mode, steps, k, database, ...)."""
    try:
        pipe.check_inputs(prompts, seeds, mode, steps, inject_w, k, database)
    except ValueError as exc:  # check_inputs validates and computes nothing: every ValueError is the input's
        raise RequestError(str(exc)) from exc


def generate_png(
    model_dir: Path,
    prompt: str,
    out: Path,
    *,
    seed: int = 0,
    mode: str = "auto",
    steps: int = 1,
    inject_w: float = 0.8,
    k: int = 4,
    databases: Sequence[str] | None = None,
    database: str | None = None,
    adapter_dir: Path | None = None,
    lora_dir: Path | None = None,
    verify: bool = False,
    engine: str = "torch",
    engine_dir: Path | None = None,
) -> Generated:
    """Open ``model_dir`` (with ``databases``, ``NAME=DIR`` specs; None: the model's own),
    generate ``prompt`` with ``seed`` and write it to ``out`` as PNG. ``database`` names the
    one to retrieve from (default: the first); ``verify`` checks every database file's checksum."""
    from PIL import Image

    from imageragturbo.engines.pipeline_engines import use_engine
    from imageragturbo.model.pipeline import open_pipeline

    pipe = open_pipeline(model_dir, databases=databases, adapter_dir=adapter_dir, lora_dir=lora_dir, verify=verify)
    use_engine(pipe, engine, engine_dir)
    mode = auto_mode(pipe) if mode == "auto" else mode
    check_request(pipe, [prompt], [seed], mode, steps, inject_w, k, database)
    result = pipe([prompt], [seed], mode=mode, steps=steps, inject_w=inject_w, k=k, database=database)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.images[0]).save(out, format="PNG")
    used = None if mode == "off" else pipe.databases.resolve(database).name
    return Generated(out, mode, used, result)
