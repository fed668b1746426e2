"""The latency protocol of the paper's Fig. 6: the same prompts, batch 1, after warm-up, per stage.

For every (engine, mode) pair the same ``n`` prompts run one at a time; each call's stage
timings (``text_encode``, ``retrieve``, ``denoise``, ``vae_decode``: the pipeline's own clock)
and its wall time (``total``: the whole pipeline call, input checks and postprocessing
included) are recorded, and mean / p50 / p90 reported in milliseconds.

The pairs are *interleaved*: prompt i runs on every pair before prompt i+1, in a seeded random
order per prompt. On a shared machine a burst of background load then hits every pair alike
instead of whichever happened to run during it, which is what makes ratios measured in one
run (ORT vs torch, adapter vs off) trustworthy. The order is random rather than rotated
because a rotation puts ``adapter`` right after ``off`` of the same engine three times in four,
so ``adapter`` finds that engine's weights warm in cache and its cost is understated
(results/design-notes.md has the measurement).

:func:`run` is the whole `imageragturbo bench latency`: open the model, export it for the
compiled engines, time every (engine, mode) pair, optionally profile, and write the JSON, the
report section and the figure.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imageragturbo.benchmarks import BenchError
from imageragturbo.benchmarks.report import table, update_section
from imageragturbo.machine import latency_fields, load_average, niceness
from imageragturbo.modes import MODES

logger = logging.getLogger(__name__)

STAGES = ("text_encode", "retrieve", "denoise", "vae_decode", "total")
REPORT_BEGIN = "<!-- latency-bench:begin -->"
REPORT_END = "<!-- latency-bench:end -->"


def stage_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """mean / p50 / p90 of a list of milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples to summarise")
    return {
        "mean_ms": round(float(values.mean()), 4),
        "p50_ms": round(float(np.percentile(values, 50)), 4),
        "p90_ms": round(float(np.percentile(values, 90)), 4),
    }


@dataclass
class LatencyRun:
    engine: str
    mode: str
    n: int
    stages: dict[str, dict[str, float]]


@dataclass
class LatencyResult:
    machine: dict
    runs: list[LatencyRun]
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "protocol": self.protocol, "runs": [asdict(run) for run in self.runs]}

    def run(self, engine: str, mode: str) -> LatencyRun | None:
        return next((r for r in self.runs if r.engine == engine and r.mode == mode), None)


def bench_prompts(n: int) -> list[tuple[str, int]]:
    """The fixed (prompt, seed) list: the shapes world's test-seen evaluation prompts."""
    from imageragturbo.world.splits import eval_prompts

    return eval_prompts("test-seen", n)


def run_latency_bench(
    pipes: dict[str, object],
    modes: Sequence[str],
    prompts: Sequence[tuple[str, int]],
    *,
    warmup: int = 10,
    k: int = 4,
    machine: dict | None = None,
) -> LatencyResult:
    """Time every (engine, mode) pair on ``prompts`` (batch 1), interleaved (module docstring).

    ``pipes`` maps an engine name to a :class:`~imageragturbo.model.RagTurboPipeline` running
    on that engine (all over the same model and database).
    """
    if not prompts:
        raise ValueError("the latency bench needs at least one prompt")
    pairs = [(engine, mode) for engine in pipes for mode in modes]
    # 1. warm-up: first calls allocate arenas, fill caches and (torch) pick kernels
    for engine, mode in pairs:
        for i in range(warmup):
            prompt, seed = prompts[i % len(prompts)]
            pipes[engine]([prompt], [seed + 1], mode=mode, k=k)
    # 2. measured calls, interleaved
    samples: dict[tuple[str, str], dict[str, list[float]]] = {pair: defaultdict(list) for pair in pairs}
    rng = np.random.default_rng(0)
    for i, (prompt, seed) in enumerate(prompts):
        for index in rng.permutation(len(pairs)):
            engine, mode = pairs[index]
            start = time.perf_counter()
            result = pipes[engine]([prompt], [seed], mode=mode, k=k)
            total_ms = (time.perf_counter() - start) * 1e3
            for stage in STAGES[:-1]:
                samples[(engine, mode)][stage].append(result.timings_ms[stage])
            samples[(engine, mode)]["total"].append(total_ms)
        if (i + 1) % 25 == 0:
            logger.info("latency bench: %d/%d prompts", i + 1, len(prompts))
    runs = [
        LatencyRun(engine, mode, len(prompts), {stage: stage_stats(samples[(engine, mode)][stage]) for stage in STAGES})
        for engine, mode in pairs
    ]
    info = dict(machine or latency_fields(None))
    load = load_average()
    info["load_avg_1m_at_end"] = load[0] if load else None
    # Read at the end too: the workplace may renice a running job.
    info["nice_at_end"] = niceness()
    return LatencyResult(machine=info, runs=runs, protocol={"batch": 1, "warmup": warmup, "k": k, "interleaved": "seeded random order per prompt"})


