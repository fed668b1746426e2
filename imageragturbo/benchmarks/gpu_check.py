"""The GPU check: one run that, on a GPU host with PyTorch and this project installed (nothing
fetched from the network), runs the ``gpu``-marked tests and the paper's latency protocol at
SD-Turbo scale, and writes ``latency-gpu.md`` + JSON with a short table printed last.

Steps, each timed:
1. ``pytest -m gpu`` (skipped with ``tests=False``);
2. an SD-Turbo-layout model with random weights (``model/random_model.py``; ``toy``: the same
   families shrunk) and a synthetic database of ``db_rows`` rows with its real shapes;
3. ``bench latency``'s protocol (batch 1, ``n`` prompts, per-stage times) for each engine that
   can run here: ``torch`` eager and ``torch-compile`` in the device's precision (fp16 on CUDA),
   and ``onnxruntime`` / ``tensorrt`` where installed, modes ``off`` and ``adapter``.

On the CPU the toy run finishes in seconds; the test suite runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from imageragturbo.benchmarks.report import update_section

NEEDS = ("torch (with CUDA)", "diffusers", "transformers", "safetensors", "numpy", "onnx", "onnxruntime-gpu (optional)",
         "tensorrt-cu12 (optional)", "pytest (for step 1)")
"""What the run imports beyond the standard library; the README lists the pinned versions."""


@dataclass
class GpuCheckOptions:
    out: Path
    """Folder for latency-gpu.md, latency-gpu.json and the scratch model and database."""
    device: str | None = None
    """None: cuda when available, else cpu."""
    toy: bool = False
    tests: bool = True
    n: int = 100
    db_rows: int = 20_000
    engines: tuple[str, ...] | None = None
    """None: torch, torch-compile, and onnxruntime / tensorrt where installed (the toy run: torch)."""
    work: Path | None = None
    timings_s: dict[str, float] = field(default_factory=dict)


def _engines(device: str, toy: bool) -> tuple[str, ...]:
    if toy:
        return ("torch",)
    engines = ["torch", "torch-compile"]
    if device.startswith("cuda") and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            engines.append("onnxruntime")
    if device.startswith("cuda") and importlib.util.find_spec("tensorrt") is not None:
        engines.append("tensorrt")
    return tuple(engines)


def run_gpu_check(options: GpuCheckOptions) -> dict:
    import torch

    from imageragturbo.benchmarks import latency
    from imageragturbo.benchmarks.synthetic import build_synthetic_database
    from imageragturbo.model.random_model import write_random_model

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "float16" if device.startswith("cuda") else "float32"
    out = Path(options.out)
    work = Path(options.work or out / "gpu-check-work")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    result: dict = {"device": device, "dtype": dtype, "toy": options.toy, "steps_s": timings}

    def step(name: str):
        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()
                print(f"gpu check: {name} ...", file=sys.stderr, flush=True)

            def __exit__(self, *exc):
                timings[name] = round(time.perf_counter() - self.start, 1)

        return _Timer()

    if options.tests:
        with step("gpu tests"):
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                                  capture_output=True, text=True)
            result["gpu_tests"] = {"returncode": done.returncode, "summary": (done.stdout.strip().splitlines() or [""])[-1]}
    model_dir = work / ("toy-model" if options.toy else "sd-turbo-random")
    with step("model"):
        if not (model_dir / "model_index.json").is_file():
            write_random_model(model_dir, toy=options.toy, overwrite=True)
    db = model_dir / "databases" / "synthetic"
    with step("database"):
        if not (db / "manifest.json").is_file():
            build_synthetic_database(model_dir, options.db_rows, db, overwrite=True, progress=False)
    engines = options.engines or _engines(device, options.toy)
    saved_dtype = os.environ.get("IRT_DTYPE")
    os.environ["IRT_DTYPE"] = dtype  # the pipeline's precision: fp16 on CUDA
    try:
        with step("latency"):
            bench = latency.run(latency.LatencyBenchOptions(
                model_dir=model_dir, engines=list(engines), modes=["off", "adapter"], n=options.n,
                warmup=min(10, options.n), k=4, engine_dir=work / "onnx", database=f"synthetic={db}",
                db_size=options.db_rows, threads=1, ort_optimization="all", io_binding=True, ort_static_shapes=True,
                device=device, trt_precision="fp16", trt_cuda_graph=True, profile=0, json=out / "latency-gpu.json",
                report=None, png=None, notes=[],
            ))
    finally:
        if saved_dtype is None:
            os.environ.pop("IRT_DTYPE", None)
        else:
            os.environ["IRT_DTYPE"] = saved_dtype
    rows = _rows(bench)
    result.update(engines=list(engines), rows=rows, db_rows=options.db_rows, n=options.n, machine=bench.machine)
    (out / "latency-gpu-check.json").write_text(json.dumps(result, indent=2, default=str))
    update_section(out / "latency-gpu.md", "<!-- gpu-check -->", "<!-- /gpu-check -->", _markdown(result),
                   "# Latency on a GPU: the paper's protocol at SD-Turbo scale\n")
    print(_table(result))
    return result


def _rows(bench) -> list[dict]:
    """(engine, mode) -> per-stage ms/image and the total, from the latency bench's result."""
    return [
        {"engine": run.engine, "mode": run.mode, "total_ms": round(run.stages["total"]["p50_ms"], 3),
         **{name: round(stage["p50_ms"], 3) for name, stage in run.stages.items() if name != "total"}}
        for run in bench.runs
    ]


