"""`imageragturbo eval table`: the fidelity and style tables of the shapes world (v2), by command.

Fidelity: every row of :data:`ROWS` on test-seen, test-tail and test-held, and test-held per
held-out composition beside the VAE's round-trip ceiling for it; the mean over ``seed_sets``
disjoint sets of ``n`` prompts each (set j is prompts ``j*n .. (j+1)*n - 1`` of the split's fixed
list, each with its own noise seed) and the standard error of that mean. The adapter row is
also given minus the no-retrieval control, paired per seed set: the control is the same
finetune with the gate fixed to 0 (``<model>/no_retrieval/``), so the difference is what
retrieval itself adds.

Style: for each style database, the share of test-seen outputs whose background band
(``world.style.read_style``) is that database's, per mode; a mode that ignores the database
lands near 1/3 on average.

Everything is written to ``<out>/fidelity.md`` and ``fidelity.json``, with a bar chart with
error bars (``fidelity.png``) and a grid of the same prompts and seeds across the three
databases (``style_grid.png``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from imageragturbo.eval.fidelity import RowSpec, evaluate_fidelity, save_grid
from imageragturbo.retrieval.database import RetrievalDatabase
from imageragturbo.world.spec import HELD_OUT, parse_caption
from imageragturbo.world.style import read_style
from imageragturbo.world.verifier import verify

logger = logging.getLogger(__name__)

SPLITS = ("test-seen", "test-tail", "test-held")
HELD_COMPOSITIONS = tuple(sorted(HELD_OUT))
CONTROL_DIR = "no_retrieval"
RANDOM_DATABASE = "random row"
START_T = 499
START_ROW = f"ImageRAGTurbo 1-step, neighbour start t={START_T}"
STUDENT_START_ROW = f"student 1-step, neighbour start t={START_T}"
LOW_START_T = 249
"""A second point of the start's trade (more of the neighbour kept, less of the seed's variety),
reported beside the pre-chosen t = 499, not in its place."""
STUDENT_LOW_START_ROW = f"student 1-step, neighbour start t={LOW_START_T}"
STUDENT_ROW = "student 1-step (off)"
CONTROL_ROW = "no-retrieval finetune (gate 0)"
ADAPTER_ROW = "ImageRAGTurbo 1-step (adapter)"

# Which weights each row runs on: the bare one-step student, the adapter run (adapter + its
# decoder LoRA), or the control (the same finetune with the gate at 0: its LoRA, mode off).
ROWS: tuple[tuple[str, RowSpec], ...] = (
    ("student", RowSpec("teacher 25-step (CFG 3)", "teacher", steps=25, cfg_scale=3.0)),
    ("student", RowSpec(STUDENT_ROW, "off")),
    ("control", RowSpec(CONTROL_ROW, "off")),
    ("student", RowSpec("injection w=0.8", "inject", inject_w=0.8)),
    ("student", RowSpec("injection, oracle w", "inject", inject_w=None)),
    ("student", RowSpec("injection, oracle w, random row", "inject", inject_w=None)),
    ("adapter", RowSpec(ADAPTER_ROW, "adapter")),
    ("adapter", RowSpec("ImageRAGTurbo 4-step (adapter)", "adapter", steps=4)),
    # Beyond the paper: one step from the top-1 neighbour's latent noised to t = 499 (halfway,
    # the 4-step schedule's third level; fixed before any score was seen) instead of from noise.
    ("student", RowSpec(STUDENT_START_ROW, "off", start_t=START_T)),
    ("student", RowSpec(STUDENT_LOW_START_ROW, "off", start_t=LOW_START_T)),
    ("adapter", RowSpec(START_ROW, "adapter", start_t=START_T)),
)
# The rows given again minus the control, paired per seed set, and their labels.
MINUS_CONTROL = ((ADAPTER_ROW, "adapter − no-retrieval control (paired)"),
                 (START_ROW, f"adapter, neighbour start t={START_T} − no-retrieval control (paired)"),
                 (STUDENT_START_ROW, f"student, neighbour start t={START_T} − no-retrieval control (paired)"),
                 (STUDENT_LOW_START_ROW, f"student, neighbour start t={LOW_START_T} − no-retrieval control (paired)"))
# The student's start rows minus the bare student, paired: the same weights with and without
# the neighbour, so what the retrieved latent alone adds (the control's line mixes in what the
# finetune itself loses).
MINUS_STUDENT = ((STUDENT_START_ROW, f"student, neighbour start t={START_T} − student (paired: retrieval alone)"),
                 (STUDENT_LOW_START_ROW, f"student, neighbour start t={LOW_START_T} − student (paired: retrieval alone)"))
# The style table's modes: (weights, mode, start_t, label).
STYLE_MODES = (("student", "off", None, "student (off)"), ("control", "off", None, "no-retrieval finetune"),
               ("student", "inject", None, "injection w=0.8"), ("adapter", "adapter", None, "ImageRAGTurbo (adapter)"),
               ("student", "off", START_T, f"student, neighbour start t={START_T}"))


class RandomRowSearcher:
    """A searcher that ignores the query: k rows drawn uniformly (seeded by the query's bytes),
    the control for "does the oracle's gain come from the neighbour, or from having 9 tries?"."""

    exact_cosine_scores = False

    def __init__(self, n: int):
        self.n = n

    def search(self, q: np.ndarray, k: int, texts=None) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(int.from_bytes(np.ascontiguousarray(q).tobytes()[:8].ljust(8, b"\0"), "little"))
        return rng.integers(0, self.n, size=(len(q), k)), np.zeros((len(q), k), np.float32)


@dataclass(frozen=True)
class Estimate:
    """A mean over seed sets and its standard error."""

    mean: float
    se: float
    per_set: tuple[float, ...]

    @classmethod
    def of(cls, values) -> Estimate:
        values = np.asarray(list(values), dtype=np.float64)
        se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        return cls(float(values.mean()), se, tuple(float(v) for v in values))

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.se:.3f}"


def seed_set(split: str, n: int, index: int, sets: int) -> list[tuple[str, int]]:
    """Set ``index`` of ``sets``: ``n`` (caption, seed) prompts, disjoint from the other sets."""
    from imageragturbo.world.splits import eval_prompts

    return eval_prompts(split, n * sets)[index * n : (index + 1) * n]


def _has(caption: str, composition: tuple[str, str]) -> bool:
    return composition in parse_caption(caption).pairs


def vae_ceiling(pipe, prompts: list[tuple[str, int]]) -> list[float]:
    """Verifier scores of ground-truth renders of each prompt after a VAE round trip: what any
    model drawing through this VAE can at best reach on those prompts."""
    from imageragturbo.model.images import tensor_to_images
    from imageragturbo.model.pipeline import decode_latents
    from imageragturbo.world.render import render

    images = np.stack([render(parse_caption(c), np.random.default_rng(s)) for c, s in prompts])
    with torch.inference_mode():
        decoded = tensor_to_images(decode_latents(pipe.components.vae, pipe.encode_images(images)))
    return [verify(im, c).score for im, (c, _) in zip(decoded, prompts)]


def open_table_pipelines(model_dir: Path, databases: list[str] | None = None, adapter_dir: Path | None = None,
                         lora_dir: Path | None = None, control_dir: Path | None = None) -> dict:
    """The three sets of weights the rows run on, each with the model's databases; the
    student's also holds the random-row database of the oracle control."""
    from imageragturbo.model.loading import load_teacher_unet
    from imageragturbo.model.pipeline import open_pipeline

    control = Path(control_dir) if control_dir is not None else model_dir / CONTROL_DIR
    if not control.is_dir():
        raise FileNotFoundError(f"{control}: no no-retrieval control in this model (train it: imageragturbo train world --resume)")
    pipes = {
        "student": open_pipeline(model_dir, databases=databases, base_only=True),
        "adapter": open_pipeline(model_dir, databases=databases, adapter_dir=adapter_dir, lora_dir=lora_dir),
        "control": open_pipeline(model_dir, databases=databases, adapter_dir=control / "adapter", lora_dir=control / "unet_lora"),
    }
    default = pipes["student"].databases.resolve()
    pipes["student"].add_database(RetrievalDatabase(RANDOM_DATABASE, RandomRowSearcher(len(default.store)), default.store))
    student = pipes["student"]
    return {"pipes": pipes, "teacher": load_teacher_unet(model_dir, dtype=student.dtype).to(student.device)}


def fidelity_rows(opened: dict, n: int, sets: int, k: int = 4, include_teacher: bool = True) -> dict:
    """{row: {split or split/composition: Estimate}}, plus the VAE ceiling row."""
    pipes, teacher = opened["pipes"], opened["teacher"]
    scores: dict[str, dict[str, list[float]]] = {}
    for split in SPLITS:
        for j in range(sets):
            prompts = seed_set(split, n, j, sets)
            named = {"VAE round trip (ceiling)": vae_ceiling(pipes["student"], prompts)}
            for weights, row in ROWS:
                if row.mode == "teacher" and not include_teacher:
                    continue
                database = RANDOM_DATABASE if row.name.endswith("random row") else None
                t = time.perf_counter()
                result = evaluate_fidelity(pipes[weights], row, prompts, split, teacher_unet=teacher, k=k, database=database)
                logger.info("%s, %s, set %d: %.3f (%.1f s)", row.name, split, j, result.benchmark.mean_score, time.perf_counter() - t)
                named[row.name] = result.scores
            for name, per_prompt in named.items():
                cells = scores.setdefault(name, {})
                cells.setdefault(split, []).append(float(np.mean(per_prompt)))
                if split == "test-held":
                    for comp in HELD_COMPOSITIONS:
                        mine = [s for s, (c, _) in zip(per_prompt, prompts) if _has(c, comp)]
                        cells.setdefault(f"{split}/{' '.join(comp)}", []).append(float(np.mean(mine)) if mine else float("nan"))
    table = {name: {cell: Estimate.of(v) for cell, v in cells.items()} for name, cells in scores.items()}

    def minus(row: str, baseline: str) -> dict:
        return {cell: Estimate.of(np.subtract(scores[row][cell], scores[baseline][cell])) for cell in scores[row]}

    diffs = {row: minus(row, CONTROL_ROW) for row, _ in MINUS_CONTROL}
    return {"rows": table, "adapter_minus_control": diffs[ADAPTER_ROW], "minus_control": diffs,
            "minus_student": {row: minus(row, STUDENT_ROW) for row, _ in MINUS_STUDENT}}


def style_rows(opened: dict, n: int, sets: int, k: int = 4) -> tuple[dict, dict]:
    """({mode label: {database: Estimate of the share in that database's style}}, sample images
    {mode label: {database: uint8 [8, H, W, 3]}} of the first set's first 8 prompts)."""
    pipes = opened["pipes"]
    styled = [name for name in pipes["adapter"].databases if name in ("dim", "grey", "bright")]
    table, grids = {}, {}
    for weights, mode, start_t, label in STYLE_MODES:
        table[label], grids[label] = {}, {}
        for database in styled:
            shares = []
            for j in range(sets):
                prompts = seed_set("test-seen", n, j, sets)
                result = pipes[weights]([c for c, _ in prompts], [s for _, s in prompts], mode=mode, k=k,
                                        database=database if mode != "off" or start_t is not None else None,
                                        start_t=start_t)
                shares.append(float(np.mean([read_style(im) == database for im in result.images])))
                if j == 0:
                    grids[label][database] = result.images[:8]
            table[label][database] = Estimate.of(shares)
    return table, grids


def run_table(model_dir: Path, out_dir: Path, *, n: int = 100, seed_sets: int = 5, k: int = 4,
              databases: list[str] | None = None, adapter_dir: Path | None = None, lora_dir: Path | None = None,
              control_dir: Path | None = None, include_teacher: bool = True, title: str = "") -> dict:
    """Both tables for ``model_dir`` into ``out_dir`` (see module docstring); returns the report."""
    from imageragturbo.machine import describe_machine

    if seed_sets < 2:
        raise ValueError(f"seed_sets must be >= 2 to give a standard error, got {seed_sets}")
    start = time.perf_counter()
    opened = open_table_pipelines(Path(model_dir), databases, adapter_dir, lora_dir, control_dir)
    fidelity = fidelity_rows(opened, n, seed_sets, k, include_teacher)
    style, grids = style_rows(opened, n, seed_sets, k)
    report = {
        "model": str(model_dir),
        "title": title or "Prompt fidelity and style on the shapes world (v2)",
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "lora_dir": str(lora_dir) if lora_dir else None,
        "control_dir": str(control_dir) if control_dir else None,
        "machine": describe_machine(("torch",), gpu=True).summary(),
        "n_per_set": n,
        "seed_sets": seed_sets,
        "k": k,
        "wall_s": round(time.perf_counter() - start, 1),
        "fidelity": {row: {cell: asdict(e) for cell, e in cells.items()} for row, cells in fidelity["rows"].items()},
        "adapter_minus_control": {cell: asdict(e) for cell, e in fidelity["adapter_minus_control"].items()},
        "minus_control": {row: {cell: asdict(e) for cell, e in cells.items()} for row, cells in fidelity["minus_control"].items()},
        "minus_student": {row: {cell: asdict(e) for cell, e in cells.items()} for row, cells in fidelity["minus_student"].items()},
        "style": {label: {db: asdict(e) for db, e in cells.items()} for label, cells in style.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "fidelity.md").write_text(table_markdown(report, fidelity, style))
    _bar_chart(fidelity["rows"], out_dir / "fidelity.png")
    _style_grid(grids, opened, n, seed_sets, out_dir / "style_grid.png")
    return report


def table_markdown(report: dict, fidelity: dict, style: dict) -> str:
    cells = [*SPLITS, *(f"test-held/{' '.join(c)}" for c in HELD_COMPOSITIONS)]
    lines = [
        f"# {report['title']}",
        "",
        f"Model: `{report['model']}`. Machine: {report['machine']}. Each cell: the verifier's mean over "
        f"{report['seed_sets']} seed sets of {report['n_per_set']} prompts (disjoint prompts and noise seeds), "
        f"± the standard error of that mean; k = {report['k']} neighbours; wall time {report['wall_s']:.0f} s.",
        f"Reproduce: `imageragturbo eval table --model {report['model']} --out results"
        + (f" --adapter {report['adapter_dir']}" if report["adapter_dir"] else "")
        + (f" --lora {report['lora_dir']}" if report["lora_dir"] else "")
        + (f" --control {report['control_dir']}" if report["control_dir"] else "") + "`.",
        "",
        "| row | NFE | " + " | ".join(cells) + " |",
        "| --- | --- | " + " | ".join("---" for _ in cells) + " |",
    ]
    nfe = {row.name: row.nfe for _, row in ROWS}
    nfe["VAE round trip (ceiling)"] = 0
    for name, row_cells in fidelity["rows"].items():
        lines.append(f"| {name} | {nfe.get(name, '–')} | " + " | ".join(str(row_cells[c]) for c in cells) + " |")
    for key, pairs in (("minus_control", MINUS_CONTROL), ("minus_student", MINUS_STUDENT)):
        for row, label in pairs:
            diff = fidelity[key][row]
            lines.append(f"| {label} | | " + " | ".join(str(diff[c]) for c in cells) + " |")
    lines += [
        "",
        "The control is the same finetune (data, steps, LoRA, trainable parameters) with the gate fixed to 0;",
        "the paired lines are a row minus it (or minus the bare student), per seed set. The neighbour-start",
        f"rows (beyond the paper) take their one step from the top-1 neighbour's latent noised to t = {START_T}",
        f"(chosen before any score; t = {LOW_START_T} beside it) instead of from pure noise: retrieval as",
        "img2img, with no training for it.",
        "",
        "## Style: share of test-seen outputs in the requested database's background band",
        "",
        "| mode | " + " | ".join(next(iter(style.values()))) + " | mean |",
        "| --- | " + " | ".join("---" for _ in next(iter(style.values()))) + " | --- |",
    ]
    for label, by_db in style.items():
        mean = np.mean([e.mean for e in by_db.values()])
        lines.append(f"| {label} | " + " | ".join(str(e) for e in by_db.values()) + f" | {mean:.3f} |")
    lines += ["", "![fidelity](fidelity.png)", "", "![the same prompts and seeds across the databases](style_grid.png)", ""]
    return "\n".join(lines)


def _bar_chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [rows[name][s].mean for s in SPLITS]
        errs = [rows[name][s].se for s in SPLITS]
        ax.bar(np.arange(len(SPLITS)) + i * width, means, width, yerr=errs, capsize=2, label=name)
    ax.set_xticks(np.arange(len(SPLITS)) + width * (len(names) - 1) / 2, SPLITS)
    ax.set_ylabel("verifier score (mean ± SE over seed sets)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _style_grid(grids: dict, opened: dict, n: int, sets: int, path: Path) -> None:
    """Rows: (mode, database); columns: the same 8 prompts and seeds."""
    captions = [c for c, _ in seed_set("test-seen", n, 0, sets)[:8]]
    images, labels = [], []
    for label, by_db in grids.items():
        for database, ims in by_db.items():
            images += list(ims)
            labels += [f"{label} | {database}: {c}" for c in captions[: len(ims)]]
    save_grid(np.stack(images), labels, path, "the same prompts and seeds, per mode and database", columns=8)