# -- reporting ---------------------------------------------------------------------------------


def derived_ratios(result: LatencyResult) -> list[str]:
    """The done-when comparisons that can be read off one run, as sentences."""
    lines = []
    modes = sorted({r.mode for r in result.runs})
    for mode in modes:
        torch_run, ort_run = result.run("torch", mode), result.run("onnxruntime", mode)
        if torch_run and ort_run:
            t, o = torch_run.stages["denoise"]["p50_ms"], ort_run.stages["denoise"]["p50_ms"]
            lines.append(f"`{mode}`: onnxruntime denoise p50 {o:.3f} ms vs torch {t:.3f} ms: {t / o:.2f}x faster")
    for engine in dict.fromkeys(r.engine for r in result.runs):
        off, adapter = result.run(engine, "off"), result.run(engine, "adapter")
        if off and adapter:
            a, b = adapter.stages["total"]["p50_ms"], off.stages["total"]["p50_ms"]
            lines.append(
                f"{engine}: `adapter` total p50 {a:.3f} ms vs `off` {b:.3f} ms: {100 * (a / b - 1):+.1f}% "
                f"(retrieve p50 {adapter.stages['retrieve']['p50_ms']:.3f} ms, denoise p50 "
                f"{adapter.stages['denoise']['p50_ms']:.3f} vs {off.stages['denoise']['p50_ms']:.3f} ms)"
            )
    return lines


def render_markdown(result: LatencyResult, png_name: str | None = None, notes: Sequence[str] = ()) -> str:
    m = result.machine
    lines = [
        f"Measured {m.get('date')} on {m.get('cpu')} ({m.get('logical_cores')} logical cores, "
        f"{m.get('threads')} thread(s) per engine{', GPU ' + m['gpu'] if m.get('gpu') else ''}); "
        f"torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}; load average "
        f"{m.get('load_avg_1m_at_start')} at start, {m.get('load_avg_1m_at_end')} at end"
        f"{'; nice ' + str(m['nice_at_end']) + ' at end' if m.get('nice_at_end') is not None else ''}. "
        f"Protocol: {result.runs[0].n} prompts, batch 1, {result.protocol.get('warmup')} warm-up calls per "
        f"engine and mode, k = {result.protocol.get('k')}, engines and modes interleaved per prompt in a seeded random order.",
        "",
        *[f"- {note}" for note in notes],
        *([""] if notes else []),
        *table(
            ["engine", "mode", *(f"{s} p50 (p90)" for s in STAGES), "total mean"],
            (
                [run.engine, run.mode, *(f"{run.stages[s]['p50_ms']:.3f} ({run.stages[s]['p90_ms']:.3f})" for s in STAGES),
                 f"{run.stages['total']['mean_ms']:.3f}"]
                for run in result.runs
            ),
            ["---", "---", *("---:" for _ in STAGES), "---:"],
        ),
    ]
    lines += ["", "All times in ms.", ""]
    lines += [f"- {line}" for line in derived_ratios(result)]
    if png_name:
        lines += ["", f"![per-stage mean latency, stacked]({png_name})"]
    return "\n".join(lines) + "\n"


def plot_stacked(result: LatencyResult, path: str | Path, title: str = "") -> None:
    """A stacked bar per (engine, mode) of the mean stage times, like the paper's Fig. 6;
    'other' is total minus the stages (input checks, noise, postprocessing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.engine}\n{r.mode}" for r in result.runs]
    parts = list(STAGES[:-1]) + ["other"]
    colours = ["#8da0cb", "#fc8d62", "#66c2a5", "#e78ac3", "#b3b3b3"]
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4.2))
    bottom = np.zeros(len(labels))
    for part, colour in zip(parts, colours):
        if part == "other":
            values = np.array(
                [max(0.0, r.stages["total"]["mean_ms"] - sum(r.stages[s]["mean_ms"] for s in STAGES[:-1])) for r in result.runs]
            )
        else:
            values = np.array([r.stages[part]["mean_ms"] for r in result.runs])
        ax.bar(labels, values, bottom=bottom, color=colour, label=part, width=0.6)
        bottom += values
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms / image (mean)")
    ax.set_title(title or "Inference time per image, batch 1")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_report(path: str | Path, generated: str, heading: str = "# Latency") -> None:
    """Put ``generated`` between the report's bench markers, keeping the hand-written rest."""
    update_section(path, REPORT_BEGIN, REPORT_END, generated, preamble=f"{heading}\n")


