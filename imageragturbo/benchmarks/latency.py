"""The latency protocol of the paper's Fig. 6: the same prompts, batch 1, after warm-up, per stage.

For every (engine, mode) pair the same ``n`` prompts run one at a time; each call's stage
timings (``text_encode``, ``retrieve``, ``denoise``, ``vae_decode``: the pipeline's own clock)
and its wall time (``total``: the whole pipeline call, input checks and postprocessing
included) are recorded, and mean / p50 / p90 reported in milliseconds.

The pairs are *interleaved*: prompt i runs on every pair before prompt i+1, in a seeded random
order per prompt. On a shared machine a burst of background load then hits every pair alike
instead of whichever happened to run during it, which is what makes ratios measured in one
run (ORT vs torch, adapter vs off) trustworthy. The order is random rather than rotated
because a rotation of (engine, mode) pairs puts ``adapter`` right after ``off`` of the same
engine three times in four, so ``adapter`` found that engine's text encoder and VAE (and, for
torch, the shared UNet weights) warm in cache while ``off`` always followed the other engine:
on shapes-v1 that made ``text_encode`` ~0.14 ms faster in ``adapter`` mode than in ``off`` mode
(the same code), understating the adapter's cost.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imageragturbo.eval.machine import describe_machine, load_average, niceness

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


def machine_info(threads: int | None) -> dict:
    """What the numbers were measured on, including the load at the time (a shared machine)."""
    m = describe_machine(("torch", "onnxruntime"), gpu=True)
    return {
        "cpu": m.cpu,
        "logical_cores": m.logical_cores,
        "threads": threads,
        "platform": m.platform,
        "python": m.python,
        "torch": m.versions["torch"],
        "onnxruntime": m.versions["onnxruntime"],
        "gpu": m.gpu,
        "date": m.date,
        "nice": m.nice,
        "load_avg_1m_at_start": m.load_avg[0] if m.load_avg else None,
    }


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
    info = dict(machine or machine_info(None))
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
        "| engine | mode | " + " | ".join(f"{s} p50 (p90)" for s in STAGES) + " | total mean |",
        "| --- | --- | " + " | ".join("---:" for _ in STAGES) + " | ---: |",
    ]
    for run in result.runs:
        cells = [f"{run.stages[s]['p50_ms']:.3f} ({run.stages[s]['p90_ms']:.3f})" for s in STAGES]
        lines.append(f"| {run.engine} | {run.mode} | " + " | ".join(cells) + f" | {run.stages['total']['mean_ms']:.3f} |")
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
    path = Path(path)
    block = f"{REPORT_BEGIN}\n{generated.rstrip()}\n{REPORT_END}"
    if path.is_file():
        text = path.read_text()
        if REPORT_BEGIN in text and REPORT_END in text:
            before, rest = text.split(REPORT_BEGIN, 1)
            after = rest.split(REPORT_END, 1)[1]
            path.write_text(before + block + after)
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{heading}\n\n{block}\n")


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