def _table(result: dict) -> str:
    lines = [f"GPU check (p50 ms per image) on {result['device']} ({result['dtype']}), {result['n']} prompts, batch 1, "
             f"database {result['db_rows']} rows" + (" [toy scale]" if result["toy"] else "")]
    lines.append(f"{'engine':<14}{'mode':<9}{'total ms':>10}{'retrieve':>10}{'denoise':>10}{'vae':>8}")
    for r in result["rows"]:
        lines.append(f"{r['engine']:<14}{r['mode']:<9}{r['total_ms']:>10.2f}{r.get('retrieve', 0):>10.2f}"
                     f"{r.get('denoise', 0):>10.2f}{r.get('vae_decode', 0):>8.2f}")
    by = {(r["engine"], r["mode"]): r["total_ms"] for r in result["rows"]}
    for engine in dict.fromkeys(r["engine"] for r in result["rows"]):
        if (engine, "off") in by and (engine, "adapter") in by:
            lines.append(f"{engine}: adapter over off {100 * (by[engine, 'adapter'] / by[engine, 'off'] - 1):+.1f}% "
                         "(the paper's target: within 2.5%)")
    if "gpu_tests" in result:
        lines.append(f"gpu tests: {result['gpu_tests']['summary']} (exit {result['gpu_tests']['returncode']})")
    lines.append("steps (s): " + ", ".join(f"{k} {v}" for k, v in result["steps_s"].items()))
    return "\n".join(lines)


def _markdown(result: dict) -> str:
    head = ["| engine | mode | total p50 ms/image | " + " | ".join(s for s in ("text_encode", "retrieve", "denoise", "vae_decode")) + " |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    body = [f"| {r['engine']} | {r['mode']} | {r['total_ms']:.2f} | " +
            " | ".join(f"{r.get(s, 0):.2f}" for s in ("text_encode", "retrieve", "denoise", "vae_decode")) + " |"
            for r in result["rows"]]
    machine = result.get("machine", {})
    return "\n".join([
        f"Measured by `imageragturbo bench gpu-check` on {machine.get('gpu') or machine.get('cpu') or result['device']}"
        f" ({result['device']}, {result['dtype']}); {result['n']} prompts at batch 1; a synthetic database of "
        f"{result['db_rows']} rows of SD-Turbo's shapes" + (" (toy scale)" if result["toy"] else "") + ".",
        "", *head, *body, "", "```", _table(result), "```",
    ])