def summarize_ort_profile(path: str | Path, top: int = 8) -> list[dict]:
    """ONNX Runtime's profile JSON -> the op types that took the most kernel time.

    Returns ``[{"op_type", "ms", "share"}]`` sorted by time; ``ms`` is summed over every call
    the profile recorded (so divide by the number of runs for per-call time).
    """
    events = json.loads(Path(path).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event.get("args", {}).get("op_name", "?")] += event.get("dur", 0) / 1e3
    total = sum(by_op.values()) or 1.0
    ranked = sorted(by_op.items(), key=lambda item: -item[1])[:top]
    return [{"op_type": op, "ms": round(ms, 3), "share": round(ms / total, 4)} for op, ms in ranked]


# -- the whole bench ---------------------------------------------------------------------------


@dataclass
class LatencyBenchOptions:
    """What `imageragturbo bench latency` runs (its flags, by the same names)."""

    model_dir: Path
    engines: list[str]
    modes: list[str]
    n: int
    warmup: int
    k: int
    engine_dir: Path | None
    """Export folder for onnxruntime/tensorrt (exported there first if empty; None: a temporary one)."""
    database: str | None
    """``NAME=DIR``; None: the model's own database, else a temporary one of ``db_size`` world pairs."""
    db_size: int
    threads: int
    ort_optimization: str
    io_binding: bool
    ort_static_shapes: bool
    """Pin onnxruntime's batch and k axes to 1 and ``k`` (the protocol is batch 1)."""
    device: str | None
    """Where the torch modules run (None: IRT_DEVICE, else cpu)."""
    trt_precision: str
    trt_cuda_graph: bool
    profile: int
    """After timing, profile this many calls per engine (0: none)."""
    json: Path
    report: Path | None
    png: Path | None
    notes: list[str]


def check_options(options: LatencyBenchOptions) -> None:
    """Raise BenchError for engines, modes or counts the bench cannot run."""
    from imageragturbo.engines.protocol import ENGINE_KINDS

    for engine in options.engines:
        if engine not in ENGINE_KINDS:
            raise BenchError(f"unknown engine {engine!r}; choose from {', '.join(ENGINE_KINDS)}")
    for mode in options.modes:
        if mode not in MODES:
            raise BenchError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if options.n < 1 or options.warmup < 0 or options.threads < 1:
        raise BenchError(
            f"--n and --threads must be >= 1 and --warmup >= 0, got {options.n}, {options.threads}, {options.warmup}"
        )


def run(options: LatencyBenchOptions) -> LatencyResult:
    """The bench end to end; writes ``options.json`` and, with ``options.report``, the report
    section and the figure (``options.png``, default ``latency.png`` beside the report)."""
    import torch

    from imageragturbo.engines.export import MANIFEST_NAME, export_model
    from imageragturbo.engines.pipeline_engines import use_engine
    from imageragturbo.model import RagTurboPipeline
    from imageragturbo.model.pipeline import open_pipeline

    check_options(options)
    torch.set_num_threads(options.threads)
    model_dir = options.model_dir
    torch_pipe = open_pipeline(model_dir, databases=[options.database] if options.database else None, device=options.device)
    components = torch_pipe.components
    if "adapter" in options.modes and components.adapter is None:
        raise BenchError(f"mode 'adapter' needs a model with an adapter/ folder; {model_dir} has none")
    machine = latency_fields(options.threads)

    with tempfile.TemporaryDirectory(prefix="irt-latency-") as tmp:
        work = Path(tmp)
        database, database_desc = _database(torch_pipe, options.db_size, work)
        engine_dir = options.engine_dir or work / "onnx"
        if any(e in ("onnxruntime", "tensorrt") for e in options.engines) and not (engine_dir / MANIFEST_NAME).is_file():
            print(f"exporting the model to {engine_dir} ...", file=sys.stderr)
            export_model(components, engine_dir)
        engine_options = _engine_options(options)
        pipes = {}
        for engine in options.engines:
            pipes[engine] = RagTurboPipeline(components, [database])
            use_engine(pipes[engine], engine, engine_dir, **engine_options.get(engine, {}))
        prompts = bench_prompts(options.n)
        result = run_latency_bench(pipes, options.modes, prompts, warmup=options.warmup, k=options.k, machine=machine)
        result.protocol.update(
            model_dir=str(model_dir), model_id=components.model_id, database=database_desc,
            database_size=len(database.store), prompts="shapes world test-seen eval_prompts",
            ort_optimization=options.ort_optimization, io_binding=options.io_binding,
            ort_static_shapes=options.ort_static_shapes,
        )
        profile = None
        if options.profile:
            profile = profile_ops(pipes, engine_options["onnxruntime"], engine_dir, options.modes, prompts[: options.profile],
                                  options.k, work)
    _write(result, profile, options, database_desc)
    return result


