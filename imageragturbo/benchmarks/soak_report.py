"""What `imageragturbo bench soak` prints and writes: its tables, and its section of results/soak.md."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from imageragturbo.benchmarks.conditions import describe_conditions
from imageragturbo.benchmarks.report import table, update_section
from imageragturbo.benchmarks.soak_clients import KINDS, SCHEDULE

if TYPE_CHECKING:
    from imageragturbo.benchmarks.soak import SoakResult

PREAMBLE = """# Soak: a bounded load with faults, and a SIGTERM

`imageragturbo bench soak` starts `imageragturbo serve` in its own process on loopback and sends
it a fixed number of requests from a few client threads (one request in flight each): 12 normal
requests in 20, and in each 20 one of every fault (malformed JSON, wrong types, a prompt over
the limit, a body over the cap, an unknown database, a client that hangs up in the middle of its
body, one that hangs up while its request waits, one that sends its headers a line at a time).
Every answer is counted by what it was: a normal answer (a normal request's 200, or a slow
client's that the server waited for), what a fault was meant to cause, or unexpected. The
server's RSS is read from /proc at a quarter of the requests and at the end. Then twice as many
normal requests as clients are written on fresh connections and the server gets SIGTERM: each
must still be answered (*lost*: written, never answered). Targets (issue #18): no 5xx but those
a fault caused on purpose, none lost at SIGTERM, RSS growth at most 2% from a quarter of the
requests to all of them. Reproduce with the command under each section.
"""


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.1f}" if value else "n/a"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _counts(counts: dict) -> str:
    return ", ".join(f"{outcome}: {count:g}" for outcome, count in sorted(counts.items())) or "none"


def render_markdown(result: SoakResult) -> str:
    machine, server, settings, sigterm = result.machine, result.server, result.settings, result.sigterm
    lines = [
        f"### {result.model}: {result.requests:,} requests at concurrency {result.concurrency}",
        "",
        f"Measured {result.date or 'n/a'} (code {result.code or 'n/a'}). "
        f"Machine: {machine['cpu']}, {machine['cores']} cores (shared with other jobs; load average at start "
        f"{machine['load_avg_at_start']}, at the end of the load {result.conditions.get('load_avg_at_end')}; "
        f"{describe_conditions(result.conditions)}). Server: `imageragturbo serve` started by the bench, engine "
        f"{server.get('engine')} with {server.get('threads')} intra-op thread(s), modes {server.get('modes')} "
        f"(default {server.get('default_mode')}), databases {server.get('databases')}; settings "
        + ", ".join(f"{name} {value}" for name, value in settings.items())
        + f". The load took {result.wall_s:g} s.",
        "",
    ]
    by_class = result.by_class()
    rows = [[outcome, row["normal"], row["on purpose"], row["unexpected"], sum(row.values())]
            for outcome, row in by_class.items()]
    totals = [sum(row[i] for row in rows) for i in range(1, 5)]
    lines += table(["answer", "normal answer", "caused on purpose", "unexpected", "all"],
                   rows + [["**all**", *totals]], ["---", "---:", "---:", "---:", "---:"])
    lines.append("")
    per_kind = len(SCHEDULE)
    kind_rows = [[f"`{name}`", kind.what, f"{SCHEDULE.count(name)} in {per_kind}",
                  sum(result.outcomes.get(name, {}).values()), _counts(result.outcomes.get(name, {}))]
                 for name, kind in KINDS.items()]
    lines += table(["request", "what it sends", "share", "sent", "answers"], kind_rows,
                   ["---", "---", "---:", "---:", "---"])
    lines.append("")
    first, last = (result.rss_checkpoints[0], result.rss_checkpoints[-1]) if result.rss_checkpoints else ({}, {})
    growth = f"{result.rss_growth_pct:+.2f}%" if result.rss_growth_pct is not None else "n/a"
    unexpected_5xx = sum(n for outcome, n in result.unexpected().items() if outcome.startswith("5"))
    met = {name: _met(result.targets.get(name, False))
           for name in ("no_unexpected_5xx", "none_lost_at_sigterm", "rss_growth_within_target")}
    measures = [
        ["normal requests answered 200", f"{result.normal_ok:,}", ""],
        ["their latency p50 / p99 (ms)", f"{result.normal_p50_ms} / {result.normal_p99_ms}", ""],
        [f"server RSS at {first.get('requests', 0):,} requests (MiB)", _mib(first.get("rss_bytes")), ""],
        [f"server RSS at {last.get('requests', 0):,} requests (MiB)", _mib(last.get("rss_bytes")), ""],
        ["RSS growth between them", growth, f"≤ 2%: {met['rss_growth_within_target']}"],
        ["unexpected 5xx (load and SIGTERM)", unexpected_5xx, f"0: {met['no_unexpected_5xx']}"],
        ["requests in flight at SIGTERM (written whole)",
         f"{sigterm.in_flight} ({sigterm.answered_after_signal} answered after the signal)", ""],
        ["requests lost at SIGTERM (written, never answered)", sigterm.lost, f"0: {met['none_lost_at_sigterm']}"],
    ]
    lines += table(["measure", "value", "target"], measures, ["---", "---:", "---"])
    lines += [
        "",
        f"- Answers to the SIGTERM's requests: {_counts(sigterm.outcomes)}. New connections were refused "
        f"{sigterm.refused_new_after_s} s after the signal; the server exited with status {sigterm.exit_code} "
        f"after {sigterm.exit_s} s"
        + (" (uvicorn re-raises the SIGTERM once its graceful shutdown is done)." if sigterm.exit_code == -15 else "."),
        f"- The server's own count over the load (`irt_requests_total` by status): {_counts(result.server_counts)}.",
        "",
    ]
    return "\n".join(lines)


def update_page(path: Path, result: SoakResult, command: str) -> None:
    """Replace (or append) the model's section of the results page, keeping the others."""
    section_id = f"soak:{result.model}"
    body = render_markdown(result) + f"\nCommand: `{command}`\n"
    update_section(path, f"<!-- bench:{section_id} -->", f"<!-- /bench:{section_id} -->", body, PREAMBLE)
