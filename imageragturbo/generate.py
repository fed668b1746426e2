"""`imageragturbo generate`: prompts to PNGs through the pipeline a model directory opens.

One prompt, N images of one prompt, or a prompts file (:func:`generate_pngs`): the model is
loaded once, the items run in batches of at most ``max_batch`` images per pipeline call, and the timings are reported warm (one warm-up call first, shown apart).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imageragturbo.errors import ConfigError, RequestError

DEFAULT_MAX_BATCH = 8
"""Images per pipeline call for a prompts file when neither ``--max-batch`` nor ``IRT_MAX_BATCH``
says otherwise: the server's default batch and the TensorRT engines' largest profile."""


def auto_mode(pipe) -> str:
    """'adapter' when the model has an adapter and a database is loaded, else 'off'."""
    return "adapter" if ("adapter" in pipe.denoisers and pipe.databases) else "off"


def check_request(pipe, prompts, seeds, mode: str, steps: int, inject_w, k: int, database: str | None,
                  start_t: int | None = None) -> None:
    """Raise RequestError when ``pipe`` refuses these inputs (mode, steps, k, database, ...)."""
    try:
        pipe.check_inputs(prompts, seeds, mode, steps, inject_w, k, database, start_t)
    except ValueError as exc:  # check_inputs validates and computes nothing: every ValueError is the input's
        raise RequestError(str(exc)) from exc


# -- many images: --n, --prompts-file ----------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One image to make: its prompt, seed and PNG path (``line``: its prompts-file line, 1-based)."""

    prompt: str
    seed: int
    path: Path
    line: int | None = None


@dataclass
class Call:
    """One pipeline call: how many images and each stage's wall time for the whole batch."""

    images: int
    timings_ms: dict[str, float]
    wall_ms: float


@dataclass
class GeneratedMany:
    """What :func:`generate_pngs` wrote, and how long each part took."""

    items: list[Item]
    mode: str
    database: str | None
    neighbors: list[list]
    """Per item, the pipeline's Neighbor list (empty in mode 'off')."""
    load_s: float
    """Opening the model and its databases."""
    warmup: Call | None
    """The warm-up call (one image, not written), None with ``warmup=False``."""
    calls: list[Call] = field(default_factory=list)

    @property
    def warm_calls(self) -> list[Call]:
        """The calls that ran warm: every call after a warm-up; without one, every call but
        the first (when there is only one call, that one, which is then cold)."""
        if self.warmup is not None or len(self.calls) == 1:
            return self.calls
        return self.calls[1:]

    def per_image_ms(self) -> dict[str, float]:
        """Each stage's wall time per image over the warm calls, plus ``total``."""
        calls = self.warm_calls
        images = sum(c.images for c in calls)
        stages: dict[str, float] = {}
        for call in calls:
            for stage, ms in call.timings_ms.items():
                stages[stage] = stages.get(stage, 0.0) + ms
        per = {stage: ms / images for stage, ms in stages.items()}
        per["total"] = sum(c.wall_ms for c in calls) / images
        return per

    @property
    def generate_s(self) -> float:
        """Wall time of every call, the warm-up included."""
        return (sum(c.wall_ms for c in self.calls) + (self.warmup.wall_ms if self.warmup else 0.0)) / 1e3


def _slug(text: str, limit: int = 48) -> str:
    """'A red circle, on the left!' -> 'a-red-circle-on-the-left' (file-name safe, at most ``limit``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "prompt"


def read_prompts_file(path: Path, default_seed: int = 0) -> list[tuple[int, str, int]]:
    """``(line, prompt, seed)`` for every non-blank line of ``path``: ``PROMPT`` or
    ``PROMPT<TAB>SEED`` (without a seed, ``default_seed``). Lines starting with ``#`` are
    comments. Raises ConfigError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompts file {path}: {exc}") from exc
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, tab, seed_text = line.partition("\t")
        seed = default_seed
        if tab:
            try:
                seed = int(seed_text.strip())
            except ValueError:
                raise ConfigError(f"{path}:{number}: the seed after the tab must be an integer, got {seed_text.strip()!r}") from None
            if not 0 <= seed < 2**63:
                raise ConfigError(f"{path}:{number}: seed must be in [0, 2^63), got {seed}")
        if not prompt.strip():
            raise ConfigError(f"{path}:{number}: empty prompt before the tab")
        rows.append((number, prompt.strip(), seed))
    if not rows:
        raise ConfigError(f"{path}: no prompts (one prompt per line, optionally PROMPT<TAB>SEED)")
    return rows