def _engine_options(options: LatencyBenchOptions) -> dict[str, dict]:
    """Per engine kind, what load_pipeline_engines gets besides the export."""
    from imageragturbo.engines.tensorrt_engine import TrtBuildSpec

    return {
        "onnxruntime": {
            "threads": options.threads,
            "optimization": options.ort_optimization,
            "io_binding": options.io_binding,
            "static_sizes": {"batch": 1, "k": options.k} if options.ort_static_shapes else None,
        },
        "tensorrt": {
            "build": TrtBuildSpec(precision=options.trt_precision, batch_ranges=((1, 1, 1),), k_range=(options.k,) * 3),
            "cuda_graph": options.trt_cuda_graph,
        },
    }


def _database(pipe, db_size: int, work: Path):
    """(the database, how the report describes it): the pipeline's first database, or, when
    the model has none, a temporary one of ``db_size`` world pairs built here."""
    from imageragturbo.retrieval.build import build_database
    from imageragturbo.retrieval.disk import load_database
    from imageragturbo.retrieval.pairs import WorldPairs

    if pipe.databases:
        database = pipe.databases.resolve()
        return database, str(database.store.path)
    path = work / "index"
    build_database(pipe, WorldPairs(db_size), path, progress=False)
    return load_database("world", path), f"a temporary index of {db_size} shapes-world database pairs"


def _write(result: LatencyResult, profile: dict | None, options: LatencyBenchOptions, database_desc: str) -> None:
    data = result.to_dict()
    if profile:
        data["profile"] = profile
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(data, indent=2))
    if not options.report:
        return
    report, model_dir = options.report, Path(options.model_dir)
    png = options.png or report.with_name("latency.png")
    plot_stacked(result, png, title=f"{model_dir.name}: ms/image, batch 1 ({options.threads} thread(s))")
    notes = [f"model: `{model_dir}` (id {result.protocol['model_id']}); database: {database_desc}", *options.notes]
    markdown = render_markdown(result, png_name=Path(png).name if png.parent == report.parent else str(png), notes=notes)
    if profile:
        markdown += "\n" + profile_markdown(profile, options.profile, len(options.modes))
    update_report(report, markdown)


# -- profiling -----------------------------------------------------------------------------------


def profile_ops(pipes: dict, ort_options: dict, engine_dir: Path, modes, prompts, k: int, work: Path) -> dict:
    """Untimed: per-op breakdown of the ONNX Runtime graphs and of torch's whole pipeline call,
    over ``prompts`` in every mode."""
    import torch

    from imageragturbo.engines.pipeline_engines import load_pipeline_engines
    from imageragturbo.model import RagTurboPipeline

    out: dict = {}
    if "torch" in pipes:
        pipe = pipes["torch"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for mode in modes:
                for prompt, seed in prompts:
                    pipe([prompt], [seed], mode=mode, k=k)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1
        ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
        out["torch"] = [
            {"op": e.key, "ms": round(e.self_cpu_time_total / 1e3, 3), "share": round(e.self_cpu_time_total / total, 4)}
            for e in ranked
        ]
    if "onnxruntime" in pipes:
        reference = pipes["onnxruntime"]
        engines = load_pipeline_engines("onnxruntime", engine_dir, reference.components,
                                        profile_prefix=str(work / "ort_profile"), **ort_options)
        pipe = RagTurboPipeline(reference.components, list(reference.databases.values()), engines=engines)
        for mode in modes:
            for prompt, seed in prompts:
                pipe([prompt], [seed], mode=mode, k=k)
        out["onnxruntime"] = {
            name: summarize_ort_profile(engine.end_profiling()) for name, engine in engines.engines.items()
        }
    return out


def profile_markdown(profile: dict, n: int, n_modes: int) -> str:
    """The top operators of :func:`profile_ops`, per call, as report lines."""
    calls = n * n_modes
    lines = [f"Top operators over {calls} profiled calls (ms per call; share of the graph's kernel time):", ""]
    if "torch" in profile:
        cells = ", ".join(f"{p['op']} {p['ms'] / calls:.3f} ({100 * p['share']:.0f}%)" for p in profile["torch"][:6])
        lines.append(f"- torch (whole pipeline call, self CPU time): {cells}")
    for graph, ops in profile.get("onnxruntime", {}).items():
        if not ops:  # a graph the profiled modes never ran
            continue
        per_call = calls if graph in ("text_encoder", "vae_decode") else n
        cells = ", ".join(f"{p['op_type']} {p['ms'] / per_call:.3f} ({100 * p['share']:.0f}%)" for p in ops[:6])
        lines.append(f"- onnxruntime `{graph}`: {cells}")
    return "\n".join(lines) + "\n"
