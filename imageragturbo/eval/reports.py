"""The evaluations `imageragturbo eval fidelity | table | leverage | probe` run, from a model
directory to the numbers they print and the files they write."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from imageragturbo.errors import ConfigError
from imageragturbo.generate import check_request


def open_model(model_dir: Path, databases: Sequence[str] | None, *, base_only: bool = False, teacher: bool = False):
    """(pipeline, the teacher UNet or None): ``databases`` are ``NAME=DIR`` specs (None: the model's own)."""
    from imageragturbo.model.loading import load_teacher_unet
    from imageragturbo.model.pipeline import open_pipeline

    pipe = open_pipeline(model_dir, databases=databases, base_only=base_only)
    return pipe, load_teacher_unet(model_dir, dtype=pipe.dtype).to(pipe.device) if teacher else None


def load_prompts(prompts: str, n: int) -> list[tuple[str, int]]:
    """:func:`imageragturbo.eval.fidelity.load_prompts`, its refusals as ConfigError."""
    from imageragturbo.eval import fidelity

    try:
        return fidelity.load_prompts(prompts, n)
    except ValueError as exc:  # it only reads the split name or the file
        raise ConfigError(str(exc)) from exc


def write_rows(path: Path | None, model_dir: Path, rows) -> None:
    """With a ``path``, write a table's rows there as JSON."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": str(model_dir), "rows": [r.as_dict() for r in rows]}, indent=2))


def fidelity(
    model_dir: Path,
    *,
    databases: Sequence[str] | None,
    database: str | None,
    mode: str,
    steps: int | None,
    inject_w: str,
    cfg: float,
    prompts: str,
    n: int,
    k: int,
    json_path: Path,
    grid: Path | None,
):
    """Verifier scores of one configuration; writes ``json_path`` and a grid of the first 32
    samples (``grid``, default beside the JSON). ``inject_w`` is a weight or 'oracle'.
    Returns (row, FidelityResult, grid path)."""
    from imageragturbo.eval.fidelity import RowSpec, evaluate_fidelity, save_grid

    try:
        weight = None if inject_w == "oracle" else float(inject_w)
    except ValueError as exc:
        raise ConfigError(f"--inject-w takes a weight in (0, 1] or 'oracle', got {inject_w!r}") from exc
    steps = steps or (25 if mode == "teacher" else 1)
    row = RowSpec(name=f"{mode} {steps}-step", mode=mode, steps=steps, inject_w=weight, cfg_scale=cfg)
    pipe, teacher = open_model(model_dir, databases, teacher=mode == "teacher")
    items = load_prompts(prompts, n)
    if mode != "teacher" and items:
        check_request(pipe, [items[0][0]], [items[0][1]], mode, steps, weight or 0.8, k, database)
    result = evaluate_fidelity(pipe, row, items, prompts, teacher_unet=teacher, k=k, database=database)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"model": str(model_dir), **result.as_dict()}, indent=2))
    grid = grid or json_path.with_suffix(".png")
    save_grid(result.images[:32], result.captions[:32], grid, f"{row.name} on {prompts} ({model_dir})")
    return row, result, grid


def leverage(model_dir: Path, *, n: int, timesteps: Sequence[int], json_path: Path | None) -> str:
    """How much of the one-step output each path carries, for the student (and the teacher,
    when the model has one); returns the markdown table."""
    from imageragturbo.eval.leverage import leverage_markdown, measure_leverage
    from imageragturbo.model.loading import load_model, load_teacher_unet
    from imageragturbo.model.text import PromptEncoder
    from imageragturbo.world.splits import eval_prompts

    # The bare one-step UNet (no LoRA): what the method's adapter has to steer.
    parts = load_model(model_dir, base_only=True)
    unets = {"student (unet/)": parts.unet}
    if (Path(model_dir) / "teacher").is_dir():
        unets["teacher (teacher/)"] = load_teacher_unet(model_dir).float().eval()
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder)
    prompts = [p for p, _ in eval_prompts("test-seen", n)]
    rows = [measure_leverage(u, encoder, prompts, t, name=name) for name, u in unets.items() for t in timesteps]
    write_rows(json_path, model_dir, rows)
    return leverage_markdown(rows, str(model_dir))


def probe(
    model_dir: Path,
    *,
    databases: Sequence[str] | None,
    database: str | None,
    splits: Sequence[str],
    n: int,
    fit_steps: int,
    fit_lr: float,
    json_path: Path | None,
) -> str:
    """Verifier scores with the top-1 neighbour's image, H-feature or noised latent in the
    one-step pass, per split; returns the markdown table."""
    from imageragturbo.eval.probe import probe_markdown, probe_split

    if fit_steps < 0:
        raise ConfigError(f"--fit-steps must be >= 0, got {fit_steps}")
    if not fit_lr > 0:
        raise ConfigError(f"--fit-lr must be > 0, got {fit_lr}")
    pipe, _ = open_model(model_dir, databases, base_only=True)
    if not pipe.databases:
        raise ConfigError(f"{model_dir}: probing needs a retrieval database (one with latents); give --database NAME=DIR")
    rows = []
    for split in splits:
        items = load_prompts(split, n)
        check_request(pipe, [c for c, _ in items], [s for _, s in items], "inject", 1, 0.8, 1, database)
        rows += probe_split(pipe, items, split, database=database, fit_steps=fit_steps, fit_lr=fit_lr)
    write_rows(json_path, model_dir, rows)
    return probe_markdown(rows, str(model_dir))