def plan_items(out: Path, *, prompt: str | None = None, prompts_file: Path | None = None, seed: int = 0,
               n: int = 1) -> list[Item]:
    """The images a command line asks for, with their file names.

    - one ``prompt``, ``n`` = 1: ``out`` itself;
    - one ``prompt``, ``n`` > 1: seeds ``seed .. seed+n-1`` as ``OUT-0.png .. OUT-(n-1).png``
      (``OUT`` is ``out`` without its suffix);
    - ``prompts_file``: ``out`` is a folder and line L becomes ``LLLL-<slug of the prompt>.png``
      (with ``n`` > 1: ``LLLL-<slug>-<i>.png`` with seeds ``s .. s+n-1``, s the line's seed).
    """
    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give either a PROMPT or --prompts-file FILE (not both)")
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    out = Path(out)
    if prompt is not None:
        if n == 1:
            return [Item(prompt, seed, out)]
        return [Item(prompt, seed + i, out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")) for i in range(n)]
    rows = read_prompts_file(prompts_file, seed)
    if out.suffix.lower() == ".png" or out.is_file():
        raise ConfigError(f"--out {out}: with --prompts-file, --out is a folder (one PNG per line goes into it)")
    width = max(4, len(str(rows[-1][0])))
    items = []
    for line, text, line_seed in rows:
        stem = f"{line:0{width}d}-{_slug(text)}"
        if n == 1:
            items.append(Item(text, line_seed, out / f"{stem}.png", line))
        else:
            items.extend(Item(text, line_seed + i, out / f"{stem}-{i}.png", line) for i in range(n))
    return items


def quiet_libraries(verbose: bool = False) -> None:
    """transformers' and diffusers' chatter (the "Loading weights" progress bars, the "should be
    kept in float32" notes, ...) off, or with ``verbose`` back at their defaults (warnings and
    progress bars)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (transformers_logging, diffusers_logging):
        if verbose:
            library.set_verbosity_warning()
            library.enable_progress_bar()
        else:
            library.set_verbosity_error()
            library.disable_progress_bar()


def generate_pngs(
    model_dir: Path,
    items: Sequence[Item],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    warmup: bool = True,
    mode: str = "auto",
    steps: int = 1,
    inject_w: float = 0.8,
    k: int = 4,
    databases: Sequence[str] | None = None,
    database: str | None = None,
    adapter_dir: Path | None = None,
    lora_dir: Path | None = None,
    verify: bool = False,
    start_t: int | None = None,
    engine: str = "torch",
    engine_dir: Path | None = None,
    on_call=None,
) -> GeneratedMany:
    """Open ``model_dir`` once and write every item's PNG, ``max_batch`` items per pipeline call
    (in order; an item's image is the same in any batch, see ``RagTurboPipeline.batch_invariant``).
    ``warmup`` runs one call of one image first (not written) so that every reported call is warm.
    Every item is checked before anything runs. ``on_call(done, total)`` is told after each call."""
    from PIL import Image

    from imageragturbo.engines.pipeline_engines import use_engine
    from imageragturbo.model.pipeline import open_pipeline

    items = list(items)
    if not items:
        raise ConfigError("nothing to generate")
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {max_batch}")
    start = time.perf_counter()
    pipe = open_pipeline(model_dir, databases=databases, adapter_dir=adapter_dir, lora_dir=lora_dir, verify=verify)
    use_engine(pipe, engine, engine_dir)
    load_s = time.perf_counter() - start
    mode = auto_mode(pipe) if mode == "auto" else mode
    check_request(pipe, [i.prompt for i in items], [i.seed for i in items], mode, steps, inject_w, k, database, start_t)
    used = None if mode == "off" and start_t is None else pipe.databases.resolve(database).name

    def run(batch: list[Item]) -> tuple[Call, object]:
        begin = time.perf_counter()
        result = pipe([i.prompt for i in batch], [i.seed for i in batch], mode=mode, steps=steps,
                      inject_w=inject_w, k=k, database=database, start_t=start_t)
        return Call(len(batch), dict(result.timings_ms), (time.perf_counter() - begin) * 1e3), result

    done = GeneratedMany(items, mode, used, [], load_s, run(items[:1])[0] if warmup else None)
    for first in range(0, len(items), max_batch):
        batch = items[first:first + max_batch]
        call, result = run(batch)
        for item, image, neighbors in zip(batch, result.images, result.neighbors):
            item.path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(item.path, format="PNG")
            done.neighbors.append(neighbors)
        done.calls.append(call)
        if on_call is not None:
            on_call(first + len(batch), len(items))
    return done
