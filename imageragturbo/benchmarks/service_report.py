"""What `imageragturbo bench service` writes: its section of results/service.md, and the JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from imageragturbo.benchmarks.conditions import describe_conditions
from imageragturbo.benchmarks.report import update_section

if TYPE_CHECKING:
    from imageragturbo.benchmarks.service import ServiceBenchResult

RESULTS_PREAMBLE = """# HTTP service benchmark

`imageragturbo bench service`: closed-loop load on loopback (each client thread keeps one request
in flight), against a server started by the bench in its own process. Latencies are as the
client sees them; *pipeline p50* is the sum of the pipeline stages the server reports in
`Server-Timing` (for a batched request: its batch's stage times). *Server overhead* at
concurrency 1 is given two ways: HTTP p50 minus pipeline p50, and the p50 over requests of each
request's HTTP time minus its own pipeline time (HTTP, validation, the hand-offs to and from the
worker, PNG encoding and the Python client itself). Reproduce with the command under each table.
"""


def render_markdown(result: ServiceBenchResult, settings_note: str) -> str:
    lines = [
        f"### {result.model}",
        "",
        f"Machine: {result.machine['cpu']}, {result.machine['cores']} cores (shared with other jobs; load "
        f"average at start {result.machine['load_avg_at_start']}, at end "
        f"{result.conditions.get('load_avg_at_end')}; {describe_conditions(result.conditions)}). Server: {settings_note}; engine "
        f"{result.server.get('engine')} with {result.server.get('threads')} intra-op thread(s); modes "
        f"{result.server.get('modes')}, default {result.server.get('default_mode')}; databases "
        f"{result.server.get('databases')}. Request body besides prompt and seed: `{json.dumps(result.request)}`.",
        "",
        "| concurrency | n | ok | errors | throughput (req/s) | p50 (ms) | p99 (ms) | pipeline p50 (ms) | queue wait p50 (ms) | mean batch |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in result.levels:
        errors = ", ".join(f"{k}: {v}" for k, v in level.errors.items()) or "0"
        lines.append(
            f"| {level.concurrency} | {level.n} | {level.ok} | {errors} | {level.throughput_rps:.1f} | {level.p50_ms:.2f} | "
            f"{level.p99_ms:.2f} | {level.pipeline_p50_ms:.2f} | {level.queue_wait_p50_ms:.2f} | {level.mean_batch_size:.2f} |"
        )
    lines.append("")
    if result.overhead_p50_ms is not None:
        lines.append(f"- Server overhead at concurrency 1 (HTTP p50 − pipeline p50): **{result.overhead_p50_ms:.2f} ms**.")
        c1 = next(level for level in result.levels if level.concurrency == 1)
        lines.append(
            f"- Per-request server overhead at concurrency 1 (p50 over requests of HTTP time − that request's "
            f"pipeline time): **{c1.overhead_p50_ms:.2f} ms** (p90 {c1.overhead_p90_ms:.2f} ms)."
        )
    if result.speedup_c8_over_c1 is not None:
        lines.append(f"- Throughput at concurrency 8 / concurrency 1: **{result.speedup_c8_over_c1:.2f}×**.")
    lines.append("")
    return "\n".join(lines)


def update_markdown(path: Path, section_id: str, section: str, preamble: str) -> None:
    """Replace (or append) one model's section in the results page, keeping the others."""
    update_section(path, f"<!-- bench:{section_id} -->", f"<!-- /bench:{section_id} -->", section, preamble)


def result_to_json(result: ServiceBenchResult) -> str:
    return json.dumps(asdict(result), indent=2)
