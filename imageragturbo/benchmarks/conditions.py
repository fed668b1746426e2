"""What else held the machine during a run: load average, niceness and the other busy processes.

On a shared machine other jobs (and their niceness relative to ours) decide much of a latency,
so the HTTP benches record them next to their numbers (from /proc; empty where there is none).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_snapshot() -> tuple[float, dict[int, tuple[int, int]]]:
    """(monotonic time, {pid: (nice, user+system clock ticks)}) of every process, from /proc
    (empty where there is no /proc)."""
    now = time.monotonic()
    processes: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # Fields after the parenthesised command name: state is [0], utime [11], stime [12], nice [16].
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            processes[int(entry.name)] = (int(fields[16]), int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue  # gone since the listing, or not a process
    return now, processes


def other_busy_processes(start: tuple[float, dict], end: tuple[float, dict], exclude: set[int]) -> list[dict]:
    """Processes other than ``exclude`` that used >= 10% of a core between two snapshots: their
    niceness and CPU share (what the server competed with)."""
    (t0, before), (t1, after) = start, end
    ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = []
    for pid, (nice, ticks) in after.items():
        if pid in exclude or pid not in before or t1 <= t0:
            continue
        share = (ticks - before[pid][1]) / ticks_per_s / (t1 - t0)
        if share >= 0.1:
            busy.append({"pid": pid, "nice": nice, "cpu_pct": round(100 * share, 1)})
    return sorted(busy, key=lambda p: -p["cpu_pct"])


def run_conditions(server_pid: int | None = None, start_snapshot: tuple[float, dict] | None = None) -> dict:
    """Load average, scheduling priorities and the other busy processes at the end of a run: on
    a shared machine other jobs (and their niceness relative to ours) decide much of a latency."""
    conditions: dict = {"load_avg_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if start_snapshot is not None:
        own = {os.getpid()} | ({server_pid} if server_pid is not None else set())
        conditions["other_busy"] = other_busy_processes(start_snapshot, cpu_snapshot(), own)
    for who, pid in (("client", 0), ("server", server_pid)):
        if pid is None:
            continue
        try:
            conditions[f"nice_{who}"] = os.getpriority(os.PRIO_PROCESS, pid)
        except OSError:  # the server already exited
            pass
    return conditions


def describe_conditions(conditions: dict) -> str:
    """The niceness and the other busy processes of :func:`run_conditions`, as a phrase for a report."""
    nice = [f"{who} {conditions[f'nice_{who}']}" for who in ("client", "server") if f"nice_{who}" in conditions]
    text = "nice at end: " + ", ".join(nice) if nice else "niceness not recorded"
    if "other_busy" in conditions:
        others = conditions["other_busy"]
        listed = ", ".join(f"{p['cpu_pct']:.0f}% at nice {p['nice']}" for p in others)
        text += f"; other processes over 10% of a core during the run: {listed or 'none'}"
    return text
